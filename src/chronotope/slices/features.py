"""Shared expression features of several slices: genes matched by name, one joint PCA."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

from chronotope._errors import ChronotopeInputError

__all__ = ["shared_features", "shared_genes"]

# Fewest shared genes with which slices are compared at all.
_MIN_SHARED = 20


def shared_genes(adatas: Sequence[AnnData]) -> np.ndarray:
    """Gene names present in every slice, in the order of the first one.

    Raises
    ------
    ChronotopeInputError
        Duplicate names within a slice, or fewer than 20 shared genes.
    """
    for i, a in enumerate(adatas):
        if not a.var_names.is_unique:
            raise ChronotopeInputError(
                f"slice {i} has duplicated gene names; call adata.var_names_make_unique()"
            )
    common = adatas[0].var_names
    for a in adatas[1:]:
        common = common[common.isin(a.var_names)]
    if len(common) < _MIN_SHARED:
        sizes = ", ".join(str(a.n_vars) for a in adatas)
        raise ChronotopeInputError(
            f"the slices share {len(common)} gene names (of {sizes}); at least {_MIN_SHARED} "
            "are needed. Are the names of one kind (symbols vs Ensembl ids)?"
        )
    return np.asarray(common)


def shared_features(
    adatas: Sequence[AnnData],
    *,
    layer: str | None = None,
    n_top_genes: int = 3000,
    n_comps: int = 30,
    center_slices: bool = False,
    seed: int = 0,
) -> list[np.ndarray]:
    """Joint PCA features of slices over their shared genes.

    Counts of the shared genes are stacked; highly variable genes are ranked per slice
    (``batch_key``) and combined (:func:`chronotope.pp.highly_variable_genes`); the
    selected genes are library-size normalised (over all shared genes), log1p'd and
    reduced by one PCA fitted on all slices together, so every slice lives in one space.

    Parameters
    ----------
    adatas
        Slices with raw counts in ``.X`` (or ``layer``).
    layer
        Layer holding the counts.
    n_top_genes, n_comps
        Genes selected and principal components kept (clamped to what the data allow).
    center_slices
        Centre each gene within each slice before the PCA (slices from different
        platforms whose per-gene capture differs; see ``batch_key`` of
        :func:`chronotope.pp.pca`).
    seed
        Seed of the PCA solver.

    Returns
    -------
    list of numpy.ndarray
        One ``(n_obs_i, n_comps)`` float32 array per slice.
    """
    from chronotope.tl._domains import _preprocess_selected

    if len(adatas) < 2:
        raise ChronotopeInputError("at least two slices are needed")
    for i, a in enumerate(adatas):
        if a.n_obs == 0:
            raise ChronotopeInputError(f"slice {i} has no spots")
    genes = shared_genes(adatas)
    mats = []
    for a in adatas:
        x = a.X if layer is None else a.layers[layer]
        idx = a.var_names.get_indexer(genes)
        mats.append(sp.csr_matrix(x)[:, idx])
    stacked = sp.vstack(mats, format="csr")
    sizes = [a.n_obs for a in adatas]
    joint = AnnData(stacked)
    joint.var_names = genes
    joint.obs["slice"] = np.repeat(np.arange(len(adatas)).astype(str), sizes)
    n_comps = int(min(n_comps, stacked.shape[0] - 1, min(n_top_genes, stacked.shape[1]) - 1))
    _preprocess_selected(
        joint,
        None,
        min(n_top_genes, stacked.shape[1]),
        n_comps,
        "slice",
        seed,
        center_batches=center_slices,
    )
    scores = np.asarray(joint.obsm["X_pca"], dtype=np.float32)
    return np.split(scores, np.cumsum(sizes)[:-1])
