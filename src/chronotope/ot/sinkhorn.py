r"""Sinkhorn solver: balanced, unbalanced and semi-relaxed, many histograms at once.

Potentials follow the ott-jax convention: the plan of column ``k`` is

.. math:: P_{ij} = \exp\big((f_{ik} + g_{jk} - C_{ij}) / \varepsilon\big),

so ``f`` and ``g`` already contain ``epsilon * log a`` and ``epsilon * log b``.
The updates are

.. math::

    f_i &= \varepsilon \log a_i - \tau_a\, \varepsilon \log \textstyle\sum_j
           \exp((g_j - C_{ij})/\varepsilon), \\
    g_j &= \varepsilon \log b_j - \tau_b\, \varepsilon \log \textstyle\sum_i
           \exp((f_i - C_{ij})/\varepsilon).

Two numerical paths compute them:

* **log domain** (``lse_mode=True``): every update is a log-sum-exp against
  the cost, exact and stable for any ``epsilon``; ``G`` histograms cost ``G``
  reductions.
* **stabilised scaling** (``lse_mode="auto"``, the default): Schmitzer's
  absorption scheme. Shared reference potentials ``f_ref``, ``g_ref`` (one per
  point, common to all ``G`` histograms) define a kernel
  ``K_ij = exp((f_ref_i + g_ref_j - C_ij)/epsilon)`` computed once per
  absorption; every update is then one matrix product ``K @ V`` serving all
  ``G`` columns (dense BLAS, or a sparse product on :class:`SparseGeometry`).
  The references start from a double c-transform of the cost (so every row
  and column of the kernel holds an entry equal to 1, whatever ``epsilon``),
  and scalings are absorbed into them as soon as they leave a safe range. If
  anything still turns non-finite, the solve continues in the log domain
  from the last finite potentials.

Convergence is measured every ``inner_iterations`` iterations as the L1 change
of the column marginal made by the ``g`` update; for balanced problems this is
the usual marginal error ``|P^T 1 - b|_1``.

Gradients: the solver loop runs without autograd. :attr:`SinkhornOutput.reg_ot_cost`
is differentiable with respect to the cost (hence point positions) and the
weights by the envelope theorem (potentials are held fixed at the optimum, which
is exact at convergence). Gradients of the potentials and of the plan are
available by unrolling the last ``n_unroll`` log-domain iterations.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from chronotope._errors import ConvergenceWarning
from chronotope._settings import as_tensor
from chronotope.ot.geometry import Geometry, PointCloud
from chronotope.ot.problem import LinearProblem

__all__ = ["Sinkhorn", "SinkhornOutput", "sinkhorn"]

logger = logging.getLogger("chronotope")

ProgressCallback = Callable[[int, float], None]


def _absorb_threshold(dtype: torch.dtype) -> float:
    return 15.0 if dtype in (torch.float32, torch.float16, torch.bfloat16) else 100.0


def _log_tiny(dtype: torch.dtype) -> float:
    return math.log(torch.finfo(dtype).tiny)


def _phi(fp: torch.Tensor, tau: float, epsilon: float) -> torch.Tensor:
    """Conjugate of the marginal penalty, evaluated at the dual potential ``f'``."""
    if tau == 1.0:
        return fp
    if tau == 0.0:
        return torch.zeros_like(fp)
    rho = epsilon * tau / (1.0 - tau)
    return -rho * torch.expm1(-fp / rho)


def _has_bad(x: torch.Tensor) -> bool:
    """NaN or +inf anywhere (``-inf`` is a legitimate zero scaling)."""
    return bool(torch.isnan(x).any() or (x == math.inf).any())


def _out_of_range(row_max: torch.Tensor, thr: float) -> bool:
    finite = torch.isfinite(row_max)
    return bool((row_max[finite].abs() > thr).any())


def _marginal_change(
    logv: torch.Tensor, logv_new: torch.Tensor, log_ktu: torch.Tensor, chunk: int = 256
) -> torch.Tensor:
    """L1 change of each column marginal made by the ``g`` update (column-chunked)."""
    out = torch.empty(logv.shape[1], dtype=logv.dtype, device=logv.device)
    for start in range(0, logv.shape[1], chunk):
        c = slice(start, start + chunk)
        change = torch.expm1(logv[:, c] - logv_new[:, c]).abs_()
        change.mul_(torch.exp(logv_new[:, c] + log_ktu[:, c]))
        out[c] = torch.nan_to_num(change, nan=0.0).sum(0)
    return out


