"""Tools on AnnData: functions that read inputs by key and write results to fixed slots.

- :func:`spatial_domains` -- graph contrastive encoder + clustering into spatial domains.
"""

from __future__ import annotations

from chronotope.tl._domains import spatial_domains

__all__ = ["spatial_domains"]
