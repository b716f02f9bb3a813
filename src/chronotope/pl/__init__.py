"""Plotting: small matplotlib helpers that take an AnnData and return Axes or a Figure."""

from __future__ import annotations

from chronotope.pl._domains import domains, gene_importance
from chronotope.pl._dynamics import fate, grn, landscape, perturb, velocity_streamlines
from chronotope.pl._rank import rank_losses, rank_maps
from chronotope.pl._slices import alignment, integration, interpolation
from chronotope.pl._spatial import spatial
from chronotope.pl._undiffuse import out_of_tissue, undiffuse

__all__ = [
    "alignment",
    "domains",
    "fate",
    "gene_importance",
    "grn",
    "integration",
    "interpolation",
    "landscape",
    "out_of_tissue",
    "perturb",
    "rank_losses",
    "rank_maps",
    "spatial",
    "undiffuse",
    "velocity_streamlines",
]
