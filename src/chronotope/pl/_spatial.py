"""Scatter plots of spots in tissue coordinates."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from chronotope._errors import ChronotopeInputError
from chronotope._validate import get_obsm

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes

__all__ = ["spatial"]

# Okabe-Ito first (colour-blind safe), then tab20 for many categories.
_OKABE_ITO = (
    "#E69F00",
    "#56B4E9",
    "#009E73",
    "#F0E442",
    "#0072B2",
    "#D55E00",
    "#CC79A7",
    "#000000",
)


def _palette(n: int) -> list[Any]:
    if n <= len(_OKABE_ITO):
        return list(_OKABE_ITO[:n])
    import matplotlib as mpl

    cmap = mpl.colormaps["tab20"]
    return [cmap(i % 20) for i in range(n)]


def _resolve_color(
    adata: AnnData, color: str | np.ndarray | Sequence[Any] | None, layer: str | None
) -> tuple[np.ndarray | pd.Categorical | None, str]:
    """Return the values to colour by (numeric array or categorical) and a label."""
    if color is None:
        return None, ""
    if isinstance(color, str):
        if color in adata.obs.columns:
            values = adata.obs[color]
            if isinstance(values.dtype, pd.CategoricalDtype) or not pd.api.types.is_numeric_dtype(
                values
            ):
                return pd.Categorical(values), color
            return values.to_numpy(dtype=float), color
        if color in adata.var_names:
            j = adata.var_names.get_loc(color)
            x = adata.layers[layer] if layer is not None else adata.X
            col = x[:, j]
            col = col.toarray() if sp.issparse(col) else np.asarray(col)
            return np.asarray(col, dtype=float).ravel(), color
        raise ChronotopeInputError(
            f"pl.spatial: color={color!r} is neither a column of adata.obs nor a gene in "
            "adata.var_names."
        )
    values = np.asarray(color)
    if values.shape[0] != adata.n_obs:
        raise ChronotopeInputError(
            f"pl.spatial: color array has {values.shape[0]} entries, expected {adata.n_obs}."
        )
    if values.dtype.kind in "biuf":
        return values.astype(float).ravel(), ""
    return pd.Categorical(values), ""


def spatial(
    adata: AnnData,
    color: str | np.ndarray | Sequence[Any] | None = None,
    *,
    spatial_key: str = "spatial",
    layer: str | None = None,
    ax: Axes | None = None,
    size: float | None = None,
    cmap: str = "viridis",
    palette: Sequence[Any] | dict[str, Any] | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    title: str | None = None,
    legend: bool = True,
    colorbar: bool = True,
    invert_yaxis: bool = True,
    **scatter_kwargs: Any,
) -> Axes:
    """Scatter the observations at their spatial coordinates.

    Parameters
    ----------
    adata
        Annotated data with coordinates in ``adata.obsm[spatial_key]``.
    color
        What to colour by: a column of ``adata.obs`` (categorical or numeric), a gene
        in ``adata.var_names`` (values from ``adata.X`` or ``layer``), or an array of
        length ``n_obs``. ``None`` draws all spots in one colour.
    spatial_key
        Key of the coordinates in ``adata.obsm`` (first two columns are used).
    layer
        Layer to read gene values from instead of ``adata.X``.
    ax
        Axes to draw into; a new figure is created if ``None``.
    size
        Marker size in points^2; by default scaled with the number of spots.
    cmap
        Colormap for numeric values.
    palette
        Colours for categories: a sequence (in category order) or a mapping
        ``category -> colour``.
    vmin, vmax
        Colour limits for numeric values.
    title
        Axes title; defaults to the name of ``color``.
    legend
        Draw a legend for categorical colours.
    colorbar
        Draw a colorbar for numeric colours.
    invert_yaxis
        Flip the y axis so that image (pixel) coordinates appear upright.
    **scatter_kwargs
        Passed to :meth:`matplotlib.axes.Axes.scatter`.

    Returns
    -------
    The :class:`matplotlib.axes.Axes` drawn into.
    """
    import matplotlib.pyplot as plt

    coords = np.asarray(get_obsm(adata, spatial_key, made_by="a reader that stores coordinates"))
    if coords.ndim != 2 or coords.shape[1] < 2:
        raise ChronotopeInputError(
            f"pl.spatial: adata.obsm[{spatial_key!r}] must have at least 2 columns, "
            f"got shape {coords.shape}."
        )
    values, label = _resolve_color(adata, color, layer)
    if ax is None:
        _, ax = plt.subplots(figsize=(5.0, 4.5))
    if size is None:
        size = float(np.clip(12000.0 / max(adata.n_obs, 1), 1.0, 40.0))
    scatter_kwargs.setdefault("linewidths", 0)
    scatter_kwargs.setdefault("rasterized", True)
    x, y = coords[:, 0], coords[:, 1]

    if values is None:
        ax.scatter(x, y, s=size, c="#4C72B0", **scatter_kwargs)
    elif isinstance(values, pd.Categorical):
        cats = list(values.categories)
        if isinstance(palette, dict):
            colours = [palette.get(c, "#BBBBBB") for c in cats]
        elif palette is not None:
            colours = list(palette)
        else:
            colours = _palette(len(cats))
        codes = values.codes
        if (codes < 0).any():
            ax.scatter(x[codes < 0], y[codes < 0], s=size, c="#DDDDDD", **scatter_kwargs)
        for i, cat in enumerate(cats):
            m = codes == i
            if m.any():
                ax.scatter(
                    x[m],
                    y[m],
                    s=size,
                    color=colours[i % len(colours)],
                    label=str(cat),
                    **scatter_kwargs,
                )
        if legend and cats:
            ax.legend(
                loc="center left",
                bbox_to_anchor=(1.0, 0.5),
                frameon=False,
                markerscale=max(1.0, 4.0 / np.sqrt(size)),
                fontsize="small",
            )
    else:
        order = np.argsort(np.nan_to_num(values, nan=-np.inf), kind="stable")
        sc = ax.scatter(
            x[order],
            y[order],
            s=size,
            c=values[order],
            cmap=cmap,
            vmin=vmin,
            vmax=vmax,
            **scatter_kwargs,
        )
        if colorbar:
            ax.figure.colorbar(sc, ax=ax, fraction=0.046, pad=0.02)

    ax.set_aspect("equal")
    if invert_yaxis and not ax.yaxis_inverted():
        ax.invert_yaxis()
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(title if title is not None else label)
    return ax
