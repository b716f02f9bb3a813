r"""Multi-marginal conditional paths: cubic Hermite (Catmull-Rom) splines through chained pairs.

The default conditional path of :class:`~chronotope.dynamics.DynamicsModel` on an interval
:math:`[t_k, t_{k+1}]` is the Brownian bridge around the straight line between a pair
:math:`(x_k, x_{k+1})` drawn from the interval's plan. With ``paths="spline"`` the mean of
the bridge is instead a cubic Hermite curve whose tangents at the two knots come from the
neighbouring snapshots (multi-marginal flow matching, Rohbeck et al. 2024; Tong et al.
2024 for the bridges):

* a pair ``(i, j)`` is drawn from the plan of interval :math:`k` as before;
* a predecessor of ``i`` is drawn from the plan of interval :math:`k-1` given its target
  ``i`` (uniformly among the drawn pairs of that plan that end at ``i``), and a successor
  of ``j`` from the plan of interval :math:`k+1` given its source ``j``. This is the
  Markov chain of the consecutive plans, read locally;
* the knot tangents are Catmull-Rom's central differences,
  :math:`m_k = (x_{k+1} - x_{k-1}) / (t_{k+1} - t_{k-1})`; at the first and last time point,
  or when a cell has no drawn neighbour, the tangent is the secant of the interval
  (:math:`(x_{k+1} - x_k)/\Delta t_k`), so with two time points the spline is the
  straight line and the old paths are recovered exactly.

The curve passes through both knots (the marginals at the snapshot times are unchanged);
between them it bends with the chain's curvature, so a time point held out between
``t_k`` and ``t_{k+1}`` is interpolated with information from ``t_{k-1}`` and
``t_{k+2}`` too. Catmull-Rom tangents are local (each interval depends on at most four
snapshots) and reproduce straight lines and constant velocities exactly; a natural cubic
spline, which couples every interval, overshoots at a gap between snapshots (measured in
``docs/dynamics.md``).
"""

from __future__ import annotations

import torch

__all__ = [
    "NeighbourSampler",
    "SplineMeans",
    "catmull_rom_tangents",
    "hermite",
    "linear_mass_rate",
]


