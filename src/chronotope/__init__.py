"""chronotope: optimal transport for spatial and temporal transcriptomics.

Submodules
----------
ot
    Arrays-in, arrays-out optimal transport engine (torch, CPU and CUDA).
graph
    Sparse spatial neighbour graphs and propagation.
io
    Readers for h5ad, 10x Visium folders, csv/tsv matrices and time series.
datasets
    Loaders for the public datasets and the embedded demo data.
domains
    Graph contrastive encoder and clustering for spatial domains.
slices
    Alignment, integration, label transfer and interpolation of sections.
dynamics
    Velocity, growth and landscape from time snapshots (simulation-free RUOT).
rank
    Expression from histology features with STRank rank losses (batch-effect robust).
undiffuse
    Diffusion correction: kernels, forward model, EM deconvolution, estimation.
pp, tl, pl
    AnnData layer: preprocessing (spatial neighbours) and plots.
report, demo
    The HTML report and the ``chronotope demo`` pipeline.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from chronotope._version import __version__

logging.getLogger("chronotope").addHandler(logging.NullHandler())

_SUBMODULES = (
    "ot",
    "graph",
    "io",
    "datasets",
    "pp",
    "tl",
    "pl",
    "domains",
    "slices",
    "dynamics",
    "rank",
    "undiffuse",
    "report",
    "demo",
)

__all__ = ["__version__", *_SUBMODULES]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"chronotope.{name}")
    raise AttributeError(f"module 'chronotope' has no attribute {name!r}")
