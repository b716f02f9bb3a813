"""Transfer of labels and values from one slice to another along a sparse plan.

A transport plan ``P`` between the spots of two aligned slices says how much of each
source spot's mass goes to each target spot. Everything a source spot carries can be
moved along it, without a dense ``n x m`` array (only sparse products with ``P``):

- :func:`transfer_labels` -- categorical labels. A target spot receives, from each
  class, the plan mass of the source spots of that class (``P^T`` times the sparse
  one-hot matrix of the source labels); it gets the class with the largest mass, with
  **confidence** that class's share of the spot's incoming mass.
- :func:`transfer_values` -- continuous values (a gene, a score, a ``(n, p)`` array):
  the barycentric projection, the plan-weighted mean ``sum_i P_ij v_i / sum_i P_ij``.

Target spots that receive no mass, or less than ``min_mass`` times the mean incoming
mass per target spot, get no result (a missing label, NaN) unless
``fallback="nearest"``: then they take the result of the nearest target spot that has
one, in the target slice's own coordinates (a rigid alignment does not change which
spot is nearest, so its aligned coordinates serve equally).

The plan can be oriented either way: ``axis=0`` when the source spots are its rows
(:func:`chronotope.slices.align_pair` and :func:`chronotope.tl.align_slices` store rows =
reference / partner spots, columns = moving spots, so labels of the reference go to
the moving slice with ``axis=0``), ``axis=1`` when they are its columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.spatial import cKDTree

from chronotope._errors import ChronotopeInputError
from chronotope._validate import check_finite

__all__ = ["LabelTransfer", "transfer_labels", "transfer_values"]


@dataclass
class LabelTransfer:
    """Result of :func:`transfer_labels`, one entry per target spot.

    Attributes
    ----------
    labels
        Transferred labels (categories: those of the source); missing where the spot
        received too little mass and no fallback was asked for.
    confidence
        Share of the spot's incoming mass that came from spots of its label, in
        ``(0, 1]``; NaN where the label is missing or came from the fallback.
    mass
        Incoming plan mass of each target spot (from labelled source spots).
    filled
        Whether the label came from the fallback (the nearest labelled target spot).
    """

    labels: pd.Categorical
    confidence: np.ndarray
    mass: np.ndarray
    filled: np.ndarray


def _oriented_plan(
    plan: sp.spmatrix | sp.sparray | np.ndarray, n_source: int, axis: int
) -> sp.csr_matrix:
    """The plan as a ``(n_target, n_source)`` CSR matrix, validated."""
    if axis not in (0, 1):
        raise ChronotopeInputError(
            f"axis must be 0 (source spots are the plan's rows) or 1 (its columns), got {axis!r}"
        )
    if not sp.issparse(plan):
        plan = np.asarray(plan)
        if plan.ndim != 2:
            raise ChronotopeInputError(f"the plan must be a 2-D matrix, got {plan.ndim}-D")
    p = sp.csr_matrix(plan, dtype=np.float64)
    side = "rows" if axis == 0 else "columns"
    if p.shape[axis] != n_source:
        raise ChronotopeInputError(
            f"the plan has shape {p.shape}: {p.shape[axis]} {side}, but {n_source} source "
            f"values were given (axis={axis}: the source spots are the plan's {side})"
        )
    check_finite(p, "the plan")
    if p.nnz and p.data.min() < 0:
        raise ChronotopeInputError("plan weights must be non-negative")
    if not p.sum() > 0:
        raise ChronotopeInputError("the plan has no mass: nothing to transfer along it")
    return p.T.tocsr() if axis == 0 else p


def _check_min_mass(min_mass: float) -> None:
    if not 0.0 <= min_mass <= 1.0:
        raise ChronotopeInputError(
            f"min_mass must be in [0, 1] (a fraction of the mean incoming mass), got {min_mass}"
        )


def _received(mass: np.ndarray, min_mass: float) -> np.ndarray:
    """Target spots with enough incoming mass (at least one whenever the plan has mass)."""
    return (mass > 0) & (mass >= min_mass * mass.mean())


def _nearest_source(
    coords: np.ndarray | None, n_target: int, has: np.ndarray, fallback: str | None
) -> np.ndarray | None:
    """For each target spot without a result, the index of the nearest one with one."""
    if fallback is None:
        return None
    if fallback != "nearest":
        raise ChronotopeInputError(f"fallback must be None or 'nearest', got {fallback!r}")
    if coords is None:
        raise ChronotopeInputError(
            "fallback='nearest' needs coords: the target spots' coordinates (n_target, d)"
        )
    xy = np.asarray(coords, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[0] != n_target:
        raise ChronotopeInputError(
            f"coords has shape {xy.shape}; expected ({n_target}, d), one row per target spot"
        )
    check_finite(xy, "coords")
    donors = np.flatnonzero(has)
    need = np.flatnonzero(~has)
    nearest = np.arange(n_target)
    if need.size:
        _, k = cKDTree(xy[donors]).query(xy[need])
        nearest[need] = donors[k]
    return nearest


def transfer_labels(
    plan: sp.spmatrix | sp.sparray | np.ndarray,
    labels: Sequence[object] | np.ndarray | pd.Series | pd.Categorical,
    *,
    axis: Literal[0, 1],
    categories: Sequence[object] | None = None,
    min_mass: float = 0.0,
    ignore_missing: bool = False,
    fallback: Literal["nearest"] | None = None,
    coords: np.ndarray | None = None,
) -> LabelTransfer:
    """Categorical labels of the source spots, carried to the target spots.

    Parameters
    ----------
    plan
        Non-negative transport plan between the source and the target spots (sparse,
        or dense on small data), oriented as ``axis`` says.
    labels
        One label per source spot (strings, integers, a categorical).
    axis
        The plan axis along which the source spots lie: ``0`` when they are its rows
        (the reference of :func:`chronotope.slices.align_pair`, whose labels go to the
        moving slice), ``1`` when they are its columns.
    categories
        The classes, in order (default: those of a categorical ``labels``, else the
        sorted distinct labels). A label outside them is an error.
    min_mass
        A target spot whose incoming mass is below ``min_mass`` times the mean incoming
        mass per target spot gets no label (``0``: only spots with no mass at all).
        In ``[0, 1]``.
    ignore_missing
        Let source spots without a label (NaN / None) carry no vote: their plan mass is
        left out, as if they were not in the plan. By default they are an error.
    fallback
        ``"nearest"``: a target spot without a label takes that of the nearest target
        spot with one (in ``coords``). ``None``: it stays missing.
    coords
        ``(n_target, d)`` coordinates of the target spots, for ``fallback="nearest"``
        (its own or its aligned coordinates: a rigid transform keeps the nearest spot).

    Returns
    -------
    LabelTransfer
        ``labels``, ``confidence``, ``mass`` and ``filled`` per target spot.

    Raises
    ------
    ChronotopeInputError
        On a plan whose size along ``axis`` is not the number of labels, a plan with
        negative or non-finite weights or without mass, missing source labels (unless
        ``ignore_missing``), labels outside ``categories``, or ``fallback="nearest"``
        without ``coords`` of the right shape.
    """
    lab = labels.to_numpy() if isinstance(labels, pd.Series) else labels
    if isinstance(lab, pd.Categorical):
        cats = lab.categories if categories is None else pd.Index(categories)
        codes = pd.Categorical(lab, categories=cats).codes
        missing = np.asarray(pd.isna(lab))
    else:
        lab = np.asarray(lab, dtype=object)
        if lab.ndim != 1:
            raise ChronotopeInputError(f"labels must be 1-D, one per source spot, got {lab.shape}")
        missing = np.asarray(pd.isna(lab))
        if categories is None:
            cats = pd.Index(np.unique(lab[~missing])) if (~missing).any() else pd.Index([])
        else:
            cats = pd.Index(categories)
        codes = pd.Categorical(lab, categories=cats).codes
    if not cats.is_unique:
        raise ChronotopeInputError("categories must be unique")
    codes = np.asarray(codes, dtype=np.int64)
    outside = (codes < 0) & ~missing
    if outside.any():
        shown = ", ".join(map(repr, pd.unique(np.asarray(lab, dtype=object)[outside])[:5]))
        raise ChronotopeInputError(
            f"{int(outside.sum())} source label(s) are not among the categories: {shown}"
        )
    if missing.any() and not ignore_missing:
        raise ChronotopeInputError(
            f"{int(missing.sum())} of {missing.size} source spots have no label (NaN); pass "
            "ignore_missing=True to let them carry no vote"
        )
    _check_min_mass(min_mass)
    p = _oriented_plan(plan, codes.size, axis)  # (n_target, n_source)
    n_target, n_source = p.shape
    ok = np.flatnonzero(codes >= 0)
    onehot = sp.csr_matrix((np.ones(ok.size), (ok, codes[ok])), shape=(n_source, max(len(cats), 1)))
    votes = (p @ onehot).tocsr()  # (n_target, n_classes): mass received from each class
    mass = np.asarray(votes.sum(axis=1)).ravel()
    if not mass.sum() > 0:
        raise ChronotopeInputError("no labelled source spot carries plan mass")
    best = np.asarray(votes.argmax(axis=1)).ravel()
    top = np.asarray(votes.max(axis=1).todense()).ravel()
    has = _received(mass, min_mass)
    out_codes = np.where(has, best, -1)
    confidence = np.full(n_target, np.nan)
    confidence[has] = top[has] / mass[has]
    filled = np.zeros(n_target, dtype=bool)
    nearest = _nearest_source(coords, n_target, has, fallback)
    if nearest is not None:
        filled = ~has
        out_codes = out_codes[nearest]
    return LabelTransfer(
        labels=pd.Categorical.from_codes(out_codes, categories=cats),
        confidence=confidence,
        mass=mass,
        filled=filled,
    )


def transfer_values(
    plan: sp.spmatrix | sp.sparray | np.ndarray,
    values: np.ndarray | sp.spmatrix | sp.sparray,
    *,
    axis: Literal[0, 1],
    min_mass: float = 0.0,
    fallback: Literal["nearest"] | None = None,
    coords: np.ndarray | None = None,
) -> np.ndarray:
    """Barycentric projection of continuous source values onto the target spots.

    Each target spot ``j`` receives ``sum_i P_ij v_i / sum_i P_ij`` over source spots
    ``i`` (for ``axis=0``; the transpose for ``axis=1``).

    Parameters
    ----------
    plan
        Non-negative transport plan (sparse, or dense on small data).
    values
        ``(n_source,)`` or ``(n_source, p)`` finite values (dense or sparse, e.g. an
        expression matrix).
    axis
        The plan axis along which the source spots lie (``0``: rows, ``1``: columns).
    min_mass
        Target spots receiving less than ``min_mass`` times the mean incoming mass per
        target spot get NaN (``0``: only spots with no mass). In ``[0, 1]``.
    fallback
        ``"nearest"``: such spots take the value of the nearest target spot with one
        (in ``coords``). ``None``: they stay NaN.
    coords
        ``(n_target, d)`` target coordinates, for ``fallback="nearest"``.

    Returns
    -------
    numpy.ndarray
        ``(n_target,)`` or ``(n_target, p)`` float64, NaN rows where nothing arrived.

    Raises
    ------
    ChronotopeInputError
        On mismatched shapes, non-finite values or plan weights, negative weights, a
        plan without mass, or ``fallback="nearest"`` without ``coords``.
    """
    if sp.issparse(values):
        v = sp.csr_matrix(values, dtype=np.float64)
    else:
        v = np.asarray(values, dtype=np.float64)
    if v.ndim not in (1, 2):
        raise ChronotopeInputError(f"values must be 1-D or 2-D, got shape {v.shape}")
    check_finite(v, "values")
    _check_min_mass(min_mass)
    p = _oriented_plan(plan, v.shape[0], axis)
    mass = np.asarray(p.sum(axis=1)).ravel()
    moved = p @ v
    moved = moved.toarray() if sp.issparse(moved) else np.asarray(moved, dtype=np.float64)
    has = _received(mass, min_mass)
    out = np.full(moved.shape, np.nan)
    out[has] = moved[has] / (mass[has] if moved.ndim == 1 else mass[has, None])
    nearest = _nearest_source(coords, p.shape[0], has, fallback)
    return out if nearest is None else out[nearest]
