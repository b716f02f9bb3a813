r"""Entropic fused Gromov-Wasserstein (FGW), balanced, unbalanced or partial.

Problem
-------
Two slices are given as intra-slice costs :math:`C^x \in \mathbb{R}^{n \times n}`,
:math:`C^y \in \mathbb{R}^{m \times m}` (by default squared Euclidean distances
between spot coordinates), an optional cross-slice feature cost
:math:`M \in \mathbb{R}^{n \times m}` and weights :math:`a, b`. With the square loss,

.. math::

    \mathrm{GW}(P) = \sum_{i,k,j,l} (C^x_{ik} - C^y_{jl})^2 P_{ij} P_{kl},
    \qquad
    F_\alpha(P) = (1 - \alpha)\,\langle M, P\rangle + \alpha\,\mathrm{GW}(P),

and the solver minimises (to a stationary point; the problem is not convex)

.. math::

    F_\alpha(P) + \varepsilon\,\mathrm{KL}(P \,|\, a b^\top)
    + \rho_a \mathrm{KL}(P\mathbf{1} \,|\, a) + \rho_b \mathrm{KL}(P^\top\mathbf{1} \,|\, b),
    \qquad \rho = \varepsilon \tau / (1 - \tau),

over :math:`P \ge 0` (``tau = 1``: the marginal is a hard constraint). This is
the objective of ``ot.gromov.entropic_fused_gromov_wasserstein`` in POT when
balanced (there :math:`\varepsilon \sum P \log P`, which differs from
:math:`\varepsilon\,\mathrm{KL}(P|ab^\top)` by a constant on the balanced
polytope), and its unbalanced extension with the *linear* KL marginal
penalties of :class:`~chronotope.ot.LinearProblem`: ``alpha = 0`` is exactly
the (unbalanced) entropic OT of the lead :class:`~chronotope.ot.Sinkhorn`. It
differs from the unbalanced GW of Séjourné et al. (2021) and from ott-jax's
``tau_a``/``tau_b`` quadratic problems, which penalise the *quadratic*
divergences :math:`\mathrm{KL}(P\mathbf{1} \otimes P\mathbf{1} \,|\, a \otimes a)`
so that every term scales as mass squared. Here the GW term scales as mass
squared and the penalties as mass, so how much mass is destroyed depends on
the cost scale: use ``scale_cost`` to make ``tau`` comparable across datasets.

Partial FGW (``mass=s``) solves PASTE2's problem (Liu et al., 2023)

.. math::

    \min_{P \ge 0,\; P\mathbf{1} \le a,\; P^\top\mathbf{1} \le b,\;
    \mathbf{1}^\top P \mathbf{1} = s} F_\alpha(P)
    + \varepsilon\,\mathrm{KL}(\tilde P \,|\, \tilde a \tilde b^\top)

with the entropy taken on the plan augmented by one dummy point on each side
(Chapel et al., 2020): :math:`\tilde a = (a, |b| - s)`,
:math:`\tilde b = (b, |a| - s)`, the dummy row and column cost 0 and the
dummy-to-dummy entry is forbidden. At ``epsilon -> 0`` this is PASTE2's exact
partial FGW; PASTE2 transports a fixed mass ``s``, whereas ``tau < 1`` lets
the data decide how much mass moves.

Algorithm
---------
Mirror descent / successive linearisation (Peyré et al., 2016; POT's
``solver="PGD"``), with ``epsilon`` annealed geometrically over the first
outer iterations (``epsilon_init``, ``epsilon_decay``): at each outer iteration
the gradient

.. math::

    \nabla F_\alpha(P) = (1 - \alpha) M + \alpha\big[u^x \mathbf{1}^\top
    + \mathbf{1} (u^y)^\top - 2 (C^x P C^{y\top} + C^{x\top} P C^y)\big],
    \quad u^x = (C^x \odot C^x + C^{x\top} \odot C^{x\top}) P\mathbf{1},

(:math:`u^y` likewise with :math:`P^\top\mathbf{1}`) is the cost of an entropic
linear OT problem solved by :class:`~chronotope.ot.Sinkhorn`, warm-started
from the previous potentials. A fixed point is a stationary point of the
objective above.

Memory
------
For squared Euclidean intra-slice costs :math:`C^x = A B^\top` has rank
``d + 2`` (``A = [|x|^2, 1, -2x]``, ``B = [1, |x|^2, x]``), so
:math:`C^x P C^{y\top} = A^x (B^{x\top} P B^y) A^{y\top}` and
:math:`(C^x \odot C^x) q = \mathrm{rowsum}(A (B^\top \mathrm{diag}(q) B) \odot A)`
cost :math:`O(nm(d+2))` and :math:`O(n (d+2)^2)`: no ``n x n`` matrix and no
``n x m x n`` tensor is formed. Squared Euclidean feature costs are kept as
factors too. The ``n x m`` linearised cost and plan *are* formed (one of
each, plus Sinkhorn's kernel), which suits slices of a few thousand spots;
a coarse-to-fine path for larger slices is separate.
"""

from __future__ import annotations

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
from chronotope.ot.geometry import DenseGeometry, Geometry, PointCloud, SparseGeometry
from chronotope.ot.problem import LinearProblem, _marginal
from chronotope.ot.sinkhorn import Sinkhorn, SinkhornOutput

__all__ = [
    "FGWOutput",
    "GromovWasserstein",
    "QuadraticProblem",
    "fused_gromov_wasserstein",
]

