"""Figures for spatial domains: spots by domain (and truth), top important genes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from anndata import AnnData

from chronotope._errors import ChronotopeInputError
from chronotope.pl._spatial import spatial

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["domains", "gene_importance"]


def domains(
    adata: AnnData,
    key: str = "domain",
    labels_key: str | None = None,
    *,
    spatial_key: str = "spatial",
    size: float | None = None,
) -> Figure:
    """Spots coloured by domain, beside the reference labels when given.

    Parameters
    ----------
    adata
        Output of :func:`chronotope.tl.spatial_domains`.
    key
        Column of ``adata.obs`` with the domains.
    labels_key
        Column of ``adata.obs`` with reference labels (e.g. manual layers); the ARI is
        put in the title.
    spatial_key
        Key of the coordinates in ``adata.obsm``.
    size
        Marker size.

    Returns
    -------
    matplotlib.figure.Figure
        One panel, or two with ``labels_key``.
    """
    import matplotlib.pyplot as plt

    if key not in adata.obs:
        raise ChronotopeInputError(
            f"adata.obs[{key!r}] is missing: run chronotope.tl.spatial_domains first"
        )
    panels = 1 if labels_key is None else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.6), squeeze=False)
    title = f"domains ({adata.obs[key].nunique()})"
    if labels_key is not None:
        if labels_key not in adata.obs:
            raise ChronotopeInputError(f"adata.obs[{labels_key!r}] is missing")
        from sklearn.metrics import adjusted_rand_score

        truth = adata.obs[labels_key].astype(str).to_numpy()
        ok = truth != "nan"
        ari = adjusted_rand_score(truth[ok], adata.obs[key].astype(str).to_numpy()[ok])
        title += f", ARI {ari:.3f} vs {labels_key}"
        spatial(adata, labels_key, spatial_key=spatial_key, ax=axes[0, 1], size=size)
    spatial(adata, key, spatial_key=spatial_key, ax=axes[0, 0], size=size, title=title)
    fig.tight_layout()
    return fig


def gene_importance(
    adata: AnnData,
    n_top: int = 20,
    *,
    key: str = "gene_importance",
    gene_symbols: str | None = None,
) -> Figure:
    """Horizontal bars of the genes with the highest learned importance.

    Parameters
    ----------
    adata
        Output of :func:`chronotope.tl.spatial_domains` (``var["gene_importance"]``).
    n_top
        Number of genes shown.
    key
        Column of ``adata.var``.
    gene_symbols
        Column of ``adata.var`` with names to show instead of ``var_names``.

    Returns
    -------
    matplotlib.figure.Figure
    """
    import matplotlib.pyplot as plt

    if key not in adata.var:
        raise ChronotopeInputError(
            f"adata.var[{key!r}] is missing: run chronotope.tl.spatial_domains first"
        )
    values = adata.var[key].to_numpy(dtype=float)
    order = np.argsort(np.where(np.isnan(values), -np.inf, values))[::-1][:n_top]
    order = order[np.isfinite(values[order])]
    names = adata.var[gene_symbols] if gene_symbols else adata.var_names
    names = np.asarray(names.astype(str))[order]
    fig, ax = plt.subplots(figsize=(4.8, 0.25 * len(order) + 1.0))
    ax.barh(np.arange(len(order))[::-1], values[order], color="#3b6ea5")
    ax.set_yticks(np.arange(len(order))[::-1], names, fontsize=8)
    ax.set_xlabel("gene importance")
    ax.set_title(f"top {len(order)} genes")
    fig.tight_layout()
    return fig
