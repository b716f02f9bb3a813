"""Dynamics from time-series snapshots (arrays in, arrays out).

- :func:`snapshot_couplings` -- unbalanced entropic couplings between consecutive time
  points (chunked beyond a few thousand cells), pairs drawn from the plans, per-cell growth
  targets.
- :class:`DynamicsModel` -- velocity, growth and potential (landscape) networks trained
  simulation-free (Brownian-bridge flow and score matching on the coupled pairs); weighted
  particle simulation forward and backward, ODE or SDE; ``save`` / ``load``.
- :class:`GeneMap` -- the explicit linear map from the representation back to genes.
- :class:`NeuralGeneMap` -- a user-supplied non-linear decoder (and optional encoder).
- :func:`backtest_extrapolation` -- choose the continuation past the data by predicting
  the last training time point from the earlier ones (``extrapolate="auto"``).
"""

from __future__ import annotations

from chronotope.dynamics._validate import check_snapshots
from chronotope.dynamics.couplings import IntervalCoupling, SnapshotCouplings, snapshot_couplings
from chronotope.dynamics.extrapolation import ExtrapolationBacktest, backtest_extrapolation
from chronotope.dynamics.genemaps import NeuralGeneMap
from chronotope.dynamics.model import (
    EXTRAPOLATE_MODES,
    DynamicsModel,
    DynamicsParams,
    GeneMap,
    SimulationResult,
)

__all__ = [
    "EXTRAPOLATE_MODES",
    "DynamicsModel",
    "DynamicsParams",
    "ExtrapolationBacktest",
    "GeneMap",
    "IntervalCoupling",
    "NeuralGeneMap",
    "SimulationResult",
    "SnapshotCouplings",
    "backtest_extrapolation",
    "check_snapshots",
    "snapshot_couplings",
]
