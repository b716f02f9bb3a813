"""Relative expression from per-spot features: STRank losses that survive batch effects.

Predict spot-level expression from histology (or any per-spot) features, trained with
the listwise (:func:`~chronotope.rank.losses.list_loss`, ListSTrank) and pairwise
(:func:`~chronotope.rank.losses.pair_loss`, PairSTrank) likelihoods that a Poisson count
model gives once each slide's and gene's scale is conditioned away, or with the
baselines ``mse``, ``poisson``, ``nb``, ``margin``, ``pcc`` and ``pcc_slide``.

- :class:`RankModel` (arrays in/out) and :func:`fit` / :func:`evaluate` (AnnData);
- :func:`simulate`: slides with batch effects, depth and NB noise, and the true log-rate;
- :mod:`chronotope.rank.image`: patches from an H&E image and a built-in feature
  extractor (stain, texture and morphology statistics; no downloaded weights).
"""

from __future__ import annotations

from chronotope.rank import losses
from chronotope.rank._anndata import (
    evaluate,
    fit,
    get_features,
    highly_variable_genes,
    log_normalize,
    summarize,
)
from chronotope.rank.losses import LOSSES
from chronotope.rank.model import RankModel, RankParams, within_slide_correlation
from chronotope.rank.simulate import simulate

__all__ = [
    "LOSSES",
    "RankModel",
    "RankParams",
    "evaluate",
    "fit",
    "get_features",
    "highly_variable_genes",
    "log_normalize",
    "losses",
    "simulate",
    "summarize",
    "within_slide_correlation",
]
