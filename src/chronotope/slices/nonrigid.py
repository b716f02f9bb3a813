"""Non-rigid refinement of an aligned slice: a smooth displacement field fitted to a plan.

A rigid transform cannot follow a section that was stretched or folded while it was
cut and mounted. After :func:`chronotope.slices.align_pair`, the plan ``P`` (rows =
reference spots ``y_i``, columns = moving spots ``x_j`` already in the reference frame)
says where each moving spot's mass went. :func:`fit_displacement` turns that into a
displacement ``u_j`` per moving spot, so that ``x_j + u_j`` is the non-rigidly aligned
slice:

1. **Raw displacement.** The barycentric target of each moving spot that receives mass,
   ``t_j = sum_i P_ij y_i / w_j`` with ``w_j = sum_i P_ij``, and ``r_j = t_j - x_j``.
2. **Smooth field.** On the moving slice's spatial kNN graph (Laplacian ``L``), ``u``
   minimises

   .. math:: \\sum_j \\tilde w_j \\lVert u_j - r_j \\rVert^2 + \\lambda\\, u^\\top L u ,

   with ``w~ = w / mean(w)`` (a spot of average mass has weight 1): the normal equations
   ``(W + lambda L) u = W r`` are one sparse symmetric positive definite system,
   factorised once and solved per coordinate. Spots without mass (``w_j = 0``) get the
   harmonic extension of the field around them (a tiny ridge keeps the system
   definite, so a part of the slice with no mass anywhere gets no displacement).

The smoothness is set as a length in spot spacings, not as ``lambda``: for
neighbours at distance ``l`` around a spot, ``(L u)_j ~ -(sum l^2 / 2d) Laplace(u)``,
so on a slice of spot spacing ``h`` the field's response to a displacement pattern of
wavelength ``Lambda`` is ``1 / (1 + (2 pi s h / Lambda)^2)`` for a spot of average mass,
with ``s = smoothness`` and ``lambda = s^2 / c`` (``c``: the mean of
``sum l^2 / (2 d h^2)`` over spots). A field with ``s = 2`` keeps about 90 % of a
pattern 40 spacings long (about half a Visium section) and damps spot-to-spot noise
(wavelength 2 to 3 spacings) about 20-fold in amplitude; this does not depend on the
units of the coordinates, the spot spacing or ``n_neighbors``.

The field can only be as good as the plan. The fine plan of
:func:`chronotope.slices.align_pair` adds the squared distance (in spot spacings) to the
expression cost, which holds pairs near the rigid positions: on DLPFC 151673 against a
copy of itself warped by 2 spot spacings (wavelength 33 spacings) and rotated, one
pass brings the RMSE from 1.94 to 1.76 spacings with the default plan and to 1.38 with
``align_pair(..., spatial_weight=0.1)``; with the exact pairs it would be 0.24 (the
smoothing's own bias at ``smoothness=2``).

Only sparse matrices are formed (the plan, the kNN graph, ``W + lambda L``); memory
grows with the number of spots and plan entries.
"""

from __future__ import annotations

import logging
import warnings
from typing import Literal

import numpy as np
import scipy.sparse as sp
from scipy.sparse import linalg as spla
from scipy.spatial import cKDTree

from chronotope._errors import ChronotopeInputError, ConvergenceWarning
from chronotope._validate import check_finite

__all__ = ["fit_displacement"]

logger = logging.getLogger(__name__)

# Ridge (relative to a spot of average mass) that keeps W + lambda L definite on parts
# of the kNN graph without any mass.
_RIDGE = 1e-8
# Above this many moving spots, "auto" solves with conjugate gradients instead of a
# sparse LU factorisation.
_DIRECT_MAX = 200_000


def _spacing(xy: np.ndarray) -> float:
    d = cKDTree(xy).query(xy, k=2)[0][:, 1]
    h = float(np.median(d))
    if not h > 0:
        raise ChronotopeInputError(
            "the moving slice's spots coincide (median nearest-neighbour distance 0)"
        )
    return h


def _cg(
    a: sp.spmatrix, b: np.ndarray, x0: np.ndarray, tol: float, maxiter: int, precond: sp.spmatrix
) -> tuple[np.ndarray, int]:
    try:
        return spla.cg(a, b, x0=x0, rtol=tol, maxiter=maxiter, M=precond)
    except TypeError:  # scipy < 1.12 names the tolerance ``tol``
        return spla.cg(a, b, x0=x0, tol=tol, maxiter=maxiter, M=precond)


