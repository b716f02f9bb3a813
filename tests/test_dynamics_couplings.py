"""Snapshot couplings: agreement with POT, chunking invariants, growth targets, bad input."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from chronotope._errors import ChronotopeInputError
from chronotope.dynamics import check_snapshots, snapshot_couplings

ot = pytest.importorskip("ot")


def data_root() -> str:
    from chronotope._validate import MissingFileError
    from chronotope.datasets import get_data_dir

    try:
        return str(get_data_dir())
    except MissingFileError:
        return ""


def _two_snapshots(n0: int = 60, n1: int = 80, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x0 = rng.normal(size=(n0, 2))
    x1 = rng.normal(size=(n1, 2)) * 0.8 + [1.0, 0.5]
    return np.vstack([x0, x1]), np.r_[np.zeros(n0), np.ones(n1)]


def _pot_plan(x: np.ndarray, t: np.ndarray, iv, tau_a: float, tau_b: float) -> np.ndarray:
    x0, x1 = x[t == 0], x[t == 1]
    eps = iv.epsilon
    reg_m = tuple(eps * tau / (1 - tau) if tau < 1 else np.inf for tau in (tau_a, tau_b))
    b = np.full(x1.shape[0], (x1.shape[0] / x0.shape[0]) / x1.shape[0])
    return ot.unbalanced.sinkhorn_unbalanced(
        iv.prior, b, ot.dist(x0, x1), eps, reg_m, numItermax=100000, stopThr=1e-13
    )


@pytest.mark.parametrize(("tau_a", "tau_b"), [(0.8, 0.95), (0.9, 1.0)])
def test_row_marginals_match_pot(tau_a: float, tau_b: float) -> None:
    x, t = _two_snapshots()
    import torch

    cpl = snapshot_couplings(
        x,
        t,
        epsilon=0.1,
        tau_a=tau_a,
        tau_b=tau_b,
        tol=1e-12,
        max_iter=20000,
        dtype=torch.float64,
        n_pairs=200_000,
        growth_neighbors=0,  # the relaxed solve itself
    )
    iv = cpl.intervals[0]
    plan = _pot_plan(x, t, iv, tau_a, tau_b)
    np.testing.assert_allclose(iv.row_mass, plan.sum(1), rtol=1e-6)
    # growth targets are the log ratio of sent mass to current mass (dt = 1)
    np.testing.assert_allclose(iv.growth, np.log(plan.sum(1) / iv.mass), rtol=1e-5, atol=1e-8)
    # pairs are drawn in proportion to the plan entries: compare both marginal frequencies
    freq_r = np.bincount(iv.pairs[:, 0], minlength=60)[:60] / iv.pairs.shape[0]
    freq_c = np.bincount(iv.pairs[:, 1] - 60, minlength=80) / iv.pairs.shape[0]
    np.testing.assert_allclose(freq_r, plan.sum(1) / plan.sum(), atol=3e-3)
    np.testing.assert_allclose(freq_c, plan.sum(0) / plan.sum(), atol=3e-3)


def test_sigma_and_epsilon_are_consistent() -> None:
    x, t = _two_snapshots()
    t = t * 2.5  # dt = 2.5
    cpl = snapshot_couplings(x, t, sigma=0.3, n_pairs=100)
    assert cpl.sigma == 0.3
    np.testing.assert_allclose(cpl.intervals[0].epsilon, 2 * 0.3**2 * 2.5)
    auto = snapshot_couplings(x, t, epsilon=0.05, n_pairs=100)
    x0, x1 = x[t == 0], x[t > 0]
    mean_cost = ot.dist(x0, x1).mean()
    np.testing.assert_allclose(auto.intervals[0].epsilon, 0.05 * mean_cost, rtol=1e-10)


def test_chunked_blocks_keep_mass_and_cover_cells() -> None:
    x, t = _two_snapshots(230, 310, seed=1)
    # epsilon 0.05 (the default before 0.01): the 64-cell blocks then reach tol well within
    # max_iter, which is what the exact-mass check below needs
    cpl = snapshot_couplings(
        x, t, batch_size=64, n_rounds=2, tau_b=1.0, n_pairs=5000, epsilon=0.05
    )
    iv = cpl.intervals[0]
    assert iv.n_blocks == 5
    # tau_b = 1: every block delivers exactly its share of the target mass
    np.testing.assert_allclose(iv.row_mass.sum(), 310 / 230, rtol=2e-3)
    assert np.isin(iv.pairs[:, 0], iv.source).all() and np.isin(iv.pairs[:, 1], iv.target).all()
    assert np.unique(iv.pairs[:, 0]).size > 0.9 * 230
    assert np.isnan(cpl.growth[t == 1]).all() and np.isfinite(cpl.growth[t == 0]).all()


def test_growth_sign_where_one_population_grows() -> None:
    """A and B start equal; at t = 1 A is unchanged and B has tripled (rates 0 and log 3)."""
    rng = np.random.default_rng(3)
    a0, b0 = rng.normal(size=(100, 2)) * 0.3, rng.normal(size=(100, 2)) * 0.3 + [3.0, 0.0]
    a1, b1 = rng.normal(size=(100, 2)) * 0.3, rng.normal(size=(300, 2)) * 0.3 + [3.0, 0.0]
    x = np.vstack([a0, b0, a1, b1])
    t = np.r_[np.zeros(200), np.ones(400)]
    population_rate = np.log(2.0)
    # default (tau_a = 0.99, conservative): B above the population rate, A below it
    cpl = snapshot_couplings(x, t, n_pairs=2000)
    np.testing.assert_allclose(cpl.masses, [1.0, 2.0])
    g_a, g_b = cpl.growth[:100], cpl.growth[100:200]
    assert (g_b > population_rate).all() and (g_a < population_rate).all()
    assert g_b.min() > g_a.max()
    # more relaxed source marginal: the rates themselves are recovered
    g = snapshot_couplings(x, t, n_pairs=2000, tau_a=0.9).growth
    assert abs(g[:100].mean()) < 0.05, g[:100].mean()
    assert abs(g[100:200].mean() - np.log(3.0)) < 0.05, g[100:200].mean()


def test_user_masses_and_growth_prior() -> None:
    x, t = _two_snapshots()
    cpl = snapshot_couplings(x, t, masses=[1.0, 1.0], tau_a=1.0, n_pairs=100)
    np.testing.assert_allclose(cpl.intervals[0].growth, 0.0, atol=1e-4)
    prior = np.where(x[:, 0] > 0, 0.5, -0.5)
    cpl = snapshot_couplings(x, t, masses=[1.0, 1.0], growth_prior=prior, tau_a=0.5, n_pairs=100)
    g = cpl.intervals[0].growth
    assert g[prior[:60] > 0].mean() > g[prior[:60] < 0].mean()
    with pytest.raises(ChronotopeInputError, match="masses"):
        snapshot_couplings(x, t, masses=[1.0])
    with pytest.raises(ChronotopeInputError, match="growth_prior"):
        snapshot_couplings(x, t, growth_prior=np.ones(3))


def test_swinging_counts_warn_only_when_masses_default(caplog) -> None:
    from chronotope.dynamics.couplings import count_reversals

    # TIGON's bifurcation counts halve and double: suspect; steady growth or a small dip: not
    assert count_reversals(np.array([231, 166, 93, 211, 122, 258, 456, 359])) == [2, 3, 4]
    assert count_reversals(np.array([1429, 3781, 5788])) == []
    assert count_reversals(np.array([13035, 16830, 14103])) == []
    rng = np.random.default_rng(0)
    sizes = (40, 15, 40)
    x = np.concatenate([rng.normal(size=(n, 2)) for n in sizes])
    t = np.repeat([0.0, 1.0, 2.0], sizes)
    with caplog.at_level(logging.WARNING, logger="chronotope"):
        snapshot_couplings(x, t, n_pairs=50)
    assert "40 -> 15 -> 40" in caplog.text and "masses=" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="chronotope"):
        snapshot_couplings(x, t, masses=[1.0, 1.0, 1.0], n_pairs=50)
    assert "swing" not in caplog.text


def test_bad_inputs_raise_clear_errors() -> None:
    x, t = _two_snapshots()
    with pytest.raises(ChronotopeInputError, match="at least two time points"):
        snapshot_couplings(x, np.zeros(x.shape[0]))
    with pytest.raises(ChronotopeInputError, match="numeric"):
        snapshot_couplings(x, np.where(t > 0, "day2", "day0"))
    with pytest.raises(ChronotopeInputError, match="NaN"):
        snapshot_couplings(np.where(np.arange(x.size).reshape(x.shape) == 5, np.nan, x), t)
    with pytest.raises(ChronotopeInputError, match="time has 1 NaN"):
        snapshot_couplings(x, np.where(np.arange(t.size) == 3, np.nan, t))
    t3 = t.copy()
    t3[:4] = 7.0
    with pytest.raises(ChronotopeInputError, match="fewer than 10 cells"):
        snapshot_couplings(x, t3)
    with pytest.raises(ChronotopeInputError, match="one value per cell"):
        check_snapshots(x, t[:-1])
    # numeric strings are numbers
    _, _, times = check_snapshots(x, t.astype(str))
    np.testing.assert_array_equal(times, [0.0, 1.0])


def test_drop_last_equals_solving_without_the_last_time_point() -> None:
    """drop_last is the couplings of the earlier cells, renumbered, with no solve."""
    rng = np.random.default_rng(3)
    sizes = (40, 50, 45, 55)
    # rows of the time points interleaved, so the renumbering is exercised
    t = rng.permutation(np.repeat(np.arange(4.0), sizes))
    x = rng.normal(size=(t.size, 2)) + t[:, None] * 0.7
    # growth_neighbors=0: with pooled growth the kept intervals' rates also pooled the
    # last interval's growth (documented), so only the unpooled couplings are equal
    full = snapshot_couplings(x, t, seed=5, growth_neighbors=0)
    head = full.drop_last(t)
    keep = t < 3
    fresh = snapshot_couplings(x[keep], t[keep], seed=5, sigma=full.sigma, growth_neighbors=0)
    np.testing.assert_array_equal(head.times, fresh.times)
    np.testing.assert_allclose(head.masses, fresh.masses)
    assert head.sigma == fresh.sigma
    assert len(head.intervals) == len(fresh.intervals) == 2
    for a, b in zip(head.intervals, fresh.intervals, strict=True):
        np.testing.assert_array_equal(a.source, b.source)
        np.testing.assert_array_equal(a.target, b.target)
        np.testing.assert_array_equal(a.pairs, b.pairs)
        np.testing.assert_allclose(a.row_mass, b.row_mass)
    np.testing.assert_allclose(head.growth, fresh.growth)  # NaN at t = 2 in both
    assert np.isnan(head.growth[t[keep] == 2]).all()
    assert np.isfinite(head.growth[t[keep] < 2]).all()
    with pytest.raises(ChronotopeInputError, match="one time per cell"):
        full.drop_last(t[:-1])
    with pytest.raises(ChronotopeInputError, match="three or more"):
        head.drop_last(t[keep]).drop_last(t[keep][t[keep] < 2])


def test_default_couplings_converge_where_plain_iterations_stop_short() -> None:
    """At the default epsilon plain Sinkhorn needs thousands of iterations; the default
    over-relaxed solve converges within a small budget, to the same plan."""
    rng = np.random.default_rng(4)
    x = np.vstack([rng.normal(size=(300, 2)), rng.normal(size=(300, 2)) * 0.8 + [1.5, 0.5]])
    t = np.repeat([0.0, 1.0], 300)
    plain = snapshot_couplings(x, t, overrelaxation=1.0, max_iter=2000)
    fast = snapshot_couplings(x, t, max_iter=1000)
    assert not plain.intervals[0].converged
    assert fast.intervals[0].converged
    ref = snapshot_couplings(x, t, overrelaxation=1.0, max_iter=20000)
    assert ref.intervals[0].converged
    np.testing.assert_allclose(fast.intervals[0].row_mass, ref.intervals[0].row_mass, rtol=1e-3)


def test_growth_prior_from_the_other_intervals() -> None:
    """Default: relaxed plans, then each interval again around a prior regressed on the
    other intervals' growth; one interval or a user prior: one solve, as before."""
    rng = np.random.default_rng(6)
    sizes = (120, 150, 180)
    t = np.repeat([0.0, 1.0, 2.5], sizes)
    x = rng.normal(size=(t.size, 2)) + t[:, None] * [0.8, 0.2]
    relaxed = snapshot_couplings(x, t, growth_neighbors=0)
    pooled = snapshot_couplings(x, t)
    for k, (r, p) in enumerate(zip(relaxed.intervals, pooled.intervals, strict=True)):
        assert p.converged
        # the prior carries the population's total mass M_{k+1}
        np.testing.assert_allclose(p.prior.sum(), pooled.masses[k + 1], rtol=1e-10)
        assert not np.allclose(p.prior, r.prior)  # r.prior: the population rate
        assert np.ptp(r.prior) < 1e-12 < np.ptp(p.prior)
        np.testing.assert_allclose(p.growth, np.log(p.row_mass / p.mass) / p.dt)
        assert not np.allclose(p.growth, r.growth)
    # the prior of interval 0 comes from interval 1 alone: a kNN regression of its targets
    from sklearn.neighbors import KNeighborsRegressor

    iv1 = relaxed.intervals[1]
    g = KNeighborsRegressor(50).fit(x[iv1.source], iv1.growth).predict(x[t == 0])
    np.testing.assert_allclose(np.corrcoef(np.log(pooled.intervals[0].prior), g)[0, 1], 1.0)
    # beyond batch_size the relaxed first plans are one subsampled block per interval;
    # the prior still covers every source cell
    blocks = snapshot_couplings(x, t, batch_size=64, epsilon=0.05)
    for k, iv in enumerate(blocks.intervals):
        assert iv.n_blocks == 3 and np.ptp(iv.prior) > 0
        np.testing.assert_allclose(iv.prior.sum(), blocks.masses[k + 1], rtol=1e-10)
        assert np.corrcoef(iv.prior, pooled.intervals[k].prior)[0, 1] > 0.5
    # nothing to borrow from: one interval, a user prior, or a balanced problem
    for kw in ({}, {"growth_prior": np.full(t.size, 0.1)}, {"tau_a": 1.0}):
        keep = t < 2 if not kw else np.ones(t.size, bool)
        one = snapshot_couplings(x[keep], t[keep], **kw)
        one0 = snapshot_couplings(x[keep], t[keep], growth_neighbors=0, **kw)
        np.testing.assert_array_equal(one.intervals[0].pairs, one0.intervals[0].pairs)
        np.testing.assert_allclose(one.growth, one0.growth)
    with pytest.raises(ChronotopeInputError, match="growth_neighbors"):
        snapshot_couplings(x, t, growth_neighbors=-1)


