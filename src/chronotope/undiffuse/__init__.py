"""Diffusion correction: undo lateral mRNA diffusion (arrays in, arrays out; torch).

- :mod:`.kernels`: column-stochastic diffusion kernels (FFT on lattices, sparse graph).
- :mod:`.model`: the forward model ``A`` and Richardson-Lucy / EM in gene batches.
- :mod:`.estimate`: profile likelihood of ``sigma``, ``bleed``, ``background`` on totals.
- :mod:`.metrics`: Moran's I and the benchmark scores.
- :mod:`.prior`: the H&E image as a Gamma prior on spot total densities (MAP-EM).

The AnnData layer is :func:`chronotope.tl.undiffuse`; see ``docs/undiffuse.md``.
"""

from __future__ import annotations

from chronotope.undiffuse.estimate import Estimate, estimate_parameters, fit_totals
from chronotope.undiffuse.kernels import (
    Lattice,
    LatticeKernel,
    SparseKernel,
    infer_lattice,
    make_kernel,
    spot_spacing,
)
from chronotope.undiffuse.model import (
    DiffusionOperator,
    EMResult,
    LowRankResult,
    em_deconvolve,
    lowrank_deconvolve,
    poisson_loglik,
    round_keep_totals,
)

__all__ = [
    "DiffusionOperator",
    "EMResult",
    "Estimate",
    "Lattice",
    "LatticeKernel",
    "LowRankResult",
    "SparseKernel",
    "em_deconvolve",
    "estimate_parameters",
    "fit_totals",
    "infer_lattice",
    "lowrank_deconvolve",
    "make_kernel",
    "poisson_loglik",
    "round_keep_totals",
    "spot_spacing",
]
