"""Continuation past the data chosen by backtesting (``extrapolate="auto"``)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import ot as pot
import pytest

from chronotope._errors import ChronotopeInputError
from chronotope.dynamics import (
    DynamicsModel,
    DynamicsParams,
    backtest_extrapolation,
)
from chronotope.dynamics.extrapolation import divergence_w1

DRIFT = np.array([1.0, -0.5])
SMALL = {"hidden": 48, "n_layers": 2, "n_steps": 400, "batch_size": 256}


def _gaussians(means: list[np.ndarray], n: int = 200, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = np.vstack([rng.normal(size=(n, 2)) * 0.4 + m for m in means])
    return x, np.repeat(np.arange(len(means), dtype=np.float64), n)


def test_divergence_is_close_to_exact_w1() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(300, 3)), rng.normal(size=(400, 3)) + np.array([1.0, 0.0, 0.5])
    w = rng.uniform(0.5, 1.5, 300)
    exact = pot.emd2(w / w.sum(), np.full(400, 1 / 400), pot.dist(x, y, metric="euclidean"))
    assert divergence_w1(x, y, w) == pytest.approx(exact, rel=0.03)
    assert divergence_w1(x, x) == pytest.approx(0.0, abs=1e-3)
    with pytest.raises(ChronotopeInputError, match="masses"):
        divergence_w1(x, y, -w)


def test_backtest_continues_a_steady_drift_and_saves_the_choice(tmp_path: Path) -> None:
    """A constant drift goes on after the last training time: "continue" predicts it."""
    x, t = _gaussians([k * DRIFT for k in range(4)])
    model = DynamicsModel(extrapolate="auto", **SMALL).fit(x, t)
    assert model.extrapolate_ == "continue"
    sc = model.extrapolation_scores_
    assert set(sc) == {"landscape", "rest", "continue"}
    # held-out t = 3 is one drift step away from where "landscape" / "rest" leave the cells
    assert sc["continue"] < 0.5 * min(sc["landscape"], sc["rest"])
    assert "extrapolation_backtest" in model.timings_
    # simulate() uses the chosen continuation by default; save / load keep it
    default = model.simulate(x[t == 3], 3.0, 4.0, method="ode").final[0]
    cont = model.simulate(x[t == 3], 3.0, 4.0, method="ode", extrapolate="continue").final[0]
    np.testing.assert_array_equal(default, cont)
    model.save(tmp_path / "m")
    back = DynamicsModel.load(tmp_path / "m")
    assert back.extrapolate_ == "continue" and back.extrapolation_scores_ == pytest.approx(sc)


def test_backtest_stops_a_drift_that_stopped() -> None:
    """The cells stop at t = 3: the last interval's drift must not be continued."""
    x, t = _gaussians([0 * DRIFT, DRIFT, 2 * DRIFT, 2 * DRIFT])
    bt = backtest_extrapolation(x, t, params=DynamicsParams(**SMALL))
    assert bt.held_time == 3.0 and bt.choice in ("landscape", "rest")
    assert bt.scores["continue"] > 2 * bt.scores[bt.choice]


def test_backtest_needs_three_time_points(caplog) -> None:
    x, t = _gaussians([0 * DRIFT, DRIFT])
    with pytest.raises(ChronotopeInputError, match="three time points"):
        backtest_extrapolation(x, t)
    with pytest.raises(ChronotopeInputError, match="modes"):
        backtest_extrapolation(x, t, modes=("drift",))
    with pytest.raises(ChronotopeInputError, match="extrapolate"):
        DynamicsParams(extrapolate="drift")
    with caplog.at_level(logging.WARNING, logger="chronotope"):
        model = DynamicsModel(extrapolate="auto", **{**SMALL, "n_steps": 50}).fit(x, t)
    assert model.extrapolate_ == "landscape" and model.extrapolation_scores_ == {}
    assert "three or more time points" in caplog.text
