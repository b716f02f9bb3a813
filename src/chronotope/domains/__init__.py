"""Spatial domains: a graph self-supervised contrastive encoder and embedding clustering.

Arrays in, arrays out (the AnnData layer is :func:`chronotope.tl.spatial_domains`):

- :class:`DomainModel` -- gene-importance gate, learned multi-hop aggregation over the
  sparse spatial graph, contrastive + reconstruction objective; ``fit``,
  ``get_embedding``, ``save`` / ``load``.
- :func:`cluster_embedding`, :func:`gmm_eee`, :func:`kmeans`, :func:`leiden`,
  :func:`refine_labels` -- clustering of an embedding.
"""

from __future__ import annotations

from chronotope.domains.clustering import (
    cluster_embedding,
    gmm_eee,
    kmeans,
    leiden,
    refine_labels,
)
from chronotope.domains.model import DomainModel, DomainModelParams

__all__ = [
    "DomainModel",
    "DomainModelParams",
    "cluster_embedding",
    "gmm_eee",
    "kmeans",
    "leiden",
    "refine_labels",
]
