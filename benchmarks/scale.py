"""Scale-out proof: a synthetic atlas-sized tissue tiled from real DLPFC profiles.

The tissue: DLPFC slice 151673 (``chronotope.datasets.dlpfc``), its ``--genes`` most
expressed genes, rasterised onto a square bin lattice at half the Visium spot pitch
(Stereo-seq-like bins; each bin takes the profile of its nearest spot, so the cortical
layers stay contiguous spatial domains with their neighbourhoods), the slice repeated
side by side on one seamless lattice until ``--spots`` bins, and every count thinned
binomially to a mean of ``--depth`` UMIs per tissue bin (sparse, like Stereo-seq). Bins
off the tissue are kept as background (1 % of a random profile), so the lattice is a full
rectangle and the diffusion kernel is an FFT convolution. Written once to an ``.h5ad``.

Steps (each in its own fresh process, so that the peak RSS is the step's own; for
``local:2`` the figure is the peak of the sum over the process and its Dask workers):

- ``graph``: 6-nearest-neighbour spatial graph of all bins (coordinates read in backed
  mode, ``chronotope.io.read_h5ad_backed``);
- ``domains``: the domain encoder trained on a spatially contiguous subsample
  (``--train-spots``), then the embedding of every bin: counts read in row chunks
  (``chronotope.io.read_h5ad_chunks``), log-normalised and projected on the training
  PCA chunk by chunk, hop stack over the full graph, tiles through ``scheduler``;
- ``undiffuse``: the diffusion correction (per-gene Richardson-Lucy EM,
  ``chronotope.undiffuse.em_deconvolve``, gene batches through ``scheduler``) of all
  ``--genes`` genes with GIVEN parameters (sigma 1.5 spacings, bleed 0.3, background
  0.1) and a FIXED ``--n-iter``; the sources go to disk gene group by gene group, never
  the whole dense tissue x genes matrix;
- ``equivalence``: the same correction on the held-in DLPFC slice with
  ``scheduler=None`` and ``"local:2"`` (max relative difference);
- ``ddp``: the domain encoder on the DLPFC slice trained by 1 process and by 2 gloo
  processes under ``torchrun`` (max difference of the loss curves).

Usage::

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/scale.py --spots 100000
    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/scale.py --spots 1000000 --steps graph,domains
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, emit, run_child

STEPS = ("graph", "domains", "undiffuse", "equivalence", "ddp")
_SIGMA, _BLEED, _BACKGROUND = 1.5, 0.3, 0.1


# ----------------------------------------------------------------------------- memory
class TreeRSS:
    """Peak of the summed RSS of this process and all its descendants (Dask workers)."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self.peak = 0

    def _sample(self) -> int:
        import psutil

        me = psutil.Process()
        total = me.memory_info().rss
        for child in me.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(self.interval)

    def __enter__(self) -> TreeRSS:
        self.peak = self._sample()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._t0
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())


