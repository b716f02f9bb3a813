"""Run a peer slice-alignment tool (PASTE, PASTE2 or moscot) on two slices; standalone script.

Run it with the peer's own Python (it never imports chronotope)::

    /work/peers/<tool>/bin/python benchmarks/_slices_peers.py --tool paste|paste2|moscot \
        --a A.h5ad --b B.h5ad --output OUT.npz [--threads 1] [--s 0.7] [--alpha A] \
        [--no-tutorial-filter] [--emd-itermax 1000000]

Environments (Python 3.11; the constraints file holds ``torch==2.13.0`` so that nothing can
pull CUDA wheels, although none of these three peers installs torch)::

    echo 'torch==2.13.0' > /work/peers/graphst-constraints.txt
    python3.11 -m venv /work/peers/paste
    /work/peers/paste/bin/pip install -c /work/peers/graphst-constraints.txt \
        paste-bio==1.4.0 pot==0.9.4 scanpy anndata
    python3.11 -m venv /work/peers/paste2
    /work/peers/paste2/bin/pip install -c /work/peers/graphst-constraints.txt \
        paste2==1.0.1 pot==0.9.7 scanpy anndata
    python3.11 -m venv /work/peers/moscot
    /work/peers/moscot/bin/pip install -c /work/peers/graphst-constraints.txt \
        moscot==0.5.2 jax==0.10.2 jaxlib==0.10.2 scanpy anndata

Versions installed (all three share numpy 2.4.6, scipy 1.17.1, scanpy 1.11.5, anndata 0.12.19,
scikit-learn 1.9.1, pandas 2.3.3): paste-bio 1.4.0 + POT 0.9.4; paste2 1.0.1 + POT 0.9.7;
moscot 0.5.2 + jax/jaxlib 0.10.2 (CPU) + ott-jax 0.6.0. paste-bio 1.4.0 needs POT 0.9.4: with
POT >= 0.9.5 its ``pairwise_align`` fails (``line_search() takes 5 positional arguments but 6
were given``).

Input contract: ``A.h5ad`` and ``B.h5ad`` hold raw counts in ``.X`` (sparse or dense),
``obsm["spatial"]`` and the same genes (the caller intersects by name; this script intersects
again, keeping A's gene order). Only ``X``, ``obsm["spatial"]`` and the names are passed on.

What each tool runs (its documented defaults for pairwise alignment, as in its tutorial):

- ``paste``: the getting-started tutorial's preprocessing, per slice
  ``sc.pp.filter_genes(min_counts=15)`` and ``sc.pp.filter_cells(min_counts=100)``, then
  ``paste.pairwise_align(sliceA, sliceB, alpha=0.1)`` with all other defaults (KL expression
  dissimilarity on ``X + 0.01``, uniform marginals, ``norm=False`` so raw Euclidean spatial
  distances, 200 conditional-gradient iterations, NumPy backend, CPU). Spots removed by the
  cell filter get all-zero rows / columns in the saved plan so that it stays n_A x n_B
  (``--no-tutorial-filter`` skips both filters). Plan mass 1.
  One change from PASTE as shipped: ``pairwise_align`` calls POT's ``ot.optim.cg`` without
  ``numItermaxEmd``, so every inner EMD stops at POT's default 100,000 network-simplex
  iterations. On ~3.6k-spot slices that cap is hit ("numItermax reached before optimality"),
  the conditional gradient stops after 2 iterations on a plan that does not solve the LP, and
  151673 -> 151674 layer accuracy is 0.36. This script raises the cap to 1,000,000 (the value
  PASTE2, from the same lab, hard-codes for its own EMD calls) by wrapping ``ot.optim.cg``;
  PASTE then converges (22 iterations) and reaches 0.86, in line with PASTE's paper.
  ``--emd-itermax 0`` restores the shipped behaviour.
- ``paste2``: no preprocessing (its tutorial reads prepared h5ad files and calls the aligner),
  ``paste2.PASTE2.partial_pairwise_align(sliceA, sliceB, s=--s, alpha=0.1,
  dissimilarity="pca")``; ``"pca"`` is PASTE2's own joint normalize_total + log1p + 2,000
  seurat HVGs + 20-PC PCA distance, chosen over the default ``"glmpca"`` (minutes per slice on
  CPU). Other defaults: exact line search, ``norm=True`` (spatial distances rescaled to the
  expression cost's maximum), uniform marginals. Plan mass ``s``. The PASTE2 paper sets ``s``
  to the true overlap; for two whole adjacent sections it is close to 1, the CLI default 0.7
  is the tutorial's value.
- ``moscot``: the two slices are concatenated (``obs["batch"]`` = ``"A"``, ``"B"``, in that
  order), ``sc.pp.normalize_total`` + ``sc.pp.log1p`` (our addition: moscot's default joint
  PCA runs on ``.X`` as given, and a PCA of raw counts is not meaningful), then as in moscot's
  alignment tutorial ``AlignmentProblem(adata).prepare(batch_key="batch",
  policy="sequential")`` (defaults: ``spatial_key="spatial"``, ``normalize_spatial=True``,
  linear term = joint 30-PC PCA of ``X`` of the two slices (``local-pca`` callback),
  ``sq_euclidean`` costs) and ``.solve()`` with moscot's defaults (``alpha=0.5``,
  ``epsilon=1e-2``, balanced ``tau_a = tau_b = 1``, ``scale_cost="mean"``, full rank; the
  tutorial solves with the defaults first and then alpha=0.9 on its simulated data). Plan mass 1
  (up to Sinkhorn tolerance). ``--alpha`` overrides alpha for every tool.

Measured on DLPFC 151673 -> 151674 (3,639 x 3,673 spots, 2,340 shared genes, raw counts;
``--threads 1``; 2 cores shared with one or two other single-threaded jobs, so wall times are
upper bounds). Accuracy = sum of plan[i, j] over pairs with the same manual layer, plan
renormalised to mass 1 over the pairs where both spots are labelled (unlabelled spots:
28 in A, 38 in B, dropped):

=============================  ========  =========  ============
run                            accuracy  wall (s)   peak RSS GB
=============================  ========  =========  ============
paste (EMD cap 1e6, default)   0.857     316        2.04
paste, shipped EMD cap 1e5     0.365     56         2.04
paste2 s=0.7, pca              0.752     625        2.04
paste2 s=0.99, pca             0.770     388        2.04
moscot alpha=0.5, eps=1e-2     0.780     435        1.14
=============================  ========  =========  ============

Threads: set ``OMP_NUM_THREADS`` / ``OPENBLAS_NUM_THREADS`` / ``MKL_NUM_THREADS`` (and for
moscot ``XLA_FLAGS``) in the caller; if unset, this script sets them to ``--threads`` before
numpy loads, and for jax adds ``--xla_cpu_multi_thread_eigen=false
intra_op_parallelism_threads=1`` when ``--threads 1``.

Output ``OUT.npz``: ``plan`` (dense float32 n_A x n_B, the tool's transport plan with its own
total mass), ``wall_seconds`` (the alignment call alone: for paste the filters plus
``pairwise_align``; for paste2 ``partial_pairwise_align`` including its PCA; for moscot
concatenation, normalisation, ``prepare`` and ``solve`` plus fetching the plan), ``obs_a``,
``obs_b`` (spot names in plan order). stdout carries exactly one line ``RESULT {json}`` (tool,
versions, parameters, wall seconds of the call and of the whole process, peak RSS as
``VmHWM`` in bytes, plan mass); the tools' own output goes to stderr.
"""

