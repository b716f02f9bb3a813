"""Figures for dynamics: velocity streamlines, landscape, fate bars, perturbation, GRN."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
from anndata import AnnData

from chronotope._errors import ChronotopeInputError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["fate", "grn", "landscape", "perturb", "velocity_streamlines"]


def _figure(ncols: int = 1, size: tuple[float, float] = (4.8, 4.2)) -> tuple[Figure, np.ndarray]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] * ncols, size[1]), layout="constrained")
    return fig, np.atleast_1d(fig.subplots(1, ncols, squeeze=False)[0])


def _uns(adata: AnnData, key: str, made_by: str) -> dict:
    if key not in adata.uns:
        raise ChronotopeInputError(f"adata.uns[{key!r}] is missing: run {made_by} first.")
    return adata.uns[key]


def _coordinates(
    adata: AnnData,
    key: str,
    cols: list[int] | None = None,
    shape: tuple[int, ...] | None = None,
    what: str = "",
) -> np.ndarray:
    """Cells in ``obsm[key]`` or ``.X``, densified only after the checks: ``shape`` (the
    whole matrix must have it) or ``cols`` (only those columns are taken)."""
    if key == "X":
        m = adata.X
    elif key in adata.obsm:
        m = adata.obsm[key]
    else:
        raise ChronotopeInputError(f"adata.obsm[{key!r}] is missing.")
    if shape is not None and tuple(m.shape) != tuple(shape):
        raise ChronotopeInputError(
            f"velocity basis {key!r} {tuple(m.shape)} and velocities {what} {tuple(shape)} "
            "differ in shape; pass velocity_basis= the coordinates the velocity lives in."
        )
    if cols is not None:
        if max(cols) >= m.shape[1]:
            raise ChronotopeInputError(f"basis {key!r} has {m.shape[1]} dimension(s), dims={cols}.")
        m = m[:, cols]
    return np.asarray(m.toarray() if hasattr(m, "toarray") else m, dtype=np.float64)


def _grid_velocity(
    pts: np.ndarray, vel: np.ndarray, n_grid: int, n_neighbors: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Gaussian-kernel average of the cell velocities on a regular grid (kNN, no N x N)."""
    from sklearn.neighbors import NearestNeighbors

    lo, hi = pts.min(0), pts.max(0)
    gx = np.linspace(lo[0], hi[0], n_grid)
    gy = np.linspace(lo[1], hi[1], n_grid)
    xx, yy = np.meshgrid(gx, gy)
    grid = np.column_stack([xx.ravel(), yy.ravel()])
    k = min(n_neighbors, pts.shape[0])
    nn = NearestNeighbors(n_neighbors=k).fit(pts)
    dist, idx = nn.kneighbors(grid)
    h = max(float(np.mean(hi - lo)) / n_grid, 1e-12) * 1.5
    w = np.exp(-0.5 * (dist / h) ** 2)
    tot = w.sum(1)
    v = (w[:, :, None] * vel[idx]).sum(1) / np.maximum(tot, 1e-300)[:, None]
    # hide the grid far from every cell (beyond two kernel widths)
    empty = dist[:, 0] > 2 * h
    v[empty] = np.nan
    return gx, gy, v[:, 0].reshape(n_grid, n_grid), v[:, 1].reshape(n_grid, n_grid)


