"""Sparse spatial neighbour graphs (arrays in, arrays out; no AnnData here).

Builders return ``(connectivities, distances)`` as symmetric CSR matrices:

- :func:`knn_graph` -- k nearest neighbours.
- :func:`radius_graph` -- all pairs closer than a radius.
- :func:`grid_graph` -- rings on a hexagonal (Visium) or square (ST) spot lattice.
- :func:`block_diagonal` -- combine per-sample matrices (every builder also takes
  ``library=`` to keep samples apart).

Operations:

- :func:`normalize_adjacency`, :func:`propagate`, :func:`gaussian_weights`,
  :func:`to_torch_sparse`.

For AnnData, use :func:`chronotope.pp.spatial_neighbors`.
"""

from __future__ import annotations

from chronotope.graph.builders import block_diagonal, grid_graph, knn_graph, radius_graph
from chronotope.graph.ops import gaussian_weights, normalize_adjacency, propagate, to_torch_sparse

__all__ = [
    "block_diagonal",
    "gaussian_weights",
    "grid_graph",
    "knn_graph",
    "normalize_adjacency",
    "propagate",
    "radius_graph",
    "to_torch_sparse",
]
