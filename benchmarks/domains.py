"""Spatial domains: chronotope vs GraphST on real data, and scale.

Cases
-----
dlpfc
    DLPFC 151673 and 151674 (7 layers; unlabelled spots excluded from scoring). For each
    seed: chronotope (``tl.spatial_domains`` with defaults) and GraphST 1.1.1 (its own
    defaults, 600 epochs) on the same preprocessing (chronotope's normalisation, log1p,
    3,000 seurat_v3 genes; GraphST gets the scaled genes, clipped at 10, as its features)
    and the same clustering (PCA 20 of the embedding, tied-covariance Gaussian mixture,
    6-neighbour majority vote). ARI / NMI mean and sd, wall and CPU time, peak RSS.
secondary
    Mouse olfactory bulb (5 layers) and STARmap BZ5 / BZ9 / BZ14 (4 layers): chronotope
    ARI against the layer labels (GraphST too with ``--graphst-secondary``).
scale
    Synthetic tissues of 10k / 50k / 200k spots built from real DLPFC 151673 profiles:
    Visium-like (the slice tiled side by side on its hexagonal lattice) and
    Stereo-seq-like (a square bin lattice at half the spot pitch over the tiled slice,
    each bin taking the counts of its nearest spot thinned to 25 %). chronotope time and
    peak RSS; GraphST at 10k for memory (a few epochs; its time per epoch is printed).

Every run is a fresh process; peak RSS is the process's high-water mark (``VmHWM``; not
``ru_maxrss``, which on Linux keeps the parent's peak across ``exec``).
Threads: ``--threads`` (default 1) for both tools, so runs do not fight over the cores.
GraphST runs with the Python of its own environment (``--graphst-python``; see
``benchmarks/_graphst_peer.py`` for the install).

Usage::

    python benchmarks/domains.py                       # all cases, 5 seeds
    python benchmarks/domains.py --cases dlpfc --seeds 5 --graphst-seeds 5
    python benchmarks/domains.py --cases scale --sizes 10000,50000,200000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_device_argument, bench_device, emit, peak_rss_bytes, run_child, use_device

HERE = Path(__file__).resolve()
GRAPHST_PEER = HERE.parent / "_graphst_peer.py"
DEFAULT_GRAPHST_PY = "/work/peers/graphst/bin/python"


# ----------------------------------------------------------------------------- data
def _load(name: str):
    import chronotope as ct

    if name in ("151673", "151674"):
        a = ct.datasets.dlpfc(name, load_image=False)
        return a, "layer", 7
    if name == "mob":
        return ct.datasets.mouse_olfactory_bulb(), "layer", 5
    if name.startswith("starmap"):
        return ct.datasets.starmap(name.split("_", 1)[1]), "layer", 4
    raise ValueError(name)


def _tile(n: int, kind: str, seed: int = 0):
    """Synthetic tissue of about ``n`` spots from DLPFC 151673 profiles (see module doc)."""
    import scipy.sparse as sp
    from anndata import AnnData
    from scipy.spatial import cKDTree

    import chronotope as ct

    base = ct.datasets.dlpfc("151673", load_image=False)
    X = sp.csr_matrix(base.X)
    xy = np.asarray(base.obsm["spatial"], dtype=float)
    span = xy.max(0) - xy.min(0) + 300.0
    rng = np.random.default_rng(seed)
    # bins at half the pitch: about 3 per spot once bins away from tissue are dropped
    n_base = base.n_obs if kind == "visium" else base.n_obs * 3
    n_tiles = int(np.ceil(n / n_base))
    cols = int(np.ceil(np.sqrt(n_tiles)))
    shifts = np.array([(i % cols, i // cols) for i in range(n_tiles)], dtype=float) * span
    tiled_xy = (xy[None] + shifts[:, None]).reshape(-1, 2)
    src = np.tile(np.arange(base.n_obs), n_tiles)
    if kind == "visium":
        keep = np.arange(min(n, len(src)))
        counts = X[src[keep]]
        coords = tiled_xy[keep]
    else:
        pitch = np.median(cKDTree(xy).query(xy, k=2)[0][:, 1]) / 2
        lo, hi = tiled_xy.min(0), tiled_xy.max(0)
        gx, gy = np.meshgrid(np.arange(lo[0], hi[0], pitch), np.arange(lo[1], hi[1], pitch))
        grid = np.c_[gx.ravel(), gy.ravel()]
        d, nearest = cKDTree(tiled_xy).query(grid)
        grid, nearest = grid[d < pitch * 1.5], nearest[d < pitch * 1.5]
        grid, nearest = grid[:n], nearest[:n]
        counts = X[src[nearest]].astype(np.int64)
        counts.data = rng.binomial(counts.data, 0.25).astype(np.float32)
        counts.eliminate_zeros()
        ok = np.asarray(counts.sum(1)).ravel() > 0
        counts, coords = counts[ok], grid[ok]
    out = AnnData(sp.csr_matrix(counts, dtype=np.float32), var=base.var[[]].copy())
    out.obsm["spatial"] = coords
    return out


def _graphst_input(adata, path: Path) -> str:
    """Write GraphST's features: chronotope's preprocessing, scaled genes clipped at 10.

    Returns a digest of the features and coordinates (the key of ``--graphst-cache``).
    """
    import hashlib

    from anndata import AnnData

    import chronotope as ct

    a = adata.copy()
    ct.pp.preprocess(a, n_top_genes=3000)
    ct.pp.scale(a, max_value=10.0)
    out = AnnData(np.asarray(a.obsm["scaled"], dtype=np.float32))
    out.obsm["spatial"] = np.asarray(a.obsm["spatial"], dtype=float)
    out.write_h5ad(path)
    digest = hashlib.sha1(np.ascontiguousarray(out.X).tobytes())
    digest.update(np.ascontiguousarray(out.obsm["spatial"]).tobytes())
    return digest.hexdigest()[:16]


def _scores(truth: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    m = truth != "nan"
    return {
        "ari": float(adjusted_rand_score(truth[m], pred[m])),
        "nmi": float(normalized_mutual_info_score(truth[m], pred[m])),
    }


def _reduce(embedding: np.ndarray, seed: int) -> np.ndarray:
    """The clustering input of tl.spatial_domains: PCA to 20 components of the embedding."""
    from sklearn.decomposition import PCA

    return PCA(min(20, embedding.shape[1]), random_state=seed).fit_transform(embedding)


def _cluster_reduced(red: np.ndarray, coords: np.ndarray, k: int, seed: int) -> np.ndarray:
    """EEE mixture (BIC against EII) on the 20 PCs, then the spatial majority vote."""
    from chronotope.domains import gmm_eee, refine_labels

    return refine_labels(gmm_eee(red, k, random_state=seed), coords)


def _cluster(embedding: np.ndarray, coords: np.ndarray, k: int, seed: int) -> np.ndarray:
    """The clustering of tl.spatial_domains: PCA 20, EEE mixture, majority vote."""
    return _cluster_reduced(_reduce(embedding, seed), coords, k, seed)


# ----------------------------------------------------------------------------- children
def child(spec: dict[str, Any]) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    import anndata as ad

    import chronotope as ct
    import chronotope.tl  # torch and the rest; scikit-learn loads when clustering

    base = peak_rss_bytes() / 2**30
    adata = ad.read_h5ad(spec["input"])
    t0, c0 = time.perf_counter(), time.process_time()
    ct.tl.spatial_domains(adata, spec["n_domains"], seed=spec["seed"], device=bench_device())
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    out: dict[str, Any] = {
        "wall_s": wall,
        "cpu_s": cpu,
        "peak_rss_gb": peak_rss_bytes() / 2**30,
        "import_rss_gb": base,
        "hop_weights": [float(w) for w in adata.uns["domain"]["hop_weights"]],
    }
    if spec.get("labels_key"):
        truth = adata.obs[spec["labels_key"]].astype(str).to_numpy()
        out.update(_scores(truth, adata.obs["domain"].astype(str).to_numpy()))
    emit(out)


CHRONOTOPE_PY: str | None = None  # --chronotope-python


def run_chronotope(path: Path, k: int, seed: int, labels_key: str | None, threads: int):
    spec = {
        "input": str(path),
        "n_domains": k,
        "seed": seed,
        "labels_key": labels_key,
        "threads": threads,
    }
    return run_child(HERE, spec, timeout=3600, python=CHRONOTOPE_PY)


def graphst_import_rss(py: str) -> float:
    """Peak RSS (GB) of GraphST's Python after importing what the runner imports."""
    code = (
        "import anndata, numpy, torch, scanpy, ot\n"
        "from GraphST import GraphST\n"
        "print([ln for ln in open('/proc/self/status') if ln.startswith('VmHWM')][0].split()[1])"
    )
    proc = subprocess.run([py, "-c", code], capture_output=True, text=True, check=False)
    try:
        return int(proc.stdout.strip().splitlines()[-1]) * 1024 / 2**30
    except (ValueError, IndexError):
        return float("nan")


