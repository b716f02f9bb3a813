r"""Choose how a dynamics model continues past its data, by backtesting on the training data.

No snapshot constrains the dynamics outside the training times, so what a model does there
(:meth:`~chronotope.dynamics.DynamicsModel.simulate`, ``extrapolate=``) is a modelling
choice, and the right one depends on the system: a process that keeps moving in the same
direction is extrapolated best by its last fields (``"continue"``), one that settles by
the landscape frozen at the last time (``"landscape"``), one that spreads by the diffusion
alone (``"rest"``), one that slows down by the last fields with a decaying transport
(``"damped"``, a damped trend, tried at each of ``relaxations``).
:func:`backtest_extrapolation` makes the choice from the training data only, the way a
forecaster is validated: the last training time point is held out, a model with the same
hyperparameters is fitted to the earlier ones, the cells of the first time point are
pushed to the held-out time under each continuation, and the continuation whose
prediction is closest to the held-out cells wins.

Closeness is the debiased Sinkhorn divergence with the Euclidean cost (an entropic
estimate of the W1 distance, :mod:`chronotope.ot`) between the predicted weighted particles
(masses normalised) and the held-out cells, both subsampled to at most ``n_sub`` points, so
the cost never grows with the square of the data.

``DynamicsModel(extrapolate="auto")`` runs this during ``fit`` (one more fit, on one time
point fewer) and keeps the winner as the model's default continuation.
"""

from __future__ import annotations

import dataclasses
import logging
import time as _time
from dataclasses import dataclass, field

import numpy as np
import torch

from chronotope._errors import ChronotopeInputError
from chronotope.dynamics.couplings import SnapshotCouplings
from chronotope.dynamics.model import EXTRAPOLATE_MODES, DynamicsModel, DynamicsParams

__all__ = ["ExtrapolationBacktest", "backtest_extrapolation", "divergence_w1"]

logger = logging.getLogger("chronotope")

#: Relaxation times (units of the last training interval) that the backtest tries for
#: ``"damped"``: from nearly ``"landscape"`` to nearly ``"continue"``.
RELAXATIONS = (0.1, 0.25, 0.5, 1.0, 2.0)


@dataclass(frozen=True)
class ExtrapolationBacktest:
    """Result of :func:`backtest_extrapolation`.

    Attributes
    ----------
    relaxation
        The relaxation time of the winner when it is ``"damped"``, else ``None``.
    damped_growth
        When the winner is ``"damped"``: whether the end's growth rates should act past
        the end, chosen by the total predicted mass at the held-out time against its
        mass (the cell-count ratio, or ``masses``); else ``None``.
    mass_errors
        ``|predicted total mass - held-out mass|`` with (``"growth"``) and without
        (``"no growth"``) the end's growth, for a ``"damped"`` winner.
    choice
        The continuation with the smallest divergence (a name of ``EXTRAPOLATE_MODES``).
    scores
        Divergence (representation units, ~W1) per continuation tried; ``"damped"`` is
        scored as ``"damped(r)"`` for each relaxation time ``r``.
    held_time
        The training time point that was held out and predicted.
    seconds
        Wall time of the backtest (fit and simulations).
    """

    choice: str
    scores: dict[str, float] = field(default_factory=dict)
    held_time: float = float("nan")
    seconds: float = 0.0
    relaxation: float | None = None
    damped_growth: bool | None = None
    mass_errors: dict[str, float] = field(default_factory=dict)


