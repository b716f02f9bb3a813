"""Plotting: small matplotlib helpers that take an AnnData and return Axes."""

from __future__ import annotations

from chronotope.pl._spatial import spatial

__all__ = ["spatial"]
