r"""Unbalanced entropic couplings between consecutive snapshots, computed once per fit.

For consecutive time points :math:`t_k < t_{k+1}` with cells :math:`x_i` and :math:`y_j`,
the plan :math:`P` solves the unbalanced entropic problem of :class:`chronotope.ot.LinearProblem`

.. math::

    \min_{P \ge 0} \langle C, P\rangle + \varepsilon_k \mathrm{KL}(P \,|\, a b^\top)
    + \rho_a \mathrm{KL}(P\mathbf 1 \,|\, a) + \rho_b \mathrm{KL}(P^\top\mathbf 1 \,|\, b),
    \qquad C_{ij} = |x_i - y_j|^2,

solved by :class:`chronotope.ot.Sinkhorn` with over-relaxed iterations
(``overrelaxation="auto"``: the same plan in 5-15x fewer iterations at the small default
epsilon, where plain iterations stopped at ``max_iter`` before reaching ``tol``; the factor
is raised during the solve when the observed rate shows it too low, about 300 iterations
per block). Masses:

* every cell of time point :math:`k` carries :math:`c_i = M_k / n_k`, where the relative
  population sizes :math:`M_k` default to the cell counts (:math:`M_k = n_k / n_0`) or are
  given by the user;
* the source prior is the mass the cell is expected to have at :math:`t_{k+1}`:
  :math:`a_i = c_i \exp(\bar g_i \Delta t_k)` with :math:`\bar g_i` the user's growth prior of
  the cell, or the population rate :math:`\log(M_{k+1}/M_k)/\Delta t_k` when none is given
  (then :math:`\sum a = \sum b` and ``tau_a = tau_b = 1`` is balanced OT with uniform growth);
* :math:`b_j = M_{k+1} / n_{k+1}`.

The **growth target** of a source cell is the log ratio of the mass it sends (the row sum
of the plan, :math:`r_i`) to the mass it has, per unit time:
:math:`g_i = \log(r_i / c_i) / \Delta t_k`.

**Growth prior from the other intervals** (``growth_neighbors``, default 50). One
interval's relaxed plan cannot tell growth from transport: where the sources underpopulate
a region of the targets, sending more mass from the nearby sources is cheaper than moving
far ones, so the plan can read a displacement as growth (shorter paths, and growth that
can even anti-correlate with the true division rate; see ``docs/dynamics.md``). Growth
is a property of the cell state, and the other intervals hold evidence about it. With two
or more intervals and no user ``growth_prior``, the relaxed plans are solved first; then,
for each interval, a time-blind k-nearest-neighbour regression of the **other**
intervals' growth targets on their source cells' states predicts a rate for this
interval's sources, shifted by a constant so that the prior's total is :math:`M_{k+1}`;
and the interval is solved again, relaxed as before (``tau_a``) but around that prior,
:math:`a_i = c_i \exp(\hat g_{-k}(x_i) \Delta t_k)`. Leaving the interval itself out
keeps its own plan from being counted twice: the prior carries the other intervals'
evidence, the relaxation this interval's. With one interval nothing changes. The first,
relaxed solves only feed the regression: one seeded block of at most ``PRIOR_CELLS`` cells
per side per interval. A rate from a shorter interval :math:`j` counts at
:math:`\Delta t_j / \Delta t_k` of its value, so the prior never claims a larger log mass
change than the plan it comes from (read as rates, short intervals' changes were multiplied
by the length ratio and made the weights degenerate on TIGON's EMT days).

**Entropy and diffusion.** The entropic plan with squared Euclidean cost and
:math:`\varepsilon_k = 2\sigma^2\Delta t_k` is the static Schrödinger bridge for Brownian
motion :math:`\sigma\,dW` over :math:`\Delta t_k` (equivalently :math:`\varepsilon = \sigma^2
\Delta t` for the cost :math:`\tfrac12|x-y|^2`). One :math:`\sigma` is used for all
intervals, so the couplings and the bridges the model trains on describe the same noise.
When :math:`\sigma` is not given it is set from ``epsilon``, a fraction of the cost scale:
:math:`\sigma^2 = \mathrm{median}_k\, \epsilon\, \bar C_k / (2\Delta t_k)` with
:math:`\bar C_k` the mean cost of interval :math:`k`.

**Scale.** Pairs with at most ``batch_size`` cells on each side are solved in one block.
Larger ones are cut into random blocks (cells of both time points shuffled and split into
the same number of near-equal parts, the target part's mass set to the source part's share
of :math:`M_{k+1}`); each block is a dense ``batch_size``-sized problem, so memory grows as
``batch_size**2``, never as :math:`n_k n_{k+1}`. ``n_rounds`` repeats the split with fresh
shuffles; growth targets average the log ratios over rounds. Training pairs are drawn from
each block's plan in proportion to its entries (blocks in proportion to their mass), so the
pair pool has the plan's distribution without the plan ever being held whole.
"""

