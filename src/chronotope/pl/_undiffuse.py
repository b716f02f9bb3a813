"""Figures of the diffusion correction: a gene before / after (/ truth), out-of-tissue signal."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

from chronotope._errors import ChronotopeInputError
from chronotope.pl._spatial import spatial

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["out_of_tissue", "undiffuse"]


def _need(adata: AnnData, key: str) -> None:
    if key not in adata.layers:
        raise ChronotopeInputError(
            f"adata.layers[{key!r}] is missing: run chronotope.tl.undiffuse first"
        )


def _column(x, j: int) -> np.ndarray:
    col = x[:, j]
    return np.asarray(col.toarray() if sp.issparse(col) else col, dtype=np.float64).ravel()


def undiffuse(
    adata: AnnData,
    gene: str | None = None,
    *,
    key: str = "undiffused",
    truth_layer: str | None = "truth",
    spatial_key: str = "spatial",
    size: float | None = None,
) -> Figure:
    """One gene observed, corrected and (when simulated) true, on one colour scale.

    Parameters
    ----------
    adata
        Output of :func:`chronotope.tl.undiffuse`.
    gene
        Gene to show (default: the corrected gene with the highest total).
    key
        Layer of the corrected counts.
    truth_layer
        Layer with the truth (:func:`chronotope.tl.simulate_diffusion`); skipped if absent.
    spatial_key
        ``obsm`` key of the coordinates.
    size
        Marker size.
    """
    import matplotlib.pyplot as plt

    _need(adata, key)
    if gene is None:
        tot = np.asarray(adata.layers[key].sum(axis=0)).ravel()
        gene = str(adata.var_names[int(np.argmax(tot))])
    if gene not in adata.var_names:
        raise ChronotopeInputError(f"gene {gene!r} is not in adata.var_names")
    j = int(adata.var_names.get_loc(gene))
    panels = [("observed", _column(adata.X, j)), ("undiffused", _column(adata.layers[key], j))]
    if truth_layer is not None and truth_layer in adata.layers:
        panels.append(("truth", _column(adata.layers[truth_layer], j)))
    vmax = float(max(np.quantile(v, 0.99) for _, v in panels)) or None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.2), squeeze=False)
    for ax, (name, v) in zip(axes[0], panels, strict=True):
        spatial(
            adata,
            v,
            spatial_key=spatial_key,
            ax=ax,
            size=size,
            vmin=0.0,
            vmax=vmax,
            title=f"{gene}: {name}",
        )
    fig.tight_layout()
    return fig


def out_of_tissue(
    adata: AnnData,
    *,
    key: str = "undiffused",
    tissue_key: str = "in_tissue",
    spatial_key: str = "spatial",
    size: float | None = None,
) -> Figure:
    """Total counts per spot before and after, and the out-of-tissue share in the titles.

    Parameters
    ----------
    adata
        Output of :func:`chronotope.tl.undiffuse`.
    key
        Layer of the corrected counts.
    tissue_key
        ``obs`` column of the in-tissue flag.
    spatial_key
        ``obsm`` key of the coordinates.
    size
        Marker size.
    """
    import matplotlib.pyplot as plt

    _need(adata, key)
    if tissue_key not in adata.obs:
        raise ChronotopeInputError(f"adata.obs[{tissue_key!r}] is missing")
    tis = adata.obs[tissue_key].to_numpy().astype(bool)
    before = np.asarray(adata.X.sum(axis=1), dtype=np.float64).ravel()
    after = np.asarray(adata.layers[key].sum(axis=1), dtype=np.float64).ravel()
    vmax = float(np.quantile(before, 0.99)) or None
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for ax, (name, v) in zip(axes[:2], (("observed", before), ("undiffused", after)), strict=True):
        share = v[~tis].sum() / max(v.sum(), 1e-300)
        spatial(
            adata,
            np.log1p(v),
            spatial_key=spatial_key,
            ax=ax,
            size=size,
            vmin=0.0,
            vmax=np.log1p(vmax) if vmax else None,
            title=f"log1p total, {name}: {100 * share:.2f}% outside tissue",
        )
    if "diffusion_fraction" in adata.obs:
        spatial(
            adata,
            "diffusion_fraction",
            spatial_key=spatial_key,
            ax=axes[2],
            size=size,
            vmin=0.0,
            vmax=1.0,
            title="share of molecules from other spots",
        )
    else:
        axes[2].set_axis_off()
    fig.tight_layout()
    return fig
