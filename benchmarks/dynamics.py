"""Dynamics: held-out, fitted and extrapolated W1 on every issue-5 dataset, with peers.

Datasets (``../shared/data``, read through ``chronotope.datasets``; see each SOURCE.md)
------------------------------------------------------------------------------------
diffusionot_emt
    DiffusionOT ``EMT.npz`` (Karacosta 2019 mass cytometry, 2-D), labels 1-4 only
    (11,791 / 12,367 / 12,299 / 12,812 cells). No real times are stored; grid
    ``t = label - 1`` (0, 1, 2, 3), DiffusionOT's own choice of four labels.
misa
    DiffusionOT ``MISA.npy`` (simulated two-gene MISA network, 500 / 716 / 771 / 738
    cells) on DiffusionOT's default grid t = 0, 1, 2, 6. The true drift is known
    (:func:`chronotope.datasets.misa_velocity`): cosine similarity of the learned
    velocity and of the learned SDE drift to it on the cells, and the sign pattern of
    the cell-averaged Jacobian (autograd of the velocity network) against the true one.
weinreb
    DiffusionOT ``Mouse_latent_ae_scaled.npz`` (Weinreb 2020, 2-D latent), days 2 / 4 / 6
    (13,035 / 16,830 / 14,103 cells), grid = days.
deepruot_simgene
    DeepRUOT ``simulation_gene_data.csv`` (2-D, index 0-4). True growth: the DeepRUOT
    simulation divides cells at rate ``alpha_g x2^2 / (1 + x2^2)`` (from the paper; the
    data folder does not store it). Pearson / Spearman correlation of the learned growth
    on the cells with ``x2^2 / (1 + x2^2)`` (constants do not change a correlation).
deepruot_emt
    DeepRUOT ``emt.csv`` (A549 TGFB1, 10-D), index 0-3 (577 / 885 / 788 / 883 cells):
    the setting of DeepRUOT's and Var-RUOT's hold-one-out tables.
mouse
    DeepRUOT ``mouse_hematopoiesis.csv`` (Weinreb, 2-D), index 0-2 (1,429 / 3,781 /
    5,788 cells). Published figures: see PUBLISHED.
gaussian_20d
    DeepRUOT ``gaussian_20d.csv``, index 0-1 (500 / 1,400 cells): only ``all``.
tigon_emt
    TIGON ``EMT.npy`` (A549, 3-D), days 0, 1/3, 1, 3, 7 (577 / 885 / 788 / 754 / 129).
tigon_bifurcation
    TIGON ``Bifurcation.npy`` (iPSC qPCR, 4-D), index 0-7.
wot
    Waddington-OT test data, day 0 / day 2, 20-D diffusion map, per-cell growth scores:
    only ``all``; Pearson / Spearman of the learned growth on the day-0 cells with the
    provided scores.

Tasks
-----
all
    Fit on every time point; predict each ``t_k > t_0`` from the start cells.
loo
    For each intermediate time point ``t_k``: fit without it, predict it from ``t_0``.
extrap
    Fit without the last time point; predict it from ``t_0``. The model's default
    ``extrapolate="auto"`` chooses the continuation past its last training time by a
    backtest (on the time point before), and its time is in the row's ``fit_s``
    (``backtest_s`` of it). ``all`` and ``loo`` predict inside the training range, where
    the continuation plays no part: they fit with ``extrapolate="landscape"``, without
    the backtest, and their ``fit_s`` is couplings and training.

Metric: W1 = exact EMD (POT ``emd2``, Euclidean cost) between the predicted weighted
particles (pushed from a seeded subsample of ``min(n_0, 2000)`` start cells, masses
normalised) and a seeded subsample of ``min(n_k, 2000)`` target cells; the same subsamples
for every method. Mass error ``|sum w - n_k / n_0|`` (start masses ``1 / n``).
``--draws K`` scores every fit again on ``K`` further seeded subsample draws (start cells
pushed again, target and baseline cells drawn again; the same draws for ours, previous
and McCann) and prints each method's mean ± sd over the draws and the paired difference
ours - McCann: the W1 of one 2,000-cell draw varies by up to 0.02-0.05 between draws on
some datasets, more than some of the gaps between methods.

Methods, same subsamples, same fit (time points) per task:

- ``ours``: :class:`chronotope.dynamics.DynamicsModel`, default hyperparameters, pushed by
  the SDE with 4 particles per start cell (``--particles``, the default of ``predict``;
  ``--method ode --particles 1`` is the probability-flow push of the first sessions).
- ``previous``: the latest training time point before ``t_k``, as is.
- ``mccann``: exact OT displacement interpolation between the training neighbours of a
  held-out ``t_k`` (held-out tasks only).
- ``otcfm``: torchcfm ``ExactOptimalTransportConditionalFlowMatcher`` (sigma 0), and
  ``sbcfm``: torchcfm ``SchrodingerBridgeConditionalFlowMatcher`` (sigma 0.1 in
  standardised units; the flow part of SF2M, integrated as its probability-flow ODE).
  Both: minibatch OT within each interval, an MLP of the same size as our velocity
  network (3 x 128, SiLU) on the same standardised units, the same number of Adam steps,
  batch and learning-rate schedule, fixed-step RK4 with our step. No growth (mass 1).

Published hold-one-out W1 (Var-RUOT, NeurIPS 2025): see ``PUBLISHED``; printed beside ours.

Usage::

    OMP_NUM_THREADS=2 python benchmarks/dynamics.py --datasets deepruot_emt,mouse --seeds 0,1,2,3,4
    python benchmarks/dynamics.py --quick                      # smoke test, minutes
    python benchmarks/dynamics.py --datasets misa --tasks all --peers none
    python benchmarks/dynamics.py --datasets weinreb --tasks loo --peers none --draws 9
    python benchmarks/dynamics.py --datasets tigon_bifurcation --tasks loo --held-out 5 \
        --masses equal --peers none --finetune-steps 200 --finetune-rollouts chained
    python benchmarks/dynamics.py --datasets mouse --no-ours --peers otcfm --out peers.jsonl
    python benchmarks/dynamics.py --summarise run1.jsonl peers.jsonl   # tables over several runs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import add_device_argument, bench_device, data_dir, use_device

# Published W1 by dataset -> tool -> (task, t) -> value.
PUBLISHED: dict[str, dict[str, dict[tuple[str, float], float]]] = {
    "deepruot_emt": {
        "TIGON": {("loo", 1): 0.346, ("loo", 2): 0.373, ("extrap", 3): 0.526},
        "DeepRUOT": {("loo", 1): 0.311, ("loo", 2): 0.334, ("extrap", 3): 0.495},
        "Var-RUOT": {("loo", 1): 0.302, ("loo", 2): 0.338, ("extrap", 3): 0.408},
    },
    # Mouse 2-D has three time points (index 0, 1, 2), so two figures per tool are W1 at
    # t = 1 and t = 2: either fitted on all time points (Var-RUOT's Table 1 setting) or
    # held out (t = 1 interpolated, t = 2 extrapolated). Printed beside both readings.
    "mouse": {
        tool: {(task, tk): v for tk, v in ((1, a), (2, b)) for task in ("all", "loo", "extrap")}
        for tool, a, b in (
            ("TIGON", 0.584, 1.326),
            ("DeepRUOT", 0.624, 1.072),
            ("Var-RUOT", 0.270, 0.259),
        )
    },
}
N_SUB = 2000
PEERS = ("otcfm", "sbcfm")


@dataclass
class Data:
    x: np.ndarray
    t: np.ndarray
    grid: str
    velocity: Callable[[Any], Any] | None = None  # true drift (torch in, torch out)
    growth_truth: Callable[[np.ndarray], np.ndarray] | None = None
    growth_scores: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def load(name: str) -> Data:
    """Cells, times and known truths of a dataset."""
    from chronotope import datasets as ds

    root = data_dir()
    if name == "diffusionot_emt":
        a = ds.emt(data_dir=root)
        keep = a.obs["time"].to_numpy() <= 4
        return Data(
            np.asarray(a.obsm["X_pca"], np.float64)[keep],
            a.obs["time"].to_numpy()[keep] - 1.0,
            "labels 1-4 -> t = 0, 1, 2, 3",
        )
    if name == "misa":
        a = ds.misa(data_dir=root)
        return Data(
            np.asarray(a.X, np.float64),
            a.obs["time"].to_numpy(np.float64),
            "t = 0, 1, 2, 6 (DiffusionOT default)",
            velocity=ds.misa_velocity,
        )
    if name == "weinreb":
        a = ds.weinreb(data_dir=root)
        return Data(np.asarray(a.X, np.float64), a.obs["time"].to_numpy(), "days 2, 4, 6")
    if name.startswith("deepruot_") or name in ("mouse", "gaussian_20d"):
        key = {
            "deepruot_simgene": "simulation_gene",
            "deepruot_emt": "emt",
            "mouse": "mouse_hematopoiesis",
            "gaussian_20d": "gaussian_20d",
        }[name]
        a = ds.deepruot(key, data_dir=root)
        d = Data(np.asarray(a.X, np.float64), a.obs["time"].to_numpy(), "t = stored index")
        if key == "simulation_gene":
            d.growth_truth = lambda x: x[:, 1] ** 2 / (1.0 + x[:, 1] ** 2)
        return d
    if name.startswith("tigon_"):
        a = ds.tigon(name.split("_", 1)[1], data_dir=root)
        grid = "days 0, 1/3, 1, 3, 7" if name == "tigon_emt" else "t = index"
        return Data(np.asarray(a.X, np.float64), a.obs["time"].to_numpy(), grid)
    if name == "wot":
        a = ds.wot(data_dir=root)
        return Data(
            np.asarray(a.X, np.float64),
            a.obs["time"].to_numpy(),
            "days 0, 2",
            growth_scores=a.obs["growth_score"].to_numpy(np.float64),
        )
    raise SystemExit(f"unknown dataset {name!r}")


DATASETS = (
    "deepruot_emt",
    "mouse",
    "misa",
    "deepruot_simgene",
    "gaussian_20d",
    "tigon_emt",
    "wot",
    "diffusionot_emt",
    "weinreb",
    "tigon_bifurcation",
)


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


# ---------------------------------------------------------------------- torchcfm peers
class CFMPeer:
    """OT-CFM / SB-CFM (torchcfm) over consecutive intervals, same budget as ours."""

    def __init__(self, kind: str, params: dict[str, Any], seed: int) -> None:
        from chronotope.dynamics import DynamicsParams

        self.kind, self.seed = kind, seed
        self.p = DynamicsParams(**params)
        self.timings_: dict[str, float] = {}

    def fit(self, x: np.ndarray, t: np.ndarray) -> CFMPeer:
        import torch
        from torch import nn
        from torchcfm.conditional_flow_matching import (
            ExactOptimalTransportConditionalFlowMatcher,
            SchrodingerBridgeConditionalFlowMatcher,
        )

        tic = time.perf_counter()
        p = self.p
        times = np.unique(t)
        self.shift = x.mean(0)
        self.scale = float(np.sqrt(((x - self.shift) ** 2).sum(1).mean() / x.shape[1])) or 1.0
        self.t_min, self.t_span = float(times[0]), float(times[-1] - times[0])
        z = torch.as_tensor((x - self.shift) / self.scale, dtype=torch.float32)
        groups = [z[torch.as_tensor(t == v)] for v in times]
        taus = [(v - self.t_min) / self.t_span for v in times]
        fm = (
            ExactOptimalTransportConditionalFlowMatcher(sigma=0.0)
            if self.kind == "otcfm"
            else SchrodingerBridgeConditionalFlowMatcher(sigma=0.1)
        )
        torch.manual_seed(self.seed)
        layers: list[nn.Module] = []
        width = x.shape[1] + 1
        for _ in range(p.n_layers):
            layers += [nn.Linear(width, p.hidden), nn.SiLU()]
            width = p.hidden
        layers.append(nn.Linear(width, x.shape[1]))
        net = nn.Sequential(*layers)
        opt = torch.optim.Adam(net.parameters(), lr=p.learning_rate)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(
            opt, T_max=p.n_steps, eta_min=0.05 * p.learning_rate
        )
        n_int = len(groups) - 1
        per = max(1, p.batch_size // n_int)
        gen = torch.Generator().manual_seed(self.seed + 1)
        import ot  # noqa: F401  (torchcfm's OT sampler uses POT)

        np.random.seed(self.seed)  # noqa: NPY002 (torchcfm draws plan pairs with np.random)
        for _ in range(p.n_steps):
            zs, ts, us = [], [], []
            for k in range(n_int):
                a, b = groups[k], groups[k + 1]
                x0 = a[torch.randint(a.shape[0], (per,), generator=gen)]
                x1 = b[torch.randint(b.shape[0], (per,), generator=gen)]
                s, xt, ut = fm.sample_location_and_conditional_flow(x0, x1)
                dtau = taus[k + 1] - taus[k]
                zs.append(xt)
                ts.append(taus[k] + s[:, None] * dtau)
                us.append(ut / dtau)
            inp = torch.cat([torch.cat(zs), torch.cat(ts)], 1)
            loss = ((net(inp) - torch.cat(us)) ** 2).sum(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        self.net = net.eval()
        self.timings_ = {"couplings": 0.0, "training": time.perf_counter() - tic}
        return self

    def velocity(self, x: np.ndarray, t: float) -> np.ndarray:
        import torch

        z = torch.as_tensor((x - self.shift) / self.scale, dtype=torch.float32)
        tau = torch.full((z.shape[0], 1), (t - self.t_min) / self.t_span)
        with torch.no_grad():
            v = self.net(torch.cat([z, tau], 1)).numpy()
        return v.astype(np.float64) * self.scale / self.t_span

    def simulate(self, x0: np.ndarray, t0: float, t_eval: list[float]) -> list[np.ndarray]:
        """Fixed-step RK4 (step = span / 100 as ours), positions at ``t_eval``."""
        import torch

        z = torch.as_tensor((x0 - self.shift) / self.scale, dtype=torch.float32)
        h_real = self.t_span / 100.0
        out, t_now = [], float(t0)

        def f(zz: torch.Tensor, tau: float) -> torch.Tensor:
            return self.net(torch.cat([zz, torch.full((zz.shape[0], 1), tau)], 1))

        with torch.no_grad():
            for tk in sorted(t_eval):
                n = max(1, math.ceil((tk - t_now) / h_real - 1e-9)) if tk > t_now else 0
                if n:
                    h = (tk - t_now) / n / self.t_span
                    tau = (t_now - self.t_min) / self.t_span
                    for _ in range(n):
                        k1 = f(z, tau)
                        k2 = f(z + 0.5 * h * k1, tau + 0.5 * h)
                        k3 = f(z + 0.5 * h * k2, tau + 0.5 * h)
                        k4 = f(z + h * k3, tau + h)
                        z = z + h / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
                        tau += h
                t_now = float(tk)
                out.append(z.numpy().astype(np.float64) * self.scale + self.shift)
        return out


# ---------------------------------------------------------------------- truths
def velocity_jacobian(
    model: Any, x: np.ndarray, t: np.ndarray, *, drift: bool = False
) -> np.ndarray:
    """Cell-averaged Jacobian ``d f_i / d x_j`` (autograd) of the velocity network.

    ``drift=True``: of the SDE drift ``v + D * score`` (``score = -grad U``), the field
    that corresponds to a simulator's drift; the probability-flow velocity differs from
    it by ``-D grad log p``, whose Jacobian ``-D Hess log p`` is positive near modes.
    """
    import torch

    frame = model._frame
    nets = model.networks
    z = torch.as_tensor(frame.z(x), dtype=torch.float32).requires_grad_(True)
    tau = torch.as_tensor([[frame.tau(v)] for v in t], dtype=torch.float32)
    inp = torch.cat([z, tau], 1)
    f = nets.velocity(inp)
    if drift:
        diff_z = 0.5 * (float(model.sigma_) * math.sqrt(frame.t_span) / frame.scale) ** 2
        (grad_u,) = torch.autograd.grad(nets.potential(inp)[:, 0].sum(), z, create_graph=True)
        f = f - diff_z * grad_u
    rows = [torch.autograd.grad(f[:, i].sum(), z, retain_graph=True)[0] for i in range(x.shape[1])]
    jac = torch.stack(rows, 1).mean(0).detach().numpy()  # d f_z / d z, averaged over cells
    return jac.astype(np.float64) / frame.t_span  # in representation units per time


def true_jacobian(fn: Callable[[Any], Any], x: np.ndarray) -> np.ndarray:
    import torch

    xx = torch.as_tensor(x, dtype=torch.float64).requires_grad_(True)
    v = fn(xx)
    rows = [torch.autograd.grad(v[:, i].sum(), xx, retain_graph=True)[0] for i in range(x.shape[1])]
    return torch.stack(rows, 1).mean(0).numpy()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over cells of the cosine similarity of two vector fields."""
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    ok = (na > 0) & (nb > 0)
    return float(np.mean((a[ok] * b[ok]).sum(1) / (na[ok] * nb[ok])))