def run_graphst(
    py: str,
    path: Path,
    seed: int,
    threads: int,
    epochs: int | None,
    work: Path,
    cache: Path | None = None,
    key: str = "",
) -> dict[str, Any]:
    """Run GraphST in its own process; reuse ``cache/graphst_{key}_{seed}_{epochs}.*`` if there.

    The result holds ``reduced``: the 20 clustering PCs of GraphST's embedding (what
    :func:`_cluster_reduced` clusters, the same numbers as clustering the embedding). The
    cache keeps those PCs (about 0.3 MB per DLPFC run, small enough to commit), not the
    3,000-column embedding.
    """
    out = work / f"graphst_{path.stem}_{seed}.npz"
    stored = cache / f"graphst_{key}_{seed}_{epochs or 'default'}" if cache and key else None
    if stored is not None and stored.with_suffix(".json").exists():
        res = json.loads(stored.with_suffix(".json").read_text())
        with np.load(stored.with_suffix(".npz")) as npz:
            if "reduced" in npz:
                res["reduced"] = npz["reduced"]
            else:  # an older cache entry with the whole embedding
                res["reduced"] = _reduce(npz["embedding"], seed)
        res["cached"] = True
        return res
    cmd = [py, str(GRAPHST_PEER), "--input", str(path), "--output", str(out)]
    cmd += ["--seed", str(seed), "--device", "cpu", "--threads", str(threads)]
    if epochs is not None:
        cmd += ["--epochs", str(epochs)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t0
    res: dict[str, Any] = {}
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("RESULT "):
            res = json.loads(line[len("RESULT ") :])
            break
    if not res:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail)}
    npz = np.load(out)
    res["reduced"] = _reduce(npz["embedding"], seed)
    res["train_seconds"] = float(npz["train_seconds"])
    res["wall_s"] = float(res.get("wall_seconds", wall))
    res["peak_rss_gb"] = res["peak_rss_bytes"] / 2**30
    if stored is not None:
        stored.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(stored.with_suffix(".npz"), reduced=res["reduced"])
        meta = {k: v for k, v in res.items() if k != "reduced"}
        stored.with_suffix(".json").write_text(json.dumps(meta))
    return res