logger = logging.getLogger("chronotope")

ScaleCost = float | Literal["mean", "max", "median"]
Array = torch.Tensor | np.ndarray


# --------------------------------------------------------------------------- costs
class _Cost:
    """A cost matrix held densely or as low-rank factors ``C = A @ B.T``."""

    def __init__(
        self,
        *,
        dense: torch.Tensor | None = None,
        factors: tuple[torch.Tensor, torch.Tensor] | None = None,
        symmetric: bool | None = None,
    ) -> None:
        if (dense is None) == (factors is None):
            raise ValueError("give exactly one of dense and factors")
        self.dense = dense
        self.factors = factors
        if dense is not None:
            self.shape = (dense.shape[0], dense.shape[1])
            if symmetric is None:
                symmetric = self.shape[0] == self.shape[1] and bool(
                    torch.allclose(dense, dense.T, rtol=1e-10, atol=1e-12)
                )
        else:
            a_f, b_f = factors  # type: ignore[misc]
            self.shape = (a_f.shape[0], b_f.shape[0])
            symmetric = bool(symmetric)
        self.symmetric = symmetric

    @property
    def is_lowrank(self) -> bool:
        return self.factors is not None

    @property
    def rank(self) -> int:
        return self.factors[0].shape[1] if self.factors is not None else min(self.shape)

    @property
    def T(self) -> _Cost:
        if self.symmetric:
            return self
        if self.dense is not None:
            return _Cost(dense=self.dense.T, symmetric=False)
        a_f, b_f = self.factors  # type: ignore[misc]
        return _Cost(factors=(b_f, a_f), symmetric=False)

    def matrix(self) -> torch.Tensor:
        """Dense matrix (tests and small problems only)."""
        if self.dense is not None:
            return self.dense
        a_f, b_f = self.factors  # type: ignore[misc]
        return a_f @ b_f.T

    def left(self, p: torch.Tensor) -> torch.Tensor:
        """``C @ p``."""
        if self.dense is not None:
            return self.dense @ p
        a_f, b_f = self.factors  # type: ignore[misc]
        return a_f @ (b_f.T @ p)

    def sq_matvec(self, q: torch.Tensor) -> torch.Tensor:
        """``(C * C) @ q`` (element-wise square), ``O(n r^2)`` for factors."""
        if self.dense is not None:
            return (self.dense * self.dense) @ q
        a_f, b_f = self.factors  # type: ignore[misc]
        s = (b_f * q[:, None]).T @ b_f
        return ((a_f @ s) * a_f).sum(1)


def _cross(cx: _Cost, p: torch.Tensor, cy: _Cost) -> torch.Tensor:
    """``Cx @ P @ Cy.T`` without forming any ``n x n`` or ``m x m`` matrix for factors."""
    if cx.is_lowrank and cy.is_lowrank:
        ax, bx = cx.factors  # type: ignore[misc]
        ay, by = cy.factors  # type: ignore[misc]
        core = (bx.T @ p) @ by  # (rx, ry)
        return (ax @ core) @ ay.T
    left = cx.left(p)  # (n, m)
    if cy.is_lowrank:
        ay, by = cy.factors  # type: ignore[misc]
        return (left @ by) @ ay.T
    return left @ cy.dense.T  # type: ignore[union-attr]


def _cross_inner(cx: _Cost, p: torch.Tensor, cy: _Cost) -> torch.Tensor:
    """``<Cx @ P @ Cy.T, P>`` as a scalar tensor."""
    if cx.is_lowrank and cy.is_lowrank:
        ax, bx = cx.factors  # type: ignore[misc]
        ay, by = cy.factors  # type: ignore[misc]
        return ((bx.T @ p @ by) * (ax.T @ p @ ay)).sum()
    return (_cross(cx, p, cy) * p).sum()


def _sq_both(c: _Cost, q: torch.Tensor) -> torch.Tensor:
    """``(C*C) q + (C*C).T q``."""
    if c.symmetric:
        return 2.0 * c.sq_matvec(q)
    return c.sq_matvec(q) + c.T.sq_matvec(q)


