"""Read snapshots from AnnData for the ``tl`` layer (kept apart from the array core)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp

from chronotope._errors import ChronotopeInputError
from chronotope._validate import get_obsm
from chronotope.dynamics.model import GeneMap

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = ["gene_map_from_adata", "read_snapshots"]

#: ``.X`` is accepted as the representation up to this many columns (dense ODEs in gene
#: space beyond it are the wrong tool; use a PCA or a latent).
MAX_X_DIM = 100


def read_snapshots(adata: AnnData, time_key: str, use_rep: str) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(x, time)``: cells in ``use_rep`` (an ``obsm`` key or ``"X"``) and times.

    Raises
    ------
    ChronotopeInputError
        A missing ``obs`` column or ``obsm`` key, non-numeric times (categorical labels
        such as ``"day2"`` must be mapped to numbers first), or ``.X`` too wide.
    """
    if time_key not in adata.obs:
        have = ", ".join(map(repr, list(adata.obs.columns)[:10])) or "none"
        raise ChronotopeInputError(f"adata.obs[{time_key!r}] not found (have: {have}).")
    col = adata.obs[time_key]
    if isinstance(col.dtype, pd.CategoricalDtype):
        col = col.astype(str)
    time = col.to_numpy()
    if use_rep == "X":
        if adata.n_vars > MAX_X_DIM:
            raise ChronotopeInputError(
                f"adata.X has {adata.n_vars} columns; dynamics work in a low-dimensional "
                f"representation (at most {MAX_X_DIM} for .X). Pass use_rep='X_pca' after "
                "chronotope.pp.pca, or another obsm key."
            )
        x = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
    else:
        x = np.asarray(get_obsm(adata, use_rep, made_by="chronotope.pp.pca"))
    return x, time


def gene_map_from_adata(adata: AnnData, use_rep: str) -> GeneMap | None:
    """The linear map back to genes: PCA loadings for ``"X_pca"``, identity for ``"X"``.

    ``None`` for other representations (a latent without a linear decoder). The centre
    is the mean of ``.X`` over cells (what an unscaled PCA of ``.X`` removed; for a PCA of
    another layer or of scaled data the map is in those units).
    """
    names = [str(v) for v in adata.var_names]
    if use_rep == "X":
        return GeneMap(np.eye(adata.n_vars), var_names=names)
    if use_rep == "X_pca" and "PCs" in adata.varm:
        loadings = np.asarray(adata.varm["PCs"], dtype=np.float64)
        if loadings.shape[1] != np.asarray(adata.obsm["X_pca"]).shape[1]:
            return None
        center = np.asarray(adata.X.mean(axis=0)).ravel()
        return GeneMap(loadings, center=center, var_names=names)
    return None