from __future__ import annotations

import logging
import math
import time as _time
from dataclasses import dataclass, replace

import numpy as np
import torch

from chronotope._errors import ChronotopeInputError
from chronotope._settings import resolve_rng
from chronotope.dynamics._validate import MIN_CELLS, check_snapshots
from chronotope.ot import LinearProblem, PointCloud, Sinkhorn
from chronotope.parallel import Scheduler, check_scheduler, parallel_map

__all__ = ["IntervalCoupling", "SnapshotCouplings", "snapshot_couplings"]

logger = logging.getLogger("chronotope")


@dataclass(frozen=True)
class IntervalCoupling:
    """Coupling of one interval ``[t0, t1]`` between consecutive time points.

    Attributes
    ----------
    t0, t1
        The two time points.
    source, target
        Global indices (rows of the input ``x``) of the cells at ``t0`` and ``t1``.
    pairs
        ``(n_pairs, 2)`` global indices ``(source cell, target cell)`` drawn from the plan.
    mass
        ``(n_source,)`` mass each source cell has at ``t0`` (``M_k / n_k``).
    prior
        ``(n_source,)`` source marginal ``a`` of the problem (expected mass at ``t1``).
    row_mass
        ``(n_source,)`` mass each source cell sends (plan row sums; geometric mean over
        rounds).
    growth
        ``(n_source,)`` growth targets ``log(row_mass / mass) / (t1 - t0)``.
    epsilon
        Absolute entropic regularisation, in squared representation units.
    n_blocks
        Blocks per round.
    converged
        Whether every block's Sinkhorn solve reached ``tol``.
    seconds
        Wall time of the solves and the pair draws.
    """

    t0: float
    t1: float
    source: np.ndarray
    target: np.ndarray
    pairs: np.ndarray
    mass: np.ndarray
    prior: np.ndarray
    row_mass: np.ndarray
    growth: np.ndarray
    epsilon: float
    n_blocks: int
    converged: bool
    seconds: float

    @property
    def dt(self) -> float:
        """Length of the interval."""
        return self.t1 - self.t0


