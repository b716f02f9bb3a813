"""Tools on AnnData: functions that read inputs by key and write results to fixed slots.

- :func:`spatial_domains` -- graph contrastive encoder + clustering into spatial domains.
- :func:`align_slices` -- slices into one frame (FGW on patches, rigid transform, sparse plans).
- :func:`interpolate_slices` -- generate the slice between two (displacement interpolation).
- :func:`integrate_slices` -- slices of different platforms in one embedding and one frame.
- :func:`transfer_labels` -- carry labels from an aligned slice along the stored plan.
- :func:`undiffuse` -- undo lateral mRNA diffusion (EM deconvolution, estimated kernel).
- :func:`simulate_diffusion` -- diffuse known counts with the same forward model.
"""

from __future__ import annotations

from chronotope.tl._domains import spatial_domains
from chronotope.tl._integrate import integrate_slices
from chronotope.tl._slices import align_slices, interpolate_slices
from chronotope.tl._transfer import transfer_labels
from chronotope.tl._undiffuse import simulate_diffusion, undiffuse

__all__ = [
    "align_slices",
    "integrate_slices",
    "interpolate_slices",
    "simulate_diffusion",
    "spatial_domains",
    "transfer_labels",
    "undiffuse",
]