def gw_gradient_terms(
    cx: _Cost, cy: _Cost, p: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(ux, uy, cross)`` with ``grad GW(P) = ux 1^T + 1 uy^T - 2 cross``."""
    q1, q2 = p.sum(1), p.sum(0)
    ux = _sq_both(cx, q1)
    uy = _sq_both(cy, q2)
    cross = _cross(cx, p, cy)
    cross = 2.0 * cross if cx.symmetric and cy.symmetric else cross + _cross(cx.T, p, cy.T)
    return ux, uy, cross


def gw_gradient(cx: _Cost, cy: _Cost, p: torch.Tensor) -> torch.Tensor:
    r"""Gradient of :math:`\mathrm{GW}(P) = \sum (C^x_{ik} - C^y_{jl})^2 P_{ij} P_{kl}`."""
    ux, uy, cross = gw_gradient_terms(cx, cy, p)
    return ux[:, None] + uy[None, :] - 2.0 * cross


def gw_objective(cx: _Cost, cy: _Cost, p: torch.Tensor) -> torch.Tensor:
    r"""GW objective for any plan.

    :math:`q_1^\top (C^x)^{\odot 2} q_1 + q_2^\top (C^y)^{\odot 2} q_2
    - 2\langle C^x P C^{y\top}, P\rangle` with :math:`q_1 = P\mathbf{1}`,
    :math:`q_2 = P^\top\mathbf{1}`.
    """
    q1, q2 = p.sum(1), p.sum(0)
    return q1 @ cx.sq_matvec(q1) + q2 @ cy.sq_matvec(q2) - 2.0 * _cross_inner(cx, p, cy)


def _sqeuclidean_factors(
    x: torch.Tensor, y: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Centred factors of ``|x_i - y_j|^2 / scale`` (centring improves conditioning)."""
    shift = x.mean(0, keepdim=True)
    xc, yc = x - shift, y - shift
    xx, yy = (xc * xc).sum(1, keepdim=True), (yc * yc).sum(1, keepdim=True)
    a_f = torch.cat([xx, torch.ones_like(xx), -2.0 * xc], dim=1) / scale
    b_f = torch.cat([torch.ones_like(yy), yy, yc], dim=1)
    return a_f, b_f


def _as_cost(geom: Geometry, *, intra: bool, name: str) -> _Cost:
    if isinstance(geom, SparseGeometry):
        raise ValueError(f"{name}: a SparseGeometry cannot be used in (fused) Gromov-Wasserstein.")
    if isinstance(geom, PointCloud) and geom.cost_fn == "sqeuclidean":
        same = geom.y is geom.x or (
            geom.x.shape == geom.y.shape and bool(torch.equal(geom.x, geom.y))
        )
        factors = _sqeuclidean_factors(geom.x, geom.y, geom.scale)
        return _Cost(factors=factors, symmetric=intra and same)
    if intra and geom.shape[0] > 5000:
        logger.warning(
            "%s: dense %d x %d intra-slice cost (only squared Euclidean point clouds use the "
            "low-rank path).",
            name,
            *geom.shape,
        )
    return _Cost(dense=geom.cost_matrix())


# ------------------------------------------------------------------------- problem
class QuadraticProblem:
    r"""Fused Gromov-Wasserstein problem between two slices.

    Defines :math:`F_\alpha(P) = (1-\alpha)\langle M, P\rangle + \alpha
    \sum_{ijkl} (C^x_{ik} - C^y_{jl})^2 P_{ij} P_{kl}` with marginal weights and
    unbalancedness; see the module docstring for the full objective.

    Parameters
    ----------
    geom_xx
        Intra-slice cost of the source, ``(n, n)``. A squared Euclidean
        :class:`~chronotope.ot.PointCloud` uses the low-rank path (no
        ``n x n`` matrix); any other geometry is made dense.
    geom_yy
        Intra-slice cost of the target, ``(m, m)``.
    geom_xy
        Feature cost ``(n, m)`` between slices; required unless ``alpha = 1``.
        A squared Euclidean ``PointCloud`` of features is kept as factors.
    alpha
        Weight of the GW term in ``[0, 1]``: 0 is linear OT on ``geom_xy``,
        1 pure Gromov-Wasserstein.
    a, b
        Weights ``(n,)`` and ``(m,)``; uniform when ``None``.
    tau_a, tau_b
        Unbalancedness in ``[0, 1]`` as in :class:`~chronotope.ot.LinearProblem`
        (``rho = epsilon * tau / (1 - tau)``).
    mass
        Partial FGW: transport exactly this mass (``0 < mass <= min(|a|, |b|)``),
        PASTE2-style; needs ``tau_a = tau_b = 1``.
    """

    def __init__(
        self,
        geom_xx: Geometry,
        geom_yy: Geometry,
        geom_xy: Geometry | None = None,
        *,
        alpha: float = 0.5,
        a: Array | None = None,
        b: Array | None = None,
        tau_a: float = 1.0,
        tau_b: float = 1.0,
        mass: float | None = None,
    ) -> None:
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}.")
        n, n2 = geom_xx.shape
        m, m2 = geom_yy.shape
        if n != n2 or m != m2:
            raise ValueError(
                f"geom_xx and geom_yy must be square intra-slice costs, got {geom_xx.shape} "
                f"and {geom_yy.shape}."
            )
        if geom_xy is None and alpha < 1.0:
            raise ValueError("geom_xy (the feature cost) is required when alpha < 1.")
        if geom_xy is not None and geom_xy.shape != (n, m):
            raise ValueError(f"geom_xy has shape {geom_xy.shape}, expected ({n}, {m}).")
        for nm, tau in (("tau_a", tau_a), ("tau_b", tau_b)):
            if not 0.0 <= float(tau) <= 1.0:
                raise ValueError(f"{nm} must lie in [0, 1], got {tau}.")
        if tau_a == 0.0 and tau_b == 0.0:
            raise ValueError("tau_a and tau_b cannot both be 0.")
        self.geom_xx, self.geom_yy, self.geom_xy = geom_xx, geom_yy, geom_xy
        self.alpha = float(alpha)
        self.tau_a, self.tau_b = float(tau_a), float(tau_b)
        self.dtype, self.device = geom_xx.dtype, geom_xx.device
        self.a = _marginal(a, n, geom_xx, "a")
        self.b = _marginal(b, m, geom_yy, "b")
        if self.a.ndim != 1 or self.b.ndim != 1:
            raise ValueError("a and b must be 1-D for (fused) Gromov-Wasserstein.")
        ma, mb = float(self.a.sum()), float(self.b.sum())
        if mass is not None:
            if not (self.tau_a == 1.0 and self.tau_b == 1.0):
                raise ValueError("mass= (partial FGW) needs tau_a = tau_b = 1.")
            if not 0.0 < mass <= min(ma, mb) * (1 + 1e-9):
                raise ValueError(
                    f"mass must lie in (0, min(|a|, |b|)] = (0, {min(ma, mb):.6g}], got {mass}."
                )
            mass = min(float(mass), ma, mb)
        elif self.tau_a == 1.0 and self.tau_b == 1.0 and not math.isclose(ma, mb, rel_tol=1e-5):
            raise ValueError(
                f"balanced FGW needs a and b of equal mass (got {ma:.6g} and {mb:.6g}); "
                "normalise them, set tau_a/tau_b < 1 or pass mass=."
            )
        self.mass = mass
        self.shape = (n, m)
        self._cx: _Cost | None = None
        self._cy: _Cost | None = None
        self._cxy: _Cost | None = None

    @property
    def is_balanced(self) -> bool:
        """Both marginals are hard constraints and all mass is transported."""
        return self.tau_a == 1.0 and self.tau_b == 1.0 and self.mass is None

    @property
    def is_lowrank(self) -> bool:
        """Both intra-slice costs are held as low-rank factors."""
        return self.cost_x.is_lowrank and self.cost_y.is_lowrank

    @property
    def cost_x(self) -> _Cost:
        if self._cx is None:
            self._cx = _as_cost(self.geom_xx, intra=True, name="geom_xx")
        return self._cx

    @property
    def cost_y(self) -> _Cost:
        if self._cy is None:
            self._cy = _as_cost(self.geom_yy, intra=True, name="geom_yy")
        return self._cy

    @property
    def cost_xy(self) -> _Cost | None:
        if self._cxy is None and self.geom_xy is not None and self.alpha < 1.0:
            self._cxy = _as_cost(self.geom_xy, intra=False, name="geom_xy")
        return self._cxy

    # ------------------------------------------------------------- objective
    def linear_cost(self, plan: torch.Tensor) -> torch.Tensor:
        """``<M, P>`` (0 without a feature cost)."""
        cxy = self.cost_xy
        if cxy is None:
            return plan.new_zeros(())
        if cxy.is_lowrank:
            a_f, b_f = cxy.factors  # type: ignore[misc]
            return ((a_f.T @ plan) * b_f.T).sum()
        return (cxy.dense * plan).sum()  # type: ignore[operator]

    def gw_cost(self, plan: torch.Tensor) -> torch.Tensor:
        r"""``GW(P) = sum_{ijkl} (C^x_ik - C^y_jl)^2 P_ij P_kl`` (any marginals)."""
        return gw_objective(self.cost_x, self.cost_y, plan)

    def fgw_cost(self, plan: torch.Tensor) -> torch.Tensor:
        r"""``(1 - alpha) <M, P> + alpha GW(P)``, without entropy or marginal penalties."""
        value = plan.new_zeros(())
        if self.alpha < 1.0:
            value = value + (1.0 - self.alpha) * self.linear_cost(plan)
        if self.alpha > 0.0:
            value = value + self.alpha * self.gw_cost(plan)
        return value

    def linearized_cost(self, plan: torch.Tensor) -> torch.Tensor:
        r"""Gradient :math:`\nabla F_\alpha(P)`, the ``(n, m)`` cost of the next Sinkhorn step."""
        alpha = self.alpha
        n, m = self.shape
        cxy = self.cost_xy
        # low-rank terms sum_k u_k v_k^T, built by one matrix product at the end
        lin_u: list[torch.Tensor] = []
        lin_v: list[torch.Tensor] = []
        dense: list[tuple[torch.Tensor, float]] = []  # (matrix, coefficient)
        if alpha < 1.0:
            if cxy.is_lowrank:  # type: ignore[union-attr]
                a_f, b_f = cxy.factors  # type: ignore[union-attr,misc]
                lin_u.append((1.0 - alpha) * a_f)
                lin_v.append(b_f)
            else:
                dense.append((cxy.dense, 1.0 - alpha))  # type: ignore[union-attr]
        if alpha > 0.0:
            cx, cy = self.cost_x, self.cost_y
            q1, q2 = plan.sum(1), plan.sum(0)
            ux, uy = _sq_both(cx, q1), _sq_both(cy, q2)
            ones_n = torch.ones((n, 1), dtype=plan.dtype, device=plan.device)
            ones_m = torch.ones((m, 1), dtype=plan.dtype, device=plan.device)
            lin_u += [alpha * ux[:, None], alpha * ones_n]
            lin_v += [ones_m, uy[:, None]]
            both_sym = cx.symmetric and cy.symmetric
            if cx.is_lowrank and cy.is_lowrank:
                # -2 (Cx P Cy^T + Cx^T P Cy) = -2 Ax (Bx^T P By) Ay^T - 2 Bx (Ax^T P Ay) By^T
                ax, bx = cx.factors  # type: ignore[misc]
                ay, by = cy.factors  # type: ignore[misc]
                coef = -4.0 * alpha if both_sym else -2.0 * alpha
                lin_u.append(coef * (ax @ ((bx.T @ plan) @ by)))
                lin_v.append(ay)
                if not both_sym:
                    lin_u.append(coef * (bx @ ((ax.T @ plan) @ ay)))
                    lin_v.append(by)
            else:
                dense.append((_cross(cx, plan, cy), -4.0 * alpha if both_sym else -2.0 * alpha))
                if not both_sym:
                    dense.append((_cross(cx.T, plan, cy.T), -2.0 * alpha))
        out = torch.cat(lin_u, 1) @ torch.cat(lin_v, 1).T if lin_u else None
        for mat, coef in dense:
            out = coef * mat if out is None else out.add_(mat, alpha=coef)
        return out  # type: ignore[return-value]

    def initial_plan(self) -> torch.Tensor:
        """``a b^T``, rescaled to ``mass`` for partial problems."""
        plan = self.a[:, None] * self.b[None, :]
        if self.mass is not None:
            plan = plan * (self.mass / float(plan.sum()))
        return plan


