"""Linear (Kantorovich) OT problems: a geometry plus marginals and unbalancedness."""

from __future__ import annotations

import numpy as np
import torch

from chronotope._settings import as_tensor
from chronotope.ot.geometry import Geometry

__all__ = ["LinearProblem"]


def _marginal(
    w: torch.Tensor | np.ndarray | None, size: int, geom: Geometry, name: str
) -> torch.Tensor:
    if w is None:
        return torch.full((size,), 1.0 / size, dtype=geom.dtype, device=geom.device)
    t = as_tensor(w, device=geom.device, dtype=geom.dtype)
    if t.ndim not in (1, 2) or t.shape[0] != size:
        raise ValueError(
            f"{name} must have shape ({size},) or ({size}, G) to match the geometry, "
            f"got {tuple(t.shape)}."
        )
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or infinite weights.")
    if (t < 0).any():
        raise ValueError(f"{name} contains negative weights.")
    mass = t.sum(0)
    if (mass <= 0).any():
        raise ValueError(f"{name} has a histogram with zero total mass.")
    return t


class LinearProblem:
    r"""Entropic, possibly unbalanced, linear OT problem.

    Solves, for each of ``G`` pairs of histograms sharing the geometry,

    .. math::

        \min_{P \ge 0} \langle C, P\rangle + \varepsilon\,\mathrm{KL}(P \,|\, a b^\top)
        + \rho_a \mathrm{KL}(P\mathbf{1} \,|\, a) + \rho_b \mathrm{KL}(P^\top\mathbf{1} \,|\, b)

    with :math:`\tau_a = \rho_a / (\rho_a + \varepsilon)` (and likewise
    :math:`\tau_b`). ``tau = 1`` is a hard marginal constraint (balanced),
    ``tau = 0`` leaves that marginal free (semi-relaxed when the other is 1).

    Parameters
    ----------
    geom
        The ground cost.
    a
        Source weights, ``(n,)`` or ``(n, G)``; uniform when ``None``.
    b
        Target weights, ``(m,)`` or ``(m, G)``; uniform when ``None``. With
        ``G`` columns, ``G`` problems are solved at once on one geometry.
    tau_a, tau_b
        Unbalancedness in ``[0, 1]``.
    """

    def __init__(
        self,
        geom: Geometry,
        a: torch.Tensor | np.ndarray | None = None,
        b: torch.Tensor | np.ndarray | None = None,
        *,
        tau_a: float = 1.0,
        tau_b: float = 1.0,
    ) -> None:
        n, m = geom.shape
        if n == 0 or m == 0:
            raise ValueError(f"the geometry is empty (shape {geom.shape}).")
        for name, tau in (("tau_a", tau_a), ("tau_b", tau_b)):
            if not 0.0 <= float(tau) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {tau}.")
        if tau_a == 0.0 and tau_b == 0.0:
            raise ValueError("tau_a and tau_b cannot both be 0 (nothing would constrain the plan).")
        at = _marginal(a, n, geom, "a")
        bt = _marginal(b, m, geom, "b")
        ga = at.shape[1] if at.ndim == 2 else 1
        gb = bt.shape[1] if bt.ndim == 2 else 1
        if ga != gb and ga != 1 and gb != 1:
            raise ValueError(f"a has {ga} histograms and b has {gb}; they must match or be 1.")
        self.geom = geom
        self.a = at
        self.b = bt
        self.tau_a = float(tau_a)
        self.tau_b = float(tau_b)
        self.n_histograms = max(ga, gb)
        self.batched = at.ndim == 2 or bt.ndim == 2
        if self.is_balanced:
            ma, mb = self.a2d.sum(0), self.b2d.sum(0)
            if not torch.allclose(ma, mb, rtol=1e-5, atol=1e-8):
                raise ValueError(
                    "balanced OT (tau_a = tau_b = 1) needs a and b of equal total mass "
                    f"(got {float(ma.max()):.6g} and {float(mb.max()):.6g}); "
                    "normalise them or set tau_a/tau_b < 1."
                )

    @property
    def is_balanced(self) -> bool:
        """Both marginals are hard constraints."""
        return self.tau_a == 1.0 and self.tau_b == 1.0

    @property
    def a2d(self) -> torch.Tensor:
        """Source weights as an ``(n, G)`` tensor."""
        a = self.a if self.a.ndim == 2 else self.a[:, None]
        return a.expand(-1, self.n_histograms)

    @property
    def b2d(self) -> torch.Tensor:
        """Target weights as an ``(m, G)`` tensor."""
        b = self.b if self.b.ndim == 2 else self.b[:, None]
        return b.expand(-1, self.n_histograms)
