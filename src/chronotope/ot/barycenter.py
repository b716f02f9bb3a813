r"""Free-support Wasserstein barycentre of weighted point clouds.

Given measures :math:`\mu_k = \sum_j b^k_j \delta_{y^k_j}` and barycentric
weights :math:`\lambda_k \ge 0` (:math:`\sum_k \lambda_k = 1`), find support
points :math:`X = (x_1, \dots, x_n)` with fixed weights :math:`w` minimising

.. math::

    \sum_k \lambda_k\, \mathrm{OT}_\varepsilon\Big(\sum_i w_i \delta_{x_i}, \mu_k\Big),
    \qquad \mathrm{OT}_\varepsilon(\nu, \mu) = \min_{P \in \Pi(w, b)}
    \sum_{ij} P_{ij} |x_i - y_j|^2 + \varepsilon\,\mathrm{KL}(P \,|\, w b^\top).

The fixed-point iteration of Cuturi & Doucet (2014, Alg. 2) alternates an
entropic OT solve from the current support to every measure
(:class:`~chronotope.ot.Sinkhorn` on a squared Euclidean
:class:`~chronotope.ot.PointCloud`, chunked when large, warm-started) with the
update of every support point to the :math:`\lambda`-weighted average of its
barycentric projections,

.. math::

    x_i \leftarrow \sum_k \lambda_k \frac{(P^k y^k)_i}{(P^k \mathbf{1})_i},

which is the exact minimiser in :math:`X` for fixed plans. At
:math:`\varepsilon \to 0` this is ``ot.lp.free_support_barycenter`` of POT.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from chronotope._errors import ConvergenceWarning
from chronotope._settings import as_tensor, resolve_rng
from chronotope.ot.geometry import PointCloud
from chronotope.ot.problem import LinearProblem
from chronotope.ot.sinkhorn import Sinkhorn

__all__ = ["BarycenterOutput", "free_support_barycenter"]

logger = logging.getLogger("chronotope")

Array = torch.Tensor | np.ndarray

#: Above this many cost entries per measure, costs are computed in row blocks.
_DENSE_LIMIT = 2**24


@dataclass(frozen=True)
class BarycenterOutput:
    """Result of :func:`free_support_barycenter`.

    Attributes
    ----------
    locations
        ``(n_support, d)`` support points of the barycentre.
    weights
        ``(n_support,)`` their (fixed) weights, summing to 1.
    displacements
        Per iteration, ``sum_i w_i |x_i^t - x_i^{t-1}|^2`` (mean squared move).
    costs
        Per iteration, ``sum_k lambda_k <P^k, C^k>`` before the move (transport
        cost without entropy).
    converged
        The displacement fell below ``tol``.
    sinkhorn_converged
        Every Sinkhorn solve of the last iteration reached ``sinkhorn_tol``.
        The projections are normalised by the plan's row sums, so they are
        accurate even when this is ``False`` (Sinkhorn converges slowly when
        the plans approach permutations, e.g. at a barycentre of translates).
    n_iter
        Fixed-point iterations run.
    epsilon
        Absolute entropic regularisation used for every measure.
    """

    locations: torch.Tensor
    weights: torch.Tensor
    displacements: np.ndarray
    costs: np.ndarray
    converged: bool
    sinkhorn_converged: bool
    n_iter: int
    epsilon: float
    timings: dict[str, float] = field(default_factory=dict)


def _normalised(w: Array | None, size: int, name: str, dev: torch.device, dt: torch.dtype):
    if w is None:
        return torch.full((size,), 1.0 / size, dtype=dt, device=dev)
    t = as_tensor(w, device=dev, dtype=dt)
    if t.shape != (size,):
        raise ValueError(f"{name} must have shape ({size},), got {tuple(t.shape)}.")
    if not torch.isfinite(t).all() or (t < 0).any() or float(t.sum()) <= 0:
        raise ValueError(f"{name} must be finite, non-negative and not all zero.")
    return t / t.sum()


def free_support_barycenter(
    measures_locations: Sequence[Array],
    measures_weights: Sequence[Array | None] | None = None,
    *,
    weights: Array | None = None,
    n_support: int | None = None,
    x_init: Array | None = None,
    support_weights: Array | None = None,
    epsilon: float | None = None,
    relative_epsilon: bool = False,
    max_iter: int = 100,
    tol: float = 1e-9,
    sinkhorn_max_iter: int = 2000,
    sinkhorn_tol: float = 1e-7,
    lse_mode: bool | Literal["auto"] = "auto",
    batch_size: int | Literal["auto"] | None = "auto",
    seed: int | np.random.Generator | None = None,
    progress: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> BarycenterOutput:
    r"""Free-support entropic Wasserstein barycentre (Cuturi & Doucet, 2014).

    Minimises :math:`\sum_k \lambda_k \mathrm{OT}_\varepsilon(\sum_i w_i
    \delta_{x_i}, \mu_k)` over the support :math:`X` (squared Euclidean cost;
    see :mod:`chronotope.ot.barycenter`).

    Parameters
    ----------
    measures_locations
        ``K`` arrays of shape ``(n_k, d)``.
    measures_weights
        ``K`` weight vectors ``(n_k,)`` (or ``None`` entries, or ``None``:
        uniform). Each is normalised to total mass 1.
    weights
        Barycentric weights :math:`\lambda` ``(K,)``, normalised to sum 1;
        uniform when ``None``.
    n_support
        Number of support points when ``x_init`` is not given; they are drawn
        without replacement from the pooled measures (probability
        :math:`\lambda_k b^k_j`) using ``seed``.
    x_init
        Initial support ``(n_support, d)``.
    support_weights
        Weights :math:`w` of the support points (fixed), normalised; uniform
        when ``None``.
    epsilon, relative_epsilon
        Entropic regularisation, absolute (squared distance units) or, with
        ``relative_epsilon`` or when ``None`` (then ``0.01``), relative to the
        :math:`\lambda`-weighted mean cost at the initial support; fixed for
        all iterations.
    max_iter, tol
        At most ``max_iter`` fixed-point iterations; stop when the mean
        squared displacement ``sum_i w_i |x_i^t - x_i^{t-1}|^2 < tol``.
    sinkhorn_max_iter, sinkhorn_tol, lse_mode
        Passed to each :class:`~chronotope.ot.Sinkhorn` solve.
    batch_size
        Row block size of the :class:`~chronotope.ot.PointCloud` costs;
        ``"auto"`` chunks when ``n_support * n_k`` exceeds ``2**24``, ``None``
        never chunks.
    seed
        Seed or generator for the random initial support.
    progress
        Show a tqdm bar over iterations.
    device, dtype
        Where and in which precision to compute (default: CPU, float64 for
        float64 input).

    Returns
    -------
    BarycenterOutput
        ``locations``, ``weights``, ``displacements``, ``converged``, ...
    """
    t0 = time.perf_counter()
    if len(measures_locations) == 0:
        raise ValueError("measures_locations is empty.")
    ys = [as_tensor(y, device=device, dtype=dtype) for y in measures_locations]
    dev, dt = ys[0].device, ys[0].dtype
    if not torch.is_floating_point(ys[0]):
        dt = torch.get_default_dtype()
    ys = [y.to(device=dev, dtype=dt) for y in ys]
    d = ys[0].shape[1] if ys[0].ndim == 2 else -1
    for k, y in enumerate(ys):
        if y.ndim != 2 or y.shape[1] != d or y.shape[0] == 0:
            raise ValueError(
                f"measures_locations[{k}] must be a non-empty (n_k, {d}) array, got "
                f"{tuple(y.shape)}."
            )
        if not torch.isfinite(y).all():
            raise ValueError(f"measures_locations[{k}] contains NaN or infinite values.")
    n_meas = len(ys)
    if measures_weights is None:
        measures_weights = [None] * n_meas
    if len(measures_weights) != n_meas:
        raise ValueError(
            f"measures_weights has {len(measures_weights)} entries for {n_meas} measures."
        )
    bs = [
        _normalised(w, y.shape[0], f"measures_weights[{k}]", dev, dt)
        for k, (w, y) in enumerate(zip(measures_weights, ys, strict=True))
    ]
    lam = _normalised(weights, n_meas, "weights", dev, dt)

    if x_init is not None:
        x = as_tensor(x_init, device=dev, dtype=dt).clone()
        if x.ndim != 2 or x.shape[1] != d:
            raise ValueError(f"x_init must have shape (n_support, {d}), got {tuple(x.shape)}.")
        if n_support is not None and n_support != x.shape[0]:
            raise ValueError(f"n_support={n_support} but x_init has {x.shape[0]} rows.")
    else:
        if n_support is None or n_support < 1:
            raise ValueError("give x_init or a positive n_support.")
        pool = torch.cat(ys).cpu().numpy()
        prob = torch.cat([lam[k] * bs[k] for k in range(n_meas)]).cpu().numpy()
        prob = prob / prob.sum()
        n_pos = int((prob > 0).sum())
        rng = resolve_rng(seed)
        idx = rng.choice(pool.shape[0], size=n_support, replace=n_support > n_pos, p=prob)
        x = torch.from_numpy(pool[idx]).to(device=dev, dtype=dt)
    n = x.shape[0]
    w = _normalised(support_weights, n, "support_weights", dev, dt)

    def _geom(xs: torch.Tensor, y: torch.Tensor) -> PointCloud:
        if batch_size == "auto":
            bsz = None if n * y.shape[0] <= _DENSE_LIMIT else max(1, _DENSE_LIMIT // y.shape[0])
        else:
            bsz = batch_size
        return PointCloud(xs, y, batch_size=bsz)

    if epsilon is None or relative_epsilon:
        mean_cost = sum(
            float(lam[k]) * _geom(x, ys[k]).mean_cost for k in range(n_meas) if float(lam[k]) > 0
        )
        eps = (0.01 if epsilon is None else float(epsilon)) * mean_cost
    else:
        eps = float(epsilon)
    if not eps > 0:
        raise ValueError(f"epsilon must be positive, got {eps}.")
    solver = Sinkhorn(
        epsilon=eps, max_iter=sinkhorn_max_iter, tol=sinkhorn_tol, lse_mode=lse_mode, warn=False
    )
    potentials: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_meas
    displacements: list[float] = []
    costs: list[float] = []
    converged = False
    inner_ok = True
    it = 0
    bar = tqdm(total=max_iter, desc="barycenter", leave=False) if progress else None
    try:
        with torch.no_grad():
            for it in range(1, max_iter + 1):
                x_new = torch.zeros_like(x)
                cost = 0.0
                inner_ok = True
                for k in range(n_meas):
                    if float(lam[k]) == 0.0:
                        continue
                    out = solver(LinearProblem(_geom(x, ys[k]), w, bs[k]), init=potentials[k])
                    potentials[k] = (out.f, out.g)
                    inner_ok = inner_ok and out.converged
                    proj = out.barycentric_projection(ys[k])
                    x_new += lam[k] * proj
                    cost += float(lam[k]) * float(out.primal_cost)
                if not torch.isfinite(x_new).all():
                    raise FloatingPointError(
                        "barycentre update produced NaN (a support point lost all its mass); "
                        "increase epsilon or use lse_mode=True."
                    )
                disp = float((w * ((x_new - x) ** 2).sum(1)).sum())
                x = x_new
                displacements.append(disp)
                costs.append(cost)
                logger.debug("barycenter iteration %d: displacement %.3e", it, disp)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(displacement=f"{disp:.2e}")
                if disp < tol:
                    converged = True
                    break
    finally:
        if bar is not None:
            bar.close()
    if not converged:
        last = displacements[-1] if displacements else math.nan
        warnings.warn(
            f"free_support_barycenter did not converge in {it} iterations (displacement "
            f"{last:.3g}, tol {tol:.3g}; last Sinkhorn solves converged: {inner_ok}).",
            ConvergenceWarning,
            stacklevel=2,
        )
    elif not inner_ok:
        logger.info(
            "free_support_barycenter: support converged but the last Sinkhorn solves did not "
            "reach sinkhorn_tol=%.3g (raise sinkhorn_max_iter or epsilon).",
            sinkhorn_tol,
        )
    return BarycenterOutput(
        locations=x,
        weights=w,
        displacements=np.asarray(displacements),
        costs=np.asarray(costs),
        converged=converged,
        sinkhorn_converged=inner_ok,
        n_iter=it,
        epsilon=eps,
        timings={"solve": time.perf_counter() - t0},
    )
