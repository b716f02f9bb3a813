"""``tl.transfer_labels``: labels of one slice carried to another along the alignment plan."""

from __future__ import annotations

import logging
import warnings
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from chronotope._errors import ChronotopeInputError

__all__ = ["transfer_labels"]

logger = logging.getLogger(__name__)

# A plan between the right two slices pairs spots about a spot spacing apart in the
# aligned frame; a stored plan whose pairs are further apart than this (in spot
# spacings, plan-weighted mean) was made for another pair of slices.
_PAIRING_SPACINGS = 5.0


def _spacing(xy: np.ndarray) -> float:
    from scipy.spatial import cKDTree

    if xy.shape[0] < 2:
        return 1.0
    return float(np.median(cKDTree(xy).query(xy, k=2)[0][:, 1])) or 1.0


def _pair_distance(plan: sp.csr_matrix, xy_source: np.ndarray, xy_target: np.ndarray) -> float:
    """Plan-weighted mean distance between paired spots, in target spot spacings."""
    p = plan.tocoo()  # rows = source, columns = target
    d = np.linalg.norm(xy_source[p.row] - xy_target[p.col], axis=1)
    return float((p.data * d).sum() / p.data.sum()) / _spacing(xy_target)


def _stored_plan(adata: AnnData, source: AnnData, aligned_key: str) -> tuple[sp.csr_matrix, str]:
    """The plan tl.align_slices stored between the two slices, rows = source spots."""
    shape = (source.n_obs, adata.n_obs)
    found: list[tuple[sp.csr_matrix, str]] = []
    for owner, name, transpose in ((adata, "adata", False), (source, "source", True)):
        entry = owner.uns.get("alignment")
        if isinstance(entry, dict) and entry.get("plan") is not None:
            p = sp.csr_matrix(entry["plan"])
            found.append((p.T.tocsr() if transpose else p, f"{name}.uns['alignment']['plan']"))
    if not found:
        joint = "alignment_plan" in adata.obsp or "alignment_plan" in source.obsp
        hint = (
            " Slices aligned jointly (one AnnData with batch_key) keep their plans in "
            "obsp['alignment_plan'] (rows = partner spots, columns = moving spots): pass "
            "plan=joint.obsp['alignment_plan'][partner_rows][:, moving_rows] with axis=0 "
            "if source is the partner slice, axis=1 if it is the moving one."
            if joint
            else " Run chronotope.tl.align_slices([source, adata]) first, or pass plan=."
        )
        raise ChronotopeInputError(
            "neither slice holds a plan in uns['alignment']['plan'] (a slice gets one when "
            "tl.align_slices aligned it onto a partner; the reference has none)." + hint
        )
    fits = [(p, where) for p, where in found if p.shape == shape]
    if not fits:
        have = ", ".join(f"{where} {p.shape}" for p, where in found)
        raise ChronotopeInputError(
            f"no stored plan pairs these slices: source has {source.n_obs} spots and adata "
            f"{adata.n_obs}, so a plan of shape {shape} (or its transpose on the source) is "
            f"needed; found {have}. Were they aligned with each other? Pass plan= otherwise."
        )
    if aligned_key in adata.obsm and aligned_key in source.obsm:
        # A stored plan of the right shape may still belong to another pair of slices
        # (e.g. two slices of one size aligned onto a third): its pairs then lie far
        # apart in the common frame. Keep the plan whose pairs are closest.
        xs = np.asarray(source.obsm[aligned_key], dtype=np.float64)
        xt = np.asarray(adata.obsm[aligned_key], dtype=np.float64)
        dist = [_pair_distance(p, xs, xt) for p, _ in fits]
        best = int(np.argmin(dist))
        if dist[best] > _PAIRING_SPACINGS:
            raise ChronotopeInputError(
                f"the stored plan(s) of the right shape ({', '.join(w for _, w in fits)}) "
                f"pair spots {dist[best]:.1f} spot spacings apart in obsm[{aligned_key!r}]: "
                "they were made for another pair of slices (with policy='star' or "
                "'sequential' only aligned neighbours share a plan). Pass plan=."
            )
        return fits[best]
    return fits[0]


