"""Tools on AnnData: functions that read inputs by key and write results to fixed slots.

- :func:`spatial_domains` -- graph contrastive encoder + clustering into spatial domains.
- :func:`align_slices` -- slices into one frame (FGW on patches, rigid transform, sparse plans).
- :func:`interpolate_slices` -- generate the slice between two (displacement interpolation).
- :func:`integrate_slices` -- slices of different platforms in one embedding and one frame.
- :func:`transfer_labels` -- carry labels from an aligned slice along the stored plan.
- :func:`histology_features`, :func:`load_embeddings`, :func:`rank_fit`, :func:`rank_predict`,
  :func:`rank_evaluate` -- expression from histology with STRank losses (:mod:`chronotope.rank`).
- :func:`fit_dynamics` -- velocity, growth and landscape from time snapshots; read-outs
  :func:`fate`, :func:`ancestry`, :func:`perturb`, :func:`landscape`,
  :func:`jacobian_grn`, :func:`dynamics_genes`, :func:`predict_dynamics`.
- :func:`undiffuse` -- undo lateral mRNA diffusion (EM deconvolution, estimated kernel).
- :func:`simulate_diffusion` -- diffuse known counts with the same forward model.
"""

from __future__ import annotations

from chronotope.tl._domains import spatial_domains
from chronotope.tl._dynamics import (
    ancestry,
    dynamics_genes,
    fate,
    fit_dynamics,
    jacobian_grn,
    landscape,
    perturb,
    predict_dynamics,
)
from chronotope.tl._integrate import integrate_slices
from chronotope.tl._rank import (
    histology_features,
    load_embeddings,
    rank_evaluate,
    rank_fit,
    rank_predict,
)
from chronotope.tl._slices import align_slices, interpolate_slices
from chronotope.tl._transfer import transfer_labels
from chronotope.tl._undiffuse import simulate_diffusion, undiffuse

__all__ = [
    "align_slices",
    "ancestry",
    "dynamics_genes",
    "fate",
    "fit_dynamics",
    "histology_features",
    "integrate_slices",
    "interpolate_slices",
    "jacobian_grn",
    "landscape",
    "load_embeddings",
    "perturb",
    "predict_dynamics",
    "rank_evaluate",
    "rank_fit",
    "rank_predict",
    "simulate_diffusion",
    "spatial_domains",
    "transfer_labels",
    "undiffuse",
]
