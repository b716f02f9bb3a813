"""Slices: alignment of serial or cross-platform sections (arrays in, arrays out).

- :func:`align_pair` -- FGW (direct or coarse to fine) plan, rigid transform, sparse plan.
- :func:`fit_rigid` -- rotation / translation (/ scale) fitted to a plan.
- :func:`interpolate_pair` -- the slice at time t between two aligned slices.
- :func:`shared_features` -- joint PCA of slices over their shared genes.
- :func:`transfer_labels`, :func:`transfer_values` -- carry labels / values along a plan.
- :func:`fit_displacement` -- smooth non-rigid displacement field fitted to a plan.
"""

from __future__ import annotations

from chronotope.slices.align import PairAlignment, align_pair
from chronotope.slices.features import shared_features, shared_genes
from chronotope.slices.interpolate import interpolate_pair, lattice_kind
from chronotope.slices.nonrigid import fit_displacement
from chronotope.slices.rigid import RigidTransform, fit_rigid
from chronotope.slices.transfer import LabelTransfer, transfer_labels, transfer_values

__all__ = [
    "LabelTransfer",
    "PairAlignment",
    "RigidTransform",
    "align_pair",
    "fit_displacement",
    "fit_rigid",
    "interpolate_pair",
    "lattice_kind",
    "shared_features",
    "shared_genes",
    "transfer_labels",
    "transfer_values",
]