def correlations(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    from scipy.stats import pearsonr, spearmanr

    return float(pearsonr(a, b)[0]), float(spearmanr(a, b)[0])


def truth_lines(name: str, d: Data, model: Any, peers: dict[str, Any], seed: int) -> dict:
    """Known-truth read-outs of a model fitted on all time points."""
    import torch

    out: dict[str, float] = {}
    if d.velocity is not None:
        with torch.no_grad():
            true_v = d.velocity(torch.as_tensor(d.x)).numpy()
        learned = np.concatenate([model.velocity(d.x[d.t == v], v) for v in np.unique(d.t)])
        drift = np.concatenate([model.drift(d.x[d.t == v], v) for v in np.unique(d.t)])
        order = np.concatenate([np.flatnonzero(d.t == v) for v in np.unique(d.t)])
        tv = true_v[order]
        out["cos_velocity"] = cosine(learned, tv)
        out["cos_drift"] = cosine(drift, tv)
        for kind, peer in peers.items():
            pv = np.concatenate([peer.velocity(d.x[d.t == v], v) for v in np.unique(d.t)])
            out[f"cos_{kind}"] = cosine(pv, tv)
        j_learn = velocity_jacobian(model, d.x, d.t)
        j_drift = velocity_jacobian(model, d.x, d.t, drift=True)
        j_true = true_jacobian(d.velocity, d.x)
        out["jac_sign_agree"] = float(np.mean(np.sign(j_learn) == np.sign(j_true)))
        out["jac_drift_sign_agree"] = float(np.mean(np.sign(j_drift) == np.sign(j_true)))
        print(
            f"{name:16s} truth seed={seed}: cosine(v, true) {out['cos_velocity']:.3f} | "
            f"cosine(v + D score, true) {out['cos_drift']:.3f} | "
            + " | ".join(f"cosine({k}) {out[f'cos_{k}']:.3f}" for k in peers)
            + f" | Jacobian sign agreement: velocity {out['jac_sign_agree']:.2f}, drift "
            f"{out['jac_drift_sign_agree']:.2f} (velocity {j_learn.round(3).tolist()}, "
            f"drift {j_drift.round(3).tolist()}, true {j_true.round(3).tolist()})",
            flush=True,
        )
    if d.growth_truth is not None:
        times = np.unique(d.t)[:-1]
        mask = np.isin(d.t, times)
        g = np.concatenate([model.growth(d.x[d.t == v], v) for v in times])
        order = np.concatenate([np.flatnonzero(d.t == v) for v in times])
        gt = d.growth_truth(d.x[order])
        out["growth_pearson"], out["growth_spearman"] = correlations(g, gt)
        tgt = model.couplings_.growth[mask] if model.couplings_ is not None else None
        if tgt is not None:
            out["target_pearson"], _ = correlations(np.asarray(tgt), d.growth_truth(d.x[mask]))
        print(
            f"{name:16s} truth seed={seed}: growth vs x2^2/(1+x2^2) on cells t<t_max: "
            f"Pearson {out['growth_pearson']:.3f} Spearman {out['growth_spearman']:.3f} | "
            f"coupling growth targets Pearson {out.get('target_pearson', float('nan')):.3f}",
            flush=True,
        )
    if d.growth_scores is not None:
        t0 = np.unique(d.t)[0]
        m = d.t == t0
        g = model.growth(d.x[m], t0)
        out["growth_pearson"], out["growth_spearman"] = correlations(g, d.growth_scores[m])
        tp, _ = correlations(model.couplings_.growth[m], d.growth_scores[m])
        out["target_pearson"] = tp
        print(
            f"{name:16s} truth seed={seed}: learned growth vs provided growth scores on day-0 "
            f"cells: Pearson {out['growth_pearson']:.3f} Spearman {out['growth_spearman']:.3f} "
            f"| coupling growth targets Pearson {tp:.3f}",
            flush=True,
        )
    return out


# ---------------------------------------------------------------------- more draws
def more_draws(
    x: np.ndarray,
    t: np.ndarray,
    tk: float,
    k: int,
    train_times: np.ndarray,
    held: float | None,
    draws: int,
    push: Callable[[np.ndarray], list[Any]],
    mode: str,
    modes: tuple[str, ...],
    i: int,
) -> dict[str, object]:
    """W1 of ours, previous and McCann on ``draws`` further subsample draws of one fit.

    Draw ``r`` takes new seeded subsamples (``10000 r`` added to each subsample seed) of
    the start cells (pushed again by the same model, same seed), of the target cells and
    of the McCann / previous snapshots; every method sees the same draw. Draw 0 is the
    row's own. A 2,000-cell subsample's W1 varies from draw to draw by more than the
    gaps between methods on some datasets, so this estimates each method's expected W1
    at this protocol, and the paired difference ours - McCann, with less noise.
    """
    times = np.unique(t)
    prev_t = train_times[train_times < tk].max()
    nxt = train_times[train_times > tk]
    out: dict[str, list[float]] = {"draws_w1": [], "draws_previous": [], "draws_mccann": []}
    for r in range(1, draws + 1):
        off = 10_000 * r
        start = subsample(x[t == times[0]], N_SUB, seed=off + 1000)
        res = push(start)[modes.index(mode)]
        xp, wp = res.x[i], res.weights[i]
        target = subsample(x[t == tk], N_SUB, seed=off + 2000 + k)
        a = subsample(x[t == prev_t], N_SUB, seed=off + 3000 + k)
        out["draws_w1"].append(w1(xp, wp, target))
        out["draws_previous"].append(w1(a, None, target))
        mc = float("nan")
        if held is not None and nxt.size and tk < train_times.max():
            b = subsample(x[t == nxt.min()], N_SUB, seed=off + 4000 + k)
            pts, wts = mccann(a, b, (tk - prev_t) / (nxt.min() - prev_t))
            mc = w1(pts, wts, target)
        out["draws_mccann"].append(mc)
    return dict(out)


def draws_line(row: dict[str, Any]) -> str:
    """One line: mean ± sd over the draws (the row's own included), paired vs McCann."""
    ours = np.r_[row["w1"], row["draws_w1"]]
    mc = np.r_[row["mccann"], row["draws_mccann"]]
    prev = np.r_[row["previous"], row["draws_previous"]]
    txt = (
        f"    {ours.size} subsample draws: W1 {ours.mean():.4f}±{ours.std(ddof=1):.4f} | "
        f"previous {prev.mean():.4f}±{prev.std(ddof=1):.4f}"
    )
    if np.isfinite(mc).all():
        diff = ours - mc
        txt += (
            f" | McCann {mc.mean():.4f}±{mc.std(ddof=1):.4f} | ours - McCann "
            f"{diff.mean():+.4f} (se {diff.std(ddof=1) / np.sqrt(diff.size):.4f}; below on "
            f"{int((diff < 0).sum())} of {diff.size})"
        )
    return txt


# ---------------------------------------------------------------------- one case
def run_case(
    name: str,
    d: Data,
    task: str,
    seed: int,
    params: dict[str, object],
    peers: tuple[str, ...],
    *,
    method: str = "sde",
    ours: bool = True,
    particles: int = 4,
    extrapolate: tuple[str, ...] = ("auto",),
    draws: int = 0,
    masses: str = "counts",
    finetune: tuple[int, str] = (0, "intervals"),
    held_out: tuple[float, ...] = (),
) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    from chronotope.dynamics import DynamicsModel, SimulationResult
    from chronotope.dynamics.finetune import finetune_rollouts

    x, t = d.x, d.t
    times = np.unique(t)
    if task == "all":
        fits = [(None, list(times[1:]))]
    elif task == "loo":
        inner = times[1:-1]
        if held_out:
            missing = [v for v in held_out if not np.isclose(inner, v).any()]
            if missing:
                raise SystemExit(f"--held-out {missing}: not intermediate time points of {name}")
            inner = [tk for tk in inner if np.isclose(held_out, tk).any()]
        fits = [(tk, [tk]) for tk in inner]
    else:
        fits = [(times[-1], [times[-1]])] if times.size > 2 else []
    x0 = subsample(x[t == times[0]], N_SUB, seed=1000)
    rows: list[dict[str, object]] = []
    truths: list[dict[str, object]] = []
    for held, targets in fits:
        keep = t != held if held is not None else np.ones(t.size, bool)
        ft_txt = ""
        tic = time.perf_counter()
        if ours:
            # extrapolate="auto" (the default) backtests on the last training time point
            # (one more fit); inside the training range the continuation plays no part, so
            # the other tasks, and fixed modes, fit without the backtest
            cont = "auto" if task == "extrap" and "auto" in extrapolate else "landscape"
            model = DynamicsModel(
                seed=seed, device=bench_device(), **{**params, "extrapolate": cont}
            ).fit(
                x[keep],
                t[keep],
                # "equal": one relative population size for every time point (counts
                # that are numbers of cells measured, not population sizes)
                masses=masses,  # type: ignore[arg-type]
            )
            if finetune[0]:
                tic_ft = time.perf_counter()
                hist = finetune_rollouts(
                    model, x[keep], t[keep], n_steps=finetune[0], rollouts=finetune[1], seed=seed
                )
                model.timings_["finetune"] = time.perf_counter() - tic_ft
                ft_txt = (
                    f" | fine-tune {finetune[0]} {finetune[1]} {model.timings_['finetune']:.1f}s"
                    f" divergence {hist['divergence'][:5].mean():.3f} -> "
                    f"{hist['divergence'][-5:].mean():.3f}"
                )
            fit_s = time.perf_counter() - tic
            tic = time.perf_counter()
            # the continuation matters only past the training range: one fit, each mode
            modes = extrapolate if task == "extrap" else ("",)

            def push(
                start: np.ndarray,
                model: DynamicsModel = model,
                targets: list[float] = targets,
                modes: tuple[str, ...] = modes,
            ) -> list[Any]:
                return [
                    model.simulate(
                        np.repeat(start, particles, axis=0),  # particles per start cell
                        times[0],
                        max(targets),
                        method=method,
                        t_eval=targets,
                        seed=seed,
                        # "auto" (and the other tasks): the model's own continuation
                        extrapolate=None if mode in ("", "auto") else mode,  # type: ignore[arg-type]
                    )
                    for mode in modes
                ]

            sims = push(x0)
            sim_s = (time.perf_counter() - tic) / len(modes)
            timings = model.timings_
        else:  # peers only
            nan_x = np.full((len(targets), 1, x.shape[1]), np.nan)
            modes = ("",)
            sims = [SimulationResult(np.asarray(targets), nan_x, np.ones((len(targets), 1)))]
            fit_s = sim_s = float("nan")
            timings = {"couplings": float("nan"), "training": float("nan")}
        fitted_peers: dict[str, Any] = {}
        peer_pred: dict[str, list[np.ndarray]] = {}
        for kind in peers:
            peer = CFMPeer(kind, params, seed).fit(x[keep], t[keep])
            fitted_peers[kind] = peer
            tic = time.perf_counter()
            peer_pred[kind] = peer.simulate(x0, times[0], targets)
            peer.timings_["simulate"] = time.perf_counter() - tic
        train_times = np.unique(t[keep])
        cases = [
            (mode, i, tk, xp, wp)
            for mode, res in zip(modes, sims, strict=True)
            for i, (tk, xp, wp) in enumerate(zip(res.times, res.x, res.weights, strict=True))
        ]
        for mode, i, tk, xp, wp in cases:
            k = int(np.searchsorted(times, tk))
            target = subsample(x[t == tk], N_SUB, seed=2000 + k)
            tic = time.perf_counter()
            score = w1(xp, wp, target) if ours else float("nan")
            # positions only (uniform weights), as the peers, which model no growth
            score_pos = w1(xp, None, target) if ours else float("nan")
            prev_t = train_times[train_times < tk].max()
            prev = w1(subsample(x[t == prev_t], N_SUB, seed=3000 + k), None, target)
            mc = float("nan")
            if held is not None and tk < train_times.max():
                nxt_t = train_times[train_times > tk].min()
                a = subsample(x[t == prev_t], N_SUB, seed=3000 + k)
                b = subsample(x[t == nxt_t], N_SUB, seed=4000 + k)
                pts, wts = mccann(a, b, (tk - prev_t) / (nxt_t - prev_t))
                mc = w1(pts, wts, target)
            peer_w1 = {kind: w1(peer_pred[kind][i], None, target) for kind in peers}
            eval_s = time.perf_counter() - tic
            n_ratio = (t == tk).sum() / (t == times[0]).sum() if masses == "counts" else 1.0
            row: dict[str, object] = {
                "dataset": name,
                "task": task,
                "t": float(tk),
                "seed": seed,
                "extrapolate": mode,
                "auto_choice": model.continuation if ours and mode == "auto" else "",
                "backtest_s": model.timings_.get("extrapolation_backtest", float("nan"))
                if ours
                else float("nan"),
                # the weight trained with (chosen by the fit with --jacobian-weight auto)
                "jacobian_weight": model.jacobian_weight_ if ours else float("nan"),
                "w1": score,
                "w1_pos": score_pos,
                "previous": prev,
                "mccann": mc,
                **peer_w1,
                "mass_err": abs(float(wp.sum()) - n_ratio) if ours else float("nan"),
                "peer_mass_err": abs(1.0 - n_ratio),
                "couplings_s": timings["couplings"],
                "training_s": timings["training"],
                "finetune_s": timings.get("finetune", 0.0),
                "finetune": f"{finetune[0]} {finetune[1]}" if finetune[0] else "",
                "fit_s": fit_s,
                "simulate_s": sim_s,
                "eval_s": eval_s,
                **{f"{kind}_train_s": fitted_peers[kind].timings_["training"] for kind in peers},
            }
            if draws and ours:
                row.update(more_draws(x, t, tk, k, train_times, held, draws, push, mode, modes, i))
            rows.append(row)
            peer_txt = "".join(f" | {kind} {peer_w1[kind]:.4f}" for kind in peers)
            auto_jac = ours and params.get("jacobian_weight") == "auto"
            jac_txt = f" jacobian {model.jacobian_weight_:g}" if auto_jac else ""
            print(
                f"{name:16s} {task:6s} t={tk:g} seed={seed} {method}"
                f"{' ' + mode if mode else ''}"
                f"{' -> ' + model.continuation if ours and mode == 'auto' else ''}"
                f"{jac_txt}: "
                f"W1 {score:.4f} "
                f"(positions only {score_pos:.4f}) | "
                f"previous {prev:.4f} | McCann {mc:.4f}{peer_txt} | mass err "
                f"{row['mass_err']:.3f} (peers {row['peer_mass_err']:.3f}) | couplings "
                f"{row['couplings_s']:.1f}s training {row['training_s']:.1f}s simulate "
                f"{sim_s:.1f}s"
                + ft_txt
                + "".join(
                    f" | {kind} training {fitted_peers[kind].timings_['training']:.1f}s"
                    for kind in peers
                )
                + f" | eval {eval_s:.1f}s",
                flush=True,
            )
            if "draws_w1" in row:
                print(draws_line(row), flush=True)
        if task == "all" and ours:
            tr = truth_lines(name, d, model, fitted_peers, seed)
            if tr:
                truths.append({"dataset": name, "seed": seed, **tr})
    return rows, truths


def summarise(rows: list[dict[str, object]], truths: list[dict[str, object]]) -> None:
    import pandas as pd

    if not rows:
        return
    df = pd.DataFrame(rows)
    if "extrapolate" not in df:
        df["extrapolate"] = ""
    df["extrapolate"] = df["extrapolate"].fillna("")
    names = ("w1", "w1_pos", "previous", "mccann", *PEERS, "mass_err", "fit_s", "backtest_s")
    cols = [c for c in names if c in df]
    print("\nsummary: W1 mean ± sd over training seeds (n = seeds)")
    for (ds, task, tk, mode), g in df.groupby(["dataset", "task", "t", "extrapolate"], sort=False):
        parts = []
        for c in cols:
            vals = g[c].to_numpy(np.float64)
            vals = vals[~np.isnan(vals)]
            if vals.size == 0:
                continue
            sd = np.std(vals, ddof=1) if vals.size > 1 else 0.0
            parts.append(f"{c} {vals.mean():.3f}±{sd:.3f} (n={vals.size})")
        pub = PUBLISHED.get(str(ds), {})
        pub_txt = "".join(
            f" | {tool} {vals[(task, float(tk))]:.3f}"
            for tool, vals in pub.items()
            if (task, float(tk)) in vals
        )
        if mode == "auto" and "auto_choice" in g:
            picks = g["auto_choice"].value_counts()
            pub_txt = " | chose " + ", ".join(f"{k} x{v}" for k, v in picks.items()) + pub_txt
        label = f"{task} {mode}" if mode else task
        print(f"  {ds:16s} {label:16s} t={tk:g}: " + " | ".join(parts) + pub_txt)
        if "draws_w1" in g and g["draws_w1"].notna().all():
            pooled = {
                c: np.concatenate([np.r_[r[c], r[f"draws_{c}"]] for _, r in g.iterrows()])
                for c in ("w1", "previous", "mccann")
            }
            print(
                f"  {'':16s} {'':16s} {pooled['w1'].size} fits x draws: "
                + " | ".join(f"{c} {v.mean():.3f}±{v.std(ddof=1):.3f}" for c, v in pooled.items())
                + (
                    f" | ours below McCann on {int((pooled['w1'] < pooled['mccann']).sum())}"
                    f" of {pooled['w1'].size}"
                    if np.isfinite(pooled["mccann"]).all()
                    else ""
                )
            )
    if truths:
        tf = pd.DataFrame(truths)
        print("\ntruth read-outs (mean ± sd over seeds)")
        for ds, g in tf.groupby("dataset", sort=False):
            parts = []
            for c in g.columns:
                if c in ("dataset", "seed") or g[c].isna().all():
                    continue
                v = g[c].to_numpy(np.float64)
                v = v[~np.isnan(v)]
                sd = np.std(v, ddof=1) if v.size > 1 else 0.0
                parts.append(f"{c} {v.mean():.3f}±{sd:.3f} (n={v.size})")
            print(f"  {ds:16s} n={len(g)}: " + " | ".join(parts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--tasks", default="all,loo,extrap")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--peers", default="otcfm,sbcfm", help="comma list or 'none'")
    ap.add_argument("--method", default="sde", choices=["ode", "sde"])
    ap.add_argument(
        "--particles",
        type=int,
        default=4,
        help="particles per start cell for ours (as predict --n-particles); ode: use 1",
    )
    ap.add_argument(
        "--extrapolate",
        default="auto",
        help="ours past the last training time (DynamicsModel.simulate): comma list of "
        "auto (default: the model backtests on its last training time point; one more "
        "fit), landscape, rest, continue, damped; one fit, one simulation per mode",
    )
    ap.add_argument(
        "--draws",
        type=int,
        default=0,
        help="also score every fit on this many further subsample draws (ours, previous, "
        "McCann; same draws for each) and print mean ± sd and the paired difference",
    )
    ap.add_argument(
        "--masses",
        default="counts",
        choices=["counts", "equal"],
        help="ours: population size per time point from the cell counts (default) or equal "
        "(counts of cells measured); the mass error then compares with 1",
    )
    ap.add_argument("--n-steps", type=int, default=None, help="override DynamicsParams.n_steps")
    ap.add_argument("--epsilon", type=float, default=None, help="override DynamicsParams.epsilon")
    ap.add_argument("--tau-a", type=float, default=None, help="override DynamicsParams.tau_a")
    ap.add_argument("--paths", default=None, help="override DynamicsParams.paths")
    ap.add_argument("--growth-path", default=None, help="override DynamicsParams.growth_path")
    ap.add_argument("--path-weight", default=None, help="override DynamicsParams.path_weight")
    ap.add_argument(
        "--jacobian-weight",
        type=lambda v: v if v == "auto" else float(v),
        default=None,
        help="override DynamicsParams.jacobian_weight (a number, or auto)",
    )
    ap.add_argument(
        "--finetune-steps",
        type=int,
        default=0,
        help="ours: rollout fine-tune steps after the fit (finetune_rollouts; 0: none)",
    )
    ap.add_argument(
        "--finetune-rollouts",
        choices=("intervals", "chained"),
        default="intervals",
        help="rollouts of the fine-tune: each interval from its own cells, or chained "
        "from the first time point",
    )
    ap.add_argument(
        "--growth-neighbors",
        type=int,
        default=None,
        help="override DynamicsParams.growth_neighbors (0: growth from each relaxed plan alone)",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: misa and deepruot_emt, task all, 300 steps (not a measurement)",
    )
    ap.add_argument(
        "--no-clamp",
        action="store_true",
        help="ablation: let the networks see times outside the training range",
    )
    ap.add_argument(
        "--held-out",
        default="",
        help="loo: only these intermediate time points (comma list; default every one)",
    )
    ap.add_argument("--no-ours", action="store_true", help="run the peers and baselines only")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the rows as JSON lines here")
    ap.add_argument(
        "--summarise",
        nargs="+",
        default=None,
        metavar="JSONL",
        help="only print the summary of rows written earlier with --out (several runs)",
    )
    add_device_argument(ap)
    args = ap.parse_args()
    print(f"{use_device(args.device)} (the peers run on the CPU)", flush=True)
    if args.summarise:
        rows, truths = [], []
        for path in args.summarise:
            for line in Path(path).read_text().splitlines():
                rec = json.loads(line)
                (rows if "task" in rec else truths).append(rec)
        summarise(rows, truths)
        return
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    params: dict[str, object] = {}
    for key, val in (
        ("n_steps", args.n_steps),
        ("epsilon", args.epsilon),
        ("tau_a", args.tau_a),
        ("paths", args.paths),
        ("growth_path", args.growth_path),
        ("path_weight", args.path_weight),
        ("growth_neighbors", args.growth_neighbors),
        ("jacobian_weight", args.jacobian_weight),
    ):
        if val is not None:
            params[key] = val
    if args.no_clamp:
        import chronotope.dynamics.model as dm

        dm._clamp_tau = lambda tau: tau
    datasets, tasks = args.datasets, args.tasks
    if args.quick:
        params.setdefault("n_steps", 300)
        if args.datasets == ",".join(DATASETS):
            datasets = "misa,deepruot_emt"
        if args.tasks == "all,loo,extrap":
            tasks = "all"
    from chronotope.dynamics.model import EXTRAPOLATE_MODES

    modes = tuple(m for m in args.extrapolate.split(",") if m)
    for m in modes:
        if m not in (*EXTRAPOLATE_MODES, "auto"):
            ap.error(f"unknown --extrapolate {m!r}; use {', '.join(EXTRAPOLATE_MODES)} or auto")
    try:
        held_out = tuple(float(v) for v in args.held_out.split(",") if v)
    except ValueError:
        ap.error(f"--held-out must be a comma list of numbers, got {args.held_out!r}")
    peers = tuple(p for p in args.peers.split(",") if p and p != "none")
    for p in peers:
        if p not in PEERS:
            ap.error(f"unknown peer {p!r}; use {PEERS} or none")
    print(
        f"threads {args.threads}; params overrides {params or 'none (defaults)'}; "
        f"ours: {args.method} x {args.particles} particles per start cell; "
        f"peers {peers or 'none'}; seeds {args.seeds}"
    )
    rows: list[dict[str, object]] = []
    truths: list[dict[str, object]] = []
    for name in datasets.split(","):
        tic = time.perf_counter()
        d = load(name)
        counts = dict(zip(*np.unique(d.t, return_counts=True), strict=True))
        print(
            f"{name}: {d.x.shape[0]} cells, d={d.x.shape[1]}, grid {d.grid}, "
            f"cells per t { ({float(k): int(v) for k, v in counts.items()}) } "
            f"(load {time.perf_counter() - tic:.1f}s)",
            flush=True,
        )
        for task in tasks.split(","):
            for seed in map(int, args.seeds.split(",")):
                r, tr = run_case(
                    name,
                    d,
                    task,
                    seed,
                    params,
                    peers,
                    method=args.method,
                    ours=not args.no_ours,
                    particles=args.particles,
                    extrapolate=modes,
                    draws=args.draws,
                    masses=args.masses,
                    finetune=(args.finetune_steps, args.finetune_rollouts),
                    held_out=held_out,
                )
                rows += r
                truths += tr
                if args.out:
                    with open(args.out, "a") as fh:
                        for row in r + tr:
                            fh.write(json.dumps(row) + "\n")
    summarise(rows, truths)


if __name__ == "__main__":
    main()