from __future__ import annotations

import os
import sys
import time

_T0 = time.perf_counter()


def _early_threads(argv: list[str]) -> int:
    """Read ``--threads`` before numpy loads and set the thread variables the caller left unset."""
    threads = 1
    for i, tok in enumerate(argv):
        if tok == "--threads" and i + 1 < len(argv):
            threads = int(argv[i + 1])
        elif tok.startswith("--threads="):
            threads = int(tok.split("=", 1)[1])
    threads = max(1, threads)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(var, str(threads))
    if threads == 1 and "XLA_FLAGS" not in os.environ:
        os.environ["XLA_FLAGS"] = (
            "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        )
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TQDM_DISABLE", "1")
    return threads


_THREADS = _early_threads(sys.argv[1:])

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import warnings  # noqa: E402
from importlib import metadata  # noqa: E402

_DEFAULT_ALPHA = {"paste": 0.1, "paste2": 0.1, "moscot": 0.5}
_DIST = {"paste": "paste-bio", "paste2": "paste2", "moscot": "moscot"}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tool", required=True, choices=sorted(_DIST))
    p.add_argument("--a", required=True, help="source slice .h5ad (raw counts in X)")
    p.add_argument("--b", required=True, help="target slice .h5ad (raw counts in X)")
    p.add_argument("--output", required=True, help=".npz to write")
    p.add_argument("--threads", type=int, default=1, help="BLAS / XLA threads (default 1)")
    p.add_argument("--s", type=float, default=0.7, help="paste2 overlap fraction (default 0.7)")
    p.add_argument(
        "--alpha",
        type=float,
        default=None,
        help="spatial (GW) weight; default the tool's own (paste 0.1, paste2 0.1, moscot 0.5)",
    )
    p.add_argument(
        "--no-tutorial-filter",
        action="store_true",
        help="paste only: skip the tutorial's filter_genes(15) / filter_cells(100)",
    )
    p.add_argument(
        "--emd-itermax",
        type=int,
        default=1_000_000,
        help="paste only: network-simplex iteration cap of each EMD inside PASTE's conditional "
        "gradient (default 1,000,000, the cap PASTE2 uses; 0 = POT's default 100,000, which "
        "stops short on ~3.6k-spot slices and returns a plan that does not solve the LP)",
    )
    return p.parse_args(argv)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _read(path: str):
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    src = ad.read_h5ad(path)
    if "spatial" not in src.obsm:
        sys.exit(f"{path}: no obsm['spatial']")
    X = src.X
    X = sp.csr_matrix(X, dtype=np.float32) if sp.issparse(X) else np.asarray(X, np.float32)
    out = ad.AnnData(
        X=X,
        obs=pd.DataFrame(index=src.obs_names.astype(str)),
        var=pd.DataFrame(index=src.var_names.astype(str)),
    )
    out.obsm["spatial"] = np.asarray(src.obsm["spatial"], dtype=np.float64)[:, :2]
    return out


def _common_genes(A, B):
    bset = set(B.var_names)
    genes = [g for g in A.var_names if g in bset]
    if not genes:
        sys.exit("the two slices share no gene")
    if len(genes) == A.n_vars == B.n_vars:
        return A, B, len(genes)
    return A[:, genes].copy(), B[:, genes].copy(), len(genes)


def _run_paste(A, B, alpha: float, tutorial_filter: bool, emd_itermax: int):
    import numpy as np
    import ot
    import paste
    import scanpy as sc

    # pairwise_align -> my_fused_gromov_wasserstein -> ot.optim.cg(...) without numItermaxEmd,
    # so POT's default cap (100,000 network-simplex iterations) applies; raise it here.
    cg = ot.optim.cg
    if emd_itermax > 0 and not getattr(cg, "_slices_peers_wrapped", False):

        def cg_capped(*a, **k):
            k.setdefault("numItermaxEmd", emd_itermax)
            return cg(*a, **k)

        cg_capped._slices_peers_wrapped = True
        ot.optim.cg = cg_capped

    info: dict = {
        "alpha": alpha,
        "dissimilarity": "kl",
        "norm": False,
        "numItermax": 200,
        "numItermaxEmd": emd_itermax if emd_itermax > 0 else "POT default (100000)",
    }
    t0 = time.perf_counter()
    sa, sb = A.copy(), B.copy()
    if tutorial_filter:
        for s in (sa, sb):
            sc.pp.filter_genes(s, min_counts=15)
            sc.pp.filter_cells(s, min_counts=100)
    pi = paste.pairwise_align(sa, sb, alpha=alpha)
    pi = np.asarray(pi)
    if tutorial_filter:
        rows = A.obs_names.get_indexer(sa.obs_names)
        cols = B.obs_names.get_indexer(sb.obs_names)
        plan = np.zeros((A.n_obs, B.n_obs), dtype=np.float32)
        plan[np.ix_(rows, cols)] = pi
    else:
        plan = pi.astype(np.float32)
    wall = time.perf_counter() - t0
    common = len(set(sa.var_names) & set(sb.var_names))
    info.update(
        tutorial_filter=tutorial_filter,
        spots_dropped_a=int(A.n_obs - sa.n_obs),
        spots_dropped_b=int(B.n_obs - sb.n_obs),
        genes_used=int(common),
        plan_dtype_returned=str(pi.dtype),
    )
    return plan, wall, info


def _run_paste2(A, B, alpha: float, s: float):
    import numpy as np
    from paste2 import PASTE2

    info = {"alpha": alpha, "s": s, "dissimilarity": "pca", "norm": True, "armijo": False}
    # Visium slices share barcodes: suffix the names so that PASTE2's joint concat is unique.
    A, B = A.copy(), B.copy()
    A.obs_names = [f"{n}-A" for n in A.obs_names]
    B.obs_names = [f"{n}-B" for n in B.obs_names]
    t0 = time.perf_counter()
    pi = PASTE2.partial_pairwise_align(A, B, s=s, alpha=alpha, dissimilarity="pca")
    wall = time.perf_counter() - t0
    pi = np.asarray(pi)
    info["plan_dtype_returned"] = str(pi.dtype)
    return pi.astype(np.float32), wall, info


def _run_moscot(A, B, alpha: float, threads: int):
    import anndata as ad
    import jax
    import numpy as np
    import pandas as pd
    import scanpy as sc
    from moscot.problems.space import AlignmentProblem

    jax.config.update("jax_platforms", "cpu")
    info = {
        "alpha": alpha,
        "epsilon": 1e-2,
        "tau_a": 1.0,
        "tau_b": 1.0,
        "scale_cost": "mean",
        "policy": "sequential",
        "joint_attr": "local-pca (30 PCs of log1p(normalize_total(X)) of both slices)",
        "normalize_spatial": True,
        "jax_backend": jax.default_backend(),
        "threads": threads,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    t0 = time.perf_counter()
    adata = ad.concat({"A": A, "B": B}, label="batch", index_unique="-")
    adata.obs["batch"] = pd.Categorical(adata.obs["batch"], categories=["A", "B"], ordered=True)
    sc.pp.normalize_total(adata)
    sc.pp.log1p(adata)
    ap = AlignmentProblem(adata=adata)
    ap = ap.prepare(batch_key="batch", policy="sequential")
    ap = ap.solve(alpha=alpha)
    sol = ap[("A", "B")].solution
    plan = np.asarray(sol.transport_matrix, dtype=np.float32)
    wall = time.perf_counter() - t0
    info["converged"] = bool(np.asarray(sol.converged))
    info["solver_output"] = type(sol).__name__
    return plan, wall, info


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    import numpy as np

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    result_out = sys.stdout
    alpha = _DEFAULT_ALPHA[args.tool] if args.alpha is None else float(args.alpha)

    with contextlib.redirect_stdout(sys.stderr):
        A = _read(args.a)
        B = _read(args.b)
        A, B, n_genes = _common_genes(A, B)
        if args.tool == "paste":
            plan, wall, info = _run_paste(
                A, B, alpha, not args.no_tutorial_filter, args.emd_itermax
            )
        elif args.tool == "paste2":
            plan, wall, info = _run_paste2(A, B, alpha, args.s)
        else:
            plan, wall, info = _run_moscot(A, B, alpha, args.threads)

    if plan.shape != (A.n_obs, B.n_obs) or not np.isfinite(plan).all():
        sys.exit(f"bad plan: shape {plan.shape}, finite {bool(np.isfinite(plan).all())}")
    np.savez(
        args.output,
        plan=plan,
        wall_seconds=np.float64(wall),
        obs_a=np.asarray(A.obs_names, dtype=str),
        obs_b=np.asarray(B.obs_names, dtype=str),
    )

    # VmHWM, not ru_maxrss: ru_maxrss survives exec, so it can report the parent's peak.
    with open("/proc/self/status") as fh:
        peak = next(int(ln.split()[1]) * 1024 for ln in fh if ln.startswith("VmHWM:"))
    versions = {
        d: _version(d)
        for d in (_DIST[args.tool], "pot", "jax", "jaxlib", "ott-jax", "scanpy", "anndata", "numpy")
        if _version(d) is not None
    }
    result = {
        "tool": args.tool,
        "version": _version(_DIST[args.tool]),
        "versions": versions,
        "n_a": int(A.n_obs),
        "n_b": int(B.n_obs),
        "n_genes": int(n_genes),
        "threads": args.threads,
        "params": info,
        "plan_mass": float(plan.sum(dtype=np.float64)),
        "wall_seconds": round(wall, 3),
        "process_wall_seconds": round(time.perf_counter() - _T0, 3),
        "peak_rss_bytes": int(peak),
        "output": args.output,
    }
    print("RESULT " + json.dumps(result), file=result_out, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
