"""``tl`` functions of relative-expression learning (:mod:`chronotope.rank`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from chronotope._errors import ChronotopeInputError

__all__ = ["histology_features", "load_embeddings", "rank_evaluate", "rank_fit", "rank_predict"]

logger = logging.getLogger("chronotope")


def _h5ad_safe(d: dict[str, Any]) -> dict[str, Any]:
    """Drop ``None`` values (h5ad cannot store them)."""
    return {k: v for k, v in d.items() if v is not None}


def _library(adata: AnnData, library_id: str | None) -> tuple[str, dict[str, Any]]:
    spatial = adata.uns.get("spatial", {})
    if not spatial:
        raise ChronotopeInputError(
            "no image: pass image= (an array or a file) or load one into uns['spatial']"
        )
    if library_id is None:
        if len(spatial) > 1:
            raise ChronotopeInputError(
                f"uns['spatial'] holds {list(spatial)}; choose one with library_id="
            )
        library_id = next(iter(spatial))
    if library_id not in spatial:
        raise ChronotopeInputError(f"library {library_id!r} not in uns['spatial']")
    return library_id, spatial[library_id]


def histology_features(
    adata: AnnData,
    image: np.ndarray | str | os.PathLike[str] | None = None,
    *,
    spatial_key: str = "spatial",
    library_id: str | None = None,
    patch_size: int | None = None,
    scale: float | None = None,
    extractor: Any = None,
    key_added: str = "X_histology",
    progress: bool = True,
) -> None:
    """Per-spot image features from the H&E patch around each spot.

    Parameters
    ----------
    adata
        Spots with centres in ``obsm[spatial_key]`` as ``(x, y)`` full-resolution pixels.
    image
        Full-resolution RGB image (array or file). ``None``: the ``"hires"`` image of
        ``uns["spatial"][library_id]``, with its ``tissue_hires_scalef``.
    spatial_key
        ``obsm`` key of the pixel coordinates.
    library_id
        Library of ``uns["spatial"]`` (needed when it holds several).
    patch_size
        Patch side in full-resolution pixels; default twice ``spot_diameter_fullres``
        from the scale factors when known, else 224.
    scale
        Image pixels per full-resolution pixel; default 1 for ``image=``, the hires scale
        factor otherwise.
    extractor
        Callable ``patch -> 1-D array`` (:class:`chronotope.rank.image.FeatureExtractor`);
        default the built-in :class:`~chronotope.rank.image.HandcraftedExtractor`.
    key_added
        Features go to ``obsm[key_added]``; ``uns[key_added]["params"]`` records the
        settings (and the feature names of the built-in extractor).
    progress
        Progress bar over spots.
    """
    from chronotope.rank.image import HandcraftedExtractor, image_features

    if spatial_key not in adata.obsm:
        raise ChronotopeInputError(f"obsm[{spatial_key!r}] not found (spot pixel coordinates)")
    coords = np.asarray(adata.obsm[spatial_key], dtype=np.float64)[:, :2]
    factors: dict[str, Any] = {}
    if image is None:
        _, lib = _library(adata, library_id)
        images = lib.get("images", {})
        factors = lib.get("scalefactors", {})
        if "hires" not in images:
            raise ChronotopeInputError("uns['spatial'][...]['images'] has no 'hires' image")
        image = images["hires"]
        scale = float(factors.get("tissue_hires_scalef", 1.0)) if scale is None else scale
    scale = 1.0 if scale is None else float(scale)
    if patch_size is None:
        d = factors.get("spot_diameter_fullres")
        patch_size = round(2 * float(d)) if d else 224
    ext = extractor if extractor is not None else HandcraftedExtractor()
    x = image_features(
        image, coords, patch_size=int(patch_size), scale=scale, extractor=ext, progress=progress
    )
    adata.obsm[key_added] = x
    adata.uns[key_added] = {
        "params": {
            "patch_size": int(patch_size),
            "scale": scale,
            "extractor": type(ext).__name__,
            "spatial_key": spatial_key,
        },
        "feature_names": list(getattr(ext, "names", [f"f{i}" for i in range(x.shape[1])])),
    }


def load_embeddings(
    adata: AnnData,
    embeddings: np.ndarray | str | os.PathLike[str],
    *,
    key_added: str = "X_embedding",
) -> None:
    """Store precomputed per-spot embeddings (e.g. of a pathology foundation model).

    Parameters
    ----------
    adata
        Spots; the embeddings' rows must follow ``obs_names``.
    embeddings
        ``(n_obs, d)`` array or a ``.npy`` file.
    key_added
        Written to ``obsm[key_added]``; use it as ``features=`` of :func:`rank_fit`.
    """
    from chronotope.rank.image import load_embeddings as _load

    adata.obsm[key_added] = _load(embeddings, adata.n_obs)
    adata.uns[key_added] = {"params": {"source": str(embeddings) if not isinstance(
        embeddings, np.ndarray) else "array"}}


def rank_fit(
    adata: AnnData,
    features: str = "X_histology",
    batch_key: str | None = None,
    *,
    genes: Sequence[str] | int | None = None,
    loss: str = "list",
    validation: AnnData | Sequence[str] | None = None,
    device: str | None = "cpu",
    progress: bool = False,
    **params: Any,
) -> Any:
    """Fit an expression-from-features model (:func:`chronotope.rank.fit`).

    Raw counts in ``.X``, features in ``obsm[features]``, slides in ``obs[batch_key]``.
    Returns the :class:`~chronotope.rank.RankModel` and records the settings in
    ``uns["rank"]["params"]`` (with the modelled genes in ``uns["rank"]["genes"]``).
    See :func:`chronotope.rank.fit` for the parameters.
    """
    from chronotope.rank import fit

    model = fit(
        adata, features, batch_key, genes=genes, loss=loss, validation=validation,
        device=device, progress=progress, **params,
    )
    adata.uns["rank"] = _h5ad_safe({
        "params": _h5ad_safe(
            {"features": features, "batch_key": batch_key, **model.params.__dict__}
        ),
        "genes": list(model.var_names or []),
        "best_epoch": model.best_epoch_,
    })
    return model


def _as_model(model: Any) -> Any:
    from chronotope.rank import RankModel

    if isinstance(model, str | os.PathLike):
        return RankModel.load(model)
    if not isinstance(model, RankModel):
        raise ChronotopeInputError("model must be a RankModel or the folder of a saved one")
    return model


def rank_predict(
    adata: AnnData,
    model: Any,
    *,
    features: str | None = None,
    key_added: str = "predicted",
) -> AnnData:
    """Predicted scores for the model's genes, as a new AnnData.

    Parameters
    ----------
    adata
        Spots with features in ``obsm[features]`` (default: the model's features key).
    model
        A fitted :class:`~chronotope.rank.RankModel` or the folder it was saved to.
    features
        ``obsm`` key of the features.
    key_added
        Layer name of the scores.

    Returns
    -------
    AnnData
        ``obs``, ``obsm`` and ``uns["spatial"]`` of ``adata``; ``var_names`` = the model's
        genes; ``layers[key_added]`` = score per spot and gene (log expression up to a
        constant per slide and gene); ``.X`` = the measured counts of those genes where
        ``adata`` has them (zeros elsewhere, ``var["measured"]`` False);
        ``obs["rank_total_counts"]``: each spot's total over all genes of ``adata`` (the
        size factors of the measured counts). ``adata`` is not modified.
    """
    from chronotope.rank._anndata import _feature_key, get_features

    model = _as_model(model)
    if model.var_names is None:
        raise ChronotopeInputError("the model has no gene names")
    x = get_features(adata, _feature_key(model, features))
    pred = model.predict(x)
    genes = pd.Index(model.var_names)
    idx = adata.var_names.get_indexer(genes)
    have = idx >= 0
    counts = sp.lil_matrix((adata.n_obs, len(genes)), dtype=np.float32)
    if have.any():
        sub = adata.X[:, idx[have]]
        counts[:, np.flatnonzero(have)] = sub.toarray() if sp.issparse(sub) else np.asarray(sub)
    out = AnnData(
        X=sp.csr_matrix(counts),
        obs=adata.obs.copy(),
        var=pd.DataFrame({"measured": have}, index=genes.astype(str)),
    )
    for k, v in adata.obsm.items():
        out.obsm[k] = v
    if "spatial" in adata.uns:
        out.uns["spatial"] = adata.uns["spatial"]
    out.layers[key_added] = pred
    # spot totals over all genes of the input: size factors of the measured counts
    out.obs["rank_total_counts"] = np.asarray(adata.X.sum(1), dtype=np.float64).ravel()
    out.uns["rank_predict"] = {
        "params": _h5ad_safe({"loss": model.params.loss, "head": model.params.head,
                              "features": model.feature_key if features is None else features,
                              "key_added": key_added})
    }
    return out


def rank_evaluate(
    adata: AnnData,
    model: Any,
    *,
    batch_key: str | None = None,
    features: str | None = None,
    truth_layer: str | None = None,
    label: str | None = None,
) -> pd.DataFrame:
    """Within-slide Pearson and Spearman correlation of prediction and measurement.

    Parameters
    ----------
    adata
        Test spots: raw counts in ``.X`` (or the truth in ``layers[truth_layer]``),
        features in ``obsm``.
    model
        A :class:`~chronotope.rank.RankModel` or the folder it was saved to.
    batch_key
        ``obs`` column of the slides; correlations are computed within each slide.
    features
        ``obsm`` key of the features (default: the model's).
    truth_layer
        Compare against this layer (e.g. a true log-rate) instead of the log-normalised
        counts.
    label
        Name of this model in ``uns["rank_evaluation"]`` (default: its loss name).

    Returns
    -------
    pandas.DataFrame
        One row per (slide, gene): ``slide``, ``gene``, ``pearson``, ``spearman``. The means
        (per slide over genes, then over slides) are stored in
        ``uns["rank_evaluation"][label]`` (``pearson``, ``spearman``, ``n_slides``,
        ``n_genes``, and the per-gene means ``per_gene``), which :func:`chronotope.pl.rank_losses`
        draws.
    """
    from chronotope.rank import evaluate, summarize

    model = _as_model(model)
    table = evaluate(
        model, adata, batch_key=batch_key, features=features, truth_layer=truth_layer
    )
    summary = summarize(table)
    per_gene = table.groupby("gene", sort=False)[["pearson", "spearman"]].mean()
    store = adata.uns.setdefault("rank_evaluation", {})
    store[label or model.params.loss] = {
        **summary,
        "per_gene_pearson": per_gene["pearson"].to_dict(),
        "params": _h5ad_safe({"batch_key": batch_key, "truth_layer": truth_layer}),
    }
    return table
