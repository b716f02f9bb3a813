"""DynamicsModel: known constant drift, growth, simulation directions, save/load, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from chronotope._errors import ChronotopeInputError
from chronotope.dynamics import DynamicsModel, DynamicsParams, GeneMap

DRIFT = np.array([1.0, -0.5])
SMALL = {"hidden": 64, "n_layers": 2, "n_steps": 600, "batch_size": 256}


def _shifting_gaussian(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """N(k * DRIFT, 0.5^2 I) at t = k, k = 0, 1, 2: the flow is the constant DRIFT."""
    rng = np.random.default_rng(seed)
    x = np.vstack([rng.normal(size=(n, 2)) * 0.5 + k * DRIFT for k in range(3)])
    return x, np.repeat([0.0, 1.0, 2.0], n)


@pytest.fixture(scope="module")
def drift_model() -> tuple[DynamicsModel, np.ndarray, np.ndarray]:
    x, t = _shifting_gaussian()
    loadings = np.linalg.qr(np.random.default_rng(1).normal(size=(5, 2)))[0]
    gm = GeneMap(loadings, center=np.arange(5.0), var_names=[f"g{i}" for i in range(5)])
    # a fixed continuation: these tests are about "landscape" and "rest", not the backtest
    model = DynamicsModel(use_rep="X_pca", gene_map=gm, extrapolate="landscape", **SMALL).fit(x, t)
    return model, x, t


def test_recovers_constant_drift(drift_model) -> None:
    model, x, t = drift_model
    assert set(model.timings_) == {"couplings", "training"}
    rng = np.random.default_rng(5)
    for tk in (0.5, 1.0, 1.5):
        pts = rng.normal(size=(400, 2)) * 0.4 + tk * DRIFT
        v = model.velocity(pts, tk)
        np.testing.assert_allclose(v.mean(0), DRIFT, atol=0.1)
        # no growth: equal cell counts, the same shape at every time point
        assert abs(model.growth(pts, tk).mean()) < 0.1
    x0 = x[t == 0]
    for method in ("ode", "sde"):
        res = model.simulate(x0, 0.0, 2.0, method=method, t_eval=[0.0, 1.0, 2.0], seed=0)
        assert res.x.shape == (3, x0.shape[0], 2) and res.weights.shape == (3, x0.shape[0])
        np.testing.assert_allclose(res.x[0], x0, atol=1e-5)
        np.testing.assert_allclose(res.x[-1].mean(0), 2 * DRIFT, atol=0.15)
        np.testing.assert_allclose(res.x[-1].std(0), [0.5, 0.5], atol=0.1)
        np.testing.assert_allclose(res.weights[-1].sum(), 1.0, atol=0.05)
    # backward (reverse-time SDE): from t = 2 back to t = 0
    back = model.simulate(x[t == 2], 2.0, 0.0, method="sde", seed=1)
    np.testing.assert_array_equal(back.times, [2.0, 0.0])
    np.testing.assert_allclose(back.x[-1].mean(0), [0.0, 0.0], atol=0.15)
    np.testing.assert_allclose(back.x[-1].std(0), [0.5, 0.5], atol=0.1)


def test_fields_are_held_at_the_ends_of_the_training_range(drift_model) -> None:
    model, x, t = drift_model
    pts = np.random.default_rng(3).normal(size=(50, 2)) * 0.4 + 2 * DRIFT
    np.testing.assert_array_equal(model.velocity(pts, 5.0), model.velocity(pts, 2.0))
    np.testing.assert_array_equal(model.growth(pts, -1.0), model.growth(pts, 0.0))
    np.testing.assert_array_equal(model.score(pts, 9.0), model.score(pts, 2.0))
    # extrapolate="continue": a constant drift goes on a little past the last time point
    res = model.simulate(x[t == 2], 2.0, 2.5, method="ode", extrapolate="continue")
    np.testing.assert_allclose(res.x[-1].mean(0), 2.5 * DRIFT, atol=0.15)


def test_rest_extrapolation_stops_drift_and_growth(drift_model) -> None:
    """``extrapolate="rest"``: past the training range only the diffusion acts."""
    model, x, t = drift_model
    x2 = x[t == 2]
    for method in ("ode", "sde"):
        res = model.simulate(
            x2, 2.0, 3.0, method=method, t_eval=[2.0, 3.0], seed=0, extrapolate="rest"
        )
        # the mean stays (no drift), the masses stay (no growth); the cloud only spreads
        np.testing.assert_allclose(res.x[-1].mean(0), x2.mean(0), atol=0.05)
        np.testing.assert_allclose(res.weights[-1], res.weights[0], rtol=1e-6)
        spread = res.x[-1].std(0) ** 2 - x2.std(0) ** 2
        assert (spread > -0.02).all() and (spread < 2 * model.sigma_**2 + 0.05).all()
        cont = model.simulate(x2, 2.0, 3.0, method=method, seed=0, extrapolate="continue")
        assert np.linalg.norm(cont.x[-1].mean(0) - x2.mean(0)) > 0.5 * np.linalg.norm(DRIFT)
    # from inside the range to outside: the step is split at t = 2, the drift acts up to it
    part = model.simulate(x[t == 1], 1.0, 3.0, method="ode", t_eval=[2.0, 3.0])
    np.testing.assert_allclose(part.x[0].mean(0), 2 * DRIFT, atol=0.15)
    np.testing.assert_allclose(part.x[1].mean(0), part.x[0].mean(0), atol=0.05)
    # backward before the first time point: at rest as well
    back = model.simulate(x[t == 0], 0.0, -1.0, method="ode")
    np.testing.assert_allclose(back.x[-1].mean(0), x[t == 0].mean(0), atol=0.05)
    with pytest.raises(ChronotopeInputError, match="extrapolate"):
        model.simulate(x2, 2.0, 3.0, extrapolate="drift")


def test_landscape_extrapolation_freezes_the_last_marginal(drift_model) -> None:
    """``extrapolate="landscape"``: no transport, no growth, Langevin in U(., t_end)."""
    model, x, t = drift_model
    x2 = x[t == 2]
    # the probability flow of a stationary Langevin dynamics does not move
    ode = model.simulate(x2, 2.0, 4.0, method="ode")
    np.testing.assert_array_equal(ode.x[-1], ode.x[0])
    np.testing.assert_array_equal(ode.weights[-1], ode.weights[0])
    default = model.simulate(x2, 2.0, 4.0, method="sde", seed=0)
    land = model.simulate(x2, 2.0, 22.0, method="sde", seed=0, extrapolate="landscape")
    rest = model.simulate(x2, 2.0, 22.0, method="sde", seed=0, extrapolate="rest")
    assert not np.array_equal(default.x[-1], default.x[0])  # the SDE does move particles
    np.testing.assert_allclose(land.weights[-1], land.weights[0], rtol=1e-6)
    # twenty time units of diffusion later the cloud keeps its place and its shape ...
    np.testing.assert_allclose(land.x[-1].mean(0), x2.mean(0), atol=0.2)  # a small model
    np.testing.assert_allclose(land.x[-1].std(0), x2.std(0), atol=0.1)
    # ... while the reference process spreads it by about 20 sigma^2 per axis
    grow = rest.x[-1].var(0) - land.x[-1].var(0)
    assert (grow > 0.5 * 20 * model.sigma_**2).all()
    # backward before the first time point: the same Langevin dynamics
    back = model.simulate(x[t == 0], 0.0, -5.0, method="sde", seed=1)
    np.testing.assert_allclose(back.x[-1].mean(0), x[t == 0].mean(0), atol=0.2)
    np.testing.assert_allclose(back.x[-1].std(0), x[t == 0].std(0), atol=0.1)


def test_score_is_gradient_of_learned_potential(drift_model) -> None:
    model, _, _ = drift_model
    # the score points towards the mode of N(DRIFT, 0.5^2 I) at t = 1
    pts = DRIFT + np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    s = model.score(pts, 1.0)
    assert (np.sum(s * (DRIFT - pts), 1) > 0).all()
    u = model.potential(pts, 1.0)
    assert (u > model.potential(DRIFT[None], 1.0)).all()
    d = model.drift(pts, 1.0)
    np.testing.assert_allclose(d, model.velocity(pts, 1.0) + 0.5 * model.sigma_**2 * s)


def test_save_load_round_trip(drift_model, tmp_path: Path) -> None:
    model, x, _ = drift_model
    out = model.save(tmp_path / "m")
    loaded = DynamicsModel.load(out, dim=2, use_rep="X_pca")
    pts = x[:50]
    for name in ("velocity", "growth", "potential", "score"):
        np.testing.assert_allclose(
            getattr(loaded, name)(pts, 0.7), getattr(model, name)(pts, 0.7), rtol=1e-6
        )
    assert loaded.params == model.params and loaded.sigma_ == model.sigma_
    np.testing.assert_array_equal(loaded.times_, [0.0, 1.0, 2.0])
    np.testing.assert_allclose(loaded.gene_map.loadings, model.gene_map.loadings)
    assert loaded.gene_map.var_names == model.gene_map.var_names
    a = model.simulate(pts, 0.0, 1.0, method="sde", seed=3)
    b = loaded.simulate(pts, 0.0, 1.0, method="sde", seed=3)
    np.testing.assert_allclose(a.x, b.x, rtol=1e-5, atol=1e-6)
    with pytest.raises(ChronotopeInputError, match="representation 'X_pca'"):
        DynamicsModel.load(out, use_rep="X_umap")
    with pytest.raises(ChronotopeInputError, match="2 dimensions"):
        DynamicsModel.load(out, dim=3)
    with pytest.raises(FileExistsError):
        model.save(out)
    with pytest.raises(FileNotFoundError):
        DynamicsModel.load(tmp_path / "nothing")


def test_growth_network_learns_which_population_grows() -> None:
    rng = np.random.default_rng(3)
    blocks = [
        rng.normal(size=(100, 2)) * 0.3,
        rng.normal(size=(100, 2)) * 0.3 + [3.0, 0.0],
        rng.normal(size=(100, 2)) * 0.3,
        rng.normal(size=(300, 2)) * 0.3 + [3.0, 0.0],
    ]
    x, t = np.vstack(blocks), np.r_[np.zeros(200), np.ones(400)]
    model = DynamicsModel(tau_a=0.9, **SMALL).fit(x, t)
    g_a = model.growth(blocks[0], 0.5).mean()
    g_b = model.growth(blocks[1], 0.5).mean()
    assert g_b - g_a > 0.7 and g_b > 0.7 and abs(g_a) < 0.3, (g_a, g_b)
    res = model.simulate(x[t == 0], 0.0, 1.0)
    np.testing.assert_allclose(res.weights[-1].sum(), 2.0, rtol=0.1)  # n_1 / n_0
    w_b = res.weights[-1][100:].sum() / res.weights[-1].sum()
    assert w_b > 0.65  # truth 0.75 of the mass on B


def test_gene_map() -> None:
    w = np.linalg.qr(np.random.default_rng(0).normal(size=(6, 3)))[0]
    gm = GeneMap(w, center=np.ones(6))
    pts = np.random.default_rng(1).normal(size=(4, 3))
    np.testing.assert_allclose(gm.to_rep(gm.to_genes(pts)), pts, atol=1e-10)
    np.testing.assert_allclose(gm.vectors_to_genes(pts), pts @ w.T)
    with pytest.raises(ChronotopeInputError, match="var_names"):
        GeneMap(w, var_names=["a"])
    x, t = _shifting_gaussian(30)
    with pytest.raises(ChronotopeInputError, match="gene_map has 3 components"):
        DynamicsModel(gene_map=gm, n_steps=1).fit(x, t)


def test_bad_inputs_and_params() -> None:
    x, t = _shifting_gaussian(30)
    with pytest.raises(ChronotopeInputError, match="at least two time points"):
        DynamicsModel(n_steps=1).fit(x, np.ones(x.shape[0]))
    with pytest.raises(ChronotopeInputError, match="numeric"):
        DynamicsModel(n_steps=1).fit(x, np.array(["a", "b", "c"] * 30)[np.argsort(t)])
    with pytest.raises(ChronotopeInputError, match="NaN"):
        DynamicsModel(n_steps=1).fit(np.where(x > 1.2, np.nan, x), t)
    with pytest.raises(ChronotopeInputError, match="fewer than 50 cells"):
        DynamicsModel(n_steps=1, min_cells=50).fit(x, t)
    with pytest.raises(ChronotopeInputError, match="n_steps"):
        DynamicsParams(n_steps=0)
    with pytest.raises(RuntimeError, match="not fitted"):
        DynamicsModel().velocity(x, 0.0)
    model = DynamicsModel(n_steps=2, hidden=8, n_layers=1).fit(x, t)
    with pytest.raises(ChronotopeInputError, match=r"shape \(n, 2\)"):
        model.simulate(np.zeros((3, 4)), 0.0, 1.0)
    with pytest.raises(ChronotopeInputError, match="method"):
        model.simulate(x[:3], 0.0, 1.0, method="euler")
    with pytest.raises(ChronotopeInputError, match="t_eval"):
        model.simulate(x[:3], 0.0, 1.0, t_eval=[2.0])
