"""Explicit, optional expression preprocessing on AnnData.

Every function reads one source matrix (``adata.X`` or a layer) and writes its result
under a new key; ``adata.X`` is never modified. Sparse input stays sparse: sums,
means and variances are taken over the stored values, and only the outputs that are
dense by nature (the scaled feature matrix, principal components) are dense.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from chronotope._errors import ChronotopeInputError
from chronotope._validate import check_counts, check_finite

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = [
    "highly_variable_genes",
    "log1p",
    "normalize_total",
    "pca",
    "preprocess",
    "scale",
]

logger = logging.getLogger("chronotope")

_FLAVORS = ("seurat_v3", "seurat")
_MAKERS = {
    "normalized": "chronotope.pp.normalize_total",
    "log1p": "chronotope.pp.log1p",
}
# Stored values per span when sparse values are processed piecewise.
_ENTRY_CHUNK = 1 << 20
# Rows per block when a dense matrix is processed piecewise (bounds float64 temporaries).
_ROW_CHUNK = 4096

Matrix = np.ndarray | sp.spmatrix | sp.sparray


# ---- helpers: reading inputs ---------------------------------------------------------


def _source_name(layer: str | None) -> str:
    return "adata.X" if layer is None else f"adata.layers[{layer!r}]"


def _get_matrix(adata: AnnData, layer: str | None) -> Matrix:
    """Return ``adata.X`` (``layer=None``) or ``adata.layers[layer]``, or raise."""
    if layer is None:
        if adata.X is None:
            raise ChronotopeInputError("adata.X is empty (None); pass layer= to read a layer.")
        return adata.X
    if layer not in adata.layers:
        have = ", ".join(map(repr, adata.layers.keys())) or "none"
        hint = f" Run {_MAKERS[layer]} first, or pass another layer." if layer in _MAKERS else ""
        raise ChronotopeInputError(f"adata.layers[{layer!r}] not found (have: {have}).{hint}")
    return adata.layers[layer]


def _check_shape(x: Matrix, name: str) -> None:
    if x.ndim != 2:
        raise ChronotopeInputError(f"{name} must be 2-D (observations x genes), got {x.ndim}-D.")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ChronotopeInputError(f"{name} is empty (shape {tuple(x.shape)}).")


def _check_nonnegative(x: Matrix, name: str, what: str) -> None:
    _check_shape(x, name)
    check_finite(x, name)
    vals = np.asarray(x.data) if sp.issparse(x) else np.asarray(x)
    if vals.size and vals.min() < 0:
        raise ChronotopeInputError(
            f"{name} contains negative values (min {vals.min():.3g}); {what} is expected."
        )


def _check_not_all_zero(x: Matrix, name: str) -> None:
    vals = np.asarray(x.data) if sp.issparse(x) else np.asarray(x)
    if not np.any(vals):
        raise ChronotopeInputError(f"{name} is all zero; there is nothing to preprocess.")


def _is_integer_valued(x: Matrix) -> bool:
    vals = np.asarray(x.data) if sp.issparse(x) else np.asarray(x)
    if vals.dtype.kind in "iub":
        return True
    flat = vals.reshape(-1)
    return all(bool(np.all(np.equal(np.mod(flat[lo:hi], 1), 0))) for lo, hi in _spans(flat.size))


def _spans(n: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` ranges of at most ``_ENTRY_CHUNK`` covering ``range(n)``."""
    return [(lo, min(lo + _ENTRY_CHUNK, n)) for lo in range(0, n, _ENTRY_CHUNK)]


def _canonical_sparse(x: Matrix) -> Matrix:
    """CSR or CSC without duplicate entries; other sparse formats become CSR (a copy)."""
    if x.format not in ("csr", "csc"):
        return x.tocsr()
    if not x.has_canonical_format:
        x = x.copy()
        x.sum_duplicates()
    return x


def _row_of_entries(x: Matrix) -> np.ndarray:
    """Row index of each stored value of a canonical CSR/CSC matrix."""
    if x.format == "csc":
        return x.indices
    return np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))