# ----------------------------------------------------------------------------- cases
def _summary(name: str, tool: str, runs: list[dict[str, Any]]) -> str:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return f"{name:8s} {tool:10s} failed: {runs[0].get('error')}"
    ari = np.array([r["ari"] for r in ok])
    nmi = np.array([r["nmi"] for r in ok])
    wall = np.mean([r["wall_s"] for r in ok])
    cpu = np.mean([r.get("cpu_s", np.nan) for r in ok])
    rss = max(r["peak_rss_gb"] for r in ok)
    n_cached = sum(bool(r.get("cached")) for r in ok)
    return (
        f"{name:8s} {tool:10s} ARI {ari.mean():.3f} ± {ari.std(ddof=1) if len(ari) > 1 else 0:.3f}"
        f"  NMI {nmi.mean():.3f} ± {nmi.std(ddof=1) if len(nmi) > 1 else 0:.3f}"
        f"  (n={len(ok)})  wall {wall:7.1f} s  cpu {cpu:7.1f} s  peak RSS {rss:.2f} GB"
        + (f"  ({n_cached} of {len(ok)} from --graphst-cache)" if n_cached else "")
    )


def case_labelled(names: list[str], args: argparse.Namespace, work: Path, graphst: bool) -> None:
    for name in names:
        adata, key, k = _load(name)
        raw = work / f"{name}.h5ad"
        adata.write_h5ad(raw)
        truth = adata.obs[key].astype(str).to_numpy()
        coords = np.asarray(adata.obsm["spatial"], dtype=float)
        ours = [run_chronotope(raw, k, s, key, args.threads) for s in range(args.seeds)]
        print(_summary(name, "chronotope", ours), flush=True)
        for s, r in enumerate(ours):
            print(f"    seed {s}: {json.dumps({k_: r.get(k_) for k_ in ('ari', 'nmi', 'wall_s')})}")
        if not graphst:
            continue
        feats = work / f"{name}_graphst.h5ad"
        key = _graphst_input(adata, feats)
        peers = []
        for s in range(args.graphst_seeds):
            r = run_graphst(
                args.graphst_python, feats, s, args.threads, None, work, args.graphst_cache, key
            )
            if "error" not in r:
                r.update(_scores(truth, _cluster_reduced(r.pop("reduced"), coords, k, s)))
                r["cpu_s"] = r.get("cpu_s", np.nan)
            peers.append(r)
            shown = {k_: r.get(k_) for k_ in ("ari", "nmi", "wall_s", "cached", "error")}
            print(f"    graphst seed {s}: {json.dumps(shown)}", flush=True)
        print(_summary(name, "graphst", peers), flush=True)
        if peers and "error" not in peers[0]:
            a1 = np.mean([r["ari"] for r in ours])
            a2 = np.mean([r["ari"] for r in peers if "ari" in r])
            m1 = max(r["peak_rss_gb"] for r in ours)
            m2 = max(r["peak_rss_gb"] for r in peers if "peak_rss_gb" in r)
            print(f"{name:8s} chronotope/graphst: ARI {a1 - a2:+.3f}, memory {m2 / m1:.1f}x less")


