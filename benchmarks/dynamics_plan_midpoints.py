"""Held-out midpoints of the coupling plan itself (no network), per coupling setting.

For a held-out intermediate time point ``t`` of a dataset of ``benchmarks/dynamics.py``,
solve the couplings of the remaining time points with each setting, draw 2,000 pairs of
the interval across ``t`` from the plan and score their displacement midpoints at ``t``
(W1, POT ``emd2``, Euclidean) against the same target subsample as the benchmark:
as drawn ("P-sampled") and reweighted to the unbalanced path measure (each pair by
``m(s) / r = rho**(s - 1)``, "mass-weighted"), with percentiles of the row-sum ratio
``rho``. McCann (exact-OT displacement interpolation) is printed first.

Usage::

    python -W ignore benchmarks/dynamics_plan_midpoints.py weinreb 4 \\
        4096:1:0.998 16384:1:0.998 4096:4:0.998 4096:1:1.0

Each setting is ``coupling_batch_size:n_rounds:tau_a`` (``epsilon`` 0.01, seed 0).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dynamics as bench


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset", help="a dataset name of benchmarks/dynamics.py")
    ap.add_argument("held", type=float, help="intermediate time point to hold out")
    ap.add_argument("settings", nargs="+", help="batch_size:n_rounds:tau_a")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch

    from chronotope.dynamics.couplings import snapshot_couplings

    torch.set_num_threads(args.threads)
    d = bench.load(args.dataset)
    x, t = d.x, d.t
    times = np.unique(t)
    if not (times[0] < args.held < times[-1]) or args.held not in times:
        raise SystemExit(f"held must be an intermediate time point of {times}")
    keep = t != args.held
    prev_t, nxt_t = times[times < args.held].max(), times[times > args.held].min()
    s = (args.held - prev_t) / (nxt_t - prev_t)
    k = int(np.searchsorted(times, args.held))
    target = bench.subsample(x[t == args.held], bench.N_SUB, seed=2000 + k)
    a = bench.subsample(x[t == prev_t], bench.N_SUB, seed=3000 + k)
    b = bench.subsample(x[t == nxt_t], bench.N_SUB, seed=4000 + k)
    pts, wts = bench.mccann(a, b, s)
    print(f"McCann {bench.w1(pts, wts, target):.4f}", flush=True)
    rng = np.random.default_rng(0)
    xs = x[keep]
    for setting in args.settings:
        cbs, rounds, tau_a = setting.split(":")
        tic = time.perf_counter()
        cpl = snapshot_couplings(
            xs,
            t[keep],
            epsilon=0.01,
            tau_a=float(tau_a),
            seed=0,
            batch_size=int(cbs),
            n_rounds=int(rounds),
        )
        iv = next(v for v in cpl.intervals if v.t0 == prev_t)
        p = iv.pairs[rng.choice(len(iv.pairs), bench.N_SUB, replace=False)]
        mid = (1 - s) * xs[p[:, 0]] + s * xs[p[:, 1]]
        rho_all = iv.row_mass / iv.mass
        rho = rho_all[np.searchsorted(iv.source, p[:, 0])]
        pct = np.round(np.percentile(rho_all, [1, 10, 50, 90, 99]), 3)
        print(
            f"bs={int(cbs)} rounds={int(rounds)} tau_a={float(tau_a)}: blocks {iv.n_blocks} "
            f"P-sampled {bench.w1(mid, None, target):.4f} "
            f"mass-weighted {bench.w1(mid, rho ** (s - 1.0), target):.4f} "
            f"rho pct {pct} ({time.perf_counter() - tic:.0f}s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
