"""Dynamics read-outs end to end on real data: CLI hold-out, fate / ancestry consistency, GRN.

Tasks (``../shared/data``; loaders in ``chronotope.datasets``)
-------------------------------------------------------------
cli
    DeepRUOT EMT-10D (``deepruot("emt")``, 577 / 885 / 788 / 883 cells, ``t`` = index):
    the external command forms, run as subprocesses, ``chronotope dynamics fit DATA.h5ad
    --time-key time --use-rep X -o MODEL --holdout 1`` then ``chronotope dynamics predict
    MODEL DATA.h5ad --time 1 -o PRED.h5ad``; W1 (POT ``emd2``, Euclidean) between the
    predicted weighted particles and the held-out cells, against the previous snapshot.
fate
    DiffusionOT EMT (``emt()``, labels 1-4 used as times, 2,000 cells per time point, a
    seeded subsample): ``tl.fate`` of 1,000 t=1 cells at t=4 (10 SDE particles each) and
    ``tl.ancestry`` of 1,000 t=4 cells back to t=1. A consistent model sends the mass of
    all start cells onto the observed label composition of the target snapshot, so the
    population fate distribution is compared with the observed t=4 composition, and the
    ancestor distribution with the observed t=1 composition (total variation distance,
    TV); mean width of the 90 % bootstrap intervals; wall time per read-out.
misa
    DiffusionOT's simulated MISA two-gene network (mutual inhibition, self-activation;
    ``.X`` = the two genes, 4 time points): ``tl.jacobian_grn`` on ``use_rep="X"`` (the
    gene map is the identity). Mutual inhibition means both off-diagonal entries of the
    gene Jacobian are negative; printed per time point and over all cells.
finetune
    DeepRUOT EMT-10D without t=1: the simulation-free fit, then 3 x 50 steps of the
    optional rollout fine-tune; W1 at t=1 (held out), 2, 3 after each (not in the default
    ``--tasks``: minutes).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/dynamics_readouts.py               # all tasks
    python benchmarks/dynamics_readouts.py --tasks cli,misa --seed 0
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import add_device_argument, bench_device, data_dir, use_device


def _w1(xp: np.ndarray, wp: np.ndarray, y: np.ndarray) -> float:
    import ot

    a = wp / wp.sum()
    b = np.full(y.shape[0], 1.0 / y.shape[0])
    return float(ot.emd2(a, b, ot.dist(xp, y, metric="euclidean"), numItermax=2_000_000))


def _sub(idx: np.ndarray, n: int, seed: int) -> np.ndarray:
    if idx.size <= n:
        return idx
    return np.sort(np.random.default_rng(seed).choice(idx, n, replace=False))


def _cli() -> list[str]:
    return [sys.executable, "-c", "from chronotope.cli import main; main()"]


def task_cli(seed: int) -> None:
    import anndata as ad

    import chronotope as ct

    a = ct.datasets.deepruot("emt", data_dir=data_dir())
    t = a.obs["time"].to_numpy()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "emt10.h5ad"
        ad.AnnData(X=a.X, obs=a.obs[["time"]]).write_h5ad(data)
        model = Path(tmp) / "model"
        pred = Path(tmp) / "pred.h5ad"
        fit_cmd = [
            *_cli(),
            "-q",
            "dynamics",
            "fit",
            str(data),
            "--time-key",
            "time",
            "--use-rep",
            "X",
            "-o",
            str(model),
            "--holdout",
            "1",
            "--seed",
            str(seed),
            "--device",
            bench_device(),
        ]
        tic = time.perf_counter()
        subprocess.run(fit_cmd, check=True)
        t_fit = time.perf_counter() - tic
        tic = time.perf_counter()
        subprocess.run(
            [
                *_cli(),
                "-q",
                "dynamics",
                "predict",
                str(model),
                str(data),
                "--time",
                "1",
                "-o",
                str(pred),
                "--device",
                bench_device(),
            ],
            check=True,
        )
        t_pred = time.perf_counter() - tic
        p = ad.read_h5ad(pred)
        xp, wp = np.asarray(p.obsm["X"], dtype=np.float64), p.obs["weight"].to_numpy()
    x = np.asarray(a.X, dtype=np.float64)
    target = x[t == 1]
    prev = x[t == 0]
    w1 = _w1(xp, wp, target)
    w1_prev = _w1(prev, np.ones(prev.shape[0]), target)
    mass = abs(wp.sum() - (t == 1).sum() / (t == 0).sum())
    print(
        f"cli deepruot_emt holdout t=1 seed={seed}: W1 {w1:.3f} (previous snapshot "
        f"{w1_prev:.3f}), mass error {mass:.3f}, fit {t_fit:.1f} s, predict {t_pred:.1f} s "
        "(wall, incl. process start)"
    )


def _tv(p: np.ndarray, q: np.ndarray) -> float:
    return 0.5 * float(np.abs(np.asarray(p) - np.asarray(q)).sum())


def task_fate(seed: int) -> None:
    import chronotope as ct

    full = ct.datasets.emt(data_dir=data_dir())
    t_all = full.obs["time"].to_numpy()
    keep = np.concatenate(
        [_sub(np.flatnonzero(t_all == tv), 2000, seed + int(tv)) for tv in (1.0, 2.0, 3.0, 4.0)]
    )
    a = full[keep].copy()
    a.obs["time"] = a.obs["time"] - 1.0  # t = label - 1, as in benchmarks/dynamics.py
    tic = time.perf_counter()
    model = ct.tl.fit_dynamics(a, "time", "X", seed=seed, device=bench_device())
    t_fit = time.perf_counter() - tic
    t = a.obs["time"].to_numpy()
    labels = a.obs["cell_type"].astype(str).to_numpy()
    timings = {}
    tic = time.perf_counter()
    ct.tl.fate(a, model, groupby="cell_type", max_cells=1000, seed=seed)
    timings["fate"] = time.perf_counter() - tic
    tic = time.perf_counter()
    ct.tl.ancestry(a, model, groupby="cell_type", max_cells=1000, seed=seed)
    timings["ancestry"] = time.perf_counter() - tic
    tic = time.perf_counter()
    ct.tl.perturb(a, model, "PC1", groupby="cell_type", max_cells=1000, n_boot=0, seed=seed)
    timings["perturb"] = time.perf_counter() - tic
    tic = time.perf_counter()
    ct.tl.jacobian_grn(a, model)
    timings["jacobian_grn"] = time.perf_counter() - tic
    classes = [str(c) for c in a.uns["fate"]["classes"]]

    def comp(mask: np.ndarray) -> np.ndarray:
        return np.array([(labels[mask] == c).mean() for c in classes])

    obs_end, obs_start = comp(t == t.max()), comp(t == t.min())
    fate_d = np.asarray(a.uns["fate"]["distribution"])
    anc_d = np.asarray(a.uns["ancestry"]["distribution"])
    started = np.isfinite(a.obsm["fate"]).all(1)
    width = float(np.mean(a.obsm["fate_upper"][started] - a.obsm["fate_lower"][started]))

    def fmt(v: np.ndarray) -> str:
        return " ".join(f"{c} {x:.3f}" for c, x in zip(classes, v, strict=True))

    print(f"fate diffusionot_emt seed={seed}: fit {t_fit:.1f} s on {a.n_obs} cells")
    print(
        f"fate t=0 -> t=3: predicted {fmt(fate_d)} | observed at t=3 {fmt(obs_end)} | "
        f"TV {_tv(fate_d, obs_end):.3f}; mean 90% interval width {width:.3f}"
    )
    print(
        f"ancestry t=3 -> t=0: predicted {fmt(anc_d)} | observed at t=0 {fmt(obs_start)} | "
        f"TV {_tv(anc_d, obs_start):.3f}"
    )
    print(f"perturb PC1 knock-out: shift {fmt(np.asarray(a.uns['perturb']['shift']))}")
    print(
        "read-out wall time: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
        + " (1,000 cells x 10 particles; perturb = two fate runs)"
    )


def task_misa(seed: int) -> None:
    import chronotope as ct

    a = ct.datasets.misa(data_dir=data_dir())
    tic = time.perf_counter()
    model = ct.tl.fit_dynamics(a, "time", "X", seed=seed, device=bench_device())
    t_fit = time.perf_counter() - tic
    rows = []
    for tv in [None, *np.unique(a.obs["time"])]:
        ct.tl.jacobian_grn(a, model, time=tv, n_edges=2)
        j = np.asarray(a.uns["grn"]["jacobian"])
        rows.append((tv, j))
    for tv, j in rows:
        ok = j[0, 1] < 0 and j[1, 0] < 0
        label = "all cells" if tv is None else f"t={tv:g}"
        print(
            f"misa seed={seed} {label}: J_gene = [[{j[0, 0]:+.3f}, {j[0, 1]:+.3f}], "
            f"[{j[1, 0]:+.3f}, {j[1, 1]:+.3f}]]  mutual inhibition (both off-diagonal < 0): "
            f"{'yes' if ok else 'no'}"
        )
    print(f"misa fit {t_fit:.1f} s on {a.n_obs} cells")


def task_finetune(seed: int) -> None:
    import chronotope as ct
    from chronotope.dynamics import DynamicsModel
    from chronotope.dynamics.finetune import finetune_rollouts

    a = ct.datasets.deepruot("emt", data_dir=data_dir())
    x = np.asarray(a.X, dtype=np.float64)
    t = a.obs["time"].to_numpy()
    train = t != 1

    def w1s(model: DynamicsModel) -> str:
        out = []
        for k in (1, 2, 3):
            xp, wp = model.simulate(x[t == 0], 0.0, float(k)).final
            out.append(f"t={k} {_w1(xp, wp, x[t == k]):.3f}")
        return ", ".join(out) + " (t=1 held out)"

    tic = time.perf_counter()
    model = DynamicsModel(use_rep="X", seed=seed, device=bench_device()).fit(x[train], t[train])
    print(
        f"finetune deepruot_emt seed={seed}: simulation-free fit {time.perf_counter() - tic:.1f}"
        f" s; W1 {w1s(model)}"
    )
    for r in range(3):
        tic = time.perf_counter()
        h = finetune_rollouts(model, x[train], t[train], n_steps=50, seed=seed + r)
        print(
            f"finetune +50 steps ({50 * (r + 1)} in all) {time.perf_counter() - tic:.1f} s: "
            f"divergence {h['divergence'][:3].mean():.3f} -> {h['divergence'][-3:].mean():.3f}; "
            f"W1 {w1s(model)}"
        )
        sys.stdout.flush()


TASKS = {"cli": task_cli, "fate": task_fate, "misa": task_misa, "finetune": task_finetune}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="cli,fate,misa")
    ap.add_argument("--seed", type=int, default=0)
    add_device_argument(ap)
    args = ap.parse_args()
    print(use_device(args.device), flush=True)
    print(f"# OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    for name in args.tasks.split(","):
        TASKS[name.strip()](args.seed)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