def hermite(
    x0: torch.Tensor,
    x1: torch.Tensor,
    m0: torch.Tensor,
    m1: torch.Tensor,
    s: torch.Tensor,
    h: torch.Tensor | float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cubic Hermite curve on an interval of length ``h`` and its time derivative.

    Parameters
    ----------
    x0, x1
        ``(n, d)`` knots at the start and end of the interval.
    m0, m1
        ``(n, d)`` tangents (per unit time) at the knots.
    s
        ``(n, 1)`` position in the interval, in ``[0, 1]``.
    h
        Interval length (scalar or ``(n, 1)``).

    Returns
    -------
    tuple of torch.Tensor
        Position ``p(s)`` and velocity ``dp/dt = (dp/ds) / h``, both ``(n, d)``.
    """
    s2, s3 = s * s, s * s * s
    h00, h10, h01, h11 = 2 * s3 - 3 * s2 + 1, s3 - 2 * s2 + s, -2 * s3 + 3 * s2, s3 - s2
    d00, d10, d01, d11 = 6 * s2 - 6 * s, 3 * s2 - 4 * s + 1, -6 * s2 + 6 * s, 3 * s2 - 2 * s
    pos = h00 * x0 + h10 * h * m0 + h01 * x1 + h11 * h * m1
    vel = (d00 * x0 + d01 * x1) / h + d10 * m0 + d11 * m1
    return pos, vel


def catmull_rom_tangents(
    x_prev: torch.Tensor,
    x0: torch.Tensor,
    x1: torch.Tensor,
    x_next: torch.Tensor,
    t_prev: torch.Tensor,
    t0: torch.Tensor,
    t1: torch.Tensor,
    t_next: torch.Tensor,
    has_prev: torch.Tensor,
    has_next: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Catmull-Rom knot tangents of the interval ``[t0, t1]`` (non-uniform times).

    ``m0 = (x1 - x_prev) / (t1 - t_prev)`` where a predecessor exists (``has_prev``), else
    the secant ``(x1 - x0) / (t1 - t0)``; ``m1 = (x_next - x0) / (t_next - t0)`` where a
    successor exists, else the secant. Times are ``(n, 1)``, masks ``(n,)`` booleans; rows
    without a neighbour may hold any finite value in ``x_prev`` / ``x_next``.
    """
    secant = (x1 - x0) / (t1 - t0)
    m0 = torch.where(has_prev[:, None], (x1 - x_prev) / (t1 - t_prev), secant)
    m1 = torch.where(has_next[:, None], (x_next - x0) / (t_next - t0), secant)
    return m0, m1


class NeighbourSampler:
    """Draw, for given cells, a partner from a pool of plan pairs keyed on one column.

    Parameters
    ----------
    pairs
        ``(n_pairs, 2)`` global cell indices ``(source, target)`` drawn from a plan.
    key
        Column matched against the query cells: 0 draws targets given sources (the
        successor in the chain), 1 draws sources given targets (the predecessor).

    Notes
    -----
    A query cell's partner is drawn uniformly among the pairs whose ``key`` column is
    that cell, i.e. from the pool's empirical conditional of the plan. Cells with no
    pair get ``ok = False`` (and partner index 0).
    """

    def __init__(self, pairs: torch.Tensor, key: int) -> None:
        keys = pairs[:, key]
        order = torch.argsort(keys, stable=True)
        self._keys = keys[order].contiguous()
        self._other = pairs[order, 1 - key].contiguous()

    def draw(self, cells: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Partner index and ``ok`` mask for each of ``cells`` (``(n,)`` long)."""
        lo = torch.searchsorted(self._keys, cells, right=False)
        hi = torch.searchsorted(self._keys, cells, right=True)
        ok = hi > lo
        u = torch.rand(cells.shape[0], generator=gen).to(cells.device)
        pick = lo + (u * (hi - lo).to(u.dtype)).long()
        pick = torch.clamp(torch.minimum(pick, hi - 1), min=0, max=self._keys.shape[0] - 1)
        return torch.where(ok, self._other[pick], torch.zeros_like(cells)), ok


class SplineMeans:
    """Catmull-Rom means of the conditional paths of every interval (used in training).

    Parameters
    ----------
    pools
        One ``(n_pairs, 2)`` tensor of plan pairs per interval, in time order.
    tau0, dtau
        ``(n_intervals,)`` start and length of each interval (network time units).
    """

    def __init__(self, pools: list[torch.Tensor], tau0: torch.Tensor, dtau: torch.Tensor) -> None:
        self.n = len(pools)
        self.tau0, self.dtau = tau0, dtau
        # predecessor of a source cell of interval k: from interval k - 1, given its target
        self._prev = [None] + [NeighbourSampler(p, key=1) for p in pools[:-1]]
        # successor of a target cell of interval k: from interval k + 1, given its source
        self._next = [NeighbourSampler(p, key=0) for p in pools[1:]] + [None]

    def mean(
        self,
        z_all: torch.Tensor,
        idx: torch.Tensor,
        which: torch.Tensor,
        s: torch.Tensor,
        gen: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Path mean and its velocity at ``s`` for pairs ``idx`` of intervals ``which``."""
        prev = torch.zeros_like(idx[:, 0])
        nxt = torch.zeros_like(idx[:, 1])
        has_prev = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        has_next = torch.zeros_like(has_prev)
        for k in range(self.n):
            rows = torch.nonzero(which == k).flatten()
            if rows.numel() == 0:
                continue
            if self._prev[k] is not None:
                prev[rows], has_prev[rows] = self._prev[k].draw(idx[rows, 0], gen)
            if self._next[k] is not None:
                nxt[rows], has_next[rows] = self._next[k].draw(idx[rows, 1], gen)
        t0 = self.tau0[which][:, None]
        h = self.dtau[which][:, None]
        t1 = t0 + h
        # neighbouring knot times (any finite value where there is no neighbour)
        t_prev = torch.where(which > 0, self.tau0[(which - 1).clamp(min=0)], t0[:, 0] - 1)
        nk = (which + 1).clamp(max=self.n - 1)
        t_next = torch.where(which < self.n - 1, self.tau0[nk] + self.dtau[nk], t1[:, 0] + 1)
        z0, z1 = z_all[idx[:, 0]], z_all[idx[:, 1]]
        m0, m1 = catmull_rom_tangents(
            z_all[prev],
            z0,
            z1,
            z_all[nxt],
            t_prev[:, None],
            t0,
            t1,
            t_next[:, None],
            has_prev,
            has_next,
        )
        return hermite(z0, z1, m0, m1, s, h)


def linear_mass_rate(rate: torch.Tensor, s: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    r"""Growth rate at bridge time ``s`` of a path whose mass is linear in time.

    A path from a cell of mass :math:`c` that the plan sends mass :math:`r = c\rho` from,
    :math:`\rho = e^{g h}` with ``rate`` :math:`g` the interval's mean log rate, has mass
    :math:`m(s) = c\,(1 + s(\rho - 1))` and rate
    :math:`\dot m / m = (\rho - 1) / (h (1 + s(\rho - 1)))`; its integral over the
    interval is :math:`\log\rho = g h`, the same end mass as the constant rate ``g``.
    Mass linear in time is a constant number of births (or deaths) per unit time along a
    path, rather than a constant rate per cell.
    """
    rho_m1 = torch.expm1(rate * h)
    out = rho_m1 / (h * (1.0 + s * rho_m1))
    return torch.where(rho_m1.abs() < 1e-6, rate, out)


def path_mass_weight(
    rate: torch.Tensor, s: torch.Tensor, h: torch.Tensor, growth_path: str = "linear"
) -> torch.Tensor:
    r"""Mass of a conditional path at bridge time ``s`` over the mass it arrives with.

    A pair drawn from the plan stands for the mass :math:`r = c\rho` its source sends
    (:math:`\rho = e^{g h}`, ``rate`` :math:`g` the interval's mean log rate over the
    interval length ``h``). At bridge time :math:`s` the path carries :math:`m(s)`:
    :math:`c\,(1 + s(\rho - 1))` for ``growth_path="linear"``, :math:`c\rho^{s}` for
    ``"exponential"``. Weighting the pair by :math:`m(s)/r` turns the plan's pair measure
    into the unbalanced path measure, whose marginals start at the observed source cells
    and satisfy :math:`\partial_t\mu + \nabla\cdot(\mu v) = g\mu`; it is 1 at :math:`s = 1`
    and :math:`1/\rho` at :math:`s = 0`.
    """
    log_rho = rate * h
    if growth_path == "exponential":
        return torch.exp((s - 1.0) * log_rho)
    return (1.0 + s * torch.expm1(log_rho)) * torch.exp(-log_rho)