def case_scale(args: argparse.Namespace, work: Path) -> None:
    for kind in args.kinds.split(","):
        for n in [int(v) for v in args.sizes.split(",")]:
            adata = _tile(n, kind)
            path = work / f"{kind}_{n}.h5ad"
            adata.write_h5ad(path)
            r = run_chronotope(path, 7, 0, None, args.threads)
            line = f"scale {kind:6s} n={adata.n_obs:7,d} chronotope"
            if "error" in r:
                print(f"{line} failed: {r['error']}", flush=True)
            else:
                print(
                    f"{line} wall {r['wall_s']:7.1f} s  cpu {r['cpu_s']:7.1f} s  "
                    f"peak RSS {r['peak_rss_gb']:.2f} GB ({r['peak_rss_gb'] * 1024:.0f} MiB; "
                    f"imports {r['import_rss_gb']:.2f} GB)",
                    flush=True,
                )
            if args.graphst and n <= args.graphst_max_n:
                feats = work / f"{kind}_{n}_graphst.h5ad"
                _graphst_input(adata, feats)
                g = run_graphst(args.graphst_python, feats, 0, args.threads, 3, work)
                if "error" in g:
                    print(f"scale {kind:6s} n={adata.n_obs:7,d} graphst    failed: {g['error']}")
                else:
                    per_epoch = g.get("train_seconds", g["wall_s"]) / 3
                    g_base = graphst_import_rss(args.graphst_python)
                    ours = r.get("peak_rss_gb", np.nan)
                    ours_work = ours - r.get("import_rss_gb", np.nan)
                    print(
                        f"scale {kind:6s} n={adata.n_obs:7,d} graphst    3 epochs wall "
                        f"{g['wall_s']:7.1f} s (about {per_epoch:.1f} s per epoch, 600 by "
                        f"default)  peak RSS {g['peak_rss_gb']:.2f} GB (imports "
                        f"{g_base:.2f} GB)\n"
                        f"scale {kind:6s} n={adata.n_obs:7,d} memory: peak RSS "
                        f"{g['peak_rss_gb'] / ours:.1f}x less for chronotope; above the "
                        f"imports ({ours_work:.2f} vs {g['peak_rss_gb'] - g_base:.2f} GB) "
                        f"{(g['peak_rss_gb'] - g_base) / ours_work:.1f}x less",
                        flush=True,
                    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child")
    ap.add_argument("--cases", default="dlpfc,secondary,scale")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--graphst-seeds", type=int, default=5)
    ap.add_argument("--graphst-python", default=DEFAULT_GRAPHST_PY)
    ap.add_argument("--no-graphst", dest="graphst", action="store_false")
    ap.add_argument("--graphst-secondary", action="store_true")
    ap.add_argument("--graphst-max-n", type=int, default=10_000)
    ap.add_argument("--slices", default="151673,151674", help="DLPFC slices of the dlpfc case")
    ap.add_argument("--sizes", default="10000,50000,200000")
    ap.add_argument("--kinds", default="visium,stereo", help="synthetic tissues of the scale case")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default=None, help="folder for inputs (default: a temp folder)")
    ap.add_argument(
        "--graphst-cache",
        type=Path,
        default=HERE.parent / "cache" / "graphst",
        help="folder keeping the clustering PCs of GraphST runs by (features digest, seed, "
        "epochs); runs found there are reused and marked cached (GraphST takes 45-50 min per "
        "DLPFC slice and seed on one CPU core). Default: benchmarks/cache/graphst, committed "
        "with the repository; 'none': always run GraphST",
    )
    ap.add_argument(
        "--chronotope-python",
        default=None,
        help="Python that runs the chronotope children (default: this one); e.g. an "
        "environment with chronotope's base install only, whose imports match GraphST's "
        "(anndata imports dask.array and xarray at import time when they are installed)",
    )
    add_device_argument(ap)
    args = ap.parse_args()
    if str(args.graphst_cache).lower() == "none":
        args.graphst_cache = None
    global CHRONOTOPE_PY
    CHRONOTOPE_PY = args.chronotope_python
    if args.child:
        child(json.loads(args.child))
        return
    print(f"{use_device(args.device)} (GraphST runs on the CPU)", flush=True)
    if args.graphst and not Path(args.graphst_python).exists():
        print(f"GraphST python {args.graphst_python} not found: GraphST runs skipped")
        args.graphst = False
    work = Path(args.work or tempfile.mkdtemp(prefix="chronotope_domains_"))
    work.mkdir(parents=True, exist_ok=True)
    cases = args.cases.split(",")
    print(
        f"threads per run: {args.threads}; seeds: chronotope {args.seeds}, GraphST "
        f"{args.graphst_seeds if args.graphst else 0}",
        flush=True,
    )
    if "dlpfc" in cases:
        case_labelled(args.slices.split(","), args, work, args.graphst)
    if "secondary" in cases:
        names = ["mob", "starmap_BZ5", "starmap_BZ9", "starmap_BZ14"]
        case_labelled(names, args, work, args.graphst and args.graphst_secondary)
    if "scale" in cases:
        case_scale(args, work)


if __name__ == "__main__":
    main()
