"""Diagnostics of a diffusion correction: Moran's I, per-gene errors against a known truth.

Moran's I is reported as a diagnostic only. It is not an objective: diffusion itself
raises Moran's I (a blurred field is smoother, so neighbours agree more), so maximising
it rewards blur. The benchmark reports ``|I(corrected) - I(truth)|`` instead.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

__all__ = ["gap_closure", "morans_i", "per_gene_pearson", "per_gene_rmse"]


def _dense(x: np.ndarray | sp.spmatrix) -> np.ndarray:
    return x.toarray() if sp.issparse(x) else np.asarray(x)


def morans_i(x: np.ndarray | sp.spmatrix, w: sp.spmatrix, *, batch: int = 512) -> np.ndarray:
    """Moran's I of every column of ``x`` under the spatial weights ``w`` (sparse, N x N).

    ``I = (N / S0) * (d^T W d) / (d^T d)`` with ``d`` the centred column; constant
    columns give NaN.
    """
    w = sp.csr_matrix(w, dtype=np.float64)
    n = w.shape[0]
    s0 = float(w.sum())
    out = np.empty(x.shape[1])
    for lo in range(0, x.shape[1], batch):
        blk = _dense(x[:, lo : lo + batch]).astype(np.float64)
        d = blk - blk.mean(axis=0, keepdims=True)
        num = (d * (w @ d)).sum(axis=0)
        den = (d * d).sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[lo : lo + batch] = np.where(den > 0, n / s0 * num / den, np.nan)
    return out


def per_gene_rmse(est: np.ndarray | sp.spmatrix, truth: np.ndarray | sp.spmatrix) -> np.ndarray:
    """Root mean squared error per column."""
    e, t = _dense(est).astype(np.float64), _dense(truth).astype(np.float64)
    return np.sqrt(((e - t) ** 2).mean(axis=0))


def per_gene_pearson(
    est: np.ndarray | sp.spmatrix, truth: np.ndarray | sp.spmatrix, *, log1p: bool = False
) -> np.ndarray:
    """Pearson correlation per column (``log1p=True``: of ``log1p`` values); NaN if constant."""
    e, t = _dense(est).astype(np.float64), _dense(truth).astype(np.float64)
    if log1p:
        e, t = np.log1p(e), np.log1p(t)
    e = e - e.mean(axis=0)
    t = t - t.mean(axis=0)
    den = np.sqrt((e * e).sum(axis=0) * (t * t).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (e * t).sum(axis=0) / den, np.nan)


def gap_closure(rmse: np.ndarray, rmse_raw: np.ndarray, rmse_floor: np.ndarray) -> np.ndarray:
    """Per-gene ``(RMSE_raw - RMSE) / (RMSE_raw - RMSE_floor)``; NaN where the gap is <= 0."""
    gap = rmse_raw - rmse_floor
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(gap > 0, (rmse_raw - rmse) / gap, np.nan)
