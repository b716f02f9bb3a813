"""Run the GraphST peer (graphst 1.1.1) on prepared features; standalone script.

Run it with the GraphST environment's Python, not chronotope's::

    /work/peers/graphst/bin/python benchmarks/_graphst_peer.py \
        --input IN.h5ad --output OUT.npz --seed 0 [--device cpu] [--epochs N] [--threads 2]

Environment (Python 3.11; torch pinned so that no CUDA wheels are pulled)::

    python3.11 -m venv /work/peers/graphst
    echo 'torch==2.13.0' > /work/peers/graphst-constraints.txt
    /work/peers/graphst/bin/pip install -c /work/peers/graphst-constraints.txt \
        torch==2.13.0 graphst==1.1.1 scanpy pot anndata psutil

GraphST imports torch, numpy, scipy, pandas, scanpy, POT (``ot``), scikit-learn and
tqdm at run time; rpy2 only inside ``GraphST.utils.mclust_R`` (not used here).

Input contract: ``IN.h5ad`` is already preprocessed by the caller. ``.X`` is the final
feature matrix (dense float32, every column used), ``obsm["spatial"]`` the spot
coordinates. Only these two are passed on to GraphST, in a fresh AnnData that also
carries ``var["highly_variable"] = True`` for every column, so that
``GraphST.GraphST.__init__``

- skips its own ``preprocess`` (HVG seurat_v3 3000, normalize_total 1e4, log1p,
  ``scale(zero_center=False, max_value=10)``), which it runs only when
  ``'highly_variable' not in adata.var``;
- builds its graph with ``construct_interaction`` (3 nearest spots by Euclidean
  distance, symmetrised; dense N x N), ``add_contrastive_label`` and ``get_feature``,
  which sets ``obsm["feat"] = X[:, highly_variable]`` = our X unchanged (checked below)
  and ``obsm["feat_a"]`` = a row permutation of it.

Training uses GraphST's defaults (600 epochs, Adam lr 0.001, weight decay 0, 64-d
hidden layer, alpha 10, beta 1, datatype "10X" i.e. the dense-graph Encoder) with
``random_seed=--seed`` (GraphST's ``fix_seed`` seeds python, numpy and torch).

Cost: the "10X" Encoder multiplies the dense normalised N x N adjacency with N x 64 and
N x n_features matrices every epoch (forward and backward); with 3,000 features the
N x N x 3000 products dominate. Measured on DLPFC 151673 (N = 3,639, 3,000 features,
2 threads, 2 cores shared with another job): 600 epochs took 3,150 s wall (about 5 s per
epoch), peak RSS 1.47 GB. Memory: about eight dense N x N float64/float32
arrays (distance matrix, kNN graph, symmetric adjacency, normalised adjacency, graph_neigh
+ identity, their torch copies, the AnnData copy GraphST makes), i.e. O(N^2), so it
does not scale past a few tens of thousands of spots.
``--sparse-adj`` (off by default) swaps only the normalised adjacency for an equal sparse
tensor; the model is unchanged (max |diff| 1e-6 in ``emb`` after 6 epochs, about half the
time per epoch) but it is no longer GraphST as shipped, so do not report its time as GraphST's.

Output ``OUT.npz``:

- ``embedding``: GraphST's ``adata.obsm["emb"]`` from ``train()``, float32. Note this is
  NOT the 64-d hidden layer: it is the decoder output ``h = A_norm @ (A_norm @ X W1) W2``
  (the reconstructed features, n_obs x n_features), and it is what GraphST's tutorial
  clusters.
- ``train_seconds``: wall time of ``GraphST.GraphST(...)`` (graph construction) plus
  ``train()``.

stdout carries exactly one line, ``RESULT {json}`` (wall seconds of the whole process,
peak RSS (``VmHWM``) in bytes, and the run settings); GraphST's own
prints go to stderr and tqdm bars are off.

Clustering (for the caller). GraphST's DLPFC tutorial does, after ``train()``::

    clustering(adata, n_clusters=7, radius=50, method="mclust", refinement=True)

i.e. ``GraphST.utils.clustering``: ``PCA(n_components=20, random_state=42)`` fitted on
``obsm["emb"]`` (sklearn, default centring, no scaling, no whitening) -> R ``mclust``
``Mclust(emb_pca, G=7, modelNames="EEE")`` with ``set.seed(2020)`` (EEE = Gaussian
mixture with one full covariance shared by all components; the Python counterpart is
``sklearn.mixture.GaussianMixture(7, covariance_type="tied")``) -> refinement (DLPFC
only): each spot takes the most frequent label among its 50 nearest other spots by
Euclidean distance of ``obsm["spatial"]`` (ties: the first label reached among the
neighbours in distance order, as Python's ``max(list, key=list.count)``). R and rpy2
are not available here, so mclust itself cannot be run. On 151673 (600 epochs, seed 0)
PCA 20 + tied GaussianMixture gave ARI 0.553 vs the manual layers (0.586 after the
50-neighbour refinement); one of five GMM seeds fell into a poor optimum (0.361), so
consider ``n_init`` > 1.
"""