def divergence_w1(
    x: np.ndarray,
    y: np.ndarray,
    a: np.ndarray | None = None,
    *,
    epsilon: float = 0.01,
    device: str | torch.device | None = "cpu",
) -> float:
    """Debiased Sinkhorn divergence with the Euclidean cost between two point clouds.

    ``S(a, b) = OT(a, b) - OT(a, a) / 2 - OT(b, b) / 2`` with the entropic cost
    ``OT``; it tends to the W1 distance as ``epsilon`` goes to 0 and is zero for equal
    clouds. The two self terms are solved by the symmetric update
    (:func:`chronotope.ot.symmetric_ot_cost`).

    Parameters
    ----------
    x, y
        ``(n, d)`` and ``(m, d)`` points.
    a
        ``(n,)`` non-negative masses of ``x`` (normalised here; default uniform); ``y``
        is uniform.
    epsilon
        Entropic regularisation as a fraction of the mean distance between ``x`` and
        ``y``.
    device
        Torch device.
    """
    from chronotope import ot

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    wa = np.full(x.shape[0], 1.0 / x.shape[0]) if a is None else np.asarray(a, np.float64)
    if wa.shape != (x.shape[0],) or not np.isfinite(wa).all() or (wa < 0).any() or wa.sum() <= 0:
        raise ChronotopeInputError(f"a must be {x.shape[0]} finite non-negative masses.")
    wa = wa / wa.sum()
    wb = np.full(y.shape[0], 1.0 / y.shape[0])
    # costs stream in row blocks beyond 4096 x 4096 points: never an n x m matrix for large n
    big = max(x.shape[0], y.shape[0]) > 4096

    def geom(p: np.ndarray, q: np.ndarray) -> ot.PointCloud:
        rows = 4096 if big else None
        return ot.PointCloud(p, q, cost="euclidean", batch_size=rows, device=device)

    geom_xy = geom(x, y)
    eps = float(epsilon) * float(geom_xy.mean_cost)

    def cost(g: ot.PointCloud, wp: np.ndarray, wq: np.ndarray) -> float:
        # the Euclidean cost at a small epsilon needs many plain iterations: over-relaxed
        out = ot.sinkhorn(
            g, a=wp, b=wq, epsilon=eps, tol=1e-4, max_iter=5000, overrelaxation="auto"
        )
        return float(out.reg_ot_cost)

    def self_cost(p: np.ndarray, wp: np.ndarray) -> float:
        # OT(a, a): one potential, the averaged symmetric update (tens of iterations)
        return ot.symmetric_ot_cost(geom(p, p), wp, epsilon=eps, tol=1e-4)

    value = cost(geom_xy, wa, wb) - 0.5 * self_cost(x, wa) - 0.5 * self_cost(y, wb)
    return max(value, 0.0)


