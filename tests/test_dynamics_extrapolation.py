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
    damped = {f"damped({r:g})" for r in (0.1, 0.25, 0.5, 1.0, 2.0)}
    assert set(sc) == {"landscape", "rest", "continue", *damped}
    # held-out t = 3 is one drift step away from where "landscape" / "rest" leave the cells
    assert sc["continue"] < 0.5 * min(sc["landscape"], sc["rest"])
    # a decaying drift falls short of it, the more the faster it decays
    assert sc["continue"] < sc["damped(2)"] < sc["damped(0.5)"] < sc["damped(0.1)"]
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
    assert bt.held_time == 3.0 and bt.choice in ("landscape", "rest", "damped")
    best = min(bt.scores.values())
    assert bt.scores["continue"] > 2 * best
    if bt.choice == "damped":  # only a transport that stops almost at once
        assert bt.relaxation is not None and bt.relaxation <= 0.25
    else:
        assert bt.relaxation is None


def test_damped_continuation_decays_the_last_drift(tmp_path: Path) -> None:
    """Past the end the ODE moves by ``r dt (1 - exp(-d / (r dt)))`` times the end velocity."""
    x, t = _gaussians([k * DRIFT for k in range(3)])
    model = DynamicsModel(**SMALL).fit(x, t)
    x2 = x[t == 2]

    def shift(**kw) -> np.ndarray:
        end = model.simulate(x2, 2.0, 3.0, method="ode", **kw).final[0]
        return (end - x2).mean(0)

    full = shift(extrapolate="continue")
    assert np.linalg.norm(full - DRIFT) < 0.3 * np.linalg.norm(DRIFT)
    for r in (0.5, 1.0, 3.0):
        expect = r * (1.0 - np.exp(-1.0 / r))
        np.testing.assert_allclose(
            shift(extrapolate="damped", relaxation=r), expect * full, atol=0.05
        )
    np.testing.assert_allclose(shift(extrapolate="damped", relaxation=1e-3), 0.0, atol=0.01)
    np.testing.assert_allclose(shift(extrapolate="damped", relaxation=1e3), full, atol=0.01)
    # backward in time the first interval's drift decays the same way
    x0 = x[t == 0]
    back = (model.simulate(x0, 0.0, -1.0, method="ode", extrapolate="damped").final[0] - x0).mean(0)
    np.testing.assert_allclose(back, -(1.0 - np.exp(-1.0)) * DRIFT, atol=0.3)
    # without growth past the end the masses stay as they were at the end
    stay = model.simulate(x2, 2.0, 3.0, method="ode", extrapolate="damped", damped_growth=False)
    np.testing.assert_allclose(stay.weights[-1], stay.weights[0], rtol=1e-6)
    # the model's own relaxation is the default, and it is saved
    model.relaxation_ = 0.5
    np.testing.assert_allclose(
        shift(extrapolate="damped"), shift(extrapolate="damped", relaxation=0.5)
    )
    model.save(tmp_path / "m")
    assert DynamicsModel.load(tmp_path / "m").relaxation_ == 0.5
    with pytest.raises(ChronotopeInputError, match="relaxation"):
        model.simulate(x2, 2.0, 3.0, extrapolate="damped", relaxation=0.0)
    with pytest.raises(ChronotopeInputError, match="relaxation"):
        DynamicsParams(relaxation=float("inf"))


def test_backtest_needs_three_time_points(caplog) -> None:
    x, t = _gaussians([0 * DRIFT, DRIFT])
    with pytest.raises(ChronotopeInputError, match="three time points"):
        backtest_extrapolation(x, t)
    with pytest.raises(ChronotopeInputError, match="modes"):
        backtest_extrapolation(x, t, modes=("drift",))
    with pytest.raises(ChronotopeInputError, match="extrapolate"):
        DynamicsParams(extrapolate="drift")
    assert DynamicsParams().extrapolate == "auto"  # the default: a note, not a warning
    with caplog.at_level(logging.INFO, logger="chronotope"):
        model = DynamicsModel(**{**SMALL, "n_steps": 50}).fit(x, t)
    assert model.extrapolate_ == "landscape" and model.extrapolation_scores_ == {}
    notes = [r for r in caplog.records if "three or more time points" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelno == logging.INFO


@pytest.mark.parametrize(("last", "grows"), [(800, True), (100, False)])
def test_backtest_decides_growth_past_the_end_by_mass(last: int, grows: bool) -> None:
    """Cells slow down (steps 1, 1/2, 1/4) while their number doubles: "damped" wins the
    shape; keeping the growth is right when the held-out count doubles again, not when it
    falls back."""
    rng = np.random.default_rng(0)
    means = [0.0, 1.0, 1.5, 1.75]
    sizes = [100, 200, 400, last]
    x = np.vstack(
        [rng.normal(size=(n, 2)) * 0.3 + m * DRIFT for m, n in zip(means, sizes, strict=True)]
    )
    t = np.repeat(np.arange(4, dtype=np.float64), sizes)
    bt = backtest_extrapolation(x, t, params=DynamicsParams(**SMALL))
    assert bt.choice == "damped", bt.scores
    assert bt.damped_growth is grows, bt.mass_errors
    assert set(bt.mass_errors) == {"growth", "no growth"}


def test_fit_backtest_reuses_the_couplings_of_the_earlier_intervals() -> None:
    """The backtest inside fit reuses the model's couplings (and sigma): the same result as
    solving them again at that sigma, on fewer steps in proportion to the intervals.

    Exactly so without growth pooling; with it (the default) the kept intervals' rates also
    pooled the last interval's growth, so the scores differ a little (documented)."""
    x, t = _gaussians([k * DRIFT for k in range(4)], n=120)
    small = {**SMALL, "growth_neighbors": 0}
    model = DynamicsModel(extrapolate="auto", **small).fit(x, t)
    fresh = backtest_extrapolation(x, t, params=DynamicsParams(**small, sigma=model.sigma_))
    assert model.extrapolate_ == fresh.choice
    assert model.extrapolation_scores_ == pytest.approx(fresh.scores, rel=1e-6)
    reused = backtest_extrapolation(
        x, t, params=DynamicsParams(**small), couplings=model.couplings_
    )
    assert reused.scores == pytest.approx(fresh.scores, rel=1e-6)
    pooled = DynamicsModel(extrapolate="auto", **SMALL).fit(x, t)
    fresh = backtest_extrapolation(x, t, params=DynamicsParams(**SMALL, sigma=pooled.sigma_))
    assert pooled.extrapolate_ == fresh.choice
    assert pooled.extrapolation_scores_ == pytest.approx(fresh.scores, rel=0.03)
    with pytest.raises(ChronotopeInputError, match="couplings are of"):
        DynamicsModel(**SMALL).fit(x[t < 3], t[t < 3], couplings=model.couplings_)