from __future__ import annotations

import os
import time

_T0 = time.perf_counter()

# Thread caps before numpy/torch load (the machine has 2 cores, shared with others).
_THREADS = "2"
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, _THREADS)
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="prepared .h5ad (X = final features)")
    p.add_argument("--output", required=True, help=".npz to write")
    p.add_argument("--seed", type=int, default=0, help="GraphST random_seed")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--epochs", type=int, default=None, help="default: GraphST's 600")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument(
        "--sparse-adj",
        action="store_true",
        help="opt-in speed-up, not GraphST as shipped: hold GraphST's normalised adjacency as a "
        "sparse torch tensor (same values, so the same model up to float rounding)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)

    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp
    import torch

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    import GraphST
    from GraphST import GraphST as graphst_mod

    torch.set_num_threads(max(1, args.threads))

    src = ad.read_h5ad(args.input)
    X = src.X
    if sp.issparse(X):
        X = X.toarray()
    X = np.ascontiguousarray(np.asarray(X, dtype=np.float32))
    if not np.isfinite(X).all():
        sys.exit("input .X has non-finite values")
    if "spatial" not in src.obsm:
        sys.exit("input has no obsm['spatial']")
    coords = np.asarray(src.obsm["spatial"], dtype=np.float64)[:, :2]
    if "highly_variable" in src.var and not bool(np.all(src.var["highly_variable"])):
        print(
            "warning: var['highly_variable'] is not all True; all columns of X are used",
            file=sys.stderr,
        )

    # Fresh AnnData: only X, coordinates and an all-True HVG flag, so GraphST skips its
    # preprocess and builds adj / label_CSL / feat itself from exactly these.
    adata = ad.AnnData(
        X=X,
        obs=pd.DataFrame(index=src.obs_names.astype(str)),
        var=pd.DataFrame(
            {"highly_variable": np.ones(X.shape[1], dtype=bool)}, index=src.var_names.astype(str)
        ),
    )
    adata.obsm["spatial"] = coords
    del src

    kwargs = {"device": torch.device(args.device), "random_seed": args.seed}
    if args.epochs is not None:
        kwargs["epochs"] = args.epochs

    with contextlib.redirect_stdout(sys.stderr):
        t0 = time.perf_counter()
        model = graphst_mod.GraphST(adata, **kwargs)
        if args.sparse_adj:
            # Encoder.forward only does torch.mm(adj, .), which accepts a sparse COO adj.
            model.adj = model.adj.to_sparse_coo().coalesce()
        out = model.train()
        train_seconds = time.perf_counter() - t0

    feat = np.asarray(model.adata.obsm["feat"])
    if feat.shape != X.shape or not np.array_equal(feat, X):
        sys.exit("GraphST's obsm['feat'] differs from the input X")
    emb = np.ascontiguousarray(np.asarray(out.obsm["emb"], dtype=np.float32))
    if emb.shape[0] != X.shape[0] or not np.isfinite(emb).all():
        sys.exit(f"bad GraphST embedding: shape {emb.shape}, finite {np.isfinite(emb).all()}")

    np.savez(args.output, embedding=emb, train_seconds=np.float64(train_seconds))

    # VmHWM, not ru_maxrss: ru_maxrss survives exec, so it can report the parent's peak.
    with open("/proc/self/status") as fh:
        peak = next(int(ln.split()[1]) * 1024 for ln in fh if ln.startswith("VmHWM:"))
    result = {
        "method": "graphst",
        "graphst_version": getattr(GraphST, "__version__", "1.1.1"),
        "torch_version": torch.__version__,
        "n_obs": int(X.shape[0]),
        "n_features": int(X.shape[1]),
        "embedding_dim": int(emb.shape[1]),
        "epochs": int(model.epochs),
        "seed": args.seed,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "sparse_adj": bool(args.sparse_adj),
        "train_seconds": round(train_seconds, 3),
        "wall_seconds": round(time.perf_counter() - _T0, 3),
        "peak_rss_bytes": int(peak),
        "output": args.output,
    }
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
