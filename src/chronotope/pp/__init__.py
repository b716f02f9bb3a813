"""Preprocessing on AnnData: functions that read inputs by key and write fixed slots.

- :func:`spatial_neighbors` -- spatial neighbour graph into ``obsp`` / ``uns``.
- :func:`normalize_total`, :func:`log1p` -- normalised and log layers (``.X`` untouched).
- :func:`highly_variable_genes` -- ``var["highly_variable"]`` (Seurat v3 or Seurat).
- :func:`scale`, :func:`pca` -- dense model features in ``obsm`` / principal components.
- :func:`preprocess` -- ``normalize_total`` -> ``log1p`` -> ``highly_variable_genes``.
"""

from __future__ import annotations

from chronotope.pp._preprocess import (
    highly_variable_genes,
    log1p,
    normalize_total,
    pca,
    preprocess,
    scale,
)
from chronotope.pp._spatial_neighbors import spatial_neighbors

__all__ = [
    "highly_variable_genes",
    "log1p",
    "normalize_total",
    "pca",
    "preprocess",
    "scale",
    "spatial_neighbors",
]
