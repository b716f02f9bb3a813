"""Wall time and peak memory of one full default dynamics fit, per phase.

Issue 5 asks for a full fit in at most 3 minutes on 2 CPU cores for EMT, at least 5x faster
than the published TIGON / DeepRUOT times (Var-RUOT, NeurIPS 2025: 365 s / 800 s to OT loss
< 0.30 on EMT). "Full" here is the default ``DynamicsModel(seed=0).fit(x, t)`` on every time
point, so it includes the couplings, the training and the backtest of
``extrapolate="auto"`` (one more fit, on one time point fewer).

Each dataset is fitted in a fresh interpreter (``--child``), so its peak resident set
(``VmHWM``) is its own. The loaders are those of ``benchmarks/dynamics.py``
(``../shared/data``).

Usage::

    python -W ignore benchmarks/dynamics_fit_time.py --datasets deepruot_emt,diffusionot_emt \\
        --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, peak_rss_bytes, run_child

LIMIT_S = 180.0
PUBLISHED_S = {"TIGON": 365.0, "DeepRUOT": 800.0}


def _child(spec: dict) -> None:
    import torch

    import dynamics as bench
    from chronotope.dynamics import DynamicsModel

    torch.set_num_threads(int(spec["threads"]))
    d = bench.load(spec["dataset"])
    tic = time.perf_counter()
    model = DynamicsModel(seed=int(spec["seed"])).fit(d.x, d.t)
    wall = time.perf_counter() - tic
    emit(
        {
            "dataset": spec["dataset"],
            "n_cells": int(d.x.shape[0]),
            "dim": int(d.x.shape[1]),
            "wall_s": wall,
            "phases": {k: float(v) for k, v in model.timings_.items()},
            "peak_rss_gb": peak_rss_bytes() / 2**30,
            "continuation": str(model.continuation),
            "converged": [bool(iv.converged) for iv in model.couplings_.intervals],
        }
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="deepruot_emt,diffusionot_emt")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(json.loads(args.child))
        return
    print(f"threads {args.threads}; seed {args.seed}; limit {LIMIT_S:.0f} s", flush=True)
    ok = True
    for name in args.datasets.split(","):
        spec = {"dataset": name, "threads": args.threads, "seed": args.seed}
        r = run_child(Path(__file__).resolve(), spec, timeout=1800)
        if "error" in r:
            print(f"{name}: ERROR {r['error']}", flush=True)
            ok = False
            continue
        phases = ", ".join(f"{k} {v:.1f}" for k, v in r["phases"].items())
        ratios = " | ".join(f"{p} {s / r['wall_s']:.1f}x" for p, s in PUBLISHED_S.items())
        within = r["wall_s"] <= LIMIT_S
        ok &= within
        print(
            f"{name} ({r['n_cells']:,} cells, d={r['dim']}): fit {r['wall_s']:.1f} s "
            f"{{{phases}}} peak RSS {r['peak_rss_gb']:.2f} GB -> {r['continuation']}; "
            f"faster than published {ratios}; {'within' if within else 'OVER'} "
            f"{LIMIT_S:.0f} s; couplings converged {r['converged']}",
            flush=True,
        )
    print("all within the limit" if ok else "NOT all within the limit", flush=True)


if __name__ == "__main__":
    main()