def fit_displacement(
    coords_ref: np.ndarray,
    coords_mov_aligned: np.ndarray,
    plan: sp.spmatrix | sp.sparray | np.ndarray,
    *,
    smoothness: float = 2.0,
    n_neighbors: int = 8,
    solver: Literal["auto", "direct", "cg"] = "auto",
    tol: float = 1e-8,
) -> np.ndarray:
    """Smooth displacement of the (rigidly aligned) moving spots towards their partners.

    Parameters
    ----------
    coords_ref
        ``(n, d)`` coordinates of the reference spots (the plan's rows).
    coords_mov_aligned
        ``(m, d)`` coordinates of the moving spots (the plan's columns) in the
        reference frame, e.g. :attr:`chronotope.slices.PairAlignment.aligned`.
    plan
        ``(n, m)`` non-negative transport plan (sparse; dense is accepted on small
        data), e.g. :attr:`chronotope.slices.PairAlignment.plan`.
    smoothness
        Length scale of the field in spot spacings of the moving slice (see the module
        notes): a displacement pattern of wavelength ``Lambda`` spacings is kept with
        factor ``1 / (1 + (2 pi smoothness / Lambda)^2)``. Larger is smoother; ``0``
        returns the raw displacement (zero for spots without mass).
    n_neighbors
        Neighbours per spot in the kNN graph of the moving slice.
    solver
        ``"direct"`` (sparse LU, factorised once), ``"cg"`` (conjugate gradients with a
        Jacobi preconditioner, for very large slices) or ``"auto"`` (direct up to
        200,000 spots).
    tol
        Relative residual tolerance of ``"cg"``.

    Returns
    -------
    numpy.ndarray
        ``(m, d)`` displacement; ``coords_mov_aligned + displacement`` is the
        non-rigidly aligned moving slice. Its size in spot spacings (median, 95th
        percentile, maximum) is logged at INFO level on the ``chronotope`` logger.

    Raises
    ------
    ChronotopeInputError
        On coordinates that are not ``(n, d)`` / ``(m, d)`` with one ``d``, a plan of
        another shape or with negative or non-finite weights, a plan without mass, or
        invalid ``smoothness`` / ``n_neighbors`` / ``solver``.
    """
    y = np.asarray(coords_ref, dtype=np.float64)
    x = np.asarray(coords_mov_aligned, dtype=np.float64)
    if y.ndim != 2 or x.ndim != 2 or y.shape[1] != x.shape[1] or min(y.shape[0], x.shape[0]) < 2:
        raise ChronotopeInputError(
            f"coords_ref {y.shape} and coords_mov_aligned {x.shape} must be (n, d) and "
            "(m, d) with one d and at least 2 spots each"
        )
    check_finite(y, "coords_ref")
    check_finite(x, "coords_mov_aligned")
    if not np.isfinite(smoothness) or smoothness < 0:
        raise ChronotopeInputError(f"smoothness must be >= 0 (spot spacings), got {smoothness}")
    if int(n_neighbors) != n_neighbors or n_neighbors < 1:
        raise ChronotopeInputError(f"n_neighbors must be a positive integer, got {n_neighbors}")
    if solver not in ("auto", "direct", "cg"):
        raise ChronotopeInputError(f"solver must be 'auto', 'direct' or 'cg', got {solver!r}")
    if not sp.issparse(plan):
        plan = np.asarray(plan)
    p = sp.csr_matrix(plan, dtype=np.float64)
    if p.shape != (y.shape[0], x.shape[0]):
        raise ChronotopeInputError(
            f"plan has shape {p.shape}; expected {(y.shape[0], x.shape[0])} "
            "(rows = reference spots, columns = moving spots)"
        )
    check_finite(p, "the plan")
    if p.nnz and p.data.min() < 0:
        raise ChronotopeInputError("plan weights must be non-negative")
    total = float(p.sum())
    if not total > 0:
        raise ChronotopeInputError("the plan has no mass: nothing to fit a displacement to")

    m, d = x.shape
    w = np.asarray(p.sum(axis=0)).ravel()
    has = w > 0
    raw = np.zeros_like(x)
    raw[has] = (p.T @ y)[has] / w[has, None] - x[has]
    w = w / (total / m)  # a spot of average mass has weight 1

    from chronotope.graph import knn_graph

    k = min(int(n_neighbors), m - 1)
    conn, _ = knn_graph(x, k)
    conn = sp.csr_matrix(conn, dtype=np.float64)
    h = _spacing(x)
    deg = np.asarray(conn.sum(axis=1)).ravel()
    lap = (sp.diags(deg) - conn).tocsr()
    coo = conn.tocoo()
    sq = ((x[coo.row] - x[coo.col]) ** 2).sum(axis=1) / h**2
    c = float(np.bincount(coo.row, weights=sq, minlength=m).mean()) / (2.0 * d)
    lam = smoothness**2 / c
    a = (sp.diags(w + _RIDGE) + lam * lap).tocsc()
    rhs = w[:, None] * raw
    use_cg = solver == "cg" or (solver == "auto" and m > _DIRECT_MAX)
    if use_cg:
        precond = sp.diags(1.0 / a.diagonal())
        u = np.empty_like(x)
        for col in range(d):
            sol, status = _cg(a, rhs[:, col], raw[:, col], tol, 10 * m, precond)
            if status != 0:
                warnings.warn(
                    f"conjugate gradients did not reach tol={tol} (coordinate {col})",
                    ConvergenceWarning,
                    stacklevel=2,
                )
            u[:, col] = sol
    else:
        solve = spla.factorized(a)
        u = np.column_stack([solve(rhs[:, col]) for col in range(d)])
    size = np.linalg.norm(u, axis=1) / h
    logger.info(
        "non-rigid displacement (smoothness %.3g spacings): median %.2f, 95th percentile "
        "%.2f, max %.2f spot spacings; %d of %d spots without mass",
        smoothness,
        float(np.median(size)),
        float(np.percentile(size, 95)),
        float(size.max()),
        int((~has).sum()),
        m,
    )
    return u
