"""Data-parallel training of the domain encoder and the dynamics model under ``torchrun``.

Usage::

    torchrun --nproc-per-node 2 -m chronotope.distributed_train domains IN.h5ad -o DIR
    torchrun --nproc-per-node 2 -m chronotope.distributed_train dynamics IN.h5ad -o DIR \\
        --time-key time --use-rep X_pca

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; this module
starts the process group from them (``gloo`` on CPU, ``nccl`` with ``--device cuda``, each
process on ``cuda:LOCAL_RANK``), prepares the inputs on every process (deterministic,
seeded), trains with every global mini-batch sharded over the processes (see
:mod:`chronotope._ddp`) and lets rank 0 alone write ``DIR/model/`` (the saved model) and
``DIR/history.json`` (the loss curve, the number of processes, seconds). Run without
``torchrun`` (``python -m chronotope.distributed_train ...``) it trains in one process
and writes the same files, which is how the two are compared.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from chronotope._atomic import save_json

__all__ = ["main", "train_domains", "train_dynamics"]

logger = logging.getLogger("chronotope")


def _init_group(device: str) -> tuple[int, int, str]:
    """Start the process group when launched by torchrun; ``(rank, world, device)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    import torch
    import torch.distributed as dist

    cuda = device.startswith("cuda")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def _finish(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


def train_domains(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    n_top_genes: int = 3000,
    n_comps: int = 100,
    n_neighbors: int = 6,
    batch_key: str | None = None,
    device: str = "cpu",
    **model_params: Any,
) -> dict[str, Any]:
    """Train :class:`chronotope.domains.DomainModel` on ``path`` (one or all processes).

    The inputs are those of :func:`chronotope.tl.spatial_domains` (highly variable genes,
    log-normalised PCA, spatial graph). Returns the record written to
    ``out/history.json`` (by rank 0 only; the model goes to ``out/model``).
    """
    import scipy.sparse as sp

    from chronotope import pp
    from chronotope.domains.model import DomainModel
    from chronotope.io import read_h5ad
    from chronotope.tl._domains import _preprocess_selected

    rank, world, device = _init_group(device)
    tic = time.perf_counter()
    adata = read_h5ad(path)
    _preprocess_selected(adata, None, n_top_genes, n_comps, batch_key, model_params.get("seed", 0))
    genes = adata.var["highly_variable"].to_numpy(dtype=bool)
    scores = np.asarray(adata.obsm["X_pca"], dtype=np.float32)
    loadings = np.asarray(adata.varm["PCs"], dtype=np.float32)[genes]
    pp.spatial_neighbors(adata, n_neighbors=n_neighbors, library_key=batch_key)
    conn = sp.csr_matrix(adata.obsp["spatial_connectivities"])
    model = DomainModel(device=device, progress=rank == 0, **model_params)
    model.fit(scores, loadings, conn, var_names=adata.var_names[genes].to_numpy())
    record = {
        "model": "domains",
        "processes": world,
        "n_obs": int(adata.n_obs),
        "history": model.history_,
        "loss": [float(sum(h.values())) for h in model.history_],
        "seconds": time.perf_counter() - tic,
    }
    if rank == 0:
        out = Path(out)
        model.save(out / "model", overwrite=True)
        save_json(record, out / "history.json")
    _finish(world)
    return record


def train_dynamics(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    time_key: str = "time",
    use_rep: str = "X_pca",
    device: str = "cpu",
    **params: Any,
) -> dict[str, Any]:
    """Train :class:`chronotope.dynamics.DynamicsModel` on ``path`` (one or all processes).

    Cells in ``obsm[use_rep]`` (or ``.X`` for ``"X"``) with times in ``obs[time_key]``.
    Returns the record written to ``out/history.json`` (rank 0; model in ``out/model``).
    """
    from chronotope.dynamics.model import DynamicsModel, DynamicsParams
    from chronotope.io import read_h5ad
    from chronotope.tl._dynamics import read_snapshots

    rank, world, device = _init_group(device)
    tic = time.perf_counter()
    adata = read_h5ad(path, check_nonnegative=False)
    x, t = read_snapshots(adata, time_key, use_rep)
    model = DynamicsModel(
        DynamicsParams(**params), use_rep=use_rep, time_key=time_key, device=device
    )
    model.fit(x, t, progress=rank == 0)
    record = {
        "model": "dynamics",
        "processes": world,
        "n_obs": int(adata.n_obs),
        "history": {k: v.tolist() for k, v in model.history_.items()},
        "loss": model.history_["loss"].tolist(),
        "seconds": time.perf_counter() - tic,
    }
    if rank == 0:
        out = Path(out)
        model.save(out / "model", overwrite=True)
        save_json(record, out / "history.json")
    _finish(world)
    return record


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``domains`` or ``dynamics`` IN.h5ad -o DIR [options]."""
    ap = argparse.ArgumentParser(
        prog="python -m chronotope.distributed_train",
        description="Data-parallel training under torchrun (see module docstring).",
    )
    sub = ap.add_subparsers(dest="what", required=True)
    dom = sub.add_parser("domains", help="domain encoder (DomainModel)")
    dyn = sub.add_parser("dynamics", help="dynamics model (DynamicsModel)")
    for p in (dom, dyn):
        p.add_argument("input", help="h5ad file")
        p.add_argument("-o", "--out", required=True, help="output folder (rank 0 writes)")
        p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--batch-size", type=int, default=None)
        p.add_argument("--learning-rate", type=float, default=None)
    dom.add_argument("--n-top-genes", type=int, default=3000)
    dom.add_argument("--n-comps", type=int, default=100)
    dom.add_argument("--n-neighbors", type=int, default=6)
    dom.add_argument("--batch-key", default=None)
    dom.add_argument("--max-epochs", type=int, default=None)
    dom.add_argument("--n-hops", type=int, default=None)
    dom.add_argument("--n-latent", type=int, default=None)
    dyn.add_argument("--time-key", default="time")
    dyn.add_argument("--use-rep", default="X_pca")
    dyn.add_argument("--n-steps", type=int, default=None)
    dyn.add_argument("--hidden", type=int, default=None)
    dyn.add_argument("--sigma", type=float, default=None)
    args = vars(ap.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    what, path, out = args.pop("what"), args.pop("input"), args.pop("out")
    opts = {k: v for k, v in args.items() if v is not None}
    record = (train_domains if what == "domains" else train_dynamics)(path, out, **opts)
    if int(os.environ.get("RANK", "0")) == 0:
        logger.info(
            "%s: %d processes, %d epochs/steps, final loss %.6f, %.1f s -> %s",
            what,
            record["processes"],
            len(record["loss"]),
            record["loss"][-1],
            record["seconds"],
            out,
        )
        logger.debug(json.dumps(record["loss"]))


if __name__ == "__main__":
    main()
