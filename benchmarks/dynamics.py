"""Dynamics: held-out and fitted time points, W1 against previous-snapshot and McCann baselines.

Datasets (``../shared/data``; see each folder's SOURCE.md)
--------------------------------------------------------
diffusionot_emt
    DiffusionOT ``EMT.npz`` (Karacosta 2019 mass cytometry, 2-D scaled PCA), time labels 1-4
    only (11,791 / 12,367 / 12,299 / 12,812 cells). The file stores no real times; the
    grid used is ``t = label - 1`` (0, 1, 2, 3).
deepruot_emt
    DeepRUOT ``emt.csv`` (A549 TGFB1 time course, 10-D), time indices 0-3 (577 / 885 /
    788 / 883 cells), grid ``t = index``: the setting of DeepRUOT's and Var-RUOT's
    hold-one-out tables.

Tasks
-----
all
    Fit on every time point; predict each ``t_k > t_0`` from the start cells.
loo
    For each intermediate time point ``t_k``: fit without it, predict it from ``t_0``.
extrap
    Fit without the last time point; predict it from ``t_0``.

Metric: W1 = exact EMD (POT ``emd2``, Euclidean cost) between the predicted weighted
particles (pushed from a seeded subsample of ``min(n_0, 2000)`` start cells, masses
normalised; ``--replicates R`` draws R SDE particles per start cell, each of mass 1/(R n))
and a seeded subsample of ``min(n_k, 2000)`` target cells; the same subsamples
for every method. Mass error ``|sum w - n_k / n_0|`` (start masses ``1 / n``).
Baselines, same subsamples: ``previous`` (the latest time point used in training before
``t_k``, as is) and ``mccann`` (exact OT displacement interpolation between the training
neighbours of a held-out ``t_k``; held-out tasks only).

Published hold-one-out W1 on DeepRUOT's EMT-10D (t = 1 / 2 / 3): TIGON .346/.373/.526,
DeepRUOT .311/.334/.495, Var-RUOT .302/.338/.408 (Var-RUOT, NeurIPS 2025).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/dynamics.py                     # both, all tasks
    python benchmarks/dynamics.py --datasets deepruot_emt --seeds 0,1,2
    python benchmarks/dynamics.py --tasks loo --method sde
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import data_dir

PUBLISHED = {
    "deepruot_emt": {
        "TIGON": {1: 0.346, 2: 0.373, 3: 0.526},
        "DeepRUOT": {1: 0.311, 2: 0.334, 3: 0.495},
        "Var-RUOT": {1: 0.302, 2: 0.338, 3: 0.408},
    }
}
N_SUB = 2000


def load(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Cells and times of a dataset."""
    root = data_dir()
    if name == "diffusionot_emt":
        d = np.load(root / "diffusionot_inputs" / "EMT.npz", allow_pickle=True)
        lab = d["time_label"].astype(int)
        keep = lab <= 4
        return np.asarray(d["pca_scaled"], dtype=np.float64)[keep], lab[keep] - 1.0
    if name == "deepruot_emt":
        import pandas as pd

        df = pd.read_csv(root / "deepruot_data" / "emt.csv")
        return df.iloc[:, 1:].to_numpy(np.float64), df["samples"].to_numpy(np.float64)
    raise SystemExit(f"unknown dataset {name!r}")