def backtest_extrapolation(
    x: np.ndarray,
    time: np.ndarray,
    *,
    params: DynamicsParams | None = None,
    modes: tuple[str, ...] = EXTRAPOLATE_MODES,
    relaxations: tuple[float, ...] = RELAXATIONS,
    masses: np.ndarray | list[float] | None = None,
    growth_prior: np.ndarray | None = None,
    n_sub: int = 2000,
    device: str | torch.device | None = "cpu",
    scheduler: object = None,
    couplings: SnapshotCouplings | None = None,
    progress: bool = False,
) -> ExtrapolationBacktest:
    """Hold out the last time point, fit the rest, and score each continuation on it.

    Parameters
    ----------
    x, time
        ``(n, d)`` training cells and ``(n,)`` times; at least three time points.
    params
        Hyperparameters of the model to backtest (its ``extrapolate`` is ignored).
    modes
        Continuations to compare (a subset of ``EXTRAPOLATE_MODES``).
    relaxations
        Relaxation times (units of the last interval) at which ``"damped"`` is tried.
    masses
        Relative population size per time point (as in ``fit``; the last is dropped).
    growth_prior
        ``(n,)`` prior growth rates (as in ``fit``; the held-out cells' are dropped).
    n_sub
        At most this many start cells (one SDE particle each) and held-out cells.
    device, scheduler
        As in :meth:`~chronotope.dynamics.DynamicsModel.fit`.
    couplings
        The couplings of the model being backtested (of all of ``x``, as
        ``DynamicsModel.couplings_``): the backtest model reuses all but the last interval
        (:meth:`~chronotope.dynamics.SnapshotCouplings.drop_last`) and their ``sigma``
        instead of solving them again. ``None``: solved here, with ``sigma`` set from
        the earlier time points alone.
    progress
        Show a progress bar over the backtest model's training steps.

    Notes
    -----
    The backtest model trains for ``n_steps (T - 2) / (T - 1)`` steps (``T`` training
    time points), so that each of its intervals gets as many bridge samples as one of the
    model's (the samples of a step are spread evenly over the intervals).

    Returns
    -------
    ExtrapolationBacktest
    """
    tic = _time.perf_counter()
    bad = [m for m in modes if m not in EXTRAPOLATE_MODES]
    if bad or not modes:
        raise ChronotopeInputError(
            f"modes must be among {', '.join(EXTRAPOLATE_MODES)}, got {list(modes)}."
        )
    if "damped" in modes and (
        not relaxations or not all(0 < float(r) < np.inf for r in relaxations)
    ):
        raise ChronotopeInputError(
            f"relaxations must be positive finite numbers, got {list(relaxations)}."
        )
    x = np.asarray(x, dtype=np.float64)
    t = np.asarray(time, dtype=np.float64).ravel()
    if x.ndim != 2 or x.shape[0] != t.shape[0]:
        raise ChronotopeInputError(
            f"x must be (n, d) with one time per row, got {x.shape} and {t.shape}."
        )
    times = np.unique(t)
    if times.size < 3:
        raise ChronotopeInputError(
            "backtesting the extrapolation needs at least three time points (two to fit, "
            f"one to predict); got {times.size}."
        )
    held = float(times[-1])
    keep = t < held
    base = params or DynamicsParams()
    # as many bridge samples per interval as the model's, on one interval fewer
    n_steps = max(1, round(base.n_steps * (times.size - 2) / (times.size - 1)))
    p = dataclasses.replace(base, extrapolate="landscape", n_steps=n_steps)
    head = None
    if couplings is not None:
        head = couplings.drop_last(t)
        p = dataclasses.replace(p, sigma=head.sigma)
    model = DynamicsModel(p, device=device).fit(
        x[keep],
        t[keep],
        masses=None if masses is None else list(np.asarray(masses, np.float64)[:-1]),
        growth_prior=None if growth_prior is None else np.asarray(growth_prior)[keep],
        scheduler=scheduler,  # type: ignore[arg-type]
        couplings=head,
        progress=progress,
    )
    rng = np.random.default_rng(p.seed)
    start = x[t == times[0]]
    start = start[np.sort(rng.choice(start.shape[0], min(n_sub, start.shape[0]), replace=False))]
    target = x[t == held]
    target = target[
        np.sort(rng.choice(target.shape[0], min(n_sub, target.shape[0]), replace=False))
    ]
    candidates = [
        (f"damped({float(r):g})", mode, float(r)) if mode == "damped" else (mode, mode, None)
        for mode in modes
        for r in (relaxations if mode == "damped" else (None,))
    ]

    def push(mode: str, relax: float | None, growth: bool | None = None):
        return model.simulate(
            start,
            float(times[0]),
            held,
            method="sde",
            seed=p.seed,
            extrapolate=mode,  # type: ignore[arg-type]
            relaxation=relax,
            damped_growth=growth,
        ).final

    scores: dict[str, float] = {}
    masses_at: dict[str, float] = {}
    for name, mode, relax in candidates:
        xp, wp = push(mode, relax, True)  # growth on; whether to keep it is decided below
        scores[name] = divergence_w1(xp, target, wp, device=model.device)
        masses_at[name] = float(wp.sum())
    best = min(scores, key=scores.__getitem__)
    _, choice, relaxation = next(c for c in candidates if c[0] == best)
    damped_growth: bool | None = None
    mass_errors: dict[str, float] = {}
    if choice == "damped":
        # growth past the end is a separate question: the divergence compares shapes
        # (masses normalised), the total mass is compared with the held-out mass
        if masses is None:
            counts = np.array([(t == v).sum() for v in (times[0], held)], dtype=np.float64)
            truth = float(counts[1] / counts[0])
        else:
            m = np.asarray(masses, dtype=np.float64)
            truth = float(m[-1] / m[0])
        mass_errors = {
            "growth": abs(masses_at[best] - truth),
            "no growth": abs(float(push("damped", relaxation, False)[1].sum()) - truth),
        }
        damped_growth = mass_errors["growth"] <= mass_errors["no growth"]
    seconds = _time.perf_counter() - tic
    logger.info(
        "extrapolation backtest (predict t=%g from a fit without it): %s -> %s%s (%.1f s)",
        held,
        ", ".join(f"{k} {v:.4g}" for k, v in scores.items()),
        best,
        ""
        if damped_growth is None
        else f"; mass error with growth {mass_errors['growth']:.3g}, without "
        f"{mass_errors['no growth']:.3g} -> growth {'on' if damped_growth else 'off'}",
        seconds,
    )
    return ExtrapolationBacktest(
        choice=choice,
        scores=scores,
        held_time=held,
        seconds=seconds,
        relaxation=relaxation,
        damped_growth=damped_growth,
        mass_errors=mass_errors,
    )