# ----------------------------------------------------------------------------- data
def build_tissue(n_spots: int, n_genes: int, depth: float, path: Path, seed: int = 0) -> dict:
    """Write the synthetic tissue (see the module docstring) to ``path``."""
    import anndata
    import pandas as pd
    import scipy.sparse as sp
    from scipy.spatial import cKDTree

    import chronotope as ct

    base = ct.datasets.dlpfc("151673", load_image=False)
    x = sp.csr_matrix(base.X)
    top = np.sort(np.argsort(-np.asarray(x.sum(axis=0)).ravel())[:n_genes])
    x = sp.csr_matrix(x[:, top], dtype=np.float32)
    genes = base.var_names[top].to_numpy()
    layer = base.obs["layer"].astype(str).to_numpy() if "layer" in base.obs else None
    xy = np.asarray(base.obsm["spatial"], dtype=float)
    pitch = float(np.median(cKDTree(xy).query(xy, k=2)[0][:, 1])) / 2
    lo = xy.min(0) - 2 * pitch
    nx, ny = (np.ceil((xy.max(0) + 2 * pitch - lo) / pitch)).astype(int)
    gc, gr = np.meshgrid(np.arange(nx), np.arange(ny))
    cell_xy = np.c_[gc.ravel(), gr.ravel()] * pitch + lo
    d, nearest = cKDTree(xy).query(cell_xy)
    in_tissue = d < 1.5 * pitch
    per_tile = nx * ny
    n_tiles = math.ceil(n_spots / per_tile)
    cols = math.ceil(math.sqrt(n_tiles))
    rows_t = math.ceil(n_tiles / cols)
    tile_rows = math.ceil(n_spots / (cols * nx))  # lattice rows needed
    p = depth / float(np.asarray(x.sum(axis=1)).mean())
    rng = np.random.default_rng(seed)
    # lattice row by lattice row of tiles: row-major bins, the last row band cut short
    blocks, coords, tissue, labels, tiles = [], [], [], [], []
    n_done = 0
    for band in range(rows_t):
        for r in range(ny):
            if n_done >= n_spots or band * ny + r >= tile_rows:
                break
            sel = np.arange(r * nx, (r + 1) * nx)
            src = np.tile(nearest[sel], cols)
            tis = np.tile(in_tissue[sel], cols)
            take = min(len(src), n_spots - n_done)
            src, tis = src[:take], tis[:take]
            blk = x[src].astype(np.int64)
            keep = np.repeat(tis, np.diff(blk.indptr))
            prob = np.where(keep, min(p, 1.0), min(p, 1.0) * 0.01)
            blk.data = rng.binomial(blk.data, prob).astype(np.float32)
            blk.eliminate_zeros()
            blocks.append(sp.csr_matrix(blk, dtype=np.float32))
            c = np.arange(take)
            coords.append(np.c_[c, np.full(take, band * ny + r)].astype(np.float64))
            tissue.append(tis)
            tiles.append(band * cols + c // nx)
            if layer is not None:
                labels.append(np.where(tis, layer[src], "background"))
            n_done += take
    counts = sp.vstack(blocks, format="csr")
    obs = pd.DataFrame(
        {"in_tissue": np.concatenate(tissue).astype(np.int8), "tile": np.concatenate(tiles)},
        index=pd.RangeIndex(counts.shape[0]).astype(str),
    )
    if labels:
        obs["layer"] = pd.Categorical(np.concatenate(labels))
    ad = anndata.AnnData(counts, obs=obs, var=pd.DataFrame(index=genes))
    ad.obsm["spatial"] = np.concatenate(coords)  # bin units: the lattice cell
    ad.write_h5ad(path)
    tis_all = obs["in_tissue"].to_numpy(bool)
    lib = np.asarray(counts.sum(axis=1)).ravel()
    return {
        "n_obs": int(counts.shape[0]),
        "n_genes": int(counts.shape[1]),
        "nnz": int(counts.nnz),
        "tissue_fraction": float(tis_all.mean()),
        "mean_umis_tissue": float(lib[tis_all].mean()),
        "lattice": f"{cols * nx} x {int(np.concatenate(coords)[:, 1].max()) + 1}",
        "thinning": float(p),
    }


# ----------------------------------------------------------------------------- steps
def _graph(coords: np.ndarray):
    from chronotope.graph import knn_graph

    conn, _ = knn_graph(coords, 6)
    return conn


def step_graph(spec: dict) -> dict:
    import scipy.sparse as sp

    from chronotope.io import read_h5ad_backed

    ad = read_h5ad_backed(spec["path"])
    coords = np.asarray(ad.obsm["spatial"], dtype=float)
    ad.file.close()
    conn = _graph(coords)
    sp.save_npz(spec["graph"], conn)
    return {"n_obs": int(conn.shape[0]), "edges": int(conn.nnz)}


def _log_norm(chunk, cols: np.ndarray):
    """log1p of library-normalised (1e4, library over all genes) counts of ``cols``."""
    import scipy.sparse as sp

    lib = np.asarray(chunk.sum(axis=1), dtype=np.float64).ravel()
    factor = np.divide(1e4, lib, out=np.zeros_like(lib), where=lib > 0)
    sub = sp.csr_matrix(sp.diags(factor) @ chunk[:, cols], dtype=np.float64)
    sub.data = np.log1p(sub.data)
    return sub


def _project(sub, mean: np.ndarray, std: np.ndarray, comps: np.ndarray) -> np.ndarray:
    """PCA scores of standardised rows without densifying: (X / s) C^T - (m / s) C^T."""
    w = (comps / std[None, :]).T
    return np.asarray(sub @ w - (mean / std) @ w, dtype=np.float32)


def step_domains(spec: dict) -> dict:
    import anndata
    import scipy.sparse as sp

    from chronotope import pp
    from chronotope.domains import DomainModel
    from chronotope.io import read_h5ad_backed, read_h5ad_chunks

    sched = spec["scheduler"]
    n_train = spec["train_spots"]
    ad = read_h5ad_backed(spec["path"])
    coords = np.asarray(ad.obsm["spatial"], dtype=float)
    tissue = ad.obs["in_tissue"].to_numpy(bool)
    truth = ad.obs["layer"].astype(str).to_numpy() if "layer" in ad.obs else None
    var_names = ad.var_names.to_numpy()
    n_obs = ad.n_obs
    tile = ad.obs["tile"].to_numpy() if "tile" in ad.obs else np.zeros(n_obs, dtype=int)
    ad.file.close()
    tic = time.perf_counter()
    # training subsample: whole copies of the slice (all layers, spatially contiguous),
    # the first tiles that together hold at least n_train bins
    sizes = np.bincount(tile)
    n_tiles = int(np.searchsorted(np.cumsum(sizes), min(n_train, n_obs))) + 1
    in_train = tile < n_tiles
    train = sp.vstack(
        [c[in_train[rows]] for rows, c in read_h5ad_chunks(spec["path"]) if in_train[rows].any()]
    ).tocsr()
    n_train = train.shape[0]
    view = anndata.AnnData(train)
    pp.highly_variable_genes(view, n_top_genes=min(1000, train.shape[1]))
    hvg = np.flatnonzero(view.var["highly_variable"].to_numpy(bool))
    sub = _log_norm(train, hvg)
    mean = np.asarray(sub.mean(axis=0)).ravel()
    std = np.sqrt(np.maximum(np.asarray(sub.multiply(sub).mean(axis=0)).ravel() - mean**2, 0))
    std[std == 0] = 1.0
    from sklearn.decomposition import PCA

    dense = (sub.toarray() - mean) / std
    pca = PCA(30, random_state=0, svd_solver="randomized").fit(dense)
    comps = pca.components_.astype(np.float64)
    del dense
    scores_train = _project(sub, mean, std, comps)
    conn_train = _graph(coords[in_train])
    model = DomainModel(seed=0, device=spec["device"], progress=False)
    model.fit(scores_train, comps.T.astype(np.float32), conn_train, var_names=var_names[hvg])
    t_train = time.perf_counter() - tic
    # out of core: every bin's scores chunk by chunk
    tic = time.perf_counter()
    scores = np.empty((n_obs, comps.shape[0]), dtype=np.float32)
    for rows, chunk in read_h5ad_chunks(spec["path"], chunk_size=65536, progress=False):
        scores[rows] = _project(_log_norm(chunk, hvg), mean, std, comps)
    t_project = time.perf_counter() - tic
    tic = time.perf_counter()
    conn = sp.load_npz(spec["graph"]) if Path(spec["graph"]).is_file() else _graph(coords)
    kw = {"scheduler": sched} if sched is not None else {}
    emb = model.get_embedding(scores, comps.T.astype(np.float32), conn, **kw)
    t_embed = time.perf_counter() - tic
    np.save(Path(spec["work"]) / f"embedding_{spec['tag']}.npy", emb)
    out: dict[str, Any] = {
        "train_spots": n_train,
        "train_tiles": n_tiles,
        "hvg": len(hvg),
        "seconds_train": t_train,
        "seconds_project": t_project,
        "seconds_embed": t_embed,
        "embedding": list(emb.shape),
        "embedding_checksum": float(np.abs(emb).astype(np.float64).sum()),
    }
    if truth is not None:  # domain recovery on the tissue bins (a subsample, k-means)
        from sklearn.cluster import MiniBatchKMeans
        from sklearn.metrics import adjusted_rand_score

        idx = np.flatnonzero(tissue)
        idx = np.random.default_rng(0).choice(idx, min(200000, idx.size), replace=False)
        km = MiniBatchKMeans(7, random_state=0, n_init=3).fit_predict(
            PCA(20, random_state=0).fit_transform(emb[idx])
        )
        out["ari_kmeans_tissue"] = float(adjusted_rand_score(truth[idx], km))
    return out


def step_undiffuse(spec: dict) -> dict:
    import torch

    from chronotope.io import read_h5ad_backed, read_h5ad_chunks
    from chronotope.undiffuse import DiffusionOperator, em_deconvolve, infer_lattice, make_kernel

    sched = spec["scheduler"]
    torch.set_num_threads(1)
    ad = read_h5ad_backed(spec["path"])
    coords = np.asarray(ad.obsm["spatial"], dtype=float)
    tissue = ad.obs["in_tissue"].to_numpy(bool)
    ad.file.close()
    import scipy.sparse as sp

    n_und = spec["undiffuse_genes"] or spec["genes"]
    genes = np.arange(min(n_und, spec["genes"]))
    x = sp.vstack([c for _, c in read_h5ad_chunks(spec["path"], genes=genes)]).tocsc()
    lattice = infer_lattice(coords)
    kernel = make_kernel(coords, _SIGMA, lattice=lattice, device=spec["device"])
    op = DiffusionOperator(kernel, tissue, _BLEED, _BACKGROUND)
    out_dir = Path(spec["work"]) / f"sources_{spec['tag']}"
    out_dir.mkdir(exist_ok=True)
    group = spec["gene_group"]
    kw = {"scheduler": sched} if sched is not None else {}
    worst, n_batches = 0.0, 0
    for lo in range(0, x.shape[1], group):
        hi = min(lo + group, x.shape[1])
        xg = sp.csr_matrix(x[:, lo:hi])
        res = em_deconvolve(xg, op, n_iter=spec["n_iter"], memory_gb=spec["memory_gb"], **kw)
        z = res.z
        obs_tot = np.asarray(xg.sum(axis=0)).ravel()
        tot = z.sum(axis=0, dtype=np.float64)
        ok = obs_tot > 0
        worst = max(worst, float(np.max(np.abs(tot[ok] - obs_tot[ok]) / obs_tot[ok])))
        np.save(out_dir / f"genes_{lo:05d}.npy", z.astype(np.float32))
        n_batches += 1
        del z, res, xg
    return {
        "kernel": type(kernel).__name__,
        "n_iter": spec["n_iter"],
        "genes": int(x.shape[1]),
        "gene_groups": n_batches,
        "max_rel_total_error": worst,
        "nnz": int(x.nnz),
    }


def step_equivalence(spec: dict) -> dict:
    import chronotope as ct

    base = ct.datasets.dlpfc("151673", load_image=False)
    import scipy.sparse as sp

    x = sp.csr_matrix(base.X)
    top = np.argsort(-np.asarray(x.sum(axis=0)).ravel())[: spec["equiv_genes"]]
    ad = base[:, np.sort(top)].copy()
    out = {}
    for sched in (None, "local:2"):
        a = ad.copy()
        tic = time.perf_counter()
        ct.tl.undiffuse(
            a,
            method="pergene",
            sigma=_SIGMA,
            bleed=_BLEED,
            background=_BACKGROUND,
            n_iter=spec["n_iter_equiv"],
            diagnostics=False,
            tissue_key="in_tissue" if "in_tissue" in a.obs else None,
            scheduler=sched,
        )
        out[str(sched)] = (a.layers["undiffused"], time.perf_counter() - tic)
    a, ta = out["None"]
    b, tb = out["local:2"]
    a, b = (np.asarray(sp.csr_matrix(m).toarray(), dtype=np.float64) for m in (a, b))
    rel = np.abs(a - b) / np.maximum(np.abs(a), 1e-12)
    return {
        "genes": int(ad.n_vars),
        "spots": int(ad.n_obs),
        "max_rel_diff": float(rel[np.abs(a) > 1e-6].max()),
        "max_abs_diff": float(np.abs(a - b).max()),
        "seconds_none": ta,
        "seconds_local2": tb,
    }


def step_ddp(spec: dict) -> dict:
    import chronotope as ct
    from chronotope.distributed_train import train_domains

    work = Path(spec["work"])
    path = work / "dlpfc_151673.h5ad"
    if not path.is_file():
        base = ct.datasets.dlpfc("151673", load_image=False)
        base.obs = base.obs[[]]
        base.write_h5ad(path)
    opts = {"n_top_genes": 3000, "n_comps": 30, "max_epochs": spec["ddp_epochs"]}
    tic = time.perf_counter()
    one = train_domains(path, work / "ddp_one", **opts)
    t_one = time.perf_counter() - tic
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-port", str(_free_port()), "-m", "chronotope.distributed_train", "domains",
        str(path), "-o", str(work / "ddp_two"), "--n-top-genes=3000", "--n-comps=30",
        f"--max-epochs={spec['ddp_epochs']}",
    ]  # fmt: skip
    tic = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=1800)
    t_two = time.perf_counter() - tic
    two = json.loads((work / "ddp_two" / "history.json").read_text())
    a, b = np.asarray(one["loss"]), np.asarray(two["loss"])
    return {
        "spots": one["n_obs"],
        "epochs": len(a),
        "processes": [one["processes"], two["processes"]],
        "max_abs_diff": float(np.abs(a - b).max()),
        "max_rel_diff": float((np.abs(a - b) / np.abs(a)).max()),
        "loss_first_last": [float(a[0]), float(a[-1])],
        "seconds_one": t_one,
        "seconds_torchrun2": t_two,
    }


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child(spec: dict) -> None:
    fn = {
        "build": lambda s: build_tissue(
            s["spots"], s["genes"], s["depth"], Path(s["path"]), seed=0
        ),
        "graph": step_graph,
        "domains": step_domains,
        "undiffuse": step_undiffuse,
        "equivalence": step_equivalence,
        "ddp": step_ddp,
    }[spec["step"]]
    with TreeRSS() as m:
        res = fn(spec)
    emit({**res, "wall_s": m.wall, "peak_rss_gb": m.peak / 2**30})


