"""Free-support Wasserstein barycentre: known answers, POT agreement, invariants."""

from __future__ import annotations

import numpy as np
import ot
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chronotope.ot.barycenter import BarycenterOutput, free_support_barycenter

FAST = {"sinkhorn_tol": 1e-9, "sinkhorn_max_iter": 5000}


def _measures(seed, k=3, n=9, d=2):
    rng = np.random.default_rng(seed)
    locs = [rng.random((n, d)) for _ in range(k)]
    wts = [rng.random(n) + 0.2 for _ in range(k)]
    return rng, locs, [w / w.sum() for w in wts]


def test_two_diracs_give_weighted_midpoint():
    a, b = np.array([[0.0, 0.0]]), np.array([[2.0, 4.0]])
    out = free_support_barycenter([a, b], n_support=1)
    assert isinstance(out, BarycenterOutput) and out.converged
    np.testing.assert_allclose(out.locations.numpy(), [[1.0, 2.0]], atol=1e-12)
    out = free_support_barycenter([a, b], weights=[0.25, 0.75], n_support=1)
    np.testing.assert_allclose(out.locations.numpy(), [[1.5, 3.0]], atol=1e-12)
    np.testing.assert_allclose(out.weights.numpy(), [1.0])


@pytest.mark.parametrize("seed", [1, 11])  # generic cases: the exact plans are unique
def test_one_step_matches_pot_exact_update(seed):
    rng, locs, wts = _measures(seed)
    x0 = rng.random((5, 2))
    lam = rng.random(3)
    lam /= lam.sum()
    expected = ot.lp.free_support_barycenter(locs, wts, x0, weights=lam, numItermax=1)
    with pytest.warns(match="did not converge"):
        out = free_support_barycenter(
            locs, wts, weights=lam, x_init=x0, epsilon=3e-4, max_iter=1, tol=0.0,
            sinkhorn_tol=1e-9, sinkhorn_max_iter=20000,
        )  # fmt: skip
    np.testing.assert_allclose(out.locations.numpy(), expected, atol=1e-5)


def test_matches_pot_exact_free_support_barycenter():
    # the fixed point depends on the path; this case has non-degenerate plans all along
    rng, locs, wts = _measures(1, k=2, n=7)
    x0 = rng.random((4, 2))
    lam = np.array([0.3, 0.7])
    expected = ot.lp.free_support_barycenter(locs, wts, x0, weights=lam, stopThr=1e-14)
    out = free_support_barycenter(
        locs, wts, weights=lam, x_init=x0, epsilon=1e-3, tol=1e-14, **FAST
    )
    assert out.converged
    np.testing.assert_allclose(out.locations.numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_mccann_interpolation_between_two_measures(t):
    # mu1 is a noisy translate of mu0: the optimal map is the identity matching,
    # and the lambda = (1 - t, t) barycentre is the displacement interpolant.
    rng = np.random.default_rng(5)
    mu0 = rng.random((6, 2)) * 3
    mu1 = mu0 + np.array([1.0, 0.5]) + 0.05 * rng.normal(size=(6, 2))
    out = free_support_barycenter(
        [mu0, mu1], weights=[1 - t, t], x_init=mu0, epsilon=1e-2, tol=1e-10,
        sinkhorn_tol=1e-6,
    )  # fmt: skip
    assert out.converged
    np.testing.assert_allclose(out.locations.numpy(), (1 - t) * mu0 + t * mu1, atol=1e-4)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 6),
    k=st.integers(1, 3),
    seed=st.integers(0, 10_000),
)
def test_hypothesis_barycenter_of_identical_measures(n, k, seed):
    rng = np.random.default_rng(seed)
    mu = rng.random((n, 2)) * 10
    lam = rng.random(k) + 0.1
    out = free_support_barycenter([mu] * k, weights=lam, x_init=mu, epsilon=1e-3, tol=1e-14, **FAST)
    # the barycentre of k copies of mu is mu (up to the entropic blur)
    np.testing.assert_allclose(out.locations.numpy(), mu, atol=1e-4)


def test_identical_measures_from_random_support():
    rng = np.random.default_rng(6)
    mu = rng.random((6, 2))
    w = rng.random(6) + 0.5
    w /= w.sum()
    out = free_support_barycenter(
        [mu, mu], [w, w], n_support=3, seed=0, epsilon=1e-3, tol=1e-14, **FAST
    )
    # the barycentric projections preserve the weighted mean of mu
    np.testing.assert_allclose(out.locations.numpy().mean(0), w @ mu, atol=1e-6)


def test_chunked_equals_dense_and_seed_reproducible():
    locs, wts = _measures(7, n=20)[1:]
    kw = {"n_support": 6, "seed": 3, "epsilon": 0.01, "max_iter": 5, "tol": 0.0}
    with pytest.warns(match="did not converge"):
        dense = free_support_barycenter(locs, wts, batch_size=None, **kw)
    with pytest.warns(match="did not converge"):
        chunked = free_support_barycenter(locs, wts, batch_size=4, **kw)
    np.testing.assert_allclose(chunked.locations.numpy(), dense.locations.numpy(), atol=1e-9)
    assert dense.displacements.shape == (5,) and dense.costs.shape == (5,)


def test_float32_and_relative_epsilon():
    _, locs, wts = _measures(8)
    out = free_support_barycenter(
        locs, wts, n_support=4, seed=1, epsilon=0.05, relative_epsilon=True,
        dtype=torch.float32, tol=1e-8,
    )  # fmt: skip
    assert out.locations.dtype == torch.float32 and out.locations.shape == (4, 2)
    assert out.epsilon > 0


def test_input_errors():
    _, locs, wts = _measures(9)
    with pytest.raises(ValueError, match="empty"):
        free_support_barycenter([])
    with pytest.raises(ValueError, match="x_init or a positive n_support"):
        free_support_barycenter(locs)
    with pytest.raises(ValueError, match="measures_locations"):
        free_support_barycenter([locs[0], np.ones((4, 3))], n_support=2)
    with pytest.raises(ValueError, match="measures_weights"):
        free_support_barycenter(locs, wts[:2], n_support=2)
    with pytest.raises(ValueError, match="non-negative"):
        free_support_barycenter(locs, [-w for w in wts], n_support=2)
    with pytest.raises(ValueError, match="weights"):
        free_support_barycenter(locs, weights=[1.0, 2.0], n_support=2)
    with pytest.raises(ValueError, match="x_init"):
        free_support_barycenter(locs, x_init=np.ones((3, 5)))