# -------------------------------------------------------------------------- output
@dataclass(frozen=True)
class FGWOutput:
    """Result of :class:`GromovWasserstein`.

    The plan is that of the last linear problem, ``P_ij = exp((f_i + g_j -
    C_ij) / epsilon)`` with ``C`` the final linearised cost (for partial
    problems the dummy row and column are dropped by every accessor).

    Attributes
    ----------
    linear_output
        The final :class:`~chronotope.ot.SinkhornOutput` (augmented by one
        dummy point per side when ``mass`` was set).
    problem
        The solved :class:`QuadraticProblem`.
    fgw_cost
        ``(1 - alpha) <M, P> + alpha GW(P)`` of the final plan.
    linear_cost, gw_cost
        ``<M, P>`` and ``GW(P)`` of the final plan.
    errors
        Outer error per iteration: ``sum |P_t - P_{t-1}|`` (L1 change of the plan).
    costs
        ``fgw_cost`` per outer iteration (when ``GromovWasserstein(track_cost=True)``).
    converged
        The outer loop reached ``tol`` and the last Sinkhorn solve converged.
    n_outer
        Outer (linearisation) iterations run.
    epsilon
        Absolute entropic regularisation used.
    """

    linear_output: SinkhornOutput
    problem: QuadraticProblem
    fgw_cost: float
    linear_cost: float
    gw_cost: float
    errors: np.ndarray
    costs: np.ndarray
    converged: bool
    n_outer: int
    epsilon: float
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def _partial(self) -> bool:
        return self.problem.mass is not None

    @property
    def shape(self) -> tuple[int, int]:
        """``(n, m)``."""
        return self.problem.shape

    @property
    def f(self) -> torch.Tensor:
        """Source potential ``(n,)``."""
        return self.linear_output.f[: self.shape[0]]

    @property
    def g(self) -> torch.Tensor:
        """Target potential ``(m,)``."""
        return self.linear_output.g[: self.shape[1]]

    def dense_plan(self) -> torch.Tensor:
        """The ``(n, m)`` plan."""
        n, m = self.shape
        return self.linear_output.dense_plan()[:n, :m]

    def apply(self, v: Array, *, axis: int = 1) -> torch.Tensor:
        """``P @ v`` (``axis=1``, ``v`` of shape ``(m, ...)``) or ``P.T @ v`` (``axis=0``)."""
        n, m = self.shape
        out = self.linear_output
        vt = as_tensor(v, device=out.f.device, dtype=out.f.dtype)
        if self._partial:
            pad = vt.new_zeros((1, *vt.shape[1:]))
            vt = torch.cat([vt, pad], 0)
        res = out.apply(vt, axis=axis)
        return res[: (n if axis == 1 else m)]

    def marginals(self, axis: int) -> torch.Tensor:
        """Row sums (``axis=1``, ``(n,)``) or column sums (``axis=0``, ``(m,)``) of the plan."""
        n, m = self.shape
        ones = torch.ones(m if axis == 1 else n, dtype=self.f.dtype, device=self.f.device)
        return self.apply(ones, axis=axis)

    @property
    def transported_mass(self) -> float:
        """Total mass of the plan."""
        return float(self.marginals(1).sum())

    def barycentric_projection(self, y: Array, *, axis: int = 1) -> torch.Tensor:
        """``(P @ y) / (P @ 1)`` (``axis=1``) or ``(P.T @ x) / (P.T @ 1)`` (``axis=0``)."""
        yt = as_tensor(y, device=self.f.device, dtype=self.f.dtype)
        yt = yt[:, None] if yt.ndim == 1 else yt
        ones = torch.ones((yt.shape[0], 1), dtype=yt.dtype, device=yt.device)
        both = self.apply(torch.cat([yt, ones], 1), axis=axis)
        return both[:, :-1] / both[:, -1:]

    def plan(self, k: int = 10) -> sp.csr_matrix:
        """Sparse plan keeping the ``k`` largest entries of each row (scipy CSR)."""
        n, m = self.shape
        if not self._partial:
            return self.linear_output.plan(k)
        full = self.linear_output.plan(k + 1).tocsr()[:n, :m].tocoo()
        # keep at most k entries per row (a row may have lost its dummy entry)
        order = np.lexsort((-full.data, full.row))
        rows, cols, vals = full.row[order], full.col[order], full.data[order]
        starts = np.searchsorted(rows, np.arange(n))
        rank = np.arange(rows.size) - starts[rows]
        keep = rank < k
        return sp.csr_matrix((vals[keep], (rows[keep], cols[keep])), shape=(n, m))