def subsample(x: np.ndarray, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return x[np.sort(rng.choice(x.shape[0], min(n, x.shape[0]), replace=False))]


def w1(x: np.ndarray, w: np.ndarray | None, y: np.ndarray) -> float:
    import ot

    a = np.full(x.shape[0], 1.0 / x.shape[0]) if w is None else w / w.sum()
    b = np.full(y.shape[0], 1.0 / y.shape[0])
    return float(ot.emd2(a, b, ot.dist(x, y, metric="euclidean"), numItermax=10_000_000))


def mccann(x0: np.ndarray, x1: np.ndarray, s: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact-OT displacement interpolation at fraction ``s`` (support of the plan)."""
    import ot

    a = np.full(x0.shape[0], 1.0 / x0.shape[0])
    b = np.full(x1.shape[0], 1.0 / x1.shape[0])
    plan = ot.emd(a, b, ot.dist(x0, x1), numItermax=10_000_000)
    i, j = np.nonzero(plan > 1e-12)
    return (1 - s) * x0[i] + s * x1[j], plan[i, j]


def run_case(
    name: str,
    x: np.ndarray,
    t: np.ndarray,
    task: str,
    seed: int,
    method: str,
    params: dict[str, object],
    *,
    replicates: int = 1,
) -> list[dict[str, object]]:
    from chronotope.dynamics import DynamicsModel

    times = np.unique(t)
    if task == "all":
        fits = [(None, times[1:])]
    elif task == "loo":
        fits = [(tk, [tk]) for tk in times[1:-1]]
    else:
        fits = [(times[-1], [times[-1]])]
    start_pool = x[t == times[0]]
    x0 = subsample(start_pool, N_SUB, seed=1000)
    rows = []
    for held, targets in fits:
        keep = t != held if held is not None else np.ones(t.size, bool)
        tic = time.perf_counter()
        model = DynamicsModel(seed=seed, **params).fit(x[keep], t[keep])
        fit_s = time.perf_counter() - tic
        tic = time.perf_counter()
        starts = np.repeat(x0, replicates, axis=0)
        res = model.simulate(
            starts, times[0], max(targets), method=method, t_eval=targets, seed=seed
        )
        sim_s = time.perf_counter() - tic
        train_times = np.unique(t[keep])
        for tk, xp, wp in zip(res.times, res.x, res.weights, strict=True):
            k = int(np.searchsorted(times, tk))
            target = subsample(x[t == tk], N_SUB, seed=2000 + k)
            tic = time.perf_counter()
            score = w1(xp, wp, target)
            prev_t = train_times[train_times < tk].max()
            prev = w1(subsample(x[t == prev_t], N_SUB, seed=3000 + k), None, target)
            mc = float("nan")
            if held is not None and tk < train_times.max():
                nxt_t = train_times[train_times > tk].min()
                a = subsample(x[t == prev_t], N_SUB, seed=3000 + k)
                b = subsample(x[t == nxt_t], N_SUB, seed=4000 + k)
                pts, wts = mccann(a, b, (tk - prev_t) / (nxt_t - prev_t))
                mc = w1(pts, wts, target)
            eval_s = time.perf_counter() - tic
            n_ratio = (t == tk).sum() / (t == times[0]).sum()
            rows.append(
                {
                    "dataset": name,
                    "task": task,
                    "t": float(tk),
                    "seed": seed,
                    "w1": score,
                    "previous": prev,
                    "mccann": mc,
                    "mass_err": abs(float(wp.sum()) - n_ratio),
                    "couplings_s": model.timings_["couplings"],
                    "training_s": model.timings_["training"],
                    "fit_s": fit_s,
                    "simulate_s": sim_s,
                    "eval_s": eval_s,
                }
            )
            r = rows[-1]
            print(
                f"{name:16s} {task:6s} t={tk:g} seed={seed} {method}x{replicates}: "
                f"W1 {score:.4f} | "
                f"previous {prev:.4f} | McCann {mc:.4f} | mass err {r['mass_err']:.3f} | "
                f"couplings {r['couplings_s']:.1f}s training {r['training_s']:.1f}s "
                f"simulate {sim_s:.1f}s eval {eval_s:.1f}s",
                flush=True,
            )
    return rows


def summarise(rows: list[dict[str, object]]) -> None:
    import pandas as pd

    df = pd.DataFrame(rows)
    print("\nsummary (mean ± sd over seeds)")
    g = df.groupby(["dataset", "task", "t"])
    out = g[["w1", "previous", "mccann", "mass_err", "fit_s"]].agg(["mean", "std"])
    with pd.option_context("display.width", 250, "display.precision", 4, "display.max_columns", 20):
        print(out)
    for ds, pub in PUBLISHED.items():
        if ds not in set(df["dataset"]):
            continue
        print(f"\npublished hold-one-out W1 on {ds}:")
        for tool, vals in pub.items():
            print(f"  {tool:9s} " + "  ".join(f"t={k}: {v:.3f}" for k, v in vals.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="deepruot_emt,diffusionot_emt")
    ap.add_argument("--tasks", default="all,loo,extrap")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--method", default="ode", choices=["ode", "sde"])
    ap.add_argument("--n-steps", type=int, default=None, help="override DynamicsParams.n_steps")
    ap.add_argument("--epsilon", type=float, default=None, help="override DynamicsParams.epsilon")
    ap.add_argument("--tau-a", type=float, default=None, help="override DynamicsParams.tau_a")
    ap.add_argument(
        "--replicates",
        type=int,
        default=1,
        help="particles per start cell (SDE draws; >1 only with --method sde)",
    )
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.replicates > 1 and args.method != "sde":
        ap.error("--replicates > 1 needs --method sde (ODE copies coincide)")
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    params: dict[str, object] = {}
    for key, val in (("n_steps", args.n_steps), ("epsilon", args.epsilon), ("tau_a", args.tau_a)):
        if val is not None:
            params[key] = val
    print(f"threads {args.threads}; params overrides {params or 'none (defaults)'}")
    rows: list[dict[str, object]] = []
    for name in args.datasets.split(","):
        tic = time.perf_counter()
        x, t = load(name)
        counts = dict(zip(*np.unique(t, return_counts=True), strict=True))
        print(
            f"{name}: {x.shape[0]} cells, d={x.shape[1]}, "
            f"cells per t { ({float(k): int(v) for k, v in counts.items()}) } "
            f"(load {time.perf_counter() - tic:.1f}s)",
            flush=True,
        )
        for task in args.tasks.split(","):
            for seed in map(int, args.seeds.split(",")):
                rows += run_case(
                    name, x, t, task, seed, args.method, params, replicates=args.replicates
                )
    summarise(rows)


if __name__ == "__main__":
    main()