def velocity_streamlines(
    adata: AnnData,
    basis: str | None = None,
    *,
    velocity_key: str | None = None,
    velocity_basis: str | None = None,
    color: str | None = None,
    dims: tuple[int, int] = (0, 1),
    n_grid: int = 40,
    n_neighbors: int = 30,
    size: float | None = None,
) -> Figure:
    """Streamlines of the learned velocity over a 2-D view of the cells.

    Parameters
    ----------
    adata
        Output of :func:`chronotope.tl.fit_dynamics`.
    basis
        ``obsm`` key of the view (default: the fitted representation) or ``"X"``. When it
        is the velocity's own coordinates (``velocity_basis``) the velocity is drawn as it
        is; any other view (a UMAP of the PCA the model was fitted on, say) gets the
        velocity projected by scVelo's transition-kernel projection
        (:func:`chronotope.dynamics.readouts.embed_velocity`, ``n_neighbors`` cells in
        the velocity's coordinates), a direction field.
    velocity_key
        ``obsm`` key of the velocities (default: ``uns["dynamics"]["velocity_key"]``).
    velocity_basis
        ``obsm`` key (or ``"X"``) of the coordinates the velocity lives in (default: the
        fitted representation).
    color
        ``obs`` column to colour the cells by (categorical or numeric); default the time.
    dims
        The two dimensions shown.
    n_grid
        Grid points per axis for the smoothed field.
    n_neighbors
        Cells averaged per grid point (and neighbours per cell of the projection).
    size
        Marker size.

    Returns
    -------
    matplotlib.figure.Figure
    """
    rec = _uns(adata, "dynamics", "chronotope.tl.fit_dynamics")
    vrep = velocity_basis or rec["params"]["use_rep"]
    rep = basis or vrep
    vkey = velocity_key or rec["velocity_key"]
    if vkey not in adata.obsm:
        raise ChronotopeInputError(f"adata.obsm[{vkey!r}] is missing.")
    v = np.asarray(adata.obsm[vkey], dtype=np.float64)
    # the velocity's own coordinates have its shape (checked before anything is densified)
    x_v = _coordinates(adata, vrep, shape=v.shape, what=repr(vkey))
    i, j = dims
    if rep == vrep:
        x = x_v
    else:
        from chronotope.dynamics.readouts import embed_velocity

        x = _coordinates(adata, rep, [i, j])
        v = embed_velocity(x_v, v, x, n_neighbors=n_neighbors)
        i, j = 0, 1
    pts, vel = x[:, [i, j]].astype(np.float64), v[:, [i, j]].astype(np.float64)
    gx, gy, u, w = _grid_velocity(pts, vel, n_grid, n_neighbors)
    fig, (ax,) = _figure()
    ckey = color or rec["params"]["time_key"]
    s = size if size is not None else max(1.0, 2e4 / max(adata.n_obs, 1))
    if ckey in adata.obs:
        col = adata.obs[ckey]
        if hasattr(col, "cat"):
            for name in col.cat.categories:
                m = (col == name).to_numpy()
                ax.scatter(pts[m, 0], pts[m, 1], s=s, alpha=0.5, lw=0, label=str(name))
            ax.legend(frameon=False, fontsize="small", markerscale=3, loc="best")
        else:
            sc = ax.scatter(
                pts[:, 0], pts[:, 1], c=col.to_numpy(), s=s, alpha=0.5, lw=0, cmap="viridis"
            )
            fig.colorbar(sc, ax=ax, label=ckey, shrink=0.8)
    else:
        ax.scatter(pts[:, 0], pts[:, 1], s=s, c="0.7", lw=0)
    speed = np.hypot(u, w)
    lw = 0.6 + 1.6 * np.nan_to_num(speed / max(np.nanmax(speed), 1e-12))
    ax.streamplot(gx, gy, u, w, color="k", linewidth=lw, density=1.2, arrowsize=0.9)
    ax.set_xlabel(f"{rep} {dims[0] + 1}")
    ax.set_ylabel(f"{rep} {dims[1] + 1}")
    how = "" if rep == vrep else f", projected from {vrep}"
    ax.set_title(f"velocity (probability flow){how}")
    return fig


