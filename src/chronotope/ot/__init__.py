"""Optimal transport engine: arrays in, arrays out, torch on CPU or CUDA.

Shaped as geometry / problem / solver / output:

>>> from chronotope import ot
>>> geom = ot.PointCloud(x, y, batch_size=4096)
>>> out = ot.Sinkhorn(epsilon=0.01)(ot.LinearProblem(geom, a, b, tau_a=0.9))
>>> out.barycentric_projection(y)

or in one call, ``ot.sinkhorn(x, y, epsilon=0.01)``.
"""

from chronotope.ot.barycenter import BarycenterOutput, free_support_barycenter
from chronotope.ot.geometry import DenseGeometry, Geometry, PointCloud, SparseGeometry
from chronotope.ot.gromov import (
    FGWOutput,
    GromovWasserstein,
    QuadraticProblem,
    fused_gromov_wasserstein,
)
from chronotope.ot.problem import LinearProblem
from chronotope.ot.sinkhorn import Sinkhorn, SinkhornOutput, sinkhorn
from chronotope.ot.symmetric import symmetric_ot_cost, symmetric_sinkhorn

__all__ = [
    "BarycenterOutput",
    "DenseGeometry",
    "FGWOutput",
    "Geometry",
    "GromovWasserstein",
    "LinearProblem",
    "PointCloud",
    "QuadraticProblem",
    "Sinkhorn",
    "SinkhornOutput",
    "SparseGeometry",
    "free_support_barycenter",
    "fused_gromov_wasserstein",
    "sinkhorn",
    "symmetric_ot_cost",
    "symmetric_sinkhorn",
]
