"""AnnData bridge of :mod:`chronotope.rank`: fit on raw counts, predict, evaluate per slide."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from chronotope._errors import ChronotopeInputError
from chronotope._validate import check_counts
from chronotope.rank.losses import log_size_factors
from chronotope.rank.model import RankModel, RankParams, within_slide_correlation

__all__ = [
    "evaluate",
    "fit",
    "get_features",
    "highly_variable_genes",
    "log_normalize",
    "summarize",
]

logger = logging.getLogger("chronotope")


def get_features(adata: AnnData, features: str | np.ndarray) -> np.ndarray:
    """Per-spot features: ``obsm[features]`` (a key) or an ``(n_obs, d)`` array."""
    if isinstance(features, str):
        if features not in adata.obsm:
            raise ChronotopeInputError(
                f"obsm[{features!r}] not found (have {sorted(adata.obsm)}); compute features "
                "with chronotope.tl.histology_features or store embeddings there"
            )
        x = adata.obsm[features]
        x = x.to_numpy() if isinstance(x, pd.DataFrame) else np.asarray(x)
    else:
        x = np.asarray(features)
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] != adata.n_obs:
        raise ChronotopeInputError(
            f"features have shape {x.shape}; expected ({adata.n_obs}, n_features)"
        )
    if not np.isfinite(x).all():
        raise ChronotopeInputError("features contain NaN or infinite values")
    return x


def _dense(x: Any) -> np.ndarray:
    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float32)


def _slides(adata: AnnData, batch_key: str | None) -> np.ndarray:
    if batch_key is None:
        return np.zeros(adata.n_obs, dtype=object).astype(str)
    if batch_key not in adata.obs:
        raise ChronotopeInputError(
            f"obs[{batch_key!r}] not found (have {list(adata.obs.columns)[:10]})"
        )
    lab = adata.obs[batch_key]
    if lab.isna().any():
        raise ChronotopeInputError(f"obs[{batch_key!r}] has missing values")
    return lab.astype(str).to_numpy()


def log_normalize(counts: np.ndarray, totals: np.ndarray) -> np.ndarray:
    """``log1p(y / l)`` with ``l`` the size factor from the spot totals (see losses)."""
    ls = log_size_factors(totals)
    return np.log1p(np.asarray(counts, dtype=np.float32) * np.exp(-ls)[:, None])


def highly_variable_genes(
    counts: np.ndarray | sp.spmatrix,
    groups: np.ndarray,
    n_top: int,
    *,
    totals: np.ndarray | None = None,
) -> np.ndarray:
    """Indices of the ``n_top`` genes of highest mean within-slide variance.

    The variance of the log-normalised counts is computed within each slide (so that a
    batch shift between slides does not count as variability) and averaged over slides.
    Call it on the training slides only. Genes without counts are never chosen.
    """
    x = counts
    if totals is None:
        totals = np.asarray(x.sum(1)).ravel()
    ls = log_size_factors(totals)
    groups = np.asarray(groups)
    score = np.zeros(x.shape[1])
    for k in np.unique(groups):
        m = np.flatnonzero(groups == k)
        xk = _dense(x[m])
        t = np.log1p(xk * np.exp(-ls[m])[:, None])
        score += t.var(0)
    score /= max(1, len(np.unique(groups)))
    nz = np.asarray((x != 0).sum(0)).ravel() > 0 if sp.issparse(x) else (x != 0).any(0)
    score[~nz] = -np.inf
    n_top = min(int(n_top), int(nz.sum()))
    return np.sort(np.argsort(-score, kind="stable")[:n_top])


def fit(
    adata: AnnData,
    features: str | np.ndarray = "X_histology",
    batch_key: str | None = None,
    *,
    genes: Sequence[str] | int | None = None,
    loss: str = "list",
    validation: AnnData | Sequence[str] | None = None,
    layer: str | None = None,
    device: str | None = "cpu",
    progress: bool = False,
    **params: Any,
) -> RankModel:
    """Fit a :class:`RankModel` on raw counts of an AnnData.

    Parameters
    ----------
    adata
        Spots x genes, raw counts in ``.X`` (or ``layers[layer]``), features in
        ``obsm[features]``.
    features
        ``obsm`` key or an ``(n_obs, d)`` array.
    batch_key
        ``obs`` column naming the slide of each spot (lists and pairs stay within slides).
        ``None``: one slide.
    genes
        Gene names to model, an integer ``N`` (the ``N`` most variable genes on the
        training slides: :func:`highly_variable_genes`; with a validation AnnData, among
        the genes it has too), or ``None`` for all genes.
    loss
        Loss name (:data:`chronotope.rank.losses.LOSSES`).
    validation
        Slides used for model selection: an AnnData (same features key) or names of
        slides of ``adata`` (``obs[batch_key]``), which are then left out of training and of
        the gene selection.
    layer
        Layer with the raw counts instead of ``.X``.
    device, progress
        Torch device; progress bar over epochs.
    **params
        Fields of :class:`RankParams` (``head``, ``batching``, ``max_epochs``, ...).

    Returns
    -------
    RankModel
        Trained; ``var_names`` are the modelled genes, ``feature_key`` the obsm key.
    """
    params = {"loss": loss, **params}
    RankParams(**params)  # validate before the heavy work
    x_all = adata.layers[layer] if layer is not None else adata.X
    if layer is not None and layer not in adata.layers:
        raise ChronotopeInputError(f"layers[{layer!r}] not found")
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ChronotopeInputError("adata is empty")
    check_counts(x_all, "training counts")
    feats = get_features(adata, features)
    slides = _slides(adata, batch_key)
    val_ad: AnnData | None = None
    train = np.ones(adata.n_obs, dtype=bool)
    if validation is not None and not isinstance(validation, AnnData):
        names = [str(v) for v in ([validation] if isinstance(validation, str) else validation)]
        if batch_key is None:
            raise ChronotopeInputError("validation slide names need batch_key")
        unknown = sorted(set(names) - set(slides))
        if unknown:
            raise ChronotopeInputError(f"validation slides {unknown} not in obs[{batch_key!r}]")
        vmask = np.isin(slides, names)
        train = ~vmask
        if not train.any():
            raise ChronotopeInputError("no training slides left after removing validation")
        val_ad = adata[vmask]
    elif isinstance(validation, AnnData):
        val_ad = validation
    totals_all = np.asarray(x_all.sum(1)).ravel()
    if genes is None:
        gidx = np.arange(adata.n_vars)
    elif isinstance(genes, int | np.integer) and not isinstance(genes, bool):
        if int(genes) < 1:
            raise ChronotopeInputError(f"genes (number of genes) must be >= 1, got {genes}")
        tr = np.flatnonzero(train)
        cand = np.arange(adata.n_vars)
        if isinstance(validation, AnnData):  # only genes the validation data can score
            cand = np.flatnonzero(adata.var_names.isin(validation.var_names))
        sub = highly_variable_genes(
            x_all[tr][:, cand], slides[tr], int(genes), totals=totals_all[tr]
        )
        gidx = cand[sub]
    else:
        names = pd.Index([str(g) for g in genes])
        missing = names.difference(adata.var_names)
        if len(missing):
            raise ChronotopeInputError(
                f"{len(missing)} gene(s) not in adata.var_names, e.g. {list(missing[:5])}"
            )
        gidx = adata.var_names.get_indexer(names)
    if len(gidx) == 0:
        raise ChronotopeInputError("no genes to model")
    var_names = adata.var_names[gidx].astype(str).tolist()
    tr = np.flatnonzero(train)
    y = _dense(x_all[tr][:, gidx])
    pos = totals_all[tr][totals_all[tr] > 0]
    ref = float(np.median(pos)) if pos.size else 1.0
    ls = log_size_factors(totals_all[tr], reference=ref)
    val = None
    if val_ad is not None:
        vgenes = pd.Index(var_names).difference(val_ad.var_names)
        if len(vgenes):
            raise ChronotopeInputError(f"validation data lack {len(vgenes)} model genes")
        vx = val_ad.layers[layer] if layer is not None else val_ad.X
        if isinstance(validation, AnnData):
            if not isinstance(features, str):
                raise ChronotopeInputError("a validation AnnData needs features as an obsm key")
            vf = get_features(val_ad, features)
        else:
            vf = feats[~train]
        vy = _dense(vx[:, val_ad.var_names.get_indexer(var_names)])
        vls = log_size_factors(np.asarray(vx.sum(1)).ravel())
        vslides = _slides(val_ad, batch_key if batch_key in val_ad.obs else None)
        val = (vf, vy, vslides, vls)
    model = RankModel(device=device, progress=progress, **params)
    model.feature_key = features if isinstance(features, str) else None
    model.fit(feats[tr], y, slides[tr], log_size=ls, var_names=var_names,
              validation=val)
    model.size_reference_ = ref
    return model


def evaluate(
    model: RankModel,
    adata: AnnData,
    *,
    batch_key: str | None = None,
    features: str | np.ndarray | None = None,
    truth_layer: str | None = None,
    layer: str | None = None,
) -> pd.DataFrame:
    """Per-slide x per-gene Pearson and Spearman correlation of prediction and truth.

    Correlations are computed within each slide of ``adata`` (``obs[batch_key]``), never
    with slides pooled together.

    Parameters
    ----------
    model
        A fitted :class:`RankModel`.
    adata
        Test spots; features in ``obsm[features]`` (default: the model's feature key).
    batch_key
        ``obs`` column of the slides (``None``: one slide).
    features
        ``obsm`` key or array; default ``model.feature_key``.
    truth_layer
        Layer holding the truth (e.g. the simulator's ``"log_rate"``); by default the
        log-normalised raw counts of ``.X`` (or ``layers[layer]``), size factors from all
        genes.
    layer
        Layer with raw counts instead of ``.X``.

    Returns
    -------
    pandas.DataFrame
        Columns ``slide``, ``gene``, ``pearson``, ``spearman`` (NaN where the truth is
        constant within the slide). The means (:func:`summarize`) are in
        ``table.attrs["mean"]``.
    """
    genes = _model_genes(model, adata)
    x = get_features(adata, _feature_key(model, features))
    pred = model.predict(x)
    gidx = adata.var_names.get_indexer(genes)
    if truth_layer is not None:
        if truth_layer not in adata.layers:
            raise ChronotopeInputError(f"layers[{truth_layer!r}] not found")
        truth = _dense(adata.layers[truth_layer][:, gidx])
    else:
        xr = adata.layers[layer] if layer is not None else adata.X
        check_counts(xr, "test counts")
        truth = log_normalize(_dense(xr[:, gidx]), np.asarray(xr.sum(1)).ravel())
    slides = _slides(adata, batch_key)
    names = np.unique(slides)
    rp = within_slide_correlation(pred, truth, slides, method="pearson")
    rs = within_slide_correlation(pred, truth, slides, method="spearman")
    table = pd.DataFrame(
        {
            "slide": np.repeat(names, len(genes)),
            "gene": np.tile(np.asarray(genes, dtype=object), len(names)),
            "pearson": rp.ravel(),
            "spearman": rs.ravel(),
        }
    )
    table.attrs["mean"] = summarize(table)
    return table


def summarize(table: pd.DataFrame) -> dict[str, float]:
    """Means of an :func:`evaluate` table: per slide over genes, then over slides."""
    per = table.groupby("slide", observed=True)[["pearson", "spearman"]].mean()
    return {
        "pearson": float(per["pearson"].mean()),
        "spearman": float(per["spearman"].mean()),
        "n_slides": len(per),
        "n_genes": int(table["gene"].nunique()),
    }


def _model_genes(model: RankModel, adata: AnnData) -> list[str]:
    if model.var_names is None:
        raise ChronotopeInputError("the model has no gene names")
    missing = pd.Index(model.var_names).difference(adata.var_names)
    if len(missing):
        raise ChronotopeInputError(
            f"{len(missing)} model gene(s) not in the data, e.g. {list(missing[:5])}"
        )
    return list(model.var_names)


def _feature_key(model: RankModel, features: str | np.ndarray | None) -> str | np.ndarray:
    if features is not None:
        return features
    if model.feature_key is None:
        raise ChronotopeInputError("the model does not record its features key; pass features=")
    return model.feature_key