def landscape(
    adata: AnnData,
    key: str = "landscape",
    *,
    time_key: str | None = None,
    kind: Literal["contour", "surface"] = "contour",
    max_panels: int = 4,
) -> Figure:
    """The learned landscape ``U(x, t)`` at up to ``max_panels`` times, cells overlaid.

    Parameters
    ----------
    adata
        Output of :func:`chronotope.tl.landscape`.
    key
        Its ``key_added``.
    time_key
        ``obs`` time column for the overlaid cells (default: the one recorded).
    kind
        ``"contour"`` (filled contours with the cells of that time) or ``"surface"`` (3-D).
    max_panels
        Most panels; times are chosen evenly.

    Returns
    -------
    matplotlib.figure.Figure
    """
    rec = _uns(adata, key, "chronotope.tl.landscape")
    u = np.asarray(rec["U"])
    times = np.asarray(rec["times"])
    gx, gy = np.asarray(rec["grid_x"]), np.asarray(rec["grid_y"])
    dims = [int(d) for d in rec["params"]["dims"]]
    tkey = time_key or rec["params"]["time_key"]
    pick = np.unique(np.linspace(0, len(times) - 1, min(max_panels, len(times))).round())
    pick = pick.astype(int)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(pick), 3.8), layout="constrained")
    rep = adata.uns.get("dynamics", {}).get("params", {}).get("use_rep")
    x = None
    if rep == "X":
        x = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    elif rep is not None and rep in adata.obsm:
        x = np.asarray(adata.obsm[rep])
    vmax = float(np.percentile(u, 95))
    for n, k in enumerate(pick):
        if kind == "surface":
            ax = fig.add_subplot(1, len(pick), n + 1, projection="3d")
            xx, yy = np.meshgrid(gx, gy)
            ax.plot_surface(xx, yy, np.minimum(u[k], vmax), cmap="viridis", lw=0)
        else:
            ax = fig.add_subplot(1, len(pick), n + 1)
            cs = ax.contourf(gx, gy, np.minimum(u[k], vmax), levels=20, cmap="viridis")
            if x is not None and tkey in adata.obs:
                m = np.isclose(adata.obs[tkey].to_numpy(dtype=np.float64), times[k])
                sub = x[m][:: max(1, int(m.sum()) // 1500)]
                ax.scatter(sub[:, dims[0]], sub[:, dims[1]], s=1.5, c="w", alpha=0.5, lw=0)
            if n == len(pick) - 1:
                fig.colorbar(cs, ax=ax, label="U (min 0)", shrink=0.8)
        ax.set_title(f"t = {times[k]:g}")
    return fig


def fate(adata: AnnData, key: str = "fate", groupby: str | None = None) -> Figure:
    """Fate distribution of the start cells (with ``groupby``: per start-cell group).

    Parameters
    ----------
    adata
        Output of :func:`chronotope.tl.fate`.
    key
        Its ``key_added``.
    groupby
        ``obs`` column of the start cells (e.g. their own state): one stacked bar per
        group, plus the population.

    Returns
    -------
    matplotlib.figure.Figure
        Bars of the mean probability per fate; the error bars are the mean bootstrap
        interval of the cells.
    """
    rec = _uns(adata, key, "chronotope.tl.fate")
    classes = [str(c) for c in rec["classes"]]
    probs = np.asarray(adata.obsm[key])
    ok = np.isfinite(probs).all(1)
    fig, axes = _figure(2 if groupby else 1)
    dist = np.asarray(rec["distribution"])
    lo = np.nanmean(np.asarray(adata.obsm[f"{key}_lower"])[ok], 0)
    hi = np.nanmean(np.asarray(adata.obsm[f"{key}_upper"])[ok], 0)
    mean = probs[ok].mean(0)
    ax = axes[0]
    pos = np.arange(len(classes))
    ax.bar(pos, dist, color=[f"C{i}" for i in range(len(classes))])
    ax.errorbar(
        pos,
        mean,
        yerr=[np.maximum(mean - lo, 0), np.maximum(hi - mean, 0)],
        fmt="none",
        ecolor="k",
        capsize=3,
    )
    ax.set_xticks(pos, classes)
    ax.set_ylabel("fate probability")
    p = rec["params"]
    ax.set_title(f"fate at t={p['target_time']:g} of cells at t={p['start_time']:g}")
    if groupby:
        if groupby not in adata.obs:
            raise ChronotopeInputError(f"adata.obs[{groupby!r}] is missing.")
        lab = adata.obs[groupby].to_numpy().astype(str)[ok]
        groups = sorted(set(lab))
        bottom = np.zeros(len(groups))
        for c, name in enumerate(classes):
            vals = np.array([probs[ok][lab == g, c].mean() for g in groups])
            axes[1].bar(groups, vals, bottom=bottom, color=f"C{c}", label=name)
            bottom += vals
        axes[1].set_ylabel("mean fate probability")
        axes[1].set_xlabel(f"start cells by {groupby}")
        axes[1].legend(frameon=False, fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def perturb(adata: AnnData, key: str = "perturb") -> Figure:
    """Fate distribution before and after an in-silico perturbation, and the shift.

    Parameters
    ----------
    adata
        Output of :func:`chronotope.tl.perturb`.
    key
        Its ``key_added``.

    Returns
    -------
    matplotlib.figure.Figure
    """
    rec = _uns(adata, key, "chronotope.tl.perturb")
    classes = [str(c) for c in rec["classes"]]
    base, pert = np.asarray(rec["baseline"]), np.asarray(rec["perturbed"])
    fig, (a0, a1) = _figure(2)
    pos = np.arange(len(classes))
    a0.bar(pos - 0.2, base, 0.4, label="baseline", color="0.6")
    a0.bar(pos + 0.2, pert, 0.4, label="perturbed", color="C3")
    a0.set_xticks(pos, classes)
    a0.set_ylabel("fate probability")
    a0.legend(frameon=False, fontsize="small")
    p = rec["params"]
    a0.set_title(f"{p['gene']} {p['mode']} (set to {float(rec['value']):.3g})")
    shift = np.asarray(rec["shift"])
    a1.bar(pos, shift, color=np.where(shift >= 0, "C2", "C3"))
    a1.axhline(0, color="k", lw=0.8)
    a1.set_xticks(pos, classes)
    a1.set_ylabel("change of fate probability")
    a1.set_title("shift (perturbed - baseline)")
    return fig


def grn(adata: AnnData, key: str = "grn", *, n_genes: int = 25) -> Figure:
    """Heatmap of the gene-space Jacobian (signed) over the genes of the strongest edges.

    Parameters
    ----------
    adata
        Output of :func:`chronotope.tl.jacobian_grn`.
    key
        Its ``key_added``.
    n_genes
        Most genes shown (those in the strongest edges first).

    Returns
    -------
    matplotlib.figure.Figure
        ``J[a, b] = d v_a / d gene_b``: row ``a`` target, column ``b`` source.
    """
    rec = _uns(adata, key, "chronotope.tl.jacobian_grn")
    genes = [str(g) for g in rec["genes"]]
    j = np.asarray(rec["jacobian"])
    order: list[str] = []
    for s, t in zip(rec["edges"]["source"], rec["edges"]["target"], strict=True):
        for g in (str(s), str(t)):
            if g not in order:
                order.append(g)
    order = (order or genes)[:n_genes]
    idx = [genes.index(g) for g in order]
    sub = j[np.ix_(idx, idx)]
    vmax = float(np.abs(sub).max()) or 1.0
    fig, (ax,) = _figure(size=(0.28 * len(idx) + 2.5, 0.28 * len(idx) + 2.0))
    im = ax.imshow(sub, cmap="RdBu_r", vmin=-vmax, vmax=vmax)
    ax.set_xticks(range(len(idx)), order, rotation=90, fontsize="small")
    ax.set_yticks(range(len(idx)), order, fontsize="small")
    ax.set_xlabel("source gene b")
    ax.set_ylabel("target gene a")
    ax.set_title("cell-averaged Jacobian d v_a / d gene_b")
    fig.colorbar(im, ax=ax, shrink=0.8)
    return fig