def transfer_labels(
    adata: AnnData,
    source: AnnData,
    plan: sp.spmatrix | sp.sparray | np.ndarray | None = None,
    *,
    key: str,
    key_added: str | None = None,
    axis: Literal[0, 1] | None = None,
    min_mass: float = 0.0,
    ignore_missing: bool = False,
    fallback: Literal["nearest"] | None = None,
    aligned_key: str = "spatial_aligned",
    copy: bool = False,
) -> AnnData | None:
    """Transfer categorical labels from ``source`` to ``adata`` along an alignment plan.

    Each spot of ``adata`` gets the label whose source spots send it the most plan mass
    (:func:`chronotope.slices.transfer_labels`), and the share of its incoming mass that
    label carries as confidence.

    Parameters
    ----------
    adata
        The target slice, which receives the labels.
    source
        The slice with labels in ``obs[key]``.
    plan
        Transport plan between the two slices. Default: the one
        :func:`chronotope.tl.align_slices` stored, ``adata.uns["alignment"]["plan"]``
        (when ``adata`` was aligned onto ``source``: rows = source spots) or else
        ``source.uns["alignment"]["plan"]`` transposed (when ``source`` was aligned onto
        ``adata``).
    key
        ``source.obs`` column of labels.
    key_added
        ``adata.obs`` column to write (default ``f"{key}_transferred"``).
    axis
        For an explicit ``plan``: ``0`` when its rows are the source spots (the layout
        of ``align_slices``' plans when ``adata`` is the moving slice), ``1`` when its
        columns are. Default: from the plan's shape (which must then not be square).
    min_mass
        Spots receiving less than this fraction of the mean incoming mass per spot get
        no label (``0``: only spots with no mass), in ``[0, 1]``.
    ignore_missing
        Let unlabelled source spots (NaN) carry no vote instead of raising.
    fallback
        ``"nearest"``: spots without a label take that of the nearest labelled spot of
        ``adata`` (in ``obsm[aligned_key]``, or ``obsm["spatial"]`` when absent).
    aligned_key
        ``obsm`` key of the aligned coordinates (used for the fallback and, when both
        slices carry it, to choose between two stored plans of the same shape).
    copy
        Return a modified copy instead of writing to ``adata``.

    Returns
    -------
    AnnData or None
        The copy when ``copy=True``. Writes ``adata.obs[key_added]`` (categorical, the
        source's categories; missing where no label arrived),
        ``adata.obs[key_added + "_confidence"]`` (float, NaN where missing or filled by
        the fallback) and ``adata.uns[key_added]`` (``params``, how many spots are
        missing or filled, where the plan came from). ``.X`` is not touched.
    """
    from chronotope.slices.transfer import transfer_labels as _transfer

    if not isinstance(adata, AnnData) or not isinstance(source, AnnData):
        raise ChronotopeInputError("adata and source must both be AnnData objects")
    if key not in source.obs:
        have = ", ".join(map(repr, source.obs.columns[:10])) or "none"
        raise ChronotopeInputError(f"source.obs[{key!r}] not found (have: {have})")
    col = source.obs[key]
    if pd.api.types.is_float_dtype(col):
        vals = col.to_numpy(dtype=np.float64)
        fin = vals[np.isfinite(vals)]
        if not np.array_equal(fin, np.round(fin)):
            raise ChronotopeInputError(
                f"source.obs[{key!r}] holds continuous values; transfer_labels moves "
                "categories (for values use chronotope.slices.transfer_values)"
            )
    key_added = f"{key}_transferred" if key_added is None else key_added
    if plan is None:
        p, origin = _stored_plan(adata, source, aligned_key)
        ax = 0
    else:
        if not sp.issparse(plan):
            plan = np.asarray(plan)
            if plan.ndim != 2:
                raise ChronotopeInputError(f"plan must be a 2-D matrix, got {plan.ndim}-D")
        p, origin = plan, "plan argument"
        if axis is None:
            shape = tuple(plan.shape)
            if shape == (source.n_obs, adata.n_obs) and shape[0] != shape[1]:
                ax = 0
            elif shape == (adata.n_obs, source.n_obs) and shape[0] != shape[1]:
                ax = 1
            elif shape == (source.n_obs, adata.n_obs):
                raise ChronotopeInputError(
                    f"the plan is square {shape}: pass axis=0 if its rows are the source "
                    "spots, axis=1 if its columns are"
                )
            else:
                raise ChronotopeInputError(
                    f"plan has shape {shape}; expected ({source.n_obs}, {adata.n_obs}) "
                    f"(rows = source spots) or ({adata.n_obs}, {source.n_obs})"
                )
        else:
            ax = axis
            want = (source.n_obs, adata.n_obs) if ax == 0 else (adata.n_obs, source.n_obs)
            if ax in (0, 1) and tuple(plan.shape) != want:
                raise ChronotopeInputError(
                    f"plan has shape {tuple(plan.shape)}; with axis={ax} it must be {want} "
                    f"({'rows' if ax == 0 else 'columns'} = the {source.n_obs} source spots)"
                )
    coords = None
    if fallback is not None:
        ckey = aligned_key if aligned_key in adata.obsm else "spatial"
        if ckey not in adata.obsm:
            raise ChronotopeInputError(
                f"fallback='nearest' needs coordinates: adata.obsm[{aligned_key!r}] (written "
                "by tl.align_slices) or adata.obsm['spatial']"
            )
        coords = np.asarray(adata.obsm[ckey], dtype=np.float64)
    res = _transfer(
        p,
        col.array if isinstance(col.dtype, pd.CategoricalDtype) else col.to_numpy(),
        axis=ax,
        min_mass=min_mass,
        ignore_missing=ignore_missing,
        fallback=fallback,
        coords=coords,
    )
    target = adata.copy() if copy else adata
    target.obs[key_added] = res.labels
    target.obs[f"{key_added}_confidence"] = res.confidence
    n_missing = int(pd.isna(res.labels).sum())
    n_filled = int(res.filled.sum())
    target.uns[key_added] = {
        "params": {
            "key": key,
            "min_mass": float(min_mass),
            "ignore_missing": bool(ignore_missing),
            "fallback": "none" if fallback is None else fallback,
            "plan": origin,
        },
        "n_missing": n_missing,
        "n_filled": n_filled,
    }
    if n_missing and fallback is None and min_mass == 0:
        warnings.warn(
            f"{n_missing} of {adata.n_obs} spots received no label (no plan mass); "
            "fallback='nearest' gives them the nearest spot's label",
            UserWarning,
            stacklevel=2,
        )
    logger.info(
        "transferred %s to %d spots (%d missing, %d filled by %s); median confidence %.3f",
        key,
        adata.n_obs,
        n_missing,
        n_filled,
        fallback,
        float(np.nanmedian(res.confidence)) if np.isfinite(res.confidence).any() else np.nan,
    )
    return target if copy else None