# -------------------------------------------------------------------------- solver
def _plan_block(out: SinkhornOutput, n: int, m: int) -> torch.Tensor:
    """``exp((f_i + g_j - C_ij) / eps)`` on the first ``n x m`` block, with one allocation."""
    cost = out.problem.geom.cost_matrix()[:n, :m]
    plan = torch.empty((n, m), dtype=cost.dtype, device=cost.device)
    torch.sub(out.f[:n, None], cost, out=plan)
    return plan.add_(out.g[None, :m]).div_(out.epsilon).exp_()


ProgressCallback = Callable[[int, float], None]


@dataclass(frozen=True)
class GromovWasserstein:
    r"""Entropic (fused, unbalanced, partial) Gromov-Wasserstein solver.

    Runs the mirror-descent iteration
    :math:`P_{t+1} = \mathrm{Sinkhorn}_\varepsilon(\nabla F_\alpha(P_t))` from
    :math:`P_0 = a b^\top` (see :mod:`chronotope.ot.gromov`).

    Parameters
    ----------
    epsilon
        Entropic regularisation. Absolute (units of the scaled costs) unless
        ``relative_epsilon``; ``None`` means ``relative_epsilon`` with ``0.01``.
    relative_epsilon
        Read ``epsilon`` as a fraction of the mean of the first linearised
        cost :math:`\nabla F_\alpha(a b^\top)` (a non-negative matrix, equal to
        ``M`` when ``alpha = 0``); the absolute value is then fixed for all
        outer iterations so the objective stays the same.
    epsilon_init, epsilon_decay
        Annealing: the first linearisations use ``epsilon_t = max(epsilon,
        epsilon_init * epsilon_decay**t)``; convergence is only declared at
        the target ``epsilon``, so the fixed point (a stationary point of the
        objective at ``epsilon``) is unchanged, but far fewer Sinkhorn
        iterations are needed and poor local minima are avoided. ``"auto"``
        starts at the mean of the first linearised cost; a number is read in
        the units of ``epsilon``; ``None`` disables annealing.
    max_outer
        Maximum number of linearisations.
    tol
        Stop when ``sum |P_t - P_{t-1}| < tol`` (relative to the transported mass).
        ``tol`` and ``inner_tol`` are raised to ``1e3`` machine epsilons
        (``1.2e-4`` in float32), below which changes are rounding noise.
    max_iter, inner_tol, lse_mode, inner_iterations
        Passed to each inner :class:`~chronotope.ot.Sinkhorn` solve.
    min_outer
        Never stop before this many outer iterations.
    track_cost
        Record ``fgw_cost`` at every outer iteration (one extra ``O(nm r)`` pass each).
    progress
        ``True`` shows a tqdm bar over outer iterations; a callable
        ``(iteration, error)`` is called after each.
    warn
        Emit :class:`~chronotope._errors.ConvergenceWarning` when ``tol`` is not met.
    """

    epsilon: float | None = None
    relative_epsilon: bool = False
    epsilon_init: float | Literal["auto"] | None = "auto"
    epsilon_decay: float = 0.5
    max_outer: int = 50
    tol: float = 1e-5
    max_iter: int = 2000
    inner_tol: float = 1e-6
    lse_mode: bool | Literal["auto"] = "auto"
    inner_iterations: int = 10
    min_outer: int = 1
    track_cost: bool = False
    progress: bool | ProgressCallback = False
    warn: bool = True

    def _absolute(self, value: float, first_cost: torch.Tensor) -> float:
        if self.relative_epsilon or self.epsilon is None:
            return float(value) * float(first_cost.mean())
        return float(value)

    def __call__(
        self,
        problem: QuadraticProblem,
        init: Array | None = None,
    ) -> FGWOutput:
        """Solve ``problem``; ``init`` is an optional ``(n, m)`` initial plan."""
        t0 = time.perf_counter()
        n, m = problem.shape
        if init is None:
            plan = problem.initial_plan()
        else:
            plan = as_tensor(init, device=problem.device, dtype=problem.dtype).clone()
            if plan.shape != (n, m):
                raise ValueError(f"init plan has shape {tuple(plan.shape)}, expected ({n}, {m}).")
        if not 0.0 < self.epsilon_decay <= 1.0:
            raise ValueError(f"epsilon_decay must lie in (0, 1], got {self.epsilon_decay}.")
        with torch.no_grad():
            cost = problem.linearized_cost(plan)
            eps = self._absolute(0.01 if self.epsilon is None else self.epsilon, cost)
            if not eps > 0:
                raise ValueError(f"epsilon must be positive, got {eps}.")
            eps_t = eps
            if self.epsilon_init == "auto":
                eps_t = max(eps, float(cost.mean()))
            elif self.epsilon_init is not None:
                eps_t = max(eps, self._absolute(self.epsilon_init, cost))
            a_lin, b_lin = self._marginals(problem)
            # below ~1e3 machine epsilons plan changes are rounding noise (float32)
            floor = 1e3 * torch.finfo(problem.dtype).eps
            outer_tol, target_inner = max(self.tol, floor), max(self.inner_tol, floor)
            potentials: tuple[torch.Tensor | None, torch.Tensor | None] | None = None
            errors: list[float] = []
            costs: list[float] = []
            inner_iters = 0
            bar = None
            if self.progress is True:
                bar = tqdm(total=self.max_outer, desc="fgw", leave=False)
            converged = False
            out: SinkhornOutput | None = None
            err = math.inf
            it = 0
            try:
                for it in range(1, self.max_outer + 1):
                    if it > 1:
                        cost = problem.linearized_cost(plan)
                        eps_t = max(eps, eps_t * self.epsilon_decay)
                    final_eps = eps_t <= eps * (1.0 + 1e-12)
                    # Inexact inner solves while far from the fixed point.
                    inner_tol = max(target_inner, min(1e-3, 0.1 * err))
                    if not final_eps:
                        inner_tol = max(inner_tol, 1e-3)
                    solver = Sinkhorn(
                        epsilon=eps_t,
                        max_iter=self.max_iter,
                        tol=inner_tol,
                        lse_mode=self.lse_mode,
                        inner_iterations=self.inner_iterations,
                        warn=False,
                    )
                    geom = DenseGeometry(self._augment(cost, problem))
                    del cost
                    lin = LinearProblem(
                        geom, a_lin, b_lin, tau_a=problem.tau_a, tau_b=problem.tau_b
                    )
                    out = None  # release the previous linear problem before solving
                    out = solver(lin, init=potentials)
                    del geom, lin
                    inner_iters += out.n_iter
                    potentials = (out.f, out.g)
                    new_plan = _plan_block(out, n, m)
                    mass = float(new_plan.sum())
                    err = float(plan.sub_(new_plan).abs_().sum()) / max(mass, 1e-300)
                    plan = new_plan
                    errors.append(err)
                    if self.track_cost:
                        costs.append(float(problem.fgw_cost(plan)))
                    logger.debug(
                        "fgw outer %d: epsilon %.3g, plan change %.3e, %d Sinkhorn iterations",
                        it,
                        eps_t,
                        err,
                        out.n_iter,
                    )
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(error=f"{err:.2e}")
                    elif callable(self.progress):
                        self.progress(it, err)
                    if not math.isfinite(err):
                        break
                    exact_inner = inner_tol <= target_inner
                    if final_eps and exact_inner and err < outer_tol and it >= self.min_outer:
                        converged = True
                        break
            finally:
                if bar is not None:
                    bar.close()
            assert out is not None
            lin_c = float(problem.linear_cost(plan)) if problem.alpha < 1.0 else 0.0
            gw_c = float(problem.gw_cost(plan)) if problem.alpha > 0.0 else 0.0
            fgw_c = (1.0 - problem.alpha) * lin_c + problem.alpha * gw_c
        converged = converged and out.converged
        if not converged and self.warn:
            last = errors[-1] if errors else float("nan")
            warnings.warn(
                f"Fused Gromov-Wasserstein did not converge in {it} outer iterations "
                f"(plan change {last:.3g}, tol {self.tol:.3g}; last Sinkhorn converged: "
                f"{out.converged}); raise max_outer/max_iter or epsilon.",
                ConvergenceWarning,
                stacklevel=2,
            )
        return FGWOutput(
            linear_output=out,
            problem=problem,
            fgw_cost=fgw_c,
            linear_cost=lin_c,
            gw_cost=gw_c,
            errors=np.asarray(errors),
            costs=np.asarray(costs),
            converged=converged,
            n_outer=it,
            epsilon=eps,
            timings={"solve": time.perf_counter() - t0, "sinkhorn_iterations": inner_iters},
        )

    @staticmethod
    def _marginals(problem: QuadraticProblem) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights of the linear problems (with the dummy points of partial FGW)."""
        if problem.mass is None:
            return problem.a, problem.b
        s = problem.mass
        tiny = torch.finfo(problem.dtype).tiny
        a_lin = torch.cat([problem.a, (problem.b.sum() - s).reshape(1)]).clamp_min(tiny)
        b_lin = torch.cat([problem.b, (problem.a.sum() - s).reshape(1)]).clamp_min(tiny)
        return a_lin, b_lin

    @staticmethod
    def _augment(cost: torch.Tensor, problem: QuadraticProblem) -> torch.Tensor:
        """Add the dummy row and column of partial OT (Chapel et al., 2020)."""
        if problem.mass is None:
            return cost
        n, m = cost.shape
        big = 1e4 * (float(cost.abs().max()) + 1.0)
        aug = cost.new_zeros((n + 1, m + 1))
        aug[:n, :m] = cost
        aug[n, m] = big
        return aug


# ---------------------------------------------------------------------- functional
def _intra_geometry(
    x: Array | Geometry,
    spatial_cost: str,
    scale_cost: ScaleCost | None,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
    name: str,
) -> Geometry:
    if isinstance(x, Geometry):
        return x
    sc: ScaleCost = 1.0 if scale_cost is None else scale_cost
    if spatial_cost == "precomputed":
        geom: Geometry = DenseGeometry(x, scale_cost=sc, device=device, dtype=dtype)
        if geom.shape[0] != geom.shape[1]:
            raise ValueError(
                f"{name} must be a square cost matrix with spatial_cost='precomputed'."
            )
        return geom
    if spatial_cost not in ("sqeuclidean", "euclidean"):
        raise ValueError(
            "spatial_cost must be 'sqeuclidean', 'euclidean' or 'precomputed', "
            f"got {spatial_cost!r}."
        )
    return PointCloud(x, cost=spatial_cost, scale_cost=sc, device=device, dtype=dtype)  # type: ignore[arg-type]


def fused_gromov_wasserstein(
    x: Array | Geometry,
    y: Array | Geometry,
    *,
    features_x: Array | None = None,
    features_y: Array | None = None,
    cost_xy: Array | Geometry | None = None,
    alpha: float = 0.5,
    a: Array | None = None,
    b: Array | None = None,
    tau_a: float = 1.0,
    tau_b: float = 1.0,
    mass: float | None = None,
    spatial_cost: Literal["sqeuclidean", "euclidean", "precomputed"] = "sqeuclidean",
    scale_cost: ScaleCost | None = "mean",
    epsilon: float | None = None,
    relative_epsilon: bool = False,
    epsilon_init: float | Literal["auto"] | None = "auto",
    epsilon_decay: float = 0.5,
    max_outer: int = 50,
    tol: float = 1e-5,
    max_iter: int = 2000,
    inner_tol: float = 1e-6,
    lse_mode: bool | Literal["auto"] = "auto",
    init: Array | None = None,
    progress: bool | ProgressCallback = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> FGWOutput:
    r"""Entropic fused Gromov-Wasserstein between two slices in one call.

    Minimises (to a stationary point)

    .. math::

        (1-\alpha)\langle M, P\rangle + \alpha \sum_{ijkl} (C^x_{ik} - C^y_{jl})^2 P_{ij}P_{kl}
        + \varepsilon\,\mathrm{KL}(P|ab^\top) + \rho_a \mathrm{KL}(P\mathbf{1}|a)
        + \rho_b \mathrm{KL}(P^\top\mathbf{1}|b)

    (``rho = epsilon tau / (1 - tau)``; hard marginals when ``tau = 1``), or
    its partial version with exactly ``mass`` transported; see
    :mod:`chronotope.ot.gromov`.

    Parameters
    ----------
    x, y
        Spot coordinates ``(n, d)`` and ``(m, d)`` of the two slices (squared
        Euclidean costs use a rank ``d + 2`` factorisation: no ``n x n``
        matrix), square cost matrices with ``spatial_cost="precomputed"``, or
        :class:`~chronotope.ot.Geometry` objects.
    features_x, features_y
        Features ``(n, p)`` and ``(m, p)`` (e.g. PCA of expression); ``M`` is
        their squared Euclidean cost, kept as low-rank factors.
    cost_xy
        Alternatively, the feature cost ``M`` itself, ``(n, m)`` (array or geometry).
    alpha
        GW weight in ``[0, 1]``: 0 is linear OT on ``M``, 1 pure GW.
    a, b
        Spot weights; uniform when ``None``.
    tau_a, tau_b
        Unbalancedness in ``[0, 1]`` (1: hard marginal).
    mass
        Partial FGW (PASTE2): transport exactly this mass.
    spatial_cost
        ``"sqeuclidean"`` (low-rank), ``"euclidean"`` (dense ``n x n``, as
        PASTE) or ``"precomputed"``.
    scale_cost
        Divide each cost built here (``C^x``, ``C^y``, ``M``) by its own
        ``"mean"`` (default; exact and cheap for squared Euclidean), ``"max"``
        or ``"median"``, or by a number; ``None`` keeps raw units. Ignored for
        geometries passed in (they carry their own ``scale_cost``).
    epsilon, relative_epsilon
        Entropic regularisation, absolute in scaled-cost units, or relative to
        the mean first linearised cost; ``None`` is ``0.01`` relative.
    epsilon_init, epsilon_decay
        Annealing schedule of the first outer iterations, see :class:`GromovWasserstein`.
    max_outer, tol, max_iter, inner_tol, lse_mode, progress
        See :class:`GromovWasserstein`.
    init
        Initial ``(n, m)`` plan (default ``a b^T``).
    device, dtype
        Where and in which precision to compute (default: CPU, dtype of the inputs).

    Returns
    -------
    FGWOutput
        Plan accessors, ``fgw_cost``, ``errors``, ``converged`` and ``n_outer``.
    """
    geom_xx = _intra_geometry(x, spatial_cost, scale_cost, device, dtype, "x")
    dev, dt = geom_xx.device, geom_xx.dtype
    geom_yy = _intra_geometry(y, spatial_cost, scale_cost, dev, dt, "y")
    sc: ScaleCost = 1.0 if scale_cost is None else scale_cost
    geom_xy: Geometry | None = None
    if cost_xy is not None:
        if features_x is not None or features_y is not None:
            raise ValueError("pass either cost_xy or features_x/features_y, not both.")
        geom_xy = (
            cost_xy
            if isinstance(cost_xy, Geometry)
            else DenseGeometry(cost_xy, scale_cost=sc, device=dev, dtype=dt)
        )
    elif features_x is not None or features_y is not None:
        if features_x is None or features_y is None:
            raise ValueError("features_x and features_y must be given together.")
        geom_xy = PointCloud(features_x, features_y, scale_cost=sc, device=dev, dtype=dt)
    prob = QuadraticProblem(
        geom_xx, geom_yy, geom_xy, alpha=alpha, a=a, b=b, tau_a=tau_a, tau_b=tau_b, mass=mass
    )
    solver = GromovWasserstein(
        epsilon=0.01 if epsilon is None else epsilon,
        relative_epsilon=relative_epsilon or epsilon is None,
        epsilon_init=epsilon_init,
        epsilon_decay=epsilon_decay,
        max_outer=max_outer,
        tol=tol,
        max_iter=max_iter,
        inner_tol=inner_tol,
        lse_mode=lse_mode,
        progress=progress,
    )
    return solver(prob, init=init)
