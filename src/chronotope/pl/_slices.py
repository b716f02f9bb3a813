"""Figures for slice alignment: overlays before / after, and matched spot links."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

from chronotope._errors import ChronotopeInputError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["alignment", "integration", "interpolation"]


def alignment(
    adata: AnnData,
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
    adata, moving
        The reference and the moving slice after :func:`chronotope.tl.align_slices`
        (``obsm[aligned_key]``).
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

    for name, a in (("reference", adata), ("moving", moving)):
        if aligned_key not in a.obsm:
            raise ChronotopeInputError(f"{name}.obsm[{aligned_key!r}] is missing: align first")
    ya = np.asarray(adata.obsm[aligned_key])[:, :2]
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


def _first_centred_axis(rows: sp.csr_matrix, mean: np.ndarray) -> np.ndarray:
    """First right singular vector of ``rows - mean``, without densifying ``rows``.

    The centred matrix is an operator (``(R - 1 mean^T) v = R v - (mean . v) 1``), so the
    memory stays that of the sparse rows whatever the number of genes.
    """
    from scipy.sparse.linalg import LinearOperator, svds

    n, g = rows.shape
    if min(n, g) < 3:  # svds needs k < min(shape); tiny inputs: the dense SVD is free
        return np.linalg.svd(rows.toarray() - mean, full_matrices=False)[2][0]
    rows = rows.astype(np.float64)
    op = LinearOperator(
        (n, g),
        matvec=lambda v: rows @ np.ravel(v) - float(mean @ np.ravel(v)),
        rmatvec=lambda u: rows.T @ np.ravel(u) - mean * float(np.sum(u)),
        dtype=np.float64,
    )
    _, _, vt = svds(op, k=1, v0=np.ones(min(n, g)), tol=0, solver="arpack")
    return vt[0]


def interpolation(
    adata: AnnData,
    generated: AnnData,
    second: AnnData,
    *,
    truth: AnnData | None = None,
    spatial_key: str = "spatial",
    color: str | None = None,
) -> Figure:
    """The two slices, the generated one between them (and the real one, when known).

    Spots are coloured by ``color`` (a gene of all slices) or, by default, by the
    first principal component of the shared genes' log-expression.
    """
    import matplotlib.pyplot as plt

    from chronotope.tl._slices import _log_normalised

    panels = [("first", adata), ("generated", generated), ("second", second)]
    if truth is not None:
        panels.insert(2, ("real", truth))
    genes = generated.var_names
    for _, a in panels:
        genes = genes[genes.isin(a.var_names)]
    if color is not None and color not in genes:
        raise ChronotopeInputError(f"gene {color!r} is not in every slice")

    def values(name: str, a: AnnData) -> np.ndarray:
        x = a[:, genes].X
        if name != "generated":
            x = _log_normalised(x)  # row totals over the shared genes, kept sparse
        if color is not None:  # densify the one gene drawn, not the slice
            x = x[:, list(genes).index(color)]
            return np.asarray(x.toarray() if sp.issparse(x) else x).ravel()
        return x  # kept sparse: only a row subsample is densified below

    mats = [values(n, a) for n, a in panels]
    if color is None:
        # first principal axis of the stacked slices, from about 3,000 rows; every slice
        # is then projected sparse ((m - mean) v = m v - mean v): no slice is densified
        n_all = sum(m.shape[0] for m in mats)
        step = max(1, n_all // 3000)
        mean = sum(np.asarray(m.sum(axis=0), dtype=np.float64).ravel() for m in mats) / n_all
        rows = sp.vstack([sp.csr_matrix(m) for m in mats], format="csr")[::step]
        axis = _first_centred_axis(rows, mean)
        mats = [np.asarray(m @ axis).ravel() - float(mean @ axis) for m in mats]
    lo = min(float(np.percentile(m, 1)) for m in mats)
    hi = max(float(np.percentile(m, 99)) for m in mats)
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), squeeze=False)
    for ax, (name, a), v in zip(axes[0], panels, mats, strict=True):
        key = "spatial" if name == "generated" else spatial_key
        xy = np.asarray(a.obsm["spatial_aligned" if "spatial_aligned" in a.obsm else key])
        ax.scatter(xy[:, 0], xy[:, 1], c=v, s=max(2.0, 3e4 / len(xy)), vmin=lo, vmax=hi, lw=0)
        ax.set_title(name)
        ax.set_aspect("equal")
        ax.invert_yaxis()
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


def integration(
    adata: AnnData,
    *,
    batch_key: str = "slice",
    color: str = "domain",
    aligned_key: str = "spatial_aligned",
) -> Figure:
    """Integrated slices: each slice by ``color`` in the common frame, and all overlaid.

    Parameters
    ----------
    adata
        The result of :func:`chronotope.tl.integrate_slices`.
    batch_key
        ``obs`` column naming each spot's slice.
    color
        Categorical ``obs`` column (joint domains by default); one palette for all slices.
    aligned_key
        ``obsm`` key of the common-frame coordinates.

    Returns
    -------
    matplotlib.figure.Figure
    """
    import matplotlib.pyplot as plt

    for where, key in (("obs", batch_key), ("obs", color), ("obsm", aligned_key)):
        if key not in getattr(adata, where):
            raise ChronotopeInputError(f"adata.{where}[{key!r}] is missing: integrate first")
    xy = np.asarray(adata.obsm[aligned_key])[:, :2]
    batches = adata.obs[batch_key].astype(str).to_numpy()
    names = list(dict.fromkeys(batches))
    cats, codes = np.unique(adata.obs[color].astype(str).to_numpy(), return_inverse=True)
    cmap = plt.get_cmap("tab20" if cats.size > 10 else "tab10")
    colors = cmap(codes % cmap.N)
    n = len(names) + 1
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4.2), squeeze=False)
    markers = "os^Dv<>p"
    for ax, name in zip(axes[0], names, strict=False):
        m = batches == name
        s = max(1.0, 1.5e4 / m.sum())
        ax.scatter(xy[m, 0], xy[m, 1], c=colors[m], s=s, lw=0)
        ax.set_title(f"{name} ({m.sum()} spots)")
    ax = axes[0][-1]
    for i, name in enumerate(names):
        m = batches == name
        ax.scatter(
            xy[m, 0],
            xy[m, 1],
            c=colors[m],
            s=max(1.0, 0.5e4 / m.sum()),
            lw=0,
            alpha=0.6,
            marker=markers[i % len(markers)],
            label=name,
        )
    ax.legend(loc="upper right", frameon=False, markerscale=3)
    ax.set_title("overlaid in one frame")
    for a in axes[0]:
        a.set_aspect("equal")
        a.invert_yaxis()
        a.set_xticks([])
        a.set_yticks([])
    fig.tight_layout()
    return fig