@pytest.mark.skipif(not data_root(), reason="no data folder (set CHRONOTOPE_DATA)")
def test_pooled_growth_follows_the_true_division_rate_on_simulation_gene() -> None:
    """DeepRUOT simulation_gene without t = 1: the relaxed plan of the long interval 0 -> 2
    reads displacement as growth (anti-correlated with the true rate x2^2 / (1 + x2^2));
    around the prior from the later intervals, the growth follows the true rate there too."""
    from chronotope import datasets as ds

    a = ds.deepruot("simulation_gene")
    x, t = np.asarray(a.X, np.float64), a.obs["time"].to_numpy(np.float64)
    keep = t != 1.0
    x, t = x[keep], t[keep]

    def corr(cpl, k: int) -> float:
        iv = cpl.intervals[k]
        x2 = x[iv.source, 1]
        return float(np.corrcoef(iv.growth, x2**2 / (1 + x2**2))[0, 1])

    relaxed = snapshot_couplings(x, t, growth_neighbors=0)
    pooled = snapshot_couplings(x, t)
    assert corr(relaxed, 0) < -0.1
    assert corr(pooled, 0) > 0.5
    for k in (1, 2):  # the later intervals read it right either way
        assert corr(relaxed, k) > 0.95 and corr(pooled, k) > 0.95