# ----------------------------------------------------------------------------- main
def _line(step: str, sched: str, n: int, res: dict) -> str:
    if "error" in res:
        return f"scale {step} {n} spots [{sched}]: ERROR {res['error']}"
    keep = {k: v for k, v in res.items() if k not in ("wall_s", "peak_rss_gb")}
    extra = " ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in keep.items()
    )
    return (
        f"scale {step} {n} spots [{sched}]: time_s {res['wall_s']:.1f} peak_rss_gb "
        f"{res['peak_rss_gb']:.2f} | {extra}"
    )


def _compare(work: Path, step: str, n: int) -> str:
    """Max relative difference of the in-process and local:2 outputs of a step (on disk)."""
    if step == "domains":
        pairs = [(work / "embedding_domains_none.npy", work / "embedding_domains_local2.npy")]
    else:
        a_dir, b_dir = work / "sources_undiffuse_none", work / "sources_undiffuse_local2"
        pairs = [(f, b_dir / f.name) for f in sorted(a_dir.glob("*.npy"))]
    if not pairs or not all(a.is_file() and b.is_file() for a, b in pairs):
        return f"scale {step} {n} spots [None vs local:2]: not both run"
    worst = 0.0
    for a, b in pairs:
        x, y = np.load(a).astype(np.float64), np.load(b).astype(np.float64)
        big = np.abs(x) > 1e-6 * max(np.abs(x).max(), 1e-30)
        worst = max(worst, float((np.abs(x - y)[big] / np.abs(x)[big]).max(initial=0.0)))
    return f"scale {step} {n} spots [None vs local:2]: max_rel_diff {worst:.3g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--spots", type=int, default=1_000_000)
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--depth", type=float, default=200.0, help="mean UMIs per tissue bin")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma list of {STEPS}")
    ap.add_argument("--schedulers", default="none,local:2")
    ap.add_argument("--train-spots", type=int, default=20000)
    ap.add_argument("--n-iter", type=int, default=5, help="fixed EM iterations (undiffuse)")
    ap.add_argument(
        "--undiffuse-genes", type=int, default=0, help="undiffuse the first N genes (0: all)"
    )
    ap.add_argument("--gene-group", type=int, default=250, help="genes per EM call")
    ap.add_argument("--memory-gb", type=float, default=0.5, help="EM gene-batch budget")
    ap.add_argument("--equiv-genes", type=int, default=200)
    ap.add_argument("--n-iter-equiv", type=int, default=20)
    ap.add_argument("--ddp-epochs", type=int, default=30)
    ap.add_argument("--work", default=None, help="folder for the tissue file (kept)")
    ap.add_argument("--timeout", type=float, default=3600)
    args = ap.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    import torch

    device = str(torch.device(args.device))
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    work = Path(args.work or Path(tempfile.gettempdir()) / "chronotope_scale")
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"tissue_{args.spots}_{args.genes}_{args.depth:g}.h5ad"
    graph = work / f"graph_{args.spots}.npz"
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = set(steps) - set(STEPS) - {"build"}
    if unknown:
        sys.exit(f"unknown steps {sorted(unknown)}")
    scheds = [None if s == "none" else s for s in args.schedulers.split(",")]
    print(
        f"# device {device} ({name}); {os.cpu_count()} cpus; undiffuse parameters GIVEN "
        f"(sigma {_SIGMA}, bleed {_BLEED}, background {_BACKGROUND}), FIXED n_iter "
        f"{args.n_iter} (equivalence: {args.n_iter_equiv}); steps {','.join(steps)}",
        flush=True,
    )
    base = {
        "spots": args.spots,
        "genes": args.genes,
        "depth": args.depth,
        "path": str(path),
        "graph": str(graph),
        "work": str(work),
        "device": device,
        "train_spots": args.train_spots,
        "n_iter": args.n_iter,
        "gene_group": args.gene_group,
        "undiffuse_genes": args.undiffuse_genes,
        "memory_gb": args.memory_gb,
        "equiv_genes": args.equiv_genes,
        "n_iter_equiv": args.n_iter_equiv,
        "ddp_epochs": args.ddp_epochs,
        "scheduler": None,
    }
    script = Path(__file__).resolve()
    if not path.is_file() or "build" in steps:
        res = run_child(script, {**base, "step": "build"}, timeout=args.timeout)
        print(_line("build", "in-process", args.spots, res), flush=True)
        if "error" in res:
            return
    for step in steps:
        if step == "build":
            continue
        for sched in scheds if step in ("domains", "undiffuse") else [None]:
            tag = f"{step}_{sched or 'none'}".replace(":", "")
            spec = {**base, "step": step, "scheduler": sched, "tag": tag}
            res = run_child(script, spec, timeout=args.timeout)
            label = "in-process" if sched is None else sched
            if step == "equivalence":
                label = "None vs local:2"
            elif step == "ddp":
                label = "1 vs 2 gloo processes"
            print(
                _line(
                    step,
                    label,
                    args.spots
                    if step in ("graph", "domains", "undiffuse")
                    else res.get("spots", 0),
                    res,
                ),
                flush=True,
            )
        if step in ("domains", "undiffuse"):
            print(_compare(work, step, args.spots), flush=True)


if __name__ == "__main__":
    main()