def _column_sums(
    x: Matrix,
    *,
    clip: np.ndarray | None = None,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-column sum and sum of squares in float64, never densifying sparse input.

    ``transform`` is applied to every value first (it must map 0 to 0), then values are
    capped from above at ``clip`` (one bound per column, all positive).
    """
    n_vars = x.shape[1]
    if sp.issparse(x):
        x = _canonical_sparse(x)
        s1 = np.zeros(n_vars)
        s2 = np.zeros(n_vars)
        # stored values in spans, so that float64 temporaries stay small
        for lo, hi in _spans(x.nnz):
            vals = x.data[lo:hi].astype(np.float64)  # a copy: modified in place below
            if transform is not None:
                vals = transform(vals)
            if x.format == "csr":
                cols = x.indices[lo:hi]
            else:
                cols = np.searchsorted(x.indptr, np.arange(lo, hi), side="right") - 1
            if clip is not None:
                np.minimum(vals, clip[cols], out=vals)
            s1 += np.bincount(cols, weights=vals, minlength=n_vars)
            np.square(vals, out=vals)
            s2 += np.bincount(cols, weights=vals, minlength=n_vars)
        return s1, s2
    s1 = np.zeros(n_vars)
    s2 = np.zeros(n_vars)
    for start in range(0, x.shape[0], _ROW_CHUNK):
        block = np.asarray(x[start : start + _ROW_CHUNK], dtype=np.float64)
        if transform is not None:
            block = transform(block)
        if clip is not None:
            block = np.minimum(block, clip[None, :])
        s1 += block.sum(axis=0)
        s2 += np.square(block).sum(axis=0)
    return s1, s2


def _mean_var(
    x: Matrix, *, transform: Callable[[np.ndarray], np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and unbiased (``ddof=1``) variance in float64."""
    n = x.shape[0]
    s1, s2 = _column_sums(x, transform=transform)
    mean = s1 / n
    var = (s2 / n - mean**2) * (n / max(n - 1, 1))
    return mean, np.maximum(var, 0.0)


def _select_rows(x: Matrix, mask: np.ndarray) -> Matrix:
    if sp.issparse(x):
        x = _canonical_sparse(x)
        return x.tocsr()[mask] if x.format == "csc" else x[mask]
    return x[mask]


def _batches(adata: AnnData, batch_key: str | None) -> list[tuple[str, np.ndarray]]:
    """``(name, row mask)`` per batch, validated."""
    if batch_key is None:
        return [("all", np.ones(adata.n_obs, dtype=bool))]
    if batch_key not in adata.obs:
        have = ", ".join(map(repr, adata.obs.columns)) or "none"
        raise ChronotopeInputError(
            f"batch_key {batch_key!r} is not a column of adata.obs (have: {have})."
        )
    labels = adata.obs[batch_key]
    n_missing = int(labels.isna().sum())
    if n_missing:
        raise ChronotopeInputError(
            f"adata.obs[{batch_key!r}] has {n_missing} missing value(s); every observation "
            "needs a batch."
        )
    codes, names = pd.factorize(labels, sort=True)
    out = []
    for i, name in enumerate(names):
        mask = codes == i
        if mask.sum() < 2:
            raise ChronotopeInputError(
                f"batch {name!r} of adata.obs[{batch_key!r}] has {int(mask.sum())} "
                "observation(s); each batch needs at least 2 to estimate variances."
            )
        out.append((str(name), mask))
    return out


def _highly_variable_mask(adata: AnnData, use_highly_variable: bool, func: str) -> np.ndarray:
    if not use_highly_variable:
        return np.ones(adata.n_vars, dtype=bool)
    if "highly_variable" not in adata.var:
        raise ChronotopeInputError(
            f"{func}(use_highly_variable=True) needs adata.var['highly_variable']. Run "
            "chronotope.pp.highly_variable_genes first, or pass use_highly_variable=False."
        )
    mask = np.asarray(adata.var["highly_variable"], dtype=bool)
    if not mask.any():
        raise ChronotopeInputError("adata.var['highly_variable'] selects no gene.")
    return mask


# ---- loess ---------------------------------------------------------------------------


def _local_quadratic(
    xs: np.ndarray, ys: np.ndarray, u: np.ndarray, q: int, max_block: int
) -> tuple[np.ndarray, np.ndarray]:
    """Value and slope at each ``u`` of the tricube-weighted quadratic fitted to the
    ``q`` points of the sorted ``xs`` nearest to it (as loess's ``ehg127``)."""
    n = xs.size
    # The q nearest points of u form a window xs[lo : lo + q]; the best window is the
    # first with xs[lo] + xs[lo + q - 1] >= 2 u (these sums grow with lo).
    window_sums = xs[: n - q + 1] + xs[q - 1 :]
    lo = np.searchsorted(window_sums, 2 * u, side="left")
    right = np.where(lo <= n - q, xs[np.minimum(lo, n - q) + q - 1] - u, np.inf)
    left = np.where(lo >= 1, u - xs[np.maximum(lo - 1, 0)], np.inf)
    h = np.minimum(left, right)  # distance to the q-th nearest point
    h = np.where(h > 0, h, np.finfo(np.float64).tiny)  # q tied points: weighted mean

    value = np.empty(u.size)
    slope = np.empty(u.size)
    first = np.searchsorted(xs, u - h, side="left")
    last = np.searchsorted(xs, u + h, side="right")
    step = max(1, max_block // max(q, 1))
    for start in range(0, u.size, step):
        sl = slice(start, min(start + step, u.size))
        a, b = int(first[sl].min()), int(last[sl].max())
        xw, yw = xs[a:b], ys[a:b]
        with np.errstate(over="ignore"):  # h == tiny: far points get weight 0
            dist = np.abs(xw[None, :] - u[sl, None]) / h[sl, None]
            w = np.clip(1.0 - dist**3, 0.0, None) ** 3
        # All q nearest points exactly at distance h (tied x): weigh them equally.
        empty = w.sum(axis=1) == 0
        if empty.any():
            w[empty] = dist[empty] <= 1.0
        # A quadratic in t = (x - c) / s spans the same functions as one in x - u; a
        # centre and scale per block keep the normal equations well conditioned.
        c, s = float(np.median(u[sl])), float(h[sl].max())
        t = (xw - c) / s
        basis = np.stack([np.ones_like(t), t, t**2, t**3, t**4, yw, t * yw, t**2 * yw], axis=1)
        m = w @ basis  # (block, 8) weighted moments
        lhs = np.stack([m[:, [0, 1, 2]], m[:, [1, 2, 3]], m[:, [2, 3, 4]]], axis=1)
        rhs = m[:, [5, 6, 7]]
        # Equilibrated pseudo-inverse: fewer than 3 distinct x in a neighbourhood leave a
        # lower-degree fit (one distinct x: the weighted mean), as loess's SVD does.
        diag = np.sqrt(np.diagonal(lhs, axis1=1, axis2=2))
        eq = np.where(diag > 0, 1.0 / np.where(diag > 0, diag, 1.0), 1.0)
        inv = np.linalg.pinv(eq[:, :, None] * lhs * eq[:, None, :], rcond=1e-12)
        beta = eq * (inv @ (eq * rhs)[:, :, None])[:, :, 0]
        tu = (u[sl] - c) / s
        value[sl] = beta[:, 0] + beta[:, 1] * tu + beta[:, 2] * tu**2
        slope[sl] = (beta[:, 1] + 2 * beta[:, 2] * tu) / s
    return value, slope


def _kd_vertices(xs: np.ndarray, fc: int) -> np.ndarray:
    """Vertices of loess's k-d tree on sorted 1-D ``xs`` (``ehg126`` / ``ehg124``).

    The bounding box (widened by 0.5 % of the range) is split at the median point,
    moved off runs of tied values, until a cell holds at most ``fc`` points.
    """
    lo_x, hi_x = float(xs[0]), float(xs[-1])
    margin = 0.005 * max(hi_x - lo_x, 1e-10 * max(abs(lo_x), abs(hi_x)) + 1e-30)
    vertices = [lo_x - margin, hi_x + margin]
    stack = [(0, xs.size - 1, vertices[0], vertices[1])]  # 0-based inclusive point range
    while stack:
        lo, hi, v_lo, v_hi = stack.pop()
        if hi - lo + 1 <= fc:
            continue
        mid = (lo + hi) // 2
        offset = 0
        while lo <= mid + offset < hi:
            if xs[mid + offset] == xs[mid + offset + 1]:
                offset = -offset + (1 if offset <= 0 else 0)
            else:
                mid += offset
                break
        split = float(xs[mid])
        if split in (v_lo, v_hi):
            continue
        vertices.append(split)
        stack.append((lo, mid, v_lo, split))
        stack.append((mid + 1, hi, split, v_hi))
    return np.unique(np.asarray(vertices))


def _loess(
    x: np.ndarray,
    y: np.ndarray,
    *,
    span: float = 0.3,
    surface: Literal["interpolate", "direct"] = "interpolate",
    cell: float = 0.2,
    max_block: int = 2**22,
) -> np.ndarray:
    """Local quadratic regression (loess, tricube weights) of ``y`` on ``x``, at ``x``.

    As R's ``loess(degree=2, family="gaussian")`` and scikit-misc's ``loess`` (what
    Seurat and scanpy use): each local fit weighs the ``q = floor(span * n)`` points
    nearest in ``x`` by ``(1 - (d / h)^3)^3``, ``h`` the distance to the ``q``-th.
    ``surface="interpolate"`` (their default) fits at the vertices of a k-d tree with
    cells of at most ``floor(n * span * cell)`` points and joins vertex values and
    slopes by cubic Hermite interpolation; ``"direct"`` fits at every distinct ``x``.
    Neighbourhoods are windows of the sorted ``x``, so a fit costs ``O(q)``, computed in
    blocks of at most ``max_block`` weights.
    """
    n = x.size
    order = np.argsort(x, kind="stable")
    xs = np.asarray(x, dtype=np.float64)[order]
    ys = np.asarray(y, dtype=np.float64)[order]
    q = min(n, max(int(np.floor(n * span + 1e-5)), 3))
    if surface == "direct":
        u, inverse = np.unique(xs, return_inverse=True)
        value, _ = _local_quadratic(xs, ys, u, q, max_block)
        fitted_sorted = value[inverse]
    else:
        vertices = _kd_vertices(xs, max(int(np.floor(n * span * cell)), 1))
        value, slope = _local_quadratic(xs, ys, vertices, q, max_block)
        j = np.clip(np.searchsorted(vertices, xs, side="left") - 1, 0, vertices.size - 2)
        v0, v1 = vertices[j], vertices[j + 1]
        width = v1 - v0
        t = (xs - v0) / width
        fitted_sorted = (
            (1 - t) ** 2 * (1 + 2 * t) * value[j]
            + t**2 * (3 - 2 * t) * value[j + 1]
            + (t * (1 - t) ** 2 * slope[j] + t**2 * (t - 1) * slope[j + 1]) * width
        )
    fitted = np.empty(n)
    fitted[order] = fitted_sorted
    return fitted


# ---- normalize_total / log1p ---------------------------------------------------------


def _scale_rows(x: Matrix, factor: np.ndarray) -> Matrix:
    """``diag(factor) @ x`` as float32, in the format (and class) of ``x``."""
    if sp.issparse(x):
        fmt = x.format
        y = _canonical_sparse(x)
        vals = np.asarray(y.data, dtype=np.float64) * factor[_row_of_entries(y)]
        out = y.astype(np.float32, copy=True)
        out.data = vals.astype(np.float32)
        return out.asformat(fmt)
    out = np.empty(x.shape, dtype=np.float32)
    for start in range(0, x.shape[0], _ROW_CHUNK):
        sl = slice(start, start + _ROW_CHUNK)
        out[sl] = np.asarray(x[sl], dtype=np.float64) * factor[sl, None]
    return out


def normalize_total(
    adata: AnnData,
    *,
    target_sum: float | None = 1e4,
    layer: str | None = None,
    key_added: str = "normalized",
    copy: bool = False,
) -> AnnData | None:
    """Scale each observation to the same total count.

    Parameters
    ----------
    adata
        Annotated data with raw counts in ``adata.X`` or ``adata.layers[layer]``.
    target_sum
        Total of every observation after scaling. ``None`` uses the median total of
        the observations with non-zero counts.
    layer
        Layer with the counts; ``None`` reads ``adata.X`` (which is never modified).
    key_added
        Layer written.
    copy
        Return a modified copy instead of writing into ``adata``.

    Returns
    -------
    ``None``, or a copy of ``adata`` if ``copy=True``, with:

    ``adata.layers[key_added]``
        ``float32`` counts scaled per observation, in the format of the input (CSR stays
        CSR, dense stays dense). Observations with no counts stay zero.
    ``adata.uns[key_added]["params"]``
        ``target_sum`` (the value used) and ``layer``.
    """
    name = _source_name(layer)
    x = _get_matrix(adata, layer)
    check_counts(x, name)
    _check_not_all_zero(x, name)
    if target_sum is not None and not (np.isfinite(target_sum) and target_sum > 0):
        raise ChronotopeInputError(f"target_sum must be a positive number, got {target_sum!r}.")

    totals = np.asarray(x.sum(axis=1, dtype=np.float64)).ravel()
    nonzero = totals > 0
    if target_sum is None:
        target_sum = float(np.median(totals[nonzero]))
    if not nonzero.all():
        logger.info("normalize_total: %d observation(s) with no counts", int((~nonzero).sum()))
    factor = np.where(nonzero, target_sum / np.where(nonzero, totals, 1.0), 0.0)
    out = _scale_rows(x, factor)

    if copy:
        adata = adata.copy()
    adata.layers[key_added] = out
    adata.uns[key_added] = {"params": {"target_sum": float(target_sum), "layer": layer}}
    return adata if copy else None


def log1p(
    adata: AnnData,
    *,
    layer: str | None = "normalized",
    key_added: str = "log1p",
    copy: bool = False,
) -> AnnData | None:
    """Natural logarithm of one plus each value.

    Parameters
    ----------
    adata
        Annotated data with non-negative values in ``adata.layers[layer]``.
    layer
        Layer to transform (by default the one written by :func:`normalize_total`);
        ``None`` reads ``adata.X`` (which is never modified).
    key_added
        Layer written.
    copy
        Return a modified copy instead of writing into ``adata``.

    Returns
    -------
    ``None``, or a copy of ``adata`` if ``copy=True``, with:

    ``adata.layers[key_added]``
        ``float32`` ``log(1 + x)``, in the format of the input (zeros stay implicit).
    ``adata.uns[key_added]["params"]``
        ``layer``.
    """
    name = _source_name(layer)
    x = _get_matrix(adata, layer)
    _check_nonnegative(x, name, "non-negative (normalised) expression")

    if sp.issparse(x):
        y = _canonical_sparse(x)
        out = y.astype(np.float32, copy=True)
        out.data = np.log1p(np.asarray(y.data, dtype=np.float64)).astype(np.float32)
        out = out.asformat(x.format)
    else:
        out = np.empty(x.shape, dtype=np.float32)
        for start in range(0, x.shape[0], _ROW_CHUNK):
            sl = slice(start, start + _ROW_CHUNK)
            out[sl] = np.log1p(np.asarray(x[sl], dtype=np.float64))

    if copy:
        adata = adata.copy()
    adata.layers[key_added] = out
    adata.uns[key_added] = {"params": {"layer": layer}}
    return adata if copy else None


# ---- highly variable genes -----------------------------------------------------------


def _check_n_top(n_top_genes: int) -> None:
    if isinstance(n_top_genes, bool) or int(n_top_genes) != n_top_genes or n_top_genes < 1:
        raise ChronotopeInputError(f"n_top_genes must be a positive integer, got {n_top_genes!r}.")


def _order_to_rank(order: np.ndarray, n_top: int, n: int) -> np.ndarray:
    rank = np.full(n, np.nan)
    rank[order[:n_top]] = np.arange(n_top, dtype=np.float64)
    return rank


def _hvg_seurat_v3(
    x: Matrix, batches: list[tuple[str, np.ndarray]], n_top: int, span: float = 0.3
) -> pd.DataFrame:
    """Seurat v3 / scanpy ``flavor="seurat_v3"`` on raw counts."""
    n_vars = x.shape[1]
    norm_vars = np.empty((len(batches), n_vars))
    for i, (name, mask) in enumerate(batches):
        xb = x if mask.all() else _select_rows(x, mask)
        n = xb.shape[0]
        mean, var = _mean_var(xb)
        not_const = var > 0
        if not not_const.any():
            raise ChronotopeInputError(
                f"every gene is constant in batch {name!r}; cannot rank variability."
            )
        log_var_fit = np.zeros(n_vars)
        log_var_fit[not_const] = _loess(
            np.log10(mean[not_const]), np.log10(var[not_const]), span=span
        )
        reg_std = np.sqrt(10.0**log_var_fit)
        # Standardised values (x - mean) / reg_std are clipped at sqrt(n), as Seurat does.
        clip = reg_std * np.sqrt(n) + mean
        s1, s2 = _column_sums(xb, clip=clip)
        norm_vars[i] = (n * mean**2 + s2 - 2 * s1 * mean) / ((n - 1) * reg_std**2)

    # rank 0 = most variable, per batch
    ranks = np.argsort(np.argsort(-norm_vars, axis=1, kind="stable"), axis=1, kind="stable")
    selected = ranks < n_top
    n_batches_selected = selected.sum(axis=0)
    masked = np.where(selected, ranks.astype(np.float64), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns
        median_rank = np.nanmedian(masked, axis=0)
    # order: median rank among batches that select the gene, then selected in most batches
    key_rank = np.where(np.isnan(median_rank), np.inf, median_rank)
    order = np.lexsort((-n_batches_selected, key_rank))
    df = pd.DataFrame(
        {
            "highly_variable_rank": median_rank,
            "variances_norm": norm_vars.mean(axis=0),
            "highly_variable_nbatches": n_batches_selected,
        }
    )
    df.attrs["order"] = order
    return df


def _hvg_seurat(
    x: Matrix, batches: list[tuple[str, np.ndarray]], n_top: int, n_bins: int = 20
) -> pd.DataFrame:
    """Seurat / scanpy ``flavor="seurat"``: normalised dispersion of log1p data."""
    n_vars = x.shape[1]
    disp_norm = np.empty((len(batches), n_vars))
    selected = np.zeros((len(batches), n_vars), dtype=bool)
    for i, (_, mask) in enumerate(batches):
        xb = x if mask.all() else _select_rows(x, mask)
        mean, var = _mean_var(xb, transform=np.expm1)
        expressed = mean > 0
        mean = np.where(expressed, mean, 1e-12)
        with np.errstate(divide="ignore", invalid="ignore"):
            dispersion = var / mean
            dispersion = np.log(np.where(dispersion == 0, np.nan, dispersion))
        log_mean = np.log1p(mean)
        dn = np.full(n_vars, np.nan)
        if expressed.any():
            bins = pd.cut(log_mean[expressed], bins=n_bins)
            frame = pd.DataFrame({"bin": bins, "d": dispersion[expressed]})
            stats = frame.groupby("bin", observed=True)["d"].agg(["mean", "std"])
            avg = stats["mean"].reindex(bins).to_numpy()
            dev = stats["std"].reindex(bins).to_numpy()
            # a bin with a single gene: that gene gets a normalised dispersion of 1
            lone = np.isnan(dev)
            dev = np.where(lone, avg, dev)
            avg = np.where(lone, 0.0, avg)
            with np.errstate(divide="ignore", invalid="ignore"):
                dn[expressed] = (dispersion[expressed] - avg) / dev
        if len(batches) > 1:
            dn[~expressed] = 0.0  # as scanpy: genes absent from a batch count as 0
        order_b = np.lexsort((np.arange(n_vars), np.nan_to_num(-dn, nan=np.inf)))
        selected[i, order_b[:n_top]] = True
        disp_norm[i] = dn

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns
        mean_dn = np.nanmean(disp_norm, axis=0)
    n_batches_selected = selected.sum(axis=0)
    order = np.lexsort((np.nan_to_num(-mean_dn, nan=np.inf), -n_batches_selected))
    df = pd.DataFrame(
        {
            "highly_variable_rank": _order_to_rank(order, n_top, n_vars),
            "variances_norm": mean_dn,
            "highly_variable_nbatches": n_batches_selected,
        }
    )
    df.attrs["order"] = order
    return df


def highly_variable_genes(
    adata: AnnData,
    *,
    n_top_genes: int = 3000,
    flavor: Literal["seurat_v3", "seurat"] = "seurat_v3",
    layer: str | None = None,
    batch_key: str | None = None,
    key_added: str = "highly_variable",
    copy: bool = False,
) -> AnnData | None:
    """Flag the most variable genes.

    ``flavor="seurat_v3"`` (Stuart et al. 2019, as ``scanpy`` with ``scikit-misc``) works
    on raw counts: per gene mean and variance, a loess (local quadratic, span 0.3) of
    ``log10(variance)`` on ``log10(mean)`` over non-constant genes gives an expected
    standard deviation; counts are standardised by it, clipped at ``sqrt(n_obs)``, and
    genes are ranked by the variance of the clipped standardised values. With
    ``batch_key`` genes are ranked per batch and ordered by their median rank among the
    batches that select them, ties broken by the number of such batches.

    ``flavor="seurat"`` (Satija et al. 2015, as ``scanpy``) works on log1p-normalised
    data (pass ``layer="log1p"``): genes are grouped in 20 bins of mean expression and
    ranked by their dispersion (variance / mean of ``expm1``), z-scored within the bin.
    With ``batch_key`` genes are ordered by the number of batches that select them, ties
    broken by the mean normalised dispersion.

    Parameters
    ----------
    adata
        Annotated data.
    n_top_genes
        Number of genes to flag; more than ``n_vars`` is clamped (with a warning).
    flavor
        ``"seurat_v3"`` (raw counts) or ``"seurat"`` (log1p-normalised data).
    layer
        Layer to read; ``None`` reads ``adata.X`` (counts for ``"seurat_v3"``).
    batch_key
        Column of ``adata.obs`` with the batch of each observation; genes are ranked
        per batch and the rankings combined.
    key_added
        Column of ``adata.var`` with the boolean flag (:func:`scale` and :func:`pca`
        read ``"highly_variable"``). The other columns below have fixed names.
    copy
        Return a modified copy instead of writing into ``adata``.

    Returns
    -------
    ``None``, or a copy of ``adata`` if ``copy=True``, with:

    ``adata.var[key_added]``
        ``True`` for the ``n_top_genes`` selected genes.
    ``adata.var["highly_variable_rank"]``
        ``0`` for the most variable gene, ``NaN`` for genes not selected (with
        ``flavor="seurat_v3"`` and ``batch_key``: the median rank among batches).
    ``adata.var["means"]``, ``adata.var["variances"]``
        Mean and variance (``ddof=1``) of each gene over all observations: of the
        counts (``"seurat_v3"``), or of ``expm1`` of the data with ``log1p`` of the
        mean (``"seurat"``, as ``scanpy``).
    ``adata.var["variances_norm"]``
        Variance of the clipped standardised counts (``"seurat_v3"``) or normalised
        dispersion (``"seurat"``), averaged over batches.
    ``adata.var["highly_variable_nbatches"]``
        Number of batches that select each gene (only with ``batch_key``).
    ``adata.uns["hvg"]``
        ``{"flavor": flavor, "params": {...}}``.
    """
    if flavor not in _FLAVORS:
        raise ChronotopeInputError(f"flavor must be one of {_FLAVORS}, got {flavor!r}.")
    _check_n_top(n_top_genes)
    name = _source_name(layer)
    x = _get_matrix(adata, layer)
    if flavor == "seurat_v3":
        check_counts(x, name)
        _check_not_all_zero(x, name)
        if not _is_integer_valued(x):
            warnings.warn(
                f"flavor='seurat_v3' expects raw counts, but {name} holds non-integer values.",
                UserWarning,
                stacklevel=2,
            )
    else:
        _check_nonnegative(x, name, "log1p-normalised expression")
        _check_not_all_zero(x, name)
        if _is_integer_valued(x):
            warnings.warn(
                f"flavor='seurat' expects log1p-normalised data, but {name} holds only "
                "integers (raw counts?); pass layer='log1p'.",
                UserWarning,
                stacklevel=2,
            )
    batches = _batches(adata, batch_key)
    n_top = int(n_top_genes)
    if n_top > adata.n_vars:
        warnings.warn(
            f"n_top_genes={n_top} is more than the {adata.n_vars} genes; using all of them.",
            UserWarning,
            stacklevel=2,
        )
        n_top = adata.n_vars

    if flavor == "seurat_v3":
        df = _hvg_seurat_v3(x, batches, n_top)
        means, variances = _mean_var(x)
    else:
        df = _hvg_seurat(x, batches, n_top)
        means, variances = _mean_var(x, transform=np.expm1)
        means = np.log1p(means)
    flag = np.zeros(adata.n_vars, dtype=bool)
    flag[df.attrs["order"][:n_top]] = True
    logger.info("highly_variable_genes: %d of %d genes (%s)", n_top, adata.n_vars, flavor)

    if copy:
        adata = adata.copy()
    adata.var[key_added] = flag
    adata.var["highly_variable_rank"] = df["highly_variable_rank"].to_numpy()
    adata.var["means"] = means
    adata.var["variances"] = variances
    adata.var["variances_norm"] = df["variances_norm"].to_numpy()
    if batch_key is not None:
        adata.var["highly_variable_nbatches"] = df["highly_variable_nbatches"].to_numpy()
    adata.uns["hvg"] = {
        "flavor": flavor,
        "params": {
            "n_top_genes": n_top,
            "flavor": flavor,
            "layer": layer,
            "batch_key": batch_key,
            "key_added": key_added,
        },
    }
    return adata if copy else None


# ---- scale / pca ---------------------------------------------------------------------


def _scaled_dense(
    x: Matrix,
    mean: np.ndarray,
    std: np.ndarray,
    *,
    zero_center: bool,
    max_value: float | None,
) -> np.ndarray:
    """``(x - mean) / std`` (or ``x / std``), clipped, as dense float32, in row blocks."""
    out = np.empty(x.shape, dtype=np.float32)
    for start in range(0, x.shape[0], _ROW_CHUNK):
        sl = slice(start, start + _ROW_CHUNK)
        block = x[sl]
        block = block.toarray() if sp.issparse(block) else np.asarray(block)
        block = block.astype(np.float64)
        if zero_center:
            block -= mean
        block /= std
        if max_value is not None:
            np.clip(block, -max_value if zero_center else None, max_value, out=block)
        out[sl] = block
    return out


def _scale_columns(x: Matrix, factor: np.ndarray) -> sp.csr_matrix:
    """``x @ diag(factor)`` as float64 CSR: one new array of values (the structure of a
    canonical CSR input is shared, not copied), computed in spans of stored values."""
    x = _canonical_sparse(x).tocsr()
    vals = np.empty(x.nnz, dtype=np.float64)
    for lo, hi in _spans(x.nnz):
        np.multiply(x.data[lo:hi], factor[x.indices[lo:hi]], out=vals[lo:hi])
    return sp.csr_matrix((vals, x.indices, x.indptr), shape=x.shape)


def _select_columns(x: Matrix, mask: np.ndarray) -> Matrix:
    if mask.all():
        return x
    if sp.issparse(x):
        return _canonical_sparse(x).tocsc()[:, mask].tocsr()
    return x[:, mask]


def _std(var: np.ndarray) -> np.ndarray:
    std = np.sqrt(var)
    return np.where(std > 0, std, 1.0)


def _check_max_value(max_value: float | None) -> None:
    if max_value is not None and not (np.isfinite(max_value) and max_value > 0):
        raise ChronotopeInputError(
            f"max_value must be a positive number or None, got {max_value!r}."
        )


def scale(
    adata: AnnData,
    *,
    layer: str | None = "log1p",
    max_value: float | None = 10.0,
    zero_center: bool = True,
    use_highly_variable: bool = True,
    key_added: str = "scaled",
    copy: bool = False,
) -> AnnData | None:
    """Standardise genes to unit variance (and zero mean): the features a model takes.

    Parameters
    ----------
    adata
        Annotated data.
    layer
        Layer to read (by default the one written by :func:`log1p`); ``None`` reads
        ``adata.X``.
    max_value
        Clip standardised values to ``[-max_value, max_value]`` (only the upper bound
        without ``zero_center``); ``None`` does not clip.
    zero_center
        Subtract each gene's mean. Without it, values are only divided by the standard
        deviation.
    use_highly_variable
        Keep only the genes flagged in ``adata.var["highly_variable"]`` (see
        :func:`highly_variable_genes`).
    key_added
        Key of ``adata.obsm`` and ``adata.uns`` written.
    copy
        Return a modified copy instead of writing into ``adata``.

    Returns
    -------
    ``None``, or a copy of ``adata`` if ``copy=True``, with:

    ``adata.obsm[key_added]``
        Dense ``float32`` array ``(n_obs, n_selected)``, genes in ``adata.var`` order.
    ``adata.uns[key_added]``
        ``var_names`` of the selected genes, their ``mean`` and ``std`` (``ddof=1``,
        ``1`` for constant genes), and ``params``.
    """
    name = _source_name(layer)
    x = _get_matrix(adata, layer)
    _check_shape(x, name)
    check_finite(x, name)
    _check_max_value(max_value)
    mask = _highly_variable_mask(adata, use_highly_variable, "scale")

    xs = _select_columns(x, mask)
    mean, var = _mean_var(xs)
    std = _std(var)
    out = _scaled_dense(xs, mean, std, zero_center=zero_center, max_value=max_value)

    if copy:
        adata = adata.copy()
    adata.obsm[key_added] = out
    adata.uns[key_added] = {
        "var_names": np.asarray(adata.var_names[mask], dtype=object),
        "mean": mean,
        "std": std,
        "params": {
            "layer": layer,
            "max_value": None if max_value is None else float(max_value),
            "zero_center": bool(zero_center),
            "use_highly_variable": bool(use_highly_variable),
        },
    }
    return adata if copy else None


def pca(
    adata: AnnData,
    *,
    n_comps: int = 50,
    layer: str | None = "log1p",
    use_highly_variable: bool = True,
    scale: bool = True,
    max_value: float | None = 10.0,
    random_state: int | None = 0,
    batch_key: str | None = None,
    key_added: str = "X_pca",
    copy: bool = False,
) -> AnnData | None:
    """Principal components of the (scaled) expression, without densifying sparse input.

    Sparse input is centred implicitly by :class:`sklearn.decomposition.PCA` and scaled
    by a sparse diagonal product, so ``max_value`` clipping (which would densify) is
    applied only to dense input. ARPACK (``svd_solver="arpack"``) computes the leading
    components only, from matrix-vector products.

    Parameters
    ----------
    adata
        Annotated data.
    n_comps
        Number of components; clamped (with a warning) to ``min(n_obs, n_genes) - 1``.
    layer
        Layer to read (by default the one written by :func:`log1p`); ``None`` reads
        ``adata.X``.
    use_highly_variable
        Use only the genes flagged in ``adata.var["highly_variable"]`` (see
        :func:`highly_variable_genes`).
    scale
        Standardise each gene to unit variance (``ddof=1``) first.
    max_value
        With ``scale=True`` and dense input, clip standardised values to
        ``[-max_value, max_value]``; ``None`` does not clip. Ignored for sparse input.
    random_state
        Seed of the ARPACK start vector.
    batch_key
        Column of ``adata.obs``: centre each gene within each batch (and, with
        ``scale``, divide by its standard deviation within that batch, as Seurat scales
        each dataset before integration) before the decomposition, so a platform's or a
        batch's shift of a gene's mean or spread does not become a component. Sparse
        input stays sparse: the centred matrix is an implicit operator (``X - B M``,
        ``B`` the batch indicator, ``M`` the batch means, rows scaled per batch) given
        to ARPACK. Use it when each batch contains the same kinds of spots (e.g. two
        platforms over the same tissue); a batch that lacks a cell type entirely is
        shifted towards the others.
    key_added
        Key of ``adata.obsm`` written.
    copy
        Return a modified copy instead of writing into ``adata``.

    Returns
    -------
    ``None``, or a copy of ``adata`` if ``copy=True``, with:

    ``adata.obsm[key_added]``
        ``float32`` scores ``(n_obs, n_comps)``.
    ``adata.varm["PCs"]``
        Loadings ``(n_vars, n_comps)``; rows of genes not used are zero.
    ``adata.uns["pca"]``
        ``variance``, ``variance_ratio`` per component and ``params``.
    """
    from sklearn.decomposition import PCA

    name = _source_name(layer)
    x = _get_matrix(adata, layer)
    _check_shape(x, name)
    check_finite(x, name)
    _check_max_value(max_value)
    if int(n_comps) != n_comps or n_comps < 1:
        raise ChronotopeInputError(f"n_comps must be a positive integer, got {n_comps!r}.")
    mask = _highly_variable_mask(adata, use_highly_variable, "pca")
    n_features = int(mask.sum())
    limit = min(adata.n_obs, n_features) - 1
    if limit < 1:
        raise ChronotopeInputError(
            f"pca needs at least 2 observations and 2 genes, got {adata.n_obs} x {n_features}."
        )
    n_comps = int(n_comps)
    if n_comps > limit:
        warnings.warn(
            f"n_comps={n_comps} is more than min(n_obs, n_genes) - 1 = {limit}; using {limit}.",
            UserWarning,
            stacklevel=2,
        )
        n_comps = limit

    xs = _select_columns(x, mask)
    if batch_key is not None:
        batches = _batch_codes(adata, batch_key)
        scores, components, variance, ratio = _batch_centred_pca(
            xs, batches, n_comps, scale=scale, random_state=random_state
        )
        loadings = np.zeros((adata.n_vars, n_comps), dtype=np.float32)
        loadings[mask] = components.T
        if copy:
            adata = adata.copy()
        adata.obsm[key_added] = scores.astype(np.float32)
        adata.varm["PCs"] = loadings
        adata.uns["pca"] = {
            "variance": variance,
            "variance_ratio": ratio,
            "params": {
                "n_comps": n_comps,
                "layer": layer,
                "use_highly_variable": bool(use_highly_variable),
                "scale": bool(scale),
                "max_value": None,
                "clipped": False,
                "svd_solver": "arpack (batch-centred operator)",
                "random_state": random_state,
                "batch_key": batch_key,
            },
        }
        return adata if copy else None
    if sp.issparse(xs):
        if scale:
            _, var = _mean_var(xs)
            xs = _scale_columns(xs, 1.0 / _std(var))
        else:
            xs = sp.csr_matrix(xs, dtype=np.float64)
    elif scale:
        mean, var = _mean_var(xs)
        xs = _scaled_dense(xs, mean, _std(var), zero_center=True, max_value=max_value)
    else:
        xs = np.asarray(xs, dtype=np.float32)
    solver = "arpack"
    model = PCA(n_components=n_comps, svd_solver=solver, random_state=random_state)
    scores = model.fit_transform(xs)

    loadings = np.zeros((adata.n_vars, n_comps), dtype=np.float32)
    loadings[mask] = model.components_.T
    if copy:
        adata = adata.copy()
    adata.obsm[key_added] = np.asarray(scores, dtype=np.float32)
    adata.varm["PCs"] = loadings
    adata.uns["pca"] = {
        "variance": np.asarray(model.explained_variance_, dtype=np.float64),
        "variance_ratio": np.asarray(model.explained_variance_ratio_, dtype=np.float64),
        "params": {
            "n_comps": n_comps,
            "layer": layer,
            "use_highly_variable": bool(use_highly_variable),
            "scale": bool(scale),
            "max_value": None if max_value is None else float(max_value),
            "clipped": bool(scale and max_value is not None and not sp.issparse(x)),
            "svd_solver": solver,
            "random_state": random_state,
        },
    }
    return adata if copy else None


def _batch_codes(adata: AnnData, batch_key: str) -> np.ndarray:
    if batch_key not in adata.obs:
        raise ChronotopeInputError(f"batch_key {batch_key!r} is not a column of adata.obs.")
    col = adata.obs[batch_key]
    if col.isna().any():
        raise ChronotopeInputError(f"adata.obs[{batch_key!r}] has missing values.")
    return pd.factorize(col.astype(str))[0]


def _batch_centred_pca(
    x: Matrix,
    batches: np.ndarray,
    n_comps: int,
    *,
    scale: bool,
    random_state: int | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Truncated SVD of ``X`` centred and scaled within each batch, without forming it.

    Returns scores ``U S``, components ``V^T``, explained variance and its ratio.
    """
    from scipy.sparse.linalg import LinearOperator, svds

    n = x.shape[0]
    k = int(batches.max()) + 1
    indicator = sp.csr_matrix((np.ones(n), (np.arange(n), batches)), shape=(n, k))
    counts = np.asarray(indicator.sum(axis=0)).ravel()
    xs = sp.csr_matrix(x, dtype=np.float64) if sp.issparse(x) else np.asarray(x, np.float64)

    def dense(m: Matrix) -> np.ndarray:
        return m.toarray() if sp.issparse(m) else np.asarray(m)

    means = dense(indicator.T @ xs) / counts[:, None]  # (k, g)
    sq = dense(indicator.T @ (xs.multiply(xs) if sp.issparse(xs) else xs * xs))
    # per-batch variance of each gene (ddof=1); zero variance -> unit scale
    var = np.maximum(sq - counts[:, None] * means**2, 0.0) / np.maximum(counts - 1, 1)[:, None]
    inv = 1.0 / _std(var) if scale else np.ones_like(var)  # (k, g)
    row_batch = batches

    def matvec(v: np.ndarray) -> np.ndarray:
        v = v.reshape(xs.shape[1], -1)
        out = np.empty((n, v.shape[1]))
        for b in range(k):
            rows = row_batch == b
            w = inv[b][:, None] * v
            out[rows] = np.asarray(xs[rows] @ w) - means[b] @ w
        return out

    def rmatvec(u: np.ndarray) -> np.ndarray:
        u = u.reshape(n, -1)
        out = np.zeros((xs.shape[1], u.shape[1]))
        for b in range(k):
            rows = row_batch == b
            ub = u[rows]
            out += inv[b][:, None] * (np.asarray(xs[rows].T @ ub) - np.outer(means[b], ub.sum(0)))
        return out

    op = LinearOperator(
        (n, xs.shape[1]),
        matvec=matvec,
        rmatvec=rmatvec,
        matmat=matvec,
        rmatmat=rmatvec,
        dtype=np.float64,
    )
    v0 = np.random.default_rng(random_state).uniform(-1, 1, min(op.shape))
    u, s, vt = svds(op, k=n_comps, v0=v0, random_state=random_state)
    order = np.argsort(s)[::-1]
    u, s, vt = u[:, order], s[order], vt[order]
    # sign convention of sklearn (svd_flip on u): largest |u| entry of each column > 0
    signs = np.sign(u[np.abs(u).argmax(axis=0), np.arange(u.shape[1])])
    signs[signs == 0] = 1.0
    u, vt = u * signs, vt * signs[:, None]
    variance = s**2 / max(n - 1, 1)
    scaled_var = var * inv**2  # per batch: 1 (scaled) or the variance
    total = float((scaled_var * np.maximum(counts - 1, 1)[:, None]).sum() / max(n - 1, 1))
    ratio = variance / max(total, 1e-300)
    return u * s, vt, variance, ratio


# ---- convenience ---------------------------------------------------------------------


def preprocess(
    adata: AnnData,
    *,
    n_top_genes: int = 3000,
    target_sum: float | None = 1e4,
    flavor: Literal["seurat_v3", "seurat"] = "seurat_v3",
    batch_key: str | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Normalise, log-transform and flag highly variable genes, leaving ``adata.X`` alone.

    Runs :func:`normalize_total` (``.X`` -> ``layers["normalized"]``), :func:`log1p`
    (-> ``layers["log1p"]``) and :func:`highly_variable_genes` (on the counts in
    ``.X`` for ``flavor="seurat_v3"``, on ``layers["log1p"]`` for ``"seurat"``).

    Parameters
    ----------
    adata
        Annotated data with raw counts in ``adata.X``.
    n_top_genes
        Number of highly variable genes.
    target_sum
        Total per observation after normalisation (``None``: the median total).
    flavor
        Highly-variable-gene method, see :func:`highly_variable_genes`.
    batch_key
        Column of ``adata.obs`` with batches for :func:`highly_variable_genes`.
    copy
        Return a modified copy instead of writing into ``adata``.

    Returns
    -------
    ``None``, or a copy of ``adata`` if ``copy=True``, with ``layers["normalized"]``,
    ``layers["log1p"]``, ``var["highly_variable"]`` (and the other columns of
    :func:`highly_variable_genes`), ``uns["hvg"]``, ``uns["normalized"]`` and
    ``uns["log1p"]``.
    """
    if flavor not in _FLAVORS:
        raise ChronotopeInputError(f"flavor must be one of {_FLAVORS}, got {flavor!r}.")
    _check_n_top(n_top_genes)
    x = _get_matrix(adata, None)
    check_counts(x, "adata.X")
    _check_not_all_zero(x, "adata.X")
    _batches(adata, batch_key)
    if copy:
        adata = adata.copy()
    normalize_total(adata, target_sum=target_sum)
    log1p(adata)
    highly_variable_genes(
        adata,
        n_top_genes=n_top_genes,
        flavor=flavor,
        layer=None if flavor == "seurat_v3" else "log1p",
        batch_key=batch_key,
    )
    return adata if copy else None
