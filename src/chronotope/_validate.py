"""Input validation shared by readers, tools and the CLI.

Every check raises :class:`chronotope._errors.ChronotopeInputError` (a ``ValueError``)
with a message a person can act on, before any heavy work starts.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp

from chronotope._errors import ChronotopeInputError

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = [
    "MissingFileError",
    "check_coordinates",
    "check_counts",
    "check_file",
    "check_finite",
    "check_unique",
    "get_obsm",
]


def _data_values(x: np.ndarray | sp.spmatrix | sp.sparray) -> np.ndarray:
    if sp.issparse(x):
        return np.asarray(x.data)
    return np.asarray(x)


def check_finite(x: np.ndarray | sp.spmatrix | sp.sparray, name: str) -> None:
    """Raise if ``x`` holds NaN or infinite values (sparse: stored values only)."""
    vals = _data_values(x)
    if vals.dtype.kind in "fc" and not np.isfinite(vals).all():
        n_bad = int((~np.isfinite(vals)).sum())
        raise ChronotopeInputError(f"{name} contains {n_bad} NaN or infinite value(s).")


def check_counts(
    x: np.ndarray | sp.spmatrix | sp.sparray,
    name: str = "counts",
    *,
    allow_empty_genes: bool = True,
) -> None:
    """Validate a count matrix: 2-D, non-empty, finite and non-negative.

    Parameters
    ----------
    x
        Dense or sparse matrix, observations in rows.
    name
        How to call the matrix in error messages (e.g. ``"adata.X"``).
    allow_empty_genes
        If ``False``, raise when a column sums to zero.
    """
    if x.ndim != 2:
        raise ChronotopeInputError(f"{name} must be 2-D (observations x genes), got {x.ndim}-D.")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ChronotopeInputError(f"{name} is empty (shape {tuple(x.shape)}).")
    check_finite(x, name)
    vals = _data_values(x)
    if vals.size and vals.min() < 0:
        raise ChronotopeInputError(
            f"{name} contains negative values (min {vals.min():.3g}); raw counts are expected."
        )
    if not allow_empty_genes:
        totals = np.asarray(x.sum(axis=0)).ravel()
        if (totals == 0).any():
            raise ChronotopeInputError(
                f"{name} has {int((totals == 0).sum())} all-zero gene(s); filter them first."
            )


def check_coordinates(coords: np.ndarray, n_obs: int, name: str = "coordinates") -> np.ndarray:
    """Validate spatial coordinates and return them as a float64 array of shape (n_obs, d)."""
    arr = np.asarray(coords)
    if arr.ndim != 2 or arr.shape[1] not in (2, 3):
        raise ChronotopeInputError(
            f"{name} must have shape (n_obs, 2) or (n_obs, 3), got {tuple(arr.shape)}."
        )
    if arr.shape[0] != n_obs:
        raise ChronotopeInputError(
            f"{name} has {arr.shape[0]} rows but the data have {n_obs} observations."
        )
    arr = arr.astype(np.float64, copy=False)
    check_finite(arr, name)
    return arr


def get_obsm(adata: AnnData, key: str, *, made_by: str | None = None) -> np.ndarray:
    """Return ``adata.obsm[key]`` or raise an error naming what creates it."""
    if key not in adata.obsm:
        hint = f" Run {made_by} first, or pass another key." if made_by else ""
        have = ", ".join(map(repr, adata.obsm.keys())) or "none"
        raise ChronotopeInputError(f"adata.obsm[{key!r}] not found (have: {have}).{hint}")
    return adata.obsm[key]


class MissingFileError(ChronotopeInputError, FileNotFoundError):
    """A required input file or folder does not exist.

    Both a :class:`ChronotopeInputError` (``ValueError``) and a :class:`FileNotFoundError`.
    """


def check_file(path: str | os.PathLike[str], what: str = "file", *, is_dir: bool = False) -> Path:
    """Return ``path`` as a :class:`~pathlib.Path`, or raise naming the missing file.

    Parameters
    ----------
    path
        File or folder that must exist.
    what
        How to call it in the error message (e.g. ``"10x count matrix"``).
    is_dir
        If ``True``, ``path`` must be a folder; otherwise a file.
    """
    p = Path(path).expanduser()
    ok = p.is_dir() if is_dir else p.is_file()
    if not ok:
        kind = "folder" if is_dir else "file"
        extra = ""
        if p.exists():
            extra = f" ({'a file' if p.is_file() else 'a folder'} exists there instead)"
        raise MissingFileError(f"{what}: {kind} not found: {str(p)!r}{extra}.")
    return p


def check_unique(names: Sequence[object] | np.ndarray, what: str = "barcodes") -> None:
    """Raise if ``names`` holds duplicates, naming a few of them."""
    idx = pd.Index(np.asarray(names, dtype=object))
    if not idx.is_unique:
        dup = idx[idx.duplicated()].unique()
        shown = ", ".join(map(repr, dup[:5].tolist()))
        more = f" and {len(dup) - 5} more" if len(dup) > 5 else ""
        raise ChronotopeInputError(
            f"{len(dup)} duplicated {what}: {shown}{more}. Each entry must be unique."
        )
