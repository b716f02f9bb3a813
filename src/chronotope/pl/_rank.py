"""Figures of relative-expression learning: per-loss correlation bars, predicted vs measured."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

from chronotope._errors import ChronotopeInputError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["rank_losses", "rank_maps"]


def rank_losses(
    adata: AnnData,
    *,
    key: str = "rank_evaluation",
    metric: str = "both",
    title: str | None = None,
) -> Figure:
    """Bars of the mean within-slide correlation of each evaluated model (loss).

    Parameters
    ----------
    adata
        The test data after one or more :func:`chronotope.tl.rank_evaluate` calls
        (entries of ``uns[key]``, one per model label).
    key
        ``uns`` key of the evaluations.
    metric
        ``"pearson"``, ``"spearman"`` or ``"both"``.
    title
        Figure title.
    """
    import matplotlib.pyplot as plt

    res = adata.uns.get(key)
    if not res:
        raise ChronotopeInputError(f"uns[{key!r}] is empty: run chronotope.tl.rank_evaluate first")
    metrics = ["pearson", "spearman"] if metric == "both" else [metric]
    for m in metrics:
        if m not in ("pearson", "spearman"):
            raise ChronotopeInputError(f"metric must be pearson, spearman or both, got {metric!r}")
    labels = list(res)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(labels) + 1.5), 3.4))
    width = 0.8 / len(metrics)
    pos = np.arange(len(labels))
    colors = {"pearson": "#0072B2", "spearman": "#E69F00"}
    for i, m in enumerate(metrics):
        vals = [float(res[lab][m]) for lab in labels]
        bars = ax.bar(pos + (i - (len(metrics) - 1) / 2) * width, vals, width, label=m,
                      color=colors[m])
        for b, v in zip(bars, vals, strict=True):
            ax.annotate(f"{v:.2f}", (b.get_x() + b.get_width() / 2, v), ha="center",
                        va="bottom", fontsize=7)
    ax.set_xticks(pos, labels, rotation=30, ha="right")
    ax.set_ylabel("mean within-slide correlation")
    ax.axhline(0, color="k", lw=0.5)
    ax.legend(frameon=False, fontsize="small")
    ax.set_title(title or "per-loss correlation on the test slide(s)")
    fig.tight_layout()
    return fig


def rank_maps(
    adata: AnnData,
    genes: Sequence[str] | None = None,
    *,
    n_genes: int = 3,
    layer: str = "predicted",
    spatial_key: str = "spatial",
    batch_key: str | None = None,
    slide: str | None = None,
    size: float | None = None,
) -> Figure:
    """Measured (log-normalised) vs predicted expression maps for the top genes.

    Parameters
    ----------
    adata
        Output of :func:`chronotope.tl.rank_predict` (raw counts in ``.X``, scores in
        ``layers[layer]``, coordinates in ``obsm[spatial_key]``; size factors from
        ``obs["rank_total_counts"]`` when present, else from the genes of ``.X``).
    genes
        Genes to draw; default the ``n_genes`` with the highest within-slide Pearson
        correlation between score and measurement.
    n_genes
        Number of genes when ``genes`` is not given.
    layer
        Layer of the scores.
    spatial_key
        ``obsm`` key of the coordinates.
    batch_key, slide
        Draw only the spots of ``obs[batch_key] == slide`` (default: the first slide).
    size
        Marker size.
    """
    import matplotlib.pyplot as plt

    from chronotope.rank import log_normalize, within_slide_correlation

    if layer not in adata.layers:
        raise ChronotopeInputError(f"layers[{layer!r}] not found: run chronotope.tl.rank_predict")
    if spatial_key not in adata.obsm:
        raise ChronotopeInputError(f"obsm[{spatial_key!r}] not found")
    mask = np.ones(adata.n_obs, dtype=bool)
    if batch_key is not None:
        lab = adata.obs[batch_key].astype(str).to_numpy()
        slide = str(slide) if slide is not None else str(np.unique(lab)[0])
        mask = lab == slide
    sub = adata[mask]
    x = sub.X
    totals = (
        sub.obs["rank_total_counts"].to_numpy(dtype=np.float64)
        if "rank_total_counts" in sub.obs
        else np.asarray(x.sum(axis=1), dtype=np.float64).ravel()
    )

    def measured(cols) -> np.ndarray:  # log-normalised counts of some genes, densified alone
        blk = x[:, cols]
        return log_normalize(blk.toarray() if sp.issparse(blk) else np.asarray(blk), totals)

    pred = np.asarray(sub.layers[layer], dtype=np.float64)
    zeros = np.zeros(sub.n_obs)
    r = np.concatenate(  # per gene, in blocks of 256 genes: the counts are never dense whole
        [
            within_slide_correlation(pred[:, c], measured(c), zeros)[0]
            for c in (slice(lo, lo + 256) for lo in range(0, sub.n_vars, 256))
        ]
    )
    if genes is None:
        order = np.argsort(-np.nan_to_num(r, nan=-2.0))
        genes = [str(sub.var_names[j]) for j in order[:n_genes]]
    idx = [sub.var_names.get_loc(g) for g in genes]
    meas_sel = measured(idx)
    xy = np.asarray(sub.obsm[spatial_key])[:, :2]
    s = size if size is not None else max(4.0, 3000.0 / max(1, sub.n_obs))
    fig, axes = plt.subplots(2, len(idx), figsize=(2.8 * len(idx), 5.4), squeeze=False)
    for c, (g, j) in enumerate(zip(genes, idx, strict=True)):
        pairs = ((meas_sel[:, c], "measured"), (pred[:, j], "predicted"))
        for row, (vals, name) in enumerate(pairs):
            ax = axes[row, c]
            lo, hi = np.nanpercentile(vals, [2, 98])  # a few outlier spots do not set the scale
            ax.scatter(xy[:, 0], xy[:, 1], c=vals, s=s, cmap="viridis", linewidths=0,
                       vmin=lo, vmax=hi if hi > lo else None)
            ax.set_aspect("equal")
            ax.invert_yaxis()
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{g} {name}" + (f" (r={r[j]:.2f})" if row else ""), fontsize=8)
    fig.tight_layout()
    return fig
