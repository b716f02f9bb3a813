"""Figures for slice alignment: overlays before / after, and matched spot links."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

from chronotope._errors import ChronotopeInputError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["alignment"]


def alignment(
    reference: AnnData,
    moving: AnnData,
    plan: sp.spmatrix | None = None,
    *,
    spatial_key: str = "spatial",
    aligned_key: str = "spatial_aligned",
    n_links: int = 300,
    seed: int = 0,
) -> Figure:
    """Two slices overlaid before and after alignment, and matched spot links.

    Parameters
    ----------
    reference, moving
        The slices after :func:`chronotope.tl.align_slices` (``obsm[aligned_key]``).
    plan
        ``(n_reference, n_moving)`` plan; draws links from a random sample of reference
        spots to their strongest partner.
    spatial_key, aligned_key
        Original and aligned coordinates in ``obsm``.
    n_links
        Number of links drawn.
    seed
        Seed of the sampled links.

    Returns
    -------
    matplotlib.figure.Figure
    """
    import matplotlib.pyplot as plt

    for name, a in (("reference", reference), ("moving", moving)):
        if aligned_key not in a.obsm:
            raise ChronotopeInputError(f"{name}.obsm[{aligned_key!r}] is missing: align first")
    ya = np.asarray(reference.obsm[aligned_key])[:, :2]
    xb0 = np.asarray(moving.obsm[spatial_key])[:, :2]
    xb = np.asarray(moving.obsm[aligned_key])[:, :2]
    n_panels = 3 if plan is not None else 2
    fig, axes = plt.subplots(1, n_panels, figsize=(5 * n_panels, 5), squeeze=False)
    axes = axes[0]
    s = max(1.0, 2e4 / max(len(ya), len(xb)))
    for ax, other, title in ((axes[0], xb0, "before"), (axes[1], xb, "after")):
        ax.scatter(ya[:, 0], ya[:, 1], s=s, c="tab:blue", alpha=0.5, lw=0, label="reference")
        ax.scatter(other[:, 0], other[:, 1], s=s, c="tab:orange", alpha=0.5, lw=0, label="moving")
        ax.set_title(title)
    axes[0].legend(loc="upper right", markerscale=4, frameon=False)
    if plan is not None:
        p = sp.csr_matrix(plan)
        if p.shape != (len(ya), len(xb)):
            raise ChronotopeInputError(f"plan has shape {p.shape}, expected {(len(ya), len(xb))}")
        rows = np.flatnonzero(np.diff(p.indptr) > 0)
        rng = np.random.default_rng(seed)
        rows = rng.choice(rows, size=min(n_links, rows.size), replace=False)
        best = np.asarray(p[rows].argmax(axis=1)).ravel()
        ax = axes[2]
        ax.scatter(ya[:, 0], ya[:, 1], s=s, c="tab:blue", alpha=0.2, lw=0)
        ax.scatter(xb[:, 0], xb[:, 1], s=s, c="tab:orange", alpha=0.2, lw=0)
        from matplotlib.collections import LineCollection

        segs = np.stack([ya[rows], xb[best]], axis=1)
        ax.add_collection(LineCollection(segs, colors="k", linewidths=0.6))
        ax.set_title(f"strongest partner of {len(rows)} reference spots")
    for ax in axes:
        ax.set_aspect("equal")
        ax.invert_yaxis()
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig
