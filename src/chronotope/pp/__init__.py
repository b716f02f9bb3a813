"""Preprocessing on AnnData: functions that read inputs by key and write fixed slots.

- :func:`spatial_neighbors` -- spatial neighbour graph into ``obsp`` / ``uns``.
"""

from __future__ import annotations

from chronotope.pp._spatial_neighbors import spatial_neighbors

__all__ = ["spatial_neighbors"]
