"""Benchmark of the OT engine against POT, on real data, in one run.

Cases (each in its own process; time = wall clock, CPU = process CPU time,
memory = peak resident-set increase during the solve, sampled every 5 ms):

1. ``dense``: balanced Sinkhorn, exactly 100 iterations, between N cells of
   day 1 and N cells of day 2 of the EMT time course (2-D embedding), for
   N = 1k, 2k, 5k, 10k; chronotope (float32 and float64, cached kernel; and
   float32 chunked, which never holds an N x N cost) against POT's numpy
   backend (float64) and torch backend (float32).
2. ``batched``: G = 200 gene histograms on one geometry of N = 5,000 Visium
   spots (DLPFC 151673 + 151674 side by side), 100 iterations: chronotope
   solves all columns at once; POT in a loop (measured on the first
   ``--pot-loop-columns`` columns and scaled to 200, as printed) and POT's
   own multi-histogram mode.
3. ``sparse``: kNN (k = 30) geometry on N = 50,000 spots (DLPFC 151673 tiled),
   G = 2,000 gene histograms, 100 iterations; POT cannot hold the dense
   problem, its memory is estimated.
4. ``fgw``: fused Gromov-Wasserstein between 3,000-spot subsamples of DLPFC
   151673 and 151674 (30-D PCA features, 2-D coordinates), chronotope
   (entropic, low-rank spatial costs) against POT ``fused_gromov_wasserstein``
   (conditional gradient) and ``entropic_fused_gromov_wasserstein``.

Run ``python benchmarks/ot_engine.py`` (all cases, about 25 minutes on 2 cores)
or ``--cases dense,batched`` / ``--quick`` (smaller sizes).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    REPO,
    PeakRSS,
    add_device_argument,
    bench_device,
    data_dir,
    emit,
    fmt_gb,
    run_child,
    use_device,
)

CACHE = REPO / "bench_out" / "cache"
SEED = 0


# ----------------------------------------------------------------- inputs
def prepare_inputs() -> None:
    """Write the benchmark inputs, derived from the real datasets, to CACHE."""
    import os

    os.environ.setdefault("CHRONOTOPE_DATA", str(data_dir()))
    from chronotope import datasets
    from chronotope.graph import knn_graph

    CACHE.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    if not (CACHE / "emt.npz").exists():
        emt = datasets.emt()
        x = np.asarray(emt.X, dtype=np.float64)
        t = emt.obs["time"].to_numpy()
        np.savez(CACHE / "emt.npz", day1=x[t == 1], day2=x[t == 2])
    if not (CACHE / "dlpfc.npz").exists():
        import scipy.sparse as sp

        s1, s2 = datasets.dlpfc("151673"), datasets.dlpfc("151674")
        shared = s1.var_names.intersection(s2.var_names)
        c1 = np.asarray(s1.obsm["spatial"], dtype=np.float64)
        c2 = np.asarray(s2.obsm["spatial"], dtype=np.float64)
        # spot spacing in pixels (Visium centre-to-centre distance)
        _, dist = knn_graph(c1, 1)
        spacing = float(np.median(dist.data[dist.data > 0]))
        c2 = c2 + np.array([c1[:, 0].max() - c2[:, 0].min() + 5 * spacing, 0.0])
        coords = np.vstack([c1, c2]) / spacing
        x1 = s1[:, shared].X
        x2 = s2[:, shared].X
        counts = sp.vstack([x1, x2]).tocsr()
        lib = counts.sum(1).A1
        norm = sp.diags(1e4 / np.maximum(lib, 1)) @ counts
        norm.data = np.log1p(norm.data)
        mean = np.asarray(norm.mean(0)).ravel()
        var = np.asarray(norm.multiply(norm).mean(0)).ravel() - mean**2
        top = np.argsort(-var)[:200]
        pick = np.sort(rng.choice(coords.shape[0], 5000, replace=False))
        hist = np.asarray(counts[pick][:, top].todense(), dtype=np.float64) + 1e-3
        # FGW inputs: 3,000 spots of each slice, joint 30-D PCA of log-normalised counts
        from sklearn.decomposition import TruncatedSVD

        n1 = x1.shape[0]
        hv = np.argsort(-var)[:2000]
        z = TruncatedSVD(30, random_state=SEED).fit_transform(norm[:, hv])
        p1 = np.sort(rng.choice(n1, 3000, replace=False))
        p2 = np.sort(rng.choice(x2.shape[0], 3000, replace=False))
        lab1 = s1.obs["layer"].astype(str).to_numpy()[p1]
        lab2 = s2.obs["layer"].astype(str).to_numpy()[p2]
        np.savez(
            CACHE / "dlpfc.npz",
            coords=coords[pick],
            hist=hist,
            fgw_x1=c1[p1] / spacing,
            fgw_x2=(c2[p2] - c2[p2].min(0) + c1[p1].min(0)) / spacing,
            fgw_f1=z[:n1][p1],
            fgw_f2=z[n1:][p2],
            fgw_l1=lab1,
            fgw_l2=lab2,
        )
        # 50k tiled slice with 2,000 genes for the sparse case
        c1s = c1 / spacing
        span = c1s.max(0) - c1s.min(0) + 3.0
        tiles, reps = [], int(np.ceil(50_000 / c1s.shape[0]))
        side = int(np.ceil(np.sqrt(reps)))
        for k in range(reps):
            tiles.append(c1s + span * np.array([k % side, k // side]))
        tiled = np.vstack(tiles)[:50_000]
        g1 = np.asarray(s1.X.sum(0)).ravel()
        genes = np.argsort(-g1)[:2000]
        block = sp.csr_matrix(s1.X)[:, genes]
        big = sp.vstack([block] * reps).tocsr()[:50_000]
        sp.save_npz(CACHE / "tiled_counts.npz", big)
        np.save(CACHE / "tiled_coords.npy", tiled)


# ------------------------------------------------------------------ cases
def child(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    case, engine = spec["case"], spec.get("engine", "chronotope-f32")
    out: dict[str, Any] = {}
    if case == "dense":
        d = np.load(CACHE / "emt.npz")
        rng = np.random.default_rng(SEED)
        n = spec["n"]
        x = d["day1"][rng.choice(len(d["day1"]), n, replace=False)]
        y = d["day2"][rng.choice(len(d["day2"]), n, replace=False)]
        xx, yy = (x**2).sum(1), (y**2).sum(1)
        eps = 0.05 * float(xx.mean() + yy.mean() - 2 * x.mean(0) @ y.mean(0))
        a = np.full(n, 1.0 / n)
        out["epsilon"] = eps
        if engine.startswith("chronotope"):
            from chronotope import ot as cot

            dtype = torch.float32 if "f32" in engine else torch.float64
            dev = bench_device()
            xt = torch.tensor(x, dtype=dtype, device=dev)
            yt = torch.tensor(y, dtype=dtype, device=dev)
            batch = 1024 if "chunked" in engine else None
            solver = cot.Sinkhorn(epsilon=eps, max_iter=100, tol=0.0, warn=False)
            with PeakRSS() as m:
                res = solver(cot.LinearProblem(cot.PointCloud(xt, yt, batch_size=batch)))
                cost = float(res.primal_cost)
                err = float((res.marginals(0) - 1.0 / n).abs().sum())
            out.update(n_iter=res.n_iter, cost=cost, marginal_error=err)
        else:
            import ot

            if engine == "pot-numpy":
                with PeakRSS() as m:
                    cmat = ot.dist(x, y)
                    plan = ot.sinkhorn(a, a, cmat, eps, numItermax=100, stopThr=0.0)
                    cost = float((plan * cmat).sum())
                    err = float(np.abs(plan.sum(0) - a).sum())
            else:
                xt = torch.tensor(x, dtype=torch.float32)
                yt = torch.tensor(y, dtype=torch.float32)
                at = torch.tensor(a, dtype=torch.float32)
                with PeakRSS() as m:
                    cmat = ot.dist(xt, yt)
                    plan = ot.sinkhorn(at, at, cmat, eps, numItermax=100, stopThr=0.0)
                    cost = float((plan * cmat).sum())
                    err = float((plan.sum(0) - at).abs().sum())
            out.update(cost=cost, marginal_error=err)
        out.update(m.as_dict())
        return out
    if case == "batched":
        d = np.load(CACHE / "dlpfc.npz")
        coords, hist = d["coords"], d["hist"]
        n = coords.shape[0]
        hist = hist / hist.sum(0)
        a = np.full(n, 1.0 / n)
        eps = 0.05 * 2 * float(coords.var(0).sum())  # 0.05 x mean squared distance
        out["epsilon"] = eps
        if engine.startswith("chronotope"):
            from chronotope import ot as cot

            dtype = torch.float32 if "f32" in engine else torch.float64
            xt = torch.tensor(coords, dtype=dtype, device=bench_device())
            bt = torch.tensor(hist, dtype=dtype, device=bench_device())
            solver = cot.Sinkhorn(epsilon=eps, max_iter=100, tol=0.0, warn=False)
            with PeakRSS() as m:
                res = solver(cot.LinearProblem(cot.PointCloud(xt), None, bt))
                costs = res.primal_cost.double().cpu().numpy()
            out["costs"] = costs[: spec.get("compare", 10)].tolist()
            out["columns"] = hist.shape[1]
        else:
            import ot

            ncols = spec["columns"]
            with PeakRSS() as m:
                cmat = ot.dist(coords, coords)
                if engine == "pot-loop":
                    costs = []
                    for k in range(ncols):
                        plan = ot.sinkhorn(a, hist[:, k], cmat, eps, numItermax=100, stopThr=0.0)
                        costs.append(float((plan * cmat).sum()))
                else:  # POT's multi-histogram mode returns one transport cost per column
                    costs = ot.sinkhorn(
                        a, hist[:, :ncols], cmat, eps, numItermax=100, stopThr=0.0
                    ).tolist()
            out["costs"] = costs[: spec.get("compare", 10)]
            out["columns"] = ncols
        out.update(m.as_dict())
        return out
    if case == "sparse":
        import scipy.sparse as sp

        from chronotope import ot as cot
        from chronotope.graph import knn_graph

        coords = np.load(CACHE / "tiled_coords.npy")
        counts = sp.load_npz(CACHE / "tiled_counts.npz")
        n, g = counts.shape
        conn, _ = knn_graph(coords, spec["k"], include_self=True)
        rows, cols = conn.nonzero()
        c = ((coords[rows] - coords[cols]) ** 2).sum(1).astype(np.float32)
        cost = sp.csr_matrix((c, (rows, cols)), shape=(n, n))
        b = torch.from_numpy(np.asarray(counts.todense(), dtype=np.float32) + 1e-3)
        b = b.to(bench_device())
        b /= b.sum(0, keepdim=True)
        del counts
        eps = 0.5  # in squared spot spacings
        solver = cot.Sinkhorn(
            epsilon=eps,
            max_iter=100,
            tol=0.0,
            warn=False,
            column_batch_size=spec.get("column_batch_size"),
        )
        geom = cot.SparseGeometry(cost, device=bench_device())
        with PeakRSS() as m:
            res = solver(cot.LinearProblem(geom, None, b))
        out.update(
            n=n,
            columns=g,
            nnz=geom.nnz,
            n_iter=res.n_iter,
            final_error=float(res.errors[-1].max()),
            inputs_gb=b.numel() * 4 / 2**30,
        )
        out.update(m.as_dict())
        return out
    if case == "fgw":
        return child_fgw(spec)
    raise ValueError(case)


def child_fgw(spec: dict[str, Any]) -> dict[str, Any]:
    d = np.load(CACHE / "dlpfc.npz", allow_pickle=True)
    x1, x2, f1, f2 = d["fgw_x1"], d["fgw_x2"], d["fgw_f1"], d["fgw_f2"]
    l1, l2 = d["fgw_l1"], d["fgw_l2"]
    n = spec.get("n", 3000)
    x1, x2, f1, f2, l1, l2 = x1[:n], x2[:n], f1[:n], f2[:n], l1[:n], l2[:n]
    alpha, engine = spec["alpha"], spec["engine"]
    m_feat = ((f1[:, None, :] - f2[None, :, :]) ** 2).sum(-1)
    m_feat /= m_feat.max()
    out: dict[str, Any] = {}
    if engine.startswith("chronotope"):
        import torch

        from chronotope import ot as cot

        dt = torch.float32 if engine.endswith("f32") else torch.float64
        with PeakRSS() as m:
            # same objective as POT below: M / max(M), C / max(C) for each slice
            dev = bench_device()
            res = cot.fused_gromov_wasserstein(
                torch.tensor(x1, dtype=dt, device=dev),
                torch.tensor(x2, dtype=dt, device=dev),
                cost_xy=torch.tensor(m_feat, dtype=dt, device=dev),
                alpha=alpha,
                scale_cost="max",
                **spec.get("kwargs", {}),
            )
            plan = res.dense_plan().double().cpu().numpy()
    else:
        import ot

        c1 = ot.dist(x1, x1)
        c2 = ot.dist(x2, x2)
        c1 /= c1.max()
        c2 /= c2.max()
        p = np.full(n, 1.0 / n)
        with PeakRSS() as m:
            if engine == "pot-fgw":
                plan = ot.gromov.fused_gromov_wasserstein(
                    m_feat, c1, c2, p, p, loss_fun="square_loss", alpha=alpha
                )
            else:
                plan = ot.gromov.entropic_fused_gromov_wasserstein(
                    m_feat, c1, c2, p, p, loss_fun="square_loss", alpha=alpha, epsilon=5e-3
                )
    # The same FGW objective for every plan (square loss, costs / max as given to POT)
    import ot as pot

    c1 = pot.dist(x1, x1)
    c2 = pot.dist(x2, x2)
    c1 /= c1.max()
    c2 /= c2.max()
    q1, q2 = plan.sum(1), plan.sum(0)
    gw = q1 @ (c1**2) @ q1 + q2 @ (c2**2) @ q2 - 2 * np.sum((c1 @ plan @ c2.T) * plan)
    out["fgw_objective"] = float((1 - alpha) * np.sum(m_feat * plan) + alpha * gw)
    # PASTE's accuracy: plan mass between spots of the same layer
    valid1, valid2 = l1 != "nan", l2 != "nan"
    same = (l1[:, None] == l2[None, :]) & valid1[:, None] & valid2[None, :]
    out["layer_accuracy"] = float(plan[same].sum() / plan[valid1][:, valid2].sum())
    out.update(m.as_dict())
    return out


# ------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="dense,batched,sparse,fgw")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (smoke run)")
    parser.add_argument("--pot-loop-columns", type=int, default=10)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    add_device_argument(parser)
    args = parser.parse_args()
    if args.child:
        emit(child(json.loads(args.child)))
        return
    import torch

    print(
        f"# {use_device(args.device)}; chronotope OT engine benchmark, threads "
        f"{torch.get_num_threads()} (POT runs on the CPU)"
    )
    prepare_inputs()
    script = Path(__file__).resolve()
    cases = args.cases.split(",")
    if "dense" in cases:
        sizes = [1000, 2000] if args.quick else [1000, 2000, 5000, 10000]
        engines = [
            "chronotope-f32",
            "chronotope-f64",
            "chronotope-f32-chunked",
            "pot-numpy",
            "pot-torch",
        ]
        print("\n## dense balanced Sinkhorn, 100 iterations, EMT day 1 -> day 2 (2-D)")
        for n in sizes:
            res = {e: run_child(script, {"case": "dense", "engine": e, "n": n}) for e in engines}
            ref = res["pot-numpy"]
            for e, r in res.items():
                if "error" in r:
                    print(f"dense N={n:>6,} {e:<24} ERROR {r['error']}")
                    continue
                ratio_t = ref.get("wall_s", np.nan) / r["wall_s"]
                ratio_m = ref.get("delta_rss_gb", np.nan) / max(r["delta_rss_gb"], 1e-3)
                print(
                    f"dense N={n:>6,} {e:<24} {r['wall_s']:7.2f} s (cpu {r['cpu_s']:7.2f} s)  "
                    f"+{fmt_gb(r['delta_rss_gb'])}  cost {r['cost']:.6g}  "
                    f"|P^T1-b|_1 {r['marginal_error']:.1e}  vs POT-numpy: "
                    f"{ratio_t:5.1f}x faster, {ratio_m:5.1f}x less memory"
                )
    if "batched" in cases:
        print("\n## 200 gene histograms on one 5,000-spot geometry (DLPFC), 100 iterations")
        k = args.pot_loop_columns
        ours = {
            e: run_child(script, {"case": "batched", "engine": e})
            for e in ["chronotope-f32", "chronotope-f64"]
        }
        loop = run_child(script, {"case": "batched", "engine": "pot-loop", "columns": k})
        multi = run_child(script, {"case": "batched", "engine": "pot-multi", "columns": 200})
        if "error" not in loop:
            per_col = loop["wall_s"] / k
            loop_total = per_col * 200
            print(
                f"batched POT loop (numpy)         {loop_total:8.1f} s  (measured {k} of 200 "
                f"columns: {loop['wall_s']:.1f} s, x{200 // k})  +{fmt_gb(loop['delta_rss_gb'])}"
            )
        else:
            loop_total = np.nan
            print(f"batched POT loop ERROR {loop['error']}")
        if "error" not in multi:
            print(
                f"batched POT multi-histogram mode {multi['wall_s']:8.1f} s  "
                f"+{fmt_gb(multi['delta_rss_gb'])}"
            )
        for e, r in ours.items():
            if "error" in r:
                print(f"batched {e} ERROR {r['error']}")
                continue
            agree = ""
            if "error" not in loop and loop["costs"]:
                c_ours = np.array(r["costs"][: len(loop["costs"])])
                rel = np.abs(c_ours - np.array(loop["costs"])) / np.array(loop["costs"])
                agree = (
                    f"  transport cost vs POT (first {len(rel)} columns): "
                    f"max rel diff {rel.max():.1e}"
                )
            print(
                f"batched {e:<24} {r['wall_s']:8.1f} s (cpu {r['cpu_s']:.1f} s)  "
                f"+{fmt_gb(r['delta_rss_gb'])}  {loop_total / r['wall_s']:6.1f}x faster than "
                f"the POT loop{agree}"
            )
    if "sparse" in cases:
        print("\n## sparse kNN geometry (k=30), N=50,000 spots, G=2,000 genes, 100 iterations")
        r = run_child(script, {"case": "sparse", "k": 30, "column_batch_size": 500})
        n = 50_000
        dense_gb = 2 * n * n * 8 / 2**30
        if "error" in r:
            print(f"sparse ERROR {r['error']}")
        else:
            print(
                f"sparse chronotope-f32 (column_batch_size=500) "
                f"N={r['n']:,} nnz={r['nnz']:,} G={r['columns']:,}: "
                f"{r['wall_s']:.1f} s (cpu {r['cpu_s']:.1f} s), "
                f"peak RSS {fmt_gb(r['peak_rss_gb'])} "
                f"(inputs {fmt_gb(r['inputs_gb'])}), final marginal error {r['final_error']:.1e}"
            )
        print(
            f"sparse POT: dense cost + kernel would need {dense_gb:,.0f} GB (N x N float64 x 2); "
            "not run"
        )
    if "fgw" in cases:
        sizes = [1000] if args.quick else [3000, 1000]
        for n in sizes:
            print(
                f"\n## fused Gromov-Wasserstein, DLPFC 151673 -> 151674, {n:,} spots each, "
                "alpha=0.5 (costs / max, as PASTE)"
            )
            engines = ["chronotope-f32", "chronotope-f64", "pot-fgw"]
            if n <= 1000:
                engines.append("pot-entropic-fgw")
            res = {}
            for e in engines:
                spec = {"case": "fgw", "engine": e, "alpha": 0.5, "n": n}
                res[e] = run_child(script, spec, timeout=900)
            ref = res["pot-fgw"]
            for e, r in res.items():
                if "error" in r:
                    print(f"fgw N={n:,} {e:<18} ERROR {r['error']}")
                    continue
                speed = ref.get("wall_s", np.nan) / r["wall_s"]
                lean = ref.get("delta_rss_gb", np.nan) / max(r["delta_rss_gb"], 1e-3)
                print(
                    f"fgw N={n:,} {e:<18} {r['wall_s']:7.1f} s (cpu {r['cpu_s']:.1f} s)  "
                    f"+{fmt_gb(r['delta_rss_gb'])}  layer accuracy {r['layer_accuracy']:.3f}  "
                    f"FGW objective {r['fgw_objective']:.5f}  vs POT fgw: {speed:.1f}x faster, "
                    f"{lean:.1f}x less memory"
                )


if __name__ == "__main__":
    main()