@dataclass(frozen=True)
class SinkhornOutput:
    """Result of :class:`Sinkhorn`: potentials and lazy access to the plan.

    Attributes
    ----------
    f, g
        Potentials, ``(n,)``/``(m,)``, or ``(n, G)``/``(m, G)`` for batched problems.
    errors
        Convergence errors recorded every ``inner_iterations``; ``(n_checks,)``
        or ``(n_checks, G)``.
    converged
        Whether every histogram reached ``tol``.
    n_iter
        Iterations run.
    epsilon
        The absolute regularisation used (in units of the scaled cost).
    problem
        The solved :class:`LinearProblem` (geometry and marginals).
    timings
        Seconds spent, keyed by phase.
    """

    f: torch.Tensor
    g: torch.Tensor
    errors: torch.Tensor
    converged: bool
    n_iter: int
    epsilon: float
    problem: LinearProblem
    lse_mode: bool
    timings: dict[str, float] = field(default_factory=dict)

    # ------------------------------------------------------------ helpers
    @property
    def geom(self) -> Geometry:
        """The geometry of the problem."""
        return self.problem.geom

    def _fg2d(self) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.f if self.f.ndim == 2 else self.f[:, None]
        g = self.g if self.g.ndim == 2 else self.g[:, None]
        return f, g

    def _column(self, column: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        f, g = self._fg2d()
        if f.shape[1] > 1 and column is None:
            raise ValueError("this output holds several histograms; pass column=.")
        c = 0 if column is None else column
        return f[:, c], g[:, c]

    def _squeeze(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.problem.batched else t.squeeze(-1)

    # ------------------------------------------------------------ costs
    @property
    def primal_cost(self) -> torch.Tensor:
        """Transport cost ``<P, C>`` (scalar, or ``(G,)``), without the entropy term."""
        f, g = self._fg2d()
        return self._squeeze(self.geom.plan_cost(f, g, self.epsilon))

    @property
    def reg_ot_cost(self) -> torch.Tensor:
        r"""Regularised OT cost, the dual objective at the final potentials.

        .. math::

            \sum_i a_i \phi_a(f'_i) + \sum_j b_j \phi_b(g'_j)
            - \varepsilon\Big(\sum_{ij} P_{ij} - \sum_i a_i \sum_j b_j\Big)

        with :math:`f' = f - \varepsilon\log a` and :math:`\phi` the conjugate
        of the marginal penalty (identity when balanced). Differentiable with
        respect to the geometry's inputs and the weights (envelope theorem:
        the potentials are treated as constants).
        """
        prob, eps = self.problem, self.epsilon
        f, g = self._fg2d()
        a2, b2 = prob.a2d, prob.b2d
        with torch.no_grad():
            fp = f.detach() - eps * torch.log(a2.detach())
            gp = g.detach() - eps * torch.log(b2.detach())
        fpa = torch.where(a2 > 0, fp, torch.zeros_like(fp))
        gpb = torch.where(b2 > 0, gp, torch.zeros_like(gp))
        f_live = torch.where(a2 > 0, fpa + eps * torch.log(a2), torch.full_like(fp, -math.inf))
        g_live = torch.where(b2 > 0, gpb + eps * torch.log(b2), torch.full_like(gp, -math.inf))
        mass = self.geom.plan_mass(f_live, g_live, eps)
        value = (
            (a2 * _phi(fpa, prob.tau_a, eps)).sum(0)
            + (b2 * _phi(gpb, prob.tau_b, eps)).sum(0)
            - eps * (mass - a2.sum(0) * b2.sum(0))
        )
        return self._squeeze(value)

    # ------------------------------------------------------------ plan
    def marginals(self, axis: int, *, column: int | None = None) -> torch.Tensor:
        """Row sums (``axis=1``, shape ``(n,)``) or column sums (``axis=0``) of the plan."""
        f, g = self._column(column)
        n, m = self.geom.shape
        ones = torch.ones((m if axis == 1 else n, 1), dtype=f.dtype, device=f.device)
        return self.geom.kernel_apply(ones, axis=axis, epsilon=self.epsilon, f=f, g=g)[:, 0]

    def apply(
        self, v: torch.Tensor | np.ndarray, *, axis: int = 1, column: int | None = None
    ) -> torch.Tensor:
        """Apply the plan without forming it.

        Parameters
        ----------
        v
            ``(m, d)`` (or ``(m,)``) for ``axis=1``, returning ``P @ v``; ``(n, d)``
            for ``axis=0``, returning ``P.T @ v``.
        axis
            Which side ``v`` lives on (see above).
        column
            Which histogram, for batched outputs.
        """
        f, g = self._column(column)
        vt = as_tensor(v, device=f.device, dtype=f.dtype)
        squeeze = vt.ndim == 1
        vt = vt[:, None] if squeeze else vt
        out = self.geom.kernel_apply(vt, axis=axis, epsilon=self.epsilon, f=f, g=g)
        return out[:, 0] if squeeze else out

    def barycentric_projection(
        self, y: torch.Tensor | np.ndarray, *, axis: int = 1, column: int | None = None
    ) -> torch.Tensor:
        """Map each source point to the plan-weighted mean of its targets.

        ``(P @ y) / (P @ 1)`` for ``axis=1`` (``y`` on the target side), or
        ``(P.T @ x) / (P.T @ 1)`` for ``axis=0``. Rows with no mass give NaN.
        """
        f, g = self._column(column)
        yt = as_tensor(y, device=f.device, dtype=f.dtype)
        yt = yt[:, None] if yt.ndim == 1 else yt
        ones = torch.ones((yt.shape[0], 1), dtype=yt.dtype, device=yt.device)
        both = self.geom.kernel_apply(
            torch.cat([yt, ones], 1), axis=axis, epsilon=self.epsilon, f=f, g=g
        )
        return both[:, :-1] / both[:, -1:]

    def dense_plan(self, *, column: int | None = None) -> torch.Tensor:
        """The full ``(n, m)`` plan. Only for small problems."""
        f, g = self._column(column)
        return torch.exp((f[:, None] + g[None, :] - self.geom.cost_matrix()) / self.epsilon)

    def plan(self, k: int = 10, *, column: int | None = None) -> sp.csr_matrix:
        """Sparse plan keeping the ``k`` largest entries of each row (scipy CSR).

        Memory grows as ``n * k``; the kept mass is ``plan(k).sum()`` (compare
        with ``marginals(1).sum()`` to see what the truncation dropped).
        """
        f, g = self._column(column)
        with torch.no_grad():
            rows, cols, vals = self.geom.plan_topk(f, g, self.epsilon, k)
        return sp.csr_matrix((vals, (rows, cols)), shape=self.geom.shape)


@dataclass(frozen=True)
class Sinkhorn:
    """Entropic OT solver (log domain or stabilised scaling).

    Parameters
    ----------
    epsilon
        Entropic regularisation in units of the (scaled) cost. ``None`` uses
        ``0.05`` times the mean cost.
    max_iter
        Maximum number of iterations (one ``f`` and one ``g`` update each).
    tol
        Stop when the marginal error of every histogram is below ``tol``.
    lse_mode
        ``True``: log-domain updates. ``"auto"``: stabilised scaling with one
        kernel product for all histograms, falling back to the log domain
        if it becomes non-finite. ``False``: like ``"auto"`` but raise instead
        of falling back.
    inner_iterations
        Check convergence (and absorb scalings) every this many iterations.
    min_iter
        Never stop before this many iterations.
    n_unroll
        Re-run the last ``n_unroll`` iterations with autograd so that the
        potentials (and plan) carry gradients.
    progress
        ``True`` shows a tqdm bar; a callable ``(iteration, error)`` is called
        at every check.
    warn
        Emit :class:`~chronotope._errors.ConvergenceWarning` when ``tol`` is not met.
    column_batch_size
        Solve at most this many histograms at a time (the columns are
        independent problems), bounding memory to ``O((n + m) x
        column_batch_size)`` for any ``G``; ``None`` solves all columns at once.
    overrelaxation
        Over-relaxed updates ``f <- (1 - w) f + w T(f)`` (the same for ``g``;
        Thibault et al. 2021, Lehmann et al. 2021), which reach the same
        fixed point in fewer iterations when ``epsilon`` is small. ``1.0``
        (default): plain Sinkhorn. A number ``w`` in ``(1, 2)``: that
        factor. ``"auto"``: ``w = 2 / (1 + sqrt(1 - lambda))``, the optimal
        successive over-relaxation factor for the per-iteration contraction
        ``lambda`` of the plain iterations, estimated from their marginal
        errors over the first ``OVERRELAX_WARMUP`` iterations, then raised
        when the over-relaxed errors show ``lambda`` larger (Young's relation,
        measured over ``OVERRELAX_WINDOW`` iterations). Either way the
        first ``OVERRELAX_WARMUP`` iterations are plain, and ``w`` is halved
        towards 1 whenever the error grows ``OVERRELAX_GUARD`` times above
        its smallest value since ``w`` was last set (a divergence guard; after
        it fires ``"auto"`` no longer raises ``w``).
    """

    epsilon: float | None = None
    max_iter: int = 1000
    tol: float = 1e-6
    lse_mode: bool | Literal["auto"] = "auto"
    inner_iterations: int = 10
    min_iter: int = 0
    n_unroll: int = 0
    progress: bool | ProgressCallback = False
    warn: bool = True
    column_batch_size: int | None = None
    overrelaxation: float | Literal["auto"] = 1.0

    def __post_init__(self) -> None:
        w = self.overrelaxation
        if w != "auto" and not (isinstance(w, int | float) and 1.0 <= w < 2.0):
            raise ValueError(f"overrelaxation must be in [1, 2) or 'auto', got {w!r}.")

    def __call__(
        self,
        problem: LinearProblem,
        init: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
    ) -> SinkhornOutput:
        """Solve ``problem``, optionally warm-started from potentials ``init = (f, g)``."""
        step = self.column_batch_size
        if step is not None and problem.batched and problem.n_histograms > step:
            return self._solve_in_column_batches(problem, init, step)
        t0 = time.perf_counter()
        geom = problem.geom
        eps = float(self.epsilon) if self.epsilon is not None else 0.05 * geom.mean_cost
        if not eps > 0:
            raise ValueError(f"epsilon must be positive, got {eps}.")
        with torch.no_grad():
            # Shared marginals stay (n, 1) / (m, 1) and broadcast: no (n, G) copies.
            a2 = problem.a.detach()
            a2 = a2 if a2.ndim == 2 else a2[:, None]
            b2 = problem.b.detach()
            b2 = b2 if b2.ndim == 2 else b2[:, None]
            loga = torch.log(a2)
            # log b of many columns is recomputed where needed, not kept (m x G memory).
            logb = torch.log(b2) if b2.shape[1] == 1 else None
            f, g = self._init(problem, init, eps, loga, logb)
            state = _State(self, problem, eps, loga, logb, a2, b2)
            f, g, errors, n_iter, lse_used = state.run(f, g)
        converged = bool(errors.shape[0] > 0 and (errors[-1] < self.tol).all())
        if not converged and self.warn:
            last = float(errors[-1].max()) if errors.shape[0] else float("nan")
            warnings.warn(
                f"Sinkhorn did not converge in {n_iter} iterations (error {last:.3g} > tol "
                f"{self.tol:.3g}); raise max_iter or epsilon.",
                ConvergenceWarning,
                stacklevel=2,
            )
        timings = {"solve": time.perf_counter() - t0}
        if self.n_unroll > 0:
            f, g = self._unroll(problem, f, g, eps)
        if not problem.batched:
            f, g, errors = f[:, 0], g[:, 0], errors[:, 0]
        return SinkhornOutput(
            f=f,
            g=g,
            errors=errors,
            converged=converged,
            n_iter=n_iter,
            epsilon=eps,
            problem=problem,
            lse_mode=lse_used,
            timings=timings,
        )

    def _solve_in_column_batches(
        self,
        problem: LinearProblem,
        init: tuple[torch.Tensor | None, torch.Tensor | None] | None,
        step: int,
    ) -> SinkhornOutput:
        """Solve column chunks one after the other and concatenate the outputs."""
        t0 = time.perf_counter()
        n_cols = problem.n_histograms
        solver = dataclasses.replace(self, column_batch_size=None)

        def _cols(w: torch.Tensor | None, c: slice) -> torch.Tensor | None:
            if w is None:
                return None
            return w[:, c] if w.ndim == 2 else w

        fs, gs, errs, n_iter, lse_used = [], [], [], 0, False
        for start in range(0, n_cols, step):
            c = slice(start, min(n_cols, start + step))
            sub = LinearProblem(
                problem.geom,
                _cols(problem.a, c),
                _cols(problem.b, c),
                tau_a=problem.tau_a,
                tau_b=problem.tau_b,
            )
            sub_init = None if init is None else (_cols(init[0], c), _cols(init[1], c))
            out = solver(sub, init=sub_init)
            f, g = out._fg2d()
            fs.append(f)
            gs.append(g)
            e = out.errors if out.errors.ndim == 2 else out.errors[:, None]
            errs.append(e)
            n_iter = max(n_iter, out.n_iter)
            lse_used = lse_used or out.lse_mode
        n_checks = max(e.shape[0] for e in errs)
        # chunks that stopped early keep their last error for the remaining checks
        padded = [
            torch.cat([e, e[-1:].expand(n_checks - e.shape[0], -1)]) if 0 < e.shape[0] else e
            for e in errs
        ]
        errors = torch.cat(padded, dim=1)
        converged = bool(errors.shape[0] > 0 and (errors[-1] < self.tol).all())
        return SinkhornOutput(
            f=torch.cat(fs, dim=1),
            g=torch.cat(gs, dim=1),
            errors=errors,
            converged=converged,
            n_iter=n_iter,
            epsilon=out.epsilon,
            problem=problem,
            lse_mode=lse_used,
            timings={"solve": time.perf_counter() - t0},
        )

    def _init(
        self,
        problem: LinearProblem,
        init: tuple[torch.Tensor | None, torch.Tensor | None] | None,
        eps: float,
        loga: torch.Tensor,
        logb: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        f0, g0 = (None, None) if init is None else init
        n, m = problem.geom.shape
        ncol = problem.n_histograms
        dev, dt = problem.geom.device, problem.geom.dtype

        def _as2d(x: torch.Tensor | np.ndarray, size: int) -> torch.Tensor:
            t = as_tensor(x, device=dev, dtype=dt).detach()
            t = t[:, None] if t.ndim == 1 else t
            if t.shape[0] != size:
                raise ValueError(f"warm-start potential has {t.shape[0]} rows, expected {size}.")
            return t.expand(size, ncol).clone()

        f = None if f0 is None else _as2d(f0, n)
        g = None if g0 is None else _as2d(g0, m)
        return f, g

    def _unroll(
        self, problem: LinearProblem, f: torch.Tensor, g: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        geom = problem.geom
        loga, logb = torch.log(problem.a2d), torch.log(problem.b2d)
        f, g = f.detach(), g.detach()
        for _ in range(self.n_unroll):
            f = eps * loga - problem.tau_a * eps * geom.lse(g / eps, axis=1, epsilon=eps)
            g = eps * logb - problem.tau_b * eps * geom.lse(f / eps, axis=0, epsilon=eps)
        return f, g


#: Plain iterations before over-relaxation starts (and from which ``"auto"`` estimates it).
OVERRELAX_WARMUP = 100
#: Largest over-relaxation factor ``"auto"`` sets.
OVERRELAX_MAX = 1.95
#: Error growth (over its smallest value since the factor was set) that halves the factor.
OVERRELAX_GUARD = 1000.0
#: Iterations over which ``"auto"`` measures the over-relaxed rate before raising the factor.
OVERRELAX_WINDOW = 50


class _State:
    """Mutable state of one Sinkhorn solve (kept out of the public objects)."""

    def __init__(
        self,
        solver: Sinkhorn,
        problem: LinearProblem,
        eps: float,
        loga: torch.Tensor,
        logb: torch.Tensor,
        a2: torch.Tensor,
        b2: torch.Tensor,
    ) -> None:
        self.s = solver
        self.p = problem
        self.geom = problem.geom
        self.eps = eps
        self.loga, self._logb = loga, logb
        self.a2, self.b2 = a2, b2
        self.errors: list[torch.Tensor] = []
        self.it = 0
        # over-relaxation factor in use (1: plain), and the checks it is set from
        self.omega = 1.0
        self._omega_set = False
        self._checks: list[tuple[int, float]] = []
        self._best = math.inf
        self._adapt = True
        self._since = 0  # iteration at which the factor was last set
        self.bar = None
        if solver.progress is True:
            self.bar = tqdm(total=solver.max_iter, desc="sinkhorn", leave=False)

    @property
    def logb(self) -> torch.Tensor:
        """``log b``: stored for one column, computed on demand for many."""
        return self._logb if self._logb is not None else torch.log(self.b2)

    # ---------------------------------------------------------------- loop
    def run(
        self, f: torch.Tensor | None, g: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, bool]:
        try:
            use_lse = self.s.lse_mode is True
            if not use_lse:
                out = self._run_scaling(f, g)
                if out is None:
                    use_lse = True
                    f, g = self._fallback_f, self._fallback_g
                else:
                    f, g = out
            if use_lse:
                if g is None:
                    g = (self.eps * self.logb).expand(-1, self.p.n_histograms).clone()
                f, g = self._run_lse(f, g, self.s.max_iter)
        finally:
            if self.bar is not None:
                self.bar.close()
        errors = torch.stack(self.errors) if self.errors else torch.empty((0, g.shape[1]))
        return f, g, errors, self.it, use_lse

    def _check_now(self) -> bool:
        inner = max(1, self.s.inner_iterations)
        return self.it % inner == 0 or self.it == self.s.max_iter

    def _record(self, err: torch.Tensor) -> bool:
        err = torch.nan_to_num(err, nan=math.inf)
        self.errors.append(err)
        e = float(err.max())
        self._set_omega(e)
        if self.bar is not None:
            self.bar.update(self.it - self.bar.n)
            self.bar.set_postfix(error=f"{e:.2e}")
        elif callable(self.s.progress):
            self.s.progress(self.it, e)
        return e < self.s.tol and self.it >= self.s.min_iter

    def _set_omega(self, e: float) -> None:
        """Switch over-relaxation on after the warm-up; halve it when the error blows up."""
        target = self.s.overrelaxation
        if target == 1.0:
            return
        if not self._omega_set:
            self._checks.append((self.it, e))  # the warm-up errors, read once below
            if self.it < OVERRELAX_WARMUP:
                return
            self._omega_set = True
            if target == "auto":
                half = [c for c in self._checks if c[0] <= self.it // 2]
                it0, e0 = half[-1] if half else self._checks[0]
                if self.it > it0 and 0 < e < e0:
                    lam = (e / e0) ** (1.0 / (self.it - it0))
                    self.omega = min(OVERRELAX_MAX, 2.0 / (1.0 + math.sqrt(1.0 - lam)))
            else:
                self.omega = float(target)
            self._best = e
            self._checks, self._since = [(self.it, e)], self.it
            return
        if self.omega > 1.0:
            if not math.isfinite(e) or e > OVERRELAX_GUARD * self._best:
                self.omega = 1.0 + 0.5 * (self.omega - 1.0)
                if self.omega < 1.05:
                    self.omega = 1.0
                self._best = e if math.isfinite(e) else math.inf
                self._adapt = False  # after a blow-up the factor only comes down
            else:
                self._best = min(self._best, e)
                if target == "auto" and self._adapt:
                    self._raise_omega(e)

    def _raise_omega(self, e: float) -> None:
        """Raise an ``"auto"`` factor that the observed over-relaxed rate shows too small.

        The warm-up's transient makes the first estimate of the plain contraction
        ``lambda`` too small. For a factor ``w`` below the optimum the over-relaxed
        iterations contract by ``r`` per iteration with ``(r + w - 1)^2 = r w^2 lambda``
        (Young's relation for successive over-relaxation), so ``r``, measured over the
        last ``OVERRELAX_WINDOW`` iterations, gives ``lambda`` back and with it the
        optimal factor. Above the optimum ``r`` is ``w - 1`` and nothing changes; nor
        does it when the iterations the change would save, at the two rates down to
        ``tol``, are fewer than a window (the switch costs a transient of about that).
        """
        # only the last window's checks are kept (a long solve would otherwise rescan them all)
        self._checks = [c for c in self._checks if c[0] >= self.it - OVERRELAX_WINDOW]
        self._checks.append((self.it, e))
        if self.it - self._since < 2 * OVERRELAX_WINDOW:  # skip the switch-on transient
            return
        it1, e1 = self._checks[0]
        if not (0.0 < e < e1) or self.it <= it1:
            return
        w = self.omega
        r = (e / e1) ** (1.0 / (self.it - it1))
        if r <= w - 1.0 + 1e-3:
            return
        lam = min((r + w - 1.0) ** 2 / (r * w * w), 1.0 - 1e-9)
        new = min(OVERRELAX_MAX, 2.0 / (1.0 + math.sqrt(1.0 - lam)))
        # a change costs a transient of about a window: only worth it far from tol
        decades = math.log(max(e / self.s.tol, 1.0))
        saved = decades / -math.log(r) - decades / -math.log(max(new - 1.0, 1e-9))
        if new > w + 0.01 and saved > OVERRELAX_WINDOW:
            self.omega = new
            self._checks, self._since = [(self.it, e)], self.it
            self._best = e

    def _relax(self, old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
        """``(1 - w) old + w new`` in place of ``new`` (``new`` itself when ``w = 1``).

        A zero-mass point has ``-inf`` in every update; it keeps ``new`` (``-inf``), where
        the affine combination would give ``-inf + inf = NaN`` for ``w > 1``.
        """
        w = self.omega
        if w == 1.0 or old is None:
            return new
        dead = torch.isneginf(old)
        if bool(dead.any()):
            return torch.where(dead, new, new * w + (1.0 - w) * old)
        return new.mul_(w).add_(old, alpha=1.0 - w)

    # ---------------------------------------------------------- log domain
    def _f_update_lse(self, g: torch.Tensor) -> torch.Tensor:
        eps, tau = self.eps, self.p.tau_a
        if tau == 0.0:
            return (eps * self.loga).expand(self.geom.shape[0], g.shape[1]).clone()
        return eps * self.loga - tau * eps * self.geom.lse(g / eps, axis=1, epsilon=eps)

    def _run_lse(
        self, f: torch.Tensor | None, g: torch.Tensor, until: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        eps, tau_b = self.eps, self.p.tau_b
        if f is None:
            f = self._f_update_lse(g)
        while self.it < until:
            f = self._relax(f, self._f_update_lse(g))
            lse0 = self.geom.lse(f / eps, axis=0, epsilon=eps)
            if tau_b > 0:
                g_new = eps * self.logb - tau_b * eps * lse0
            else:
                g_new = (eps * self.logb).expand_as(lse0).clone()
            self.it += 1
            if self._check_now():
                col_new = torch.exp(g_new / eps + lse0)
                change = torch.expm1((g - g_new) / eps).abs()
                err = torch.nan_to_num(col_new * change, nan=0.0).sum(0)
                g = self._relax(g, g_new)
                if self._record(err):
                    break
            else:
                g = self._relax(g, g_new)
        return f, g

    # -------------------------------------------------- stabilised scaling
    def _run_scaling(
        self, f: torch.Tensor | None, g: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        eps, geom = self.eps, self.geom
        tau_a, tau_b = self.p.tau_a, self.p.tau_b
        thr = _absorb_threshold(geom.dtype)
        if g is not None:  # warm start (the iterations only need g to begin)
            g_ref = torch.where(torch.isfinite(g), g, torch.zeros_like(g)).mean(1)
            f_ref = f.mean(1) if f is not None else geom.c_transform_init()[0]
            logv = (g - g_ref[:, None]).div_(eps)
        else:
            # Any starting g is valid: start at the c-transform references shifted
            # by eps * log b, so that the scalings start at v = b.
            f_ref, g_ref = geom.c_transform_init()
            logv = self.logb.expand(-1, self.p.n_histograms).clone()
        del g
        v = torch.exp(logv)
        self._fallback_f, self._fallback_g = None, None
        logu = None
        while self.it < self.s.max_iter:
            logu_old = logu
            # f update: log u = log a - tau_a log(K v) + (tau_a - 1) f_ref / eps   (in place)
            if tau_a == 0.0:
                logu = self.loga - f_ref[:, None] / eps
            else:
                logu = geom.kernel_apply(v, axis=1, epsilon=eps, f=f_ref, g=g_ref, cache=True)
                logu.log_().mul_(-tau_a).add_(self.loga)
                if tau_a != 1.0:
                    logu.add_((tau_a - 1.0) * f_ref[:, None] / eps)
            # over-relaxed: both scalings are relative to the same references here
            logu = self._relax(logu_old, logu)
            del v, logu_old
            log_ktu = geom.kernel_apply(
                torch.exp(logu), axis=0, epsilon=eps, f=f_ref, g=g_ref, cache=True
            ).log_()
            if tau_b == 0.0:
                logv_new = (self.logb - g_ref[:, None] / eps).expand_as(log_ktu).clone()
            else:
                if self._logb is not None:
                    logv_new = log_ktu * (-tau_b)
                    logv_new.add_(self._logb)
                else:  # one fresh m x G buffer, no stored log b
                    logv_new = torch.log(self.b2)
                    logv_new.sub_(log_ktu if tau_b == 1.0 else log_ktu * tau_b)
                if tau_b != 1.0:
                    logv_new.add_((tau_b - 1.0) * g_ref[:, None] / eps)
            self.it += 1
            if _has_bad(logu) or _has_bad(logv_new):
                return self._give_up(f_ref, g_ref, logv)
            check = self._check_now()
            err = _marginal_change(logv, logv_new, log_ktu) if check else None
            del log_ktu
            logv = self._relax(logv, logv_new)
            del logv_new
            f_ref, g_ref, logu, logv = self._absorb(f_ref, g_ref, logu, logv, thr)
            v = torch.exp(logv)
            if check and self._record(err):
                break
        if logu is None:  # max_iter == 0
            logu = torch.zeros_like(f_ref)[:, None]
        f = logu.mul_(eps).add_(f_ref[:, None])
        g = logv.mul_(eps).add_(g_ref[:, None])
        geom.clear_cache()
        return f, g

    def _absorb(
        self,
        f_ref: torch.Tensor,
        g_ref: torch.Tensor,
        logu: torch.Tensor,
        logv: torch.Tensor,
        thr: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Move scalings into the reference potentials when they leave ``[-thr, thr]``.

        The shift of each point is the max of its log-scalings over histograms,
        so afterwards every scaling is at most 1 and the largest is exactly 1.
        """
        eps = self.eps
        row_u, row_v = logu.amax(1), logv.amax(1)
        if not (_out_of_range(row_u, thr) or _out_of_range(row_v, thr)):
            return f_ref, g_ref, logu, logv
        su = torch.where(torch.isfinite(row_u), row_u, torch.zeros_like(row_u))
        sv = torch.where(torch.isfinite(row_v), row_v, torch.zeros_like(row_v))
        logu.sub_(su[:, None])
        logv.sub_(sv[:, None])
        return f_ref + eps * su, g_ref + eps * sv, logu, logv

    def _give_up(
        self, f_ref: torch.Tensor, g_ref: torch.Tensor, logv: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        self.geom.clear_cache()
        if self.s.lse_mode is False:
            raise FloatingPointError(
                "Sinkhorn scaling iterations became non-finite; use lse_mode=True or "
                "'auto', or a larger epsilon."
            )
        logger.info("Sinkhorn: scaling path became non-finite, continuing in the log domain.")
        self._fallback_f = None
        self._fallback_g = g_ref[:, None] + self.eps * logv
        return None


def sinkhorn(
    x: torch.Tensor | np.ndarray | Geometry,
    y: torch.Tensor | np.ndarray | None = None,
    *,
    a: torch.Tensor | np.ndarray | None = None,
    b: torch.Tensor | np.ndarray | None = None,
    epsilon: float | None = None,
    tau_a: float = 1.0,
    tau_b: float = 1.0,
    cost: Literal["sqeuclidean", "euclidean"] = "sqeuclidean",
    batch_size: int | None = None,
    scale_cost: float | Literal["mean", "max", "median"] = 1.0,
    max_iter: int = 1000,
    tol: float = 1e-6,
    lse_mode: bool | Literal["auto"] = "auto",
    init: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
    progress: bool | ProgressCallback = False,
    device: torch.device | str | None = None,
    overrelaxation: float | Literal["auto"] = 1.0,
) -> SinkhornOutput:
    """Solve entropic OT between point clouds (or on a given geometry) in one call.

    Parameters
    ----------
    x
        ``(n, d)`` source points, or a :class:`~chronotope.ot.Geometry`.
    y
        ``(m, d)`` target points (default: ``x``); ignored with a geometry.
    a, b
        Weights; ``b`` may be ``(m, G)`` to solve ``G`` problems at once.
    epsilon
        Entropic regularisation (absolute, in scaled-cost units); ``None``
        uses ``0.05 * mean cost``.
    tau_a, tau_b
        Unbalancedness in ``[0, 1]`` (1 balanced, 0 free marginal).
    cost, batch_size, scale_cost, device
        Passed to :class:`~chronotope.ot.PointCloud`.
    max_iter, tol, lse_mode, progress, overrelaxation
        Passed to :class:`Sinkhorn`.
    init
        Warm-start potentials ``(f, g)``.

    Returns
    -------
    SinkhornOutput
    """
    if isinstance(x, Geometry):
        geom = x
    else:
        geom = PointCloud(
            x, y, cost=cost, batch_size=batch_size, scale_cost=scale_cost, device=device
        )
    prob = LinearProblem(geom, a, b, tau_a=tau_a, tau_b=tau_b)
    solver = Sinkhorn(
        epsilon=epsilon,
        max_iter=max_iter,
        tol=tol,
        lse_mode=lse_mode,
        progress=progress,
        overrelaxation=overrelaxation,
    )
    return solver(prob, init=init)