@dataclass(frozen=True)
class SnapshotCouplings:
    """Couplings of all consecutive time points.

    Attributes
    ----------
    times
        Sorted distinct time points, ``(T,)``.
    masses
        Relative population size ``M_k`` of each time point, ``(T,)``.
    sigma
        Diffusion coefficient (``dX = v dt + sigma dW``), in representation units per
        square root of time; ``epsilon_k = 2 sigma^2 dt_k``.
    intervals
        One :class:`IntervalCoupling` per consecutive pair.
    growth
        ``(n,)`` growth target of every cell (NaN for the cells of the last time point).
    """

    times: np.ndarray
    masses: np.ndarray
    sigma: float
    intervals: tuple[IntervalCoupling, ...]
    growth: np.ndarray

    @property
    def diffusion(self) -> float:
        """``D = sigma^2 / 2``."""
        return 0.5 * self.sigma**2

    def drop_last(self, time: np.ndarray) -> SnapshotCouplings:
        """These couplings without the last time point, for the cells before it.

        The result is what :func:`snapshot_couplings` returns for the rows
        ``time < times[-1]`` with the same ``sigma``, seed and other arguments (each
        interval is solved on its own, with a seed drawn in order from the seed), without
        solving anything again: the last interval is dropped, the indices are renumbered
        to the kept rows, and the cells of the new last time point lose their growth
        targets (they came from the dropped interval).

        Parameters
        ----------
        time
            ``(n,)`` time of every cell these couplings were computed on.

        Returns
        -------
        SnapshotCouplings
            Couplings of the rows ``time < times[-1]``, in their order.
        """
        t = np.asarray(time, dtype=np.float64).ravel()
        if self.times.size < 3:
            raise ChronotopeInputError(
                f"dropping the last time point needs three or more; these couplings have "
                f"{self.times.size}."
            )
        if t.shape != self.growth.shape:
            raise ChronotopeInputError(
                f"time must give one time per cell of the couplings ({self.growth.size}), got "
                f"shape {t.shape}."
            )
        keep = t < self.times[-1]
        if int(keep.sum()) != sum(iv.source.size for iv in self.intervals):
            raise ChronotopeInputError("time does not match the cells of these couplings.")
        renumber = np.cumsum(keep) - 1
        intervals = tuple(
            replace(
                iv,
                source=renumber[iv.source],
                target=renumber[iv.target],
                pairs=renumber[iv.pairs],
            )
            for iv in self.intervals[:-1]
        )
        growth = self.growth[keep].copy()
        growth[t[keep] == self.times[-2]] = np.nan
        return SnapshotCouplings(
            times=self.times[:-1],
            masses=self.masses[:-1],
            sigma=self.sigma,
            intervals=intervals,
            growth=growth,
        )


def _mean_sqcost(x: np.ndarray, y: np.ndarray) -> float:
    """Mean of ``|x_i - y_j|^2`` over all pairs, in O((n + m) d)."""
    mx, my = x.mean(0), y.mean(0)
    return float((x * x).sum(1).mean() + (y * y).sum(1).mean() - 2.0 * mx @ my)


def _split(idx: np.ndarray, n_blocks: int, rng: np.random.Generator) -> list[np.ndarray]:
    return np.array_split(rng.permutation(idx), n_blocks)


