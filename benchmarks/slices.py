"""Slices: alignment accuracy, known-truth recovery, scale; chronotope vs PASTE, PASTE2, moscot.

Cases
-----
dlpfc
    DLPFC 151673 -> 151674 (adjacent sections, one donor). PASTE's accuracy: the plan
    mass between spots of the same manual layer, over pairs where both spots are
    labelled, divided by the plan mass over those pairs (the plan normalised to 1; the
    kept mass is printed too). chronotope (``tl.align_slices`` defaults), PASTE
    (paste-bio 1.4.0 ``pairwise_align``), PASTE2 (``partial_pairwise_align``, s = 0.99,
    ``dissimilarity="pca"``) and moscot (``AlignmentProblem``): wall time of the
    alignment call, peak RSS of the process, ratios against chronotope.
known
    151673 against a copy of itself rotated by 35 degrees, translated, cropped to the 70 %
    of spots on one side of a line, with counts thinned to 70 % (binomial) and
    coordinates jittered by 0.1 spot spacing. chronotope partial (``mass=0.7``, told the
    overlap as PASTE2 is) and unbalanced (``tau=0.5``, not told) vs PASTE2 (``s=0.7``).
    The transform of each plan is fitted the same way (weighted Kabsch,
    :func:`chronotope.slices.fit_rigid`, which is PASTE's ``generalized_procrustes``):
    rotation error in degrees and RMSE of the aligned coordinates in spot spacings.
interp
    Leave-one-out interpolation: breast sections (Stahl 2016; predict 2 from 1 and 3,
    3 from 2 and 4) and HER2+ patient C (C2 from C1 and C3, C3 from C2 and C4, C4 from
    C3 and C5). The held-out slice is aligned into the generated slice's frame (the
    earlier slice's) with ``tl.align_slices`` and each real spot is matched to the
    nearest generated spot. Metrics: median per-gene Pearson over the 1,000 genes with
    the highest mean log-expression in the held-out slice (log1p of counts per 1e4),
    Chamfer distance of positions (mean of both directions, in spot spacings), and for
    HER2+ the agreement of the study's cluster labels carried to the generated spots
    with those of the matched real spots. Baselines on the same matching: "copy" (the
    better of the two neighbouring slices, aligned into the frame, as the generated
    slice), and "PASTE-linear" (PASTE's plan between the neighbours; each spot of the
    earlier slice moved halfway to its barycentric partner, expression averaged the
    same way).
xplatform
    Cross-platform: DLPFC 151674 re-measured as a coarser platform (Visium spots summed
    into bins of twice the spacing, like legacy ST; 60 % of the genes; a per-gene capture
    factor, log-normal with sd 0.5; coordinates in other units (x 0.37), rotated 25
    degrees). Against 151673 (Visium): plan accuracy (bin label = majority layer) and
    the fitted scale; the known-truth variant (151673 against its own binned copy):
    rotation, scale and RMSE. Then ``tl.integrate_slices``: kNN (k = 10) transfer of the
    layers from 151673 to the bins in the joint embedding ``X_domain`` and in the joint
    PCA without per-slice centring (the baseline), joint-domain ARI per slice, with
    ``center_slices`` on and off; wall time and peak RSS of the case's process.
scale
    Two synthetic slices of 5k / 20k / 50k spots (151673 and 151674 tiled side by side):
    chronotope wall time and peak RSS (PASTE at 5k for comparison).

Each tool runs in a fresh process (peak RSS = ``VmHWM`` of that process); one thread
each (``--threads``). Peers run in their own environments (``benchmarks/_slices_peers.py``
describes the installs); a missing environment skips that peer with a message.

Usage::

    python benchmarks/slices.py                         # all cases
    python benchmarks/slices.py --cases dlpfc --peers paste,paste2,moscot
    python benchmarks/slices.py --cases scale --sizes 5000,20000,50000
    python benchmarks/slices.py --cases interp --peers paste
    python benchmarks/slices.py --cases xplatform
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
PEER_SCRIPT = HERE.parent / "_slices_peers.py"
PEER_PYTHON = {
    "paste": "/work/peers/paste/bin/python",
    "paste2": "/work/peers/paste2/bin/python",
    "moscot": "/work/peers/moscot/bin/python",
}


# ----------------------------------------------------------------------------- data
def _base(name: str):
    """A DLPFC slice: counts, coordinates, layer labels only."""
    import scipy.sparse as sp
    from anndata import AnnData

    import chronotope as ct

    a = ct.datasets.dlpfc(name, load_image=False)
    out = AnnData(sp.csr_matrix(a.X, dtype=np.float32), var=a.var[[]].copy())
    out.obs_names = a.obs_names
    out.obs["layer"] = a.obs["layer"].astype(str).to_numpy()
    out.obsm["spatial"] = np.asarray(a.obsm["spatial"], dtype=float)
    return out


def _spacing(xy: np.ndarray) -> float:
    from scipy.spatial import cKDTree

    return float(np.median(cKDTree(xy).query(xy, k=2)[0][:, 1]))


def _shared(a, b):
    genes = a.var_names[a.var_names.isin(b.var_names)]
    return a[:, genes].copy(), b[:, genes].copy()


def _known_pair(angle: float = 35.0, keep: float = 0.7, seed: int = 0):
    """Reference 151673 and its transformed, cropped, thinned copy (truth coordinates)."""
    import scipy.sparse as sp

    ref = _base("151673")
    rng = np.random.default_rng(seed)
    xy = ref.obsm["spatial"]
    direction = np.array([np.cos(0.3), np.sin(0.3)])
    proj = (xy - xy.mean(0)) @ direction
    kept = proj <= np.quantile(proj, keep)
    mov = ref[kept].copy()
    x = sp.csr_matrix(mov.X).astype(np.int64)
    x.data = rng.binomial(x.data, 0.7)
    x.eliminate_zeros()
    mov.X = x.astype(np.float32)
    t = np.radians(angle)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    truth = xy[kept]
    jitter = rng.normal(0, 0.1 * _spacing(xy), size=truth.shape)
    mov.obsm["spatial"] = (truth - truth.mean(0)) @ rot.T + np.array([800.0, -500.0]) + jitter
    mov.obs_names = [f"{n}-moved" for n in mov.obs_names]
    return ref, mov, truth


def _tile(a, n: int):
    """``a`` tiled side by side until ``n`` spots (copies shifted by the slice's span)."""
    import anndata as ad

    xy = a.obsm["spatial"]
    span = xy.max(0) - xy.min(0) + 5 * _spacing(xy)
    n_tiles = int(np.ceil(n / a.n_obs))
    cols = int(np.ceil(np.sqrt(n_tiles)))
    parts = []
    for i in range(n_tiles):
        c = a.copy()
        c.obsm["spatial"] = xy + np.array([i % cols, i // cols]) * span
        c.obs_names = [f"{s}-{i}" for s in a.obs_names]
        parts.append(c)
    out = ad.concat(parts, merge="same")
    return out[:n].copy()


def pseudo_platform(a, *, factor=2.0, panel=0.6, capture_sd=0.5, units=0.37, angle=25.0,
                    seed=0):  # fmt: skip
    """``a`` re-measured by a coarser platform; returns it and the bins' true positions."""
    import scipy.sparse as sp
    from anndata import AnnData

    rng = np.random.default_rng(seed)
    xy = a.obsm["spatial"]
    g = factor * _spacing(xy)
    cell, inv = np.unique(np.round((xy - xy.min(0)) / g).astype(int), axis=0,
                          return_inverse=True)  # fmt: skip
    inv = inv.ravel()
    pool = sp.csr_matrix((np.ones(len(inv)), (inv, np.arange(len(inv)))),
                         shape=(len(cell), len(inv)))  # fmt: skip
    n_in = np.asarray(pool.sum(1)).ravel()
    cats, li = np.unique(a.obs["layer"].to_numpy().astype(str), return_inverse=True)
    onehot = sp.csr_matrix((np.ones(len(li)), (np.arange(len(li)), li)),
                           shape=(len(li), len(cats)))  # fmt: skip
    label = cats[(pool @ onehot).toarray().argmax(1)]
    keep = n_in >= 2
    genes = np.sort(rng.choice(a.n_vars, int(panel * a.n_vars), replace=False))
    capture = np.minimum(1.0, 0.5 * np.exp(rng.normal(0, capture_sd, a.n_vars)))[genes]
    x = (pool @ sp.csr_matrix(a.X)).tocsr()[keep][:, genes].tocsr().astype(np.int64)
    x.data = rng.binomial(x.data, capture[x.indices])
    x.eliminate_zeros()
    truth = cell[keep] * g + xy.min(0)
    t = np.radians(angle)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    out = AnnData(x.astype(np.float32))
    out.var_names = a.var_names[genes]
    out.obs_names = [f"bin{i}" for i in range(out.n_obs)]
    out.obs["layer"] = label[keep]
    out.obsm["spatial"] = ((truth - truth.mean(0)) @ rot.T) * units + np.array([300.0, 120.0])
    return out, truth


# ----------------------------------------------------------------------------- metrics
def layer_accuracy(plan, la: np.ndarray, lb: np.ndarray) -> tuple[float, float]:
    """PASTE's accuracy over labelled pairs (plan normalised), and the total plan mass."""
    import scipy.sparse as sp

    p = sp.coo_matrix(plan)
    ok = (la[p.row] != "nan") & (lb[p.col] != "nan")
    w = p.data[ok]
    same = la[p.row][ok] == lb[p.col][ok]
    return float(w[same].sum() / w.sum()), float(p.data.sum())


def transform_errors(plan, ref_xy, mov_xy, truth, angle: float) -> tuple[float, float]:
    """Rotation error (degrees) and RMSE (spot spacings) of the plan's fitted transform."""
    from chronotope.slices import fit_rigid

    tr = fit_rigid(ref_xy, mov_xy, plan)
    err = abs((tr.angle_degrees + angle + 180.0) % 360.0 - 180.0)  # moving was rotated +angle
    rmse = float(np.sqrt(((tr.apply(mov_xy) - truth) ** 2).sum(axis=1).mean()))
    return err, rmse / _spacing(ref_xy)


# ----------------------------------------------------------------------------- children
def child(spec: dict[str, Any]) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    import scipy.sparse as sp

    import chronotope as ct

    a = ct.io.read_h5ad(spec["a"])
    b = ct.io.read_h5ad(spec["b"])
    t0 = time.perf_counter()
    (plan,) = ct.tl.align_slices(
        [a, b], mass=spec["mass"], tau=spec["tau"], seed=0, device=bench_device()
    )
    wall = time.perf_counter() - t0
    sp.save_npz(spec["plan"], sp.csr_matrix(plan))
    emit(
        {
            "wall_s": wall,
            "peak_rss_gb": peak_rss_bytes() / 2**30,
            "info": {
                k: (v.tolist() if isinstance(v, np.ndarray) else v)
                for k, v in b.uns["alignment"]["info"].items()
                if k != "seconds"
            },
            "seconds": b.uns["alignment"]["info"]["seconds"],
        }
    )


def run_chronotope(
    a: Path, b: Path, out: Path, threads: int, mass: float | None = None, tau: float = 1.0
):
    spec = {"a": str(a), "b": str(b), "plan": str(out), "threads": threads}
    spec.update(mass=mass, tau=tau)
    res = run_child(HERE, spec, timeout=3600)
    if "error" not in res:
        import scipy.sparse as sp

        res["plan"] = sp.load_npz(out)
    return res


def run_peer(tool: str, a: Path, b: Path, out: Path, threads: int, extra: list[str]):
    py = PEER_PYTHON[tool]
    if not Path(py).exists():
        return {"error": f"{tool} environment {py} not found"}
    cmd = [py, str(PEER_SCRIPT), "--tool", tool, "--a", str(a), "--b", str(b)]
    cmd += ["--output", str(out), "--threads", str(threads), *extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
    env["MKL_NUM_THREADS"] = str(threads)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    res: dict[str, Any] = {}
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("RESULT "):
            res = json.loads(line[len("RESULT ") :])
            break
    if not res or not out.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail) or f"exit {proc.returncode}"}
    res["plan"] = np.load(out)["plan"]
    res["wall_s"] = float(res.get("wall_seconds", time.perf_counter() - t0))
    res["peak_rss_gb"] = float(res["peak_rss_bytes"]) / 2**30
    return res


# ----------------------------------------------------------------------------- cases
def _line(case: str, tool: str, res: dict[str, Any], extra: str) -> str:
    if "error" in res:
        return f"{case:6s} {tool:10s} failed: {res['error']}"
    return (
        f"{case:6s} {tool:10s} {extra}  wall {res['wall_s']:8.1f} s  "
        f"peak RSS {res['peak_rss_gb']:.2f} GB"
    )


def case_dlpfc(args: argparse.Namespace, work: Path) -> None:
    a, b = _shared(_base("151673"), _base("151674"))
    pa, pb = work / "151673.h5ad", work / "151674.h5ad"
    a.write_h5ad(pa)
    b.write_h5ad(pb)
    la, lb = a.obs["layer"].to_numpy(), b.obs["layer"].to_numpy()
    ours = run_chronotope(pa, pb, work / "plan_chronotope.npz", args.threads)
    if "error" not in ours:
        acc, mass = layer_accuracy(ours["plan"], la, lb)
        extra = f"accuracy {acc:.3f} (plan mass {mass:.3f})"
    print(_line("dlpfc", "chronotope", ours, extra if "error" not in ours else ""), flush=True)
    for tool in args.peers:
        extra_args = {"paste2": ["--s", "0.99"]}.get(tool, [])
        res = run_peer(tool, pa, pb, work / f"plan_{tool}.npz", args.threads, extra_args)
        if "error" in res:
            print(_line("dlpfc", tool, res, ""), flush=True)
            continue
        acc_p, mass_p = layer_accuracy(res["plan"], la, lb)
        print(
            _line("dlpfc", tool, res, f"accuracy {acc_p:.3f} (plan mass {mass_p:.3f})"),
            flush=True,
        )
        if "error" not in ours:
            print(
                f"dlpfc  chronotope/{tool}: accuracy {acc - acc_p:+.3f}, "
                f"{res['wall_s'] / ours['wall_s']:.1f}x faster, "
                f"{res['peak_rss_gb'] / ours['peak_rss_gb']:.1f}x less memory",
                flush=True,
            )


def case_known(args: argparse.Namespace, work: Path) -> None:
    angle = 35.0
    ref, mov, truth = _known_pair(angle=angle)
    ref, mov = _shared(ref, mov)
    pa, pb = work / "known_ref.h5ad", work / "known_mov.h5ad"
    ref.write_h5ad(pa)
    mov.write_h5ad(pb)
    rx, mx = ref.obsm["spatial"], mov.obsm["spatial"]
    for label, kw in (("mass=0.7", {"mass": 0.7}), ("tau=0.5", {"tau": 0.5})):
        ours = run_chronotope(pa, pb, work / "plan_known.npz", args.threads, **kw)
        extra = ""
        if "error" not in ours:
            err, rmse = transform_errors(ours["plan"], rx, mx, truth, angle)
            extra = f"rotation error {err:5.2f} deg  RMSE {rmse:5.2f} spacings  ({label})"
        print(_line("known", "chronotope", ours, extra), flush=True)
    if "paste2" in args.peers:
        res = run_peer("paste2", pa, pb, work / "plan_known_paste2.npz", args.threads,
                       ["--s", "0.7"])  # fmt: skip
        if "error" in res:
            print(_line("known", "paste2", res, ""), flush=True)
            return
        err_p, rmse_p = transform_errors(res["plan"], rx, mx, truth, angle)
        print(
            _line(
                "known",
                "paste2",
                res,
                f"rotation error {err_p:5.2f} deg  RMSE {rmse_p:5.2f} spacings",
            ),
            flush=True,
        )


def _lognorm(a, genes) -> np.ndarray:
    from chronotope.tl._slices import _log_normalised

    return _log_normalised(a[:, genes].X).toarray()


def _median_gene_pearson(x: np.ndarray, y: np.ndarray) -> float:
    x = x - x.mean(0)
    y = y - y.mean(0)
    den = np.sqrt((x * x).sum(0) * (y * y).sum(0))
    ok = den > 0
    return float(np.median((x * y).sum(0)[ok] / den[ok]))


def _score(gen_xy, gen_expr, gen_labels, real, real_xy, genes, labels_key):
    """Pearson, Chamfer and label agreement of a generated slice against the real one."""
    from scipy.spatial import cKDTree

    spacing = _spacing(real_xy)
    d_rg, nn = cKDTree(gen_xy).query(real_xy)
    d_gr = cKDTree(real_xy).query(gen_xy)[0]
    chamfer = (d_rg.mean() + d_gr.mean()) / 2 / spacing
    pearson = _median_gene_pearson(_lognorm(real, genes), gen_expr[nn])
    agree = float("nan")
    if labels_key is not None and gen_labels is not None:
        truth = real.obs[labels_key].astype(str).to_numpy()
        ok = truth != "nan"
        agree = float((np.asarray(gen_labels)[nn][ok] == truth[ok]).mean())
    return pearson, chamfer, agree


def case_interp(args: argparse.Namespace, work: Path) -> None:
    import chronotope as ct

    breast = ct.datasets.breast_slices()
    her2 = {s: ct.datasets.her2st(s, load_image=False) for s in ("C1", "C2", "C3", "C4", "C5")}
    for a in her2.values():
        a.obs["cluster"] = a.obs["cluster"].astype(str)
    triples = [
        ("breast 2", breast[0], breast[1], breast[2], None),
        ("breast 3", breast[1], breast[2], breast[3], None),
        ("her2 C2", her2["C1"], her2["C2"], her2["C3"], "cluster"),
        ("her2 C3", her2["C2"], her2["C3"], her2["C4"], "cluster"),
        ("her2 C4", her2["C3"], her2["C4"], her2["C5"], "cluster"),
    ]
    for name, first, real, second, key in triples:
        t0 = time.perf_counter()
        gen = ct.tl.interpolate_slices(
            first, second, t=0.5, labels_key=key, device=bench_device()
        )
        wall = time.perf_counter() - t0
        frame = [first.copy(), real.copy()]
        # the real slice in the earlier slice's frame
        ct.tl.align_slices(frame, device=bench_device())
        real_xy = frame[1].obsm["spatial_aligned"]
        shared = gen.var_names[gen.var_names.isin(real.var_names)]
        top = np.argsort(-_lognorm(real, shared).mean(0))[:1000]
        genes = shared[np.sort(top)]
        g_expr = np.asarray(gen[:, genes].X)
        labels = gen.obs[key].to_numpy() if key else None
        ours = _score(gen.obsm["spatial"], g_expr, labels, real, real_xy, genes, key)
        # copy baseline: each neighbour aligned into the frame, the better one
        copies = []
        for other in (first, second):
            pair = [first.copy(), other.copy()]
            if other is not first:
                ct.tl.align_slices(pair, device=bench_device())
                xy = pair[1].obsm["spatial_aligned"]
            else:
                xy = np.asarray(first.obsm["spatial"], float)
            o_genes = genes[genes.isin(other.var_names)]
            expr = np.zeros((other.n_obs, len(genes)))
            expr[:, genes.isin(other.var_names)] = _lognorm(other, o_genes)
            lab = other.obs[key].astype(str).to_numpy() if key else None
            copies.append(_score(xy, expr, lab, real, real_xy, genes, key))
        copy = max(copies, key=lambda r: r[0])
        fmt = "pearson {:.3f}  chamfer {:.2f}  labels {:.3f}"
        print(f"interp {name:8s} chronotope {fmt.format(*ours)}  ({wall:.1f} s)", flush=True)
        print(f"interp {name:8s} copy       {fmt.format(*copy)}", flush=True)
        if "paste" in args.peers:
            _paste_linear(name, first, second, real, real_xy, genes, key, args, work, fmt)
        print(
            f"interp {name:8s} chronotope - copy: pearson {ours[0] - copy[0]:+.3f}, "
            f"chamfer {ours[1] - copy[1]:+.2f}",
            flush=True,
        )


def _paste_linear(name, first, second, real, real_xy, genes, key, args, work, fmt) -> None:
    """PASTE plan between the neighbours, linear interpolation on the earlier slice."""
    import chronotope as ct

    a, b = _shared(first, second)
    pa, pb = work / "interp_a.h5ad", work / "interp_b.h5ad"
    a.write_h5ad(pa)
    b.write_h5ad(pb)
    res = run_peer("paste", pa, pb, work / "plan_interp_paste.npz", args.threads, [])
    if "error" in res:
        print(f"interp {name:8s} paste-lin  failed: {res['error']}", flush=True)
        return
    plan = np.asarray(res["plan"], dtype=float)
    tr = ct.slices.fit_rigid(a.obsm["spatial"], b.obsm["spatial"], plan)
    xb = tr.apply(b.obsm["spatial"])
    row = plan.sum(1, keepdims=True)
    row[row == 0] = 1.0
    xy = 0.5 * np.asarray(a.obsm["spatial"], float) + 0.5 * (plan @ xb) / row
    in_a, in_b = genes.isin(a.var_names), genes.isin(b.var_names)
    ea = np.zeros((a.n_obs, len(genes)))
    ea[:, in_a] = _lognorm(a, genes[in_a])
    eb = np.zeros((b.n_obs, len(genes)))
    eb[:, in_b] = _lognorm(b, genes[in_b])
    expr = 0.5 * ea + 0.5 * (plan @ eb) / row
    lab = a.obs[key].astype(str).to_numpy() if key else None
    score = _score(xy, expr, lab, real, real_xy, genes, key)
    print(f"interp {name:8s} paste-lin  {fmt.format(*score)}  ({res['wall_s']:.1f} s PASTE)")


def case_xplatform(args: argparse.Namespace, work: Path) -> None:
    import pandas as pd
    from sklearn.metrics import adjusted_rand_score
    from sklearn.neighbors import KNeighborsClassifier

    import chronotope as ct

    t_case = time.perf_counter()
    visium = _base("151673")
    units, angle = 0.37, 25.0
    binned, _ = pseudo_platform(_base("151674"), units=units, angle=angle)
    own, truth = pseudo_platform(visium, units=units, angle=angle, seed=1)
    print(f"xplat  151673 {visium.n_obs} spots x {visium.n_vars} genes; binned 151674 "
          f"{binned.n_obs} bins x {binned.n_vars} genes", flush=True)  # fmt: skip
    spacing = _spacing(visium.obsm["spatial"])
    for name, other in (("151674 binned", binned), ("151673 binned (truth)", own)):
        ra, rb = visium.copy(), other.copy()
        t0 = time.perf_counter()
        (plan,) = ct.tl.align_slices(
            [ra, rb], scaling=True, center_slices=True, device=bench_device()
        )
        wall = time.perf_counter() - t0
        acc, _ = layer_accuracy(plan, ra.obs["layer"].to_numpy(), rb.obs["layer"].to_numpy())
        tr = rb.uns["alignment"]["transform"]
        line = f"xplat  align {name:22s} accuracy {acc:.3f}  scale {tr['scale']:.3f} " \
               f"(units ratio {1 / units:.3f})"  # fmt: skip
        if other is own:
            rot = np.asarray(tr["rotation"])
            err = abs((np.degrees(np.arctan2(rot[1, 0], rot[0, 0])) + angle + 180) % 360 - 180)
            rmse = np.sqrt(((rb.obsm["spatial_aligned"] - truth) ** 2).sum(1).mean()) / spacing
            line += f"  rotation error {err:.2f} deg  RMSE {rmse:.2f} spacings"
        print(f"{line}  {wall:.1f} s", flush=True)
        if other is binned:
            from chronotope.slices.transfer import transfer_labels

            src = ra.obs["layer"].to_numpy().astype(object)
            src[src == "nan"] = None
            res = transfer_labels(plan, src, axis=0, ignore_missing=True)
            got = np.asarray(res.labels.astype(object))
            truth_b = rb.obs["layer"].to_numpy()
            ok = (truth_b != "nan") & ~pd.isna(got)
            agree = float((got[ok].astype(str) == truth_b[ok]).mean())
            print(f"xplat  layers carried along the plan to the bins: {agree:.3f} agree "
                  f"({ok.mean():.3f} of bins labelled)", flush=True)  # fmt: skip

    def knn(emb, m, lab):
        ok = lab != "nan"
        clf = KNeighborsClassifier(10).fit(emb[m & ok], lab[m & ok])
        return float((clf.predict(emb[~m & ok]) == lab[~m & ok]).mean())

    for center in (True, False):
        t0 = time.perf_counter()
        joint = ct.tl.integrate_slices([visium, binned], names=["visium", "binned"],
                                       n_domains=7, center_slices=center, seed=0,
                                       device=bench_device())  # fmt: skip
        wall = time.perf_counter() - t0
        m = (joint.obs["slice"] == "visium").to_numpy()
        lab = joint.obs["layer"].astype(str).to_numpy()
        dom = joint.obs["domain"].astype(str).to_numpy()
        ok = lab != "nan"
        aris = [adjusted_rand_score(lab[mm & ok], dom[mm & ok]) for mm in (m, ~m)]
        line = (f"xplat  integrate center_slices={center!s:5s} kNN transfer X_domain "
                f"{knn(joint.obsm['X_domain'], m, lab):.3f}")  # fmt: skip
        if not center:
            feats = ct.slices.shared_features([visium, binned], n_comps=30)
            line += f" (joint PCA baseline {knn(np.concatenate(feats), m, lab):.3f})"
        line += f"  ARI visium {aris[0]:.3f} binned {aris[1]:.3f}  {wall:.1f} s"
        print(line, flush=True)
    print(f"xplat  case total {time.perf_counter() - t_case:.1f} s, peak RSS "
          f"{peak_rss_bytes() / 2**30:.2f} GB", flush=True)  # fmt: skip


def case_scale(args: argparse.Namespace, work: Path) -> None:
    a, b = _shared(_base("151673"), _base("151674"))
    for n in [int(v) for v in args.sizes.split(",")]:
        ta, tb = _tile(a, n), _tile(b, n)
        pa, pb = work / f"scale_a_{n}.h5ad", work / f"scale_b_{n}.h5ad"
        ta.write_h5ad(pa)
        tb.write_h5ad(pb)
        ours = run_chronotope(pa, pb, work / f"plan_scale_{n}.npz", args.threads)
        extra = ""
        if "error" not in ours:
            acc, _ = layer_accuracy(ours["plan"], ta.obs["layer"].to_numpy(),
                                       tb.obs["layer"].to_numpy())  # fmt: skip
            extra = f"n={n:6,d} accuracy {acc:.3f}"
        print(_line("scale", "chronotope", ours, extra), flush=True)
        if "paste" in args.peers and n <= args.peer_max_n:
            res = run_peer("paste", pa, pb, work / f"plan_scale_paste_{n}.npz", args.threads, [])
            print(_line("scale", "paste", res, f"n={n:6,d}"), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child")
    ap.add_argument("--cases", default="dlpfc,known,interp,xplatform,scale")
    ap.add_argument("--peers", default="paste,paste2,moscot")
    ap.add_argument("--sizes", default="5000,20000,50000")
    ap.add_argument("--peer-max-n", type=int, default=5000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default=None, help="folder for inputs (default: a temp folder)")
    add_device_argument(ap)
    args = ap.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    print(f"{use_device(args.device)} (the peers run on the CPU)", flush=True)
    args.peers = [p for p in args.peers.split(",") if p]
    work = Path(args.work or tempfile.mkdtemp(prefix="chronotope_slices_"))
    work.mkdir(parents=True, exist_ok=True)
    cases = args.cases.split(",")
    print(f"threads per run: {args.threads}; peers: {', '.join(args.peers) or 'none'}", flush=True)
    if "dlpfc" in cases:
        case_dlpfc(args, work)
    if "known" in cases:
        case_known(args, work)
    if "interp" in cases:
        case_interp(args, work)
    if "xplatform" in cases:
        case_xplatform(args, work)
    if "scale" in cases:
        case_scale(args, work)


if __name__ == "__main__":
    main()