def _draw_pairs(plan: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Draw ``n`` index pairs with probability proportional to the entries of ``plan``."""
    cdf = np.cumsum(plan, axis=None, dtype=np.float64)
    flat = np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right")
    flat = np.minimum(flat, plan.size - 1)
    return np.divmod(flat, plan.shape[1])


#: A change of the cell count by more than this factor, reversed at the next time point by
#: more than the same factor, makes the default masses (the counts) suspect.
COUNT_SWING = 1.5


#: Cells per side of the one relaxed block per interval whose growth targets feed the prior.
PRIOR_CELLS = 2048


def _prior_from_other_intervals(
    x: np.ndarray,
    groups: list[np.ndarray],
    mass_k: np.ndarray,
    dts: np.ndarray,
    estimates: list[tuple[np.ndarray, np.ndarray]],
    n_neighbors: int,
) -> list[np.ndarray]:
    """Prior growth rates of each interval's sources from the other intervals' targets.

    ``estimates[j]`` is ``(source cells, growth targets)`` of interval ``j``'s relaxed
    plan. For interval ``k``: a k-nearest-neighbour regression of the other intervals'
    growth targets on their cells' states, predicted at all of this interval's sources and
    shifted so that ``sum c exp(r dt) = M_{k+1}``. A rate from a shorter interval ``j``
    is scaled by ``dt_j / dt_k``: the prior never claims a larger log mass change than
    the plan it comes from showed.
    """
    from sklearn.neighbors import KNeighborsRegressor

    rates = []
    for k, dt in enumerate(dts):
        others = [j for j in range(len(dts)) if j != k]
        src = np.concatenate([estimates[j][0] for j in others])
        reg = KNeighborsRegressor(n_neighbors=min(n_neighbors, src.size))
        # a rate from a shorter interval j counts at dt_j / dt_k of its value
        rates_j = [estimates[j][1] * min(1.0, float(dts[j] / dt)) for j in others]
        reg.fit(x[src], np.concatenate(rates_j))
        g = reg.predict(x[groups[k]])
        z = math.log(mass_k[k] / groups[k].size) + g * dt
        log_total = float(z.max() + np.log(np.exp(z - z.max()).sum()))
        rates.append(g + (math.log(mass_k[k + 1]) - log_total) / dt)
    return rates


def count_reversals(counts: np.ndarray, factor: float = COUNT_SWING) -> list[int]:
    """Time-point indices where the cell count swings by ``> factor`` and back by ``> factor``.

    A population that halves and then doubles (or the reverse) between neighbouring
    snapshots is more likely a varying number of cells *measured* than a population size;
    read as masses such counts force the couplings to explain the swings by death and
    growth. Index ``k`` is returned when ``c_k / c_{k-1}`` and ``c_{k+1} / c_k`` lie on
    opposite sides of 1, both by more than ``factor``.
    """
    log_ratio = np.diff(np.log(np.asarray(counts, dtype=np.float64)))
    big = np.abs(log_ratio) > math.log(factor)
    turn = np.sign(log_ratio[:-1]) * np.sign(log_ratio[1:]) < 0
    return [int(k) + 1 for k in np.flatnonzero(turn & big[:-1] & big[1:])]


def _resolve_masses(masses: np.ndarray | list[float] | None, counts: np.ndarray) -> np.ndarray:
    if masses is None:
        swings = count_reversals(counts)
        if swings:
            shown = ", ".join(
                f"{int(counts[k - 1])} -> {int(counts[k])} -> {int(counts[k + 1])}" for k in swings
            )
            logger.warning(
                "the masses default to the cell counts per time point, which swing down and up "
                "(or up and down) by more than %.1fx between neighbouring time points (%s). If "
                "the counts are numbers of cells measured rather than population sizes, pass "
                "masses='equal' (command line: --masses equal) or measured population sizes; "
                "otherwise the particle weights must explain the swings by death and growth.",
                COUNT_SWING,
                shown,
            )
        return counts / counts[0]
    m = np.asarray(masses, dtype=np.float64)
    if m.shape != counts.shape:
        raise ChronotopeInputError(
            f"masses must give one relative population size per time point ({counts.size}), "
            f"got shape {m.shape}."
        )
    if not (np.isfinite(m).all() and (m > 0).all()):
        raise ChronotopeInputError("masses must be positive and finite.")
    return m


def _interval_task(
    item: tuple,
    *,
    times: np.ndarray,
    mass_k: np.ndarray,
    sigma: float,
    tau_a: float,
    tau_b: float,
    batch_size: int,
    n_rounds: int,
    n_pairs: int | None,
    max_iter: int,
    tol: float,
    lse_mode: bool | str,
    overrelaxation: float | str,
    dtype: torch.dtype,
    device: str | torch.device | None,
) -> tuple[np.ndarray, dict]:
    """Coupling of one interval (a :func:`chronotope.parallel.parallel_map` task).

    ``item`` is ``(k, source cells, target cells, growth rate of the source cells, seed)``;
    returns the drawn pairs as local ``(source row, target row)`` indices and the other
    fields of :class:`IntervalCoupling`.
    """
    k, xs, xt, rate, seed = item
    tic = _time.perf_counter()
    rng = np.random.default_rng(seed)
    n_src, n_tgt = xs.shape[0], xt.shape[0]
    dt = float(times[k + 1] - times[k])
    eps = 2.0 * sigma**2 * dt
    current = np.full(n_src, mass_k[k] / n_src)
    prior = current * np.exp(rate * dt)
    b_all = np.full(n_tgt, mass_k[k + 1] / n_tgt)
    n_blocks = max(1, math.ceil(max(n_src, n_tgt) / batch_size))
    rounds = n_rounds if n_blocks > 1 else 1
    n_draw = n_pairs or max(20000, 4 * max(n_src, n_tgt))
    src, tgt = np.arange(n_src), np.arange(n_tgt)
    log_ratio = np.zeros(n_src)
    converged = True
    pieces: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    block_mass: list[float] = []
    for _ in range(rounds):
        parts_a = _split(src, n_blocks, rng)
        parts_b = _split(tgt, n_blocks, rng)
        for ia, ib in zip(parts_a, parts_b, strict=True):
            a_blk = prior[ia]
            b_blk = b_all[ib]
            # The target part carries the source part's share of M_{k+1}.
            b_blk = b_blk * (mass_k[k + 1] * ia.size / n_src) / b_blk.sum()
            geom = PointCloud(xs[ia], xt[ib], dtype=dtype, device=device)
            prob = LinearProblem(geom, a_blk, b_blk, tau_a=tau_a, tau_b=tau_b)
            out = Sinkhorn(
                epsilon=eps,
                max_iter=max_iter,
                tol=tol,
                lse_mode=lse_mode,
                warn=False,
                overrelaxation=overrelaxation,
            )(prob)
            converged &= bool(out.converged)
            with torch.no_grad():
                plan = out.dense_plan().cpu().numpy()
            rows = plan.sum(1)
            log_ratio[ia] += np.log(np.maximum(rows, 1e-300) / current[ia])
            pieces.append((ia, ib, plan))
            block_mass.append(float(rows.sum()))
    log_ratio /= rounds
    share = np.asarray(block_mass) / np.sum(block_mass)
    per_block = rng.multinomial(n_draw, share)
    pairs = np.empty((n_draw, 2), dtype=np.int64)
    at = 0
    for (ia, ib, plan), n_b in zip(pieces, per_block, strict=True):
        if n_b == 0:
            continue
        r, c = _draw_pairs(plan, int(n_b), rng)
        pairs[at : at + n_b, 0] = ia[r]
        pairs[at : at + n_b, 1] = ib[c]
        at += n_b
    pairs = pairs[rng.permutation(n_draw)]
    del pieces
    fields = {
        "mass": current,
        "prior": prior,
        "row_mass": current * np.exp(log_ratio),
        "growth": log_ratio / dt,
        "epsilon": eps,
        "n_blocks": n_blocks,
        "converged": converged,
        "seconds": _time.perf_counter() - tic,
    }
    return pairs, fields


def snapshot_couplings(
    x: np.ndarray,
    time: np.ndarray,
    *,
    masses: np.ndarray | list[float] | None = None,
    growth_prior: np.ndarray | None = None,
    epsilon: float = 0.01,
    sigma: float | None = None,
    tau_a: float = 0.998,
    tau_b: float = 1.0,
    growth_neighbors: int | None = 50,
    batch_size: int = 4096,
    n_rounds: int = 1,
    n_pairs: int | None = None,
    max_iter: int = 2000,
    tol: float = 1e-5,
    lse_mode: bool | str = "auto",
    overrelaxation: float | str = "auto",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = "cpu",
    min_cells: int = MIN_CELLS,
    seed: int | np.random.Generator | None = 0,
    scheduler: Scheduler = None,
    progress: bool = False,
) -> SnapshotCouplings:
    """Unbalanced entropic couplings between consecutive snapshots and growth targets.

    Parameters
    ----------
    x
        ``(n, d)`` cells in the representation.
    time
        ``(n,)`` numeric time of each cell.
    masses
        Relative population size of each time point (sorted order), ``(T,)``. ``None``:
        the cell counts, i.e. cells are sampled in proportion to the population.
    growth_prior
        ``(n,)`` prior growth rate of each cell (per unit time, e.g. from proliferation
        scores); it sets the source marginal ``a``. ``None``: the population rate.
    epsilon
        Entropic regularisation as a fraction of the mean cost of each interval; used to
        set ``sigma`` when ``sigma`` is ``None`` (see the module notes).
    sigma
        Diffusion coefficient; ``epsilon_k = 2 sigma^2 dt_k``. Overrides ``epsilon``.
    tau_a, tau_b
        Unbalancedness of the source and target marginals (1 is a hard constraint). The
        default keeps the observed target population exactly and lets source cells send
        more or less mass than their prior: that difference is the growth.
    growth_neighbors
        Neighbours of the time-blind k-nearest-neighbour regression that turns the other
        intervals' growth targets into a growth prior for each interval, which is then
        solved again around it (see the module notes). Used with two or more intervals,
        a relaxed source (``tau_a < 1``) and no ``growth_prior``. ``None`` or 0: one
        relaxed solve per interval (the behaviour before).
    batch_size
        Largest number of cells per side solved in one dense block.
    n_rounds
        Random block splits per interval (only matters beyond ``batch_size`` cells).
    n_pairs
        Pairs drawn per interval; default ``max(20000, 4 * max(n_k, n_{k+1}))``.
    max_iter, tol, lse_mode
        Passed to :class:`chronotope.ot.Sinkhorn` (``tol`` is the L1 marginal error, in the
        units of the masses, which sum to ``M_k``). ``lse_mode="auto"`` iterates on
        log-domain potentials with Schmitzer's absorption (one kernel product per update,
        falling back to pure log-sum-exp updates if anything turns non-finite); ``True``
        uses log-sum-exp updates throughout (exact, several times slower).
    overrelaxation
        Passed to :class:`chronotope.ot.Sinkhorn`: ``"auto"`` (default) over-relaxes the
        iterations by the factor that is optimal for their measured contraction, which
        reaches the same plan in 5-15x fewer iterations at the small default epsilon
        (plain iterations stop at ``max_iter`` there, 0.1 % off the marginals); ``1.0``
        is plain Sinkhorn.
    dtype, device
        Precision and device of the solves.
    min_cells
        Fewest cells allowed per time point.
    seed
        Seed of the block splits and the pair draws (one generator per interval, drawn
        from it).
    scheduler
        Where the intervals are solved (they are independent tasks,
        :func:`chronotope.parallel.parallel_map`): ``None`` (in-process), ``"local:N"``,
        a Dask scheduler address or a ``distributed.Client``. The same result on every
        scheduler.
    progress
        Progress bar over intervals.

    Returns
    -------
    SnapshotCouplings
    """
    x, t, times = check_snapshots(x, time, min_cells=min_cells)
    if batch_size < 2 or n_rounds < 1:
        raise ChronotopeInputError("batch_size must be >= 2 and n_rounds >= 1.")
    if epsilon <= 0 and sigma is None:
        raise ChronotopeInputError(f"epsilon must be positive, got {epsilon}.")
    if sigma is not None and not (np.isfinite(sigma) and sigma > 0):
        raise ChronotopeInputError(f"sigma must be positive and finite, got {sigma}.")
    if growth_neighbors is not None and int(growth_neighbors) < 0:
        raise ChronotopeInputError(f"growth_neighbors must be >= 0, got {growth_neighbors}.")
    if growth_prior is not None:
        growth_prior = np.asarray(growth_prior, dtype=np.float64)
        if growth_prior.shape != t.shape or not np.isfinite(growth_prior).all():
            raise ChronotopeInputError(
                f"growth_prior must hold one finite rate per cell ({t.size}), got shape "
                f"{growth_prior.shape}."
            )
    check_scheduler(scheduler)
    rng = resolve_rng(seed)
    groups = [np.flatnonzero(t == v) for v in times]
    counts = np.array([g.size for g in groups], dtype=np.float64)
    mass_k = _resolve_masses(masses, counts)
    dts = np.diff(times)
    if sigma is None:
        mean_costs = np.array(
            [_mean_sqcost(x[groups[k]], x[groups[k + 1]]) for k in range(len(dts))]
        )
        sigma = float(math.sqrt(np.median(epsilon * mean_costs / (2.0 * dts))))
    growth = np.full(t.shape, np.nan)
    # one generator per interval, drawn from the seed up front: the intervals are
    # independent tasks and give the same result wherever they run
    seeds = rng.integers(0, 2**63 - 1, size=len(dts))
    items = []
    for k, dt in enumerate(dts):
        src, tgt = groups[k], groups[k + 1]
        rate = (
            growth_prior[src]
            if growth_prior is not None
            else np.full(src.size, math.log(mass_k[k + 1] / mass_k[k]) / dt)
        )
        items.append((k, x[src], x[tgt], rate, int(seeds[k])))
    shared = {
        "times": times,
        "mass_k": mass_k,
        "sigma": float(sigma),
        "tau_a": tau_a,
        "tau_b": tau_b,
        "batch_size": batch_size,
        "n_rounds": n_rounds,
        "n_pairs": n_pairs,
        "max_iter": max_iter,
        "tol": tol,
        "lse_mode": lse_mode,
        "overrelaxation": overrelaxation,
        "dtype": dtype,
        "device": device,
    }
    if growth_neighbors and tau_a < 1 and growth_prior is None and len(dts) > 1:
        # first the relaxed plans, only for their growth targets: one block of at most
        # PRIOR_CELLS cells per side (a seeded subsample) per interval is enough to regress on
        sub_rng = np.random.default_rng(rng.integers(0, 2**63 - 1))
        prior_cells = min(batch_size, PRIOR_CELLS)
        subs = [
            tuple(
                np.sort(sub_rng.choice(g.size, min(g.size, prior_cells), replace=False))
                for g in (groups[k], groups[k + 1])
            )
            for k in range(len(dts))
        ]
        first = parallel_map(
            _interval_task,
            [
                (k, xs[i], xt[j], rate[i], sd)
                for (k, xs, xt, rate, sd), (i, j) in zip(items, subs, strict=True)
            ],
            scheduler=scheduler,
            shared={**shared, "n_pairs": 1},
            progress=progress,
            desc="couplings (relaxed, for the growth prior)",
        )
        rates = _prior_from_other_intervals(
            x,
            groups,
            mass_k,
            dts,
            [
                (groups[k][i], f["growth"])
                for k, ((i, _), (_, f)) in enumerate(zip(subs, first, strict=True))
            ],
            int(growth_neighbors),
        )
        items = [(k, xs, xt, rates[k], sd) for k, xs, xt, _, sd in items]
    else:
        first = None
    done = parallel_map(
        _interval_task,
        items,
        scheduler=scheduler,
        shared=shared,
        progress=progress,
        desc="couplings",
    )
    if first is not None:
        for (_, f1), (_, f2) in zip(first, done, strict=True):
            f2["converged"] = bool(f1["converged"] and f2["converged"])
            f2["seconds"] += f1["seconds"]
    intervals = []
    for k, (local_pairs, fields) in enumerate(done):
        src, tgt = groups[k], groups[k + 1]
        pairs = np.stack([src[local_pairs[:, 0]], tgt[local_pairs[:, 1]]], axis=1)
        growth[src] = fields["growth"]
        if not fields["converged"]:
            logger.warning(
                "dynamics couplings: Sinkhorn did not reach tol=%g on interval %g -> %g "
                "(max_iter=%d); the plan is used as is.",
                tol,
                times[k],
                times[k + 1],
                max_iter,
            )
        intervals.append(
            IntervalCoupling(
                t0=float(times[k]),
                t1=float(times[k + 1]),
                source=src,
                target=tgt,
                pairs=pairs,
                **fields,
            )
        )
    return SnapshotCouplings(
        times=times,
        masses=mass_k,
        sigma=float(sigma),
        intervals=tuple(intervals),
        growth=growth,
    )
