"""Sinkhorn engine: agreement with POT and scipy, invariants, gradients, errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose
from scipy.optimize import linear_sum_assignment

from chronotope import ot as cot
from chronotope._errors import ConvergenceWarning

pot = pytest.importorskip("ot")

MODES = [True, "auto"]


def _problem(seed: int, n: int = 30, m: int = 40, d: int = 2):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = rng.normal(size=(m, d)) + 0.3
    a = rng.random(n) + 0.1
    b = rng.random(m) + 0.1
    return x, y, a / a.sum(), b / b.sum()


def _solve(x, y=None, a=None, b=None, **kw):
    kw.setdefault("tol", 1e-12)
    kw.setdefault("max_iter", 100_000)
    return cot.sinkhorn(x, y, a=a, b=b, **kw)


# ----------------------------------------------------------------- POT
@pytest.mark.parametrize("lse_mode", MODES)
@pytest.mark.parametrize("eps", [1.0, 0.1, 0.05])
def test_balanced_matches_pot(eps, lse_mode):
    x, y, a, b = _problem(0)
    cost = pot.dist(x, y)
    ref = pot.sinkhorn(a, b, cost, eps, method="sinkhorn_log", numItermax=100_000, stopThr=1e-13)
    out = _solve(x, y, a, b, epsilon=eps, lse_mode=lse_mode)
    assert out.converged
    assert_allclose(out.dense_plan().numpy(), ref, atol=1e-9)
    assert_allclose(float(out.primal_cost), float((ref * cost).sum()), rtol=1e-7)


@pytest.mark.parametrize("lse_mode", MODES)
@pytest.mark.parametrize("tau", [0.3, 0.8, 0.95])
def test_unbalanced_matches_pot(tau, lse_mode):
    x, y, a, b = _problem(1)
    a = 2.0 * a  # different masses
    eps = 0.1
    rho = eps * tau / (1 - tau)
    cost = pot.dist(x, y)
    ref = pot.unbalanced.sinkhorn_unbalanced(
        a, b, cost, eps, rho, reg_type="kl", numItermax=100_000, stopThr=1e-15
    )
    out = _solve(x, y, a, b, epsilon=eps, tau_a=tau, tau_b=tau, lse_mode=lse_mode)
    assert_allclose(out.dense_plan().numpy(), ref, atol=1e-9)


@pytest.mark.parametrize("lse_mode", MODES)
def test_semi_relaxed_closed_form(lse_mode):
    x, y, a, b = _problem(2)
    eps = 0.2
    out = _solve(x, y, a, b, epsilon=eps, tau_a=0.0, tau_b=1.0, lse_mode=lse_mode)
    k = a[:, None] * np.exp(-pot.dist(x, y) / eps)
    expected = k / k.sum(0, keepdims=True) * b[None, :]
    assert_allclose(out.dense_plan().numpy(), expected, atol=1e-12)
    assert out.converged


@pytest.mark.parametrize("lse_mode", MODES)
def test_small_epsilon_stable(lse_mode):
    rng = np.random.default_rng(3)
    x, y = rng.random((40, 2)), rng.random((50, 2))
    cost = pot.dist(x, y)
    eps = 1e-3 * cost.max()
    a, b = np.full(40, 1 / 40), np.full(50, 1 / 50)
    ref = pot.sinkhorn(a, b, cost, eps, method="sinkhorn_log", numItermax=200_000, stopThr=1e-11)
    out = _solve(x, y, epsilon=eps, tol=1e-9, lse_mode=lse_mode)
    plan = out.dense_plan().numpy()
    assert np.isfinite(plan).all()
    assert_allclose(plan, ref, atol=1e-8)


def test_float32_small_epsilon_finite():
    rng = np.random.default_rng(4)
    x = torch.tensor(rng.random((100, 2)), dtype=torch.float32)
    y = torch.tensor(rng.random((110, 2)), dtype=torch.float32)
    eps = 1e-3 * float(torch.cdist(x, y).max() ** 2)
    out = cot.sinkhorn(x, y, epsilon=eps, tol=1e-5, max_iter=50_000)
    assert out.f.dtype == torch.float32
    assert torch.isfinite(out.f).all() and torch.isfinite(out.g).all()
    assert_allclose(out.marginals(0).numpy(), np.full(110, 1 / 110), atol=1e-5)


def test_epsilon_to_zero_matches_assignment():
    rng = np.random.default_rng(5)
    n = 20
    x, y = rng.random((n, 2)), rng.random((n, 2))
    cost = pot.dist(x, y)
    rows, cols = linear_sum_assignment(cost)
    out = _solve(x, y, epsilon=1e-3 * cost.max(), tol=1e-9, lse_mode=True)
    plan = out.dense_plan().numpy()
    assert_allclose(plan.argmax(1)[rows], cols)
    assert_allclose(float(out.primal_cost), cost[rows, cols].sum() / n, rtol=1e-2)


def test_euclidean_cost_and_scaling():
    x, y, a, b = _problem(6)
    cost = pot.dist(x, y, metric="euclidean")
    ref = pot.sinkhorn(
        a, b, cost / cost.max(), 0.05, method="sinkhorn_log", numItermax=100_000, stopThr=1e-13
    )
    out = _solve(x, y, a, b, epsilon=0.05, cost="euclidean", scale_cost="max")
    assert_allclose(out.dense_plan().numpy(), ref, atol=1e-9)


# ------------------------------------------------------------ batching
@pytest.mark.parametrize("lse_mode", MODES)
def test_batched_equals_loop(lse_mode):
    x, y, a, _ = _problem(7)
    rng = np.random.default_rng(7)
    bmat = rng.random((40, 6)) ** 3
    bmat[:5, 0] = 0.0  # zeros in a histogram
    bmat /= bmat.sum(0)
    out = _solve(x, y, a, bmat, epsilon=0.05, lse_mode=lse_mode)
    assert out.f.shape == (30, 6) and out.g.shape == (40, 6)
    assert out.primal_cost.shape == (6,)
    for k in range(6):
        single = _solve(x, y, a, bmat[:, k], epsilon=0.05, lse_mode=True)
        assert_allclose(out.dense_plan(column=k).numpy(), single.dense_plan().numpy(), atol=1e-10)
        assert_allclose(float(out.primal_cost[k]), float(single.primal_cost), rtol=1e-9)


@pytest.mark.parametrize("lse_mode", MODES)
def test_batched_source_histograms_with_shared_target(lse_mode):
    x, y, _, b = _problem(18)
    amat = np.random.default_rng(18).random((30, 4)) + 0.1
    amat /= amat.sum(0)
    out = _solve(x, y, amat, b, epsilon=0.1, lse_mode=lse_mode)
    assert out.f.shape == (30, 4) and out.g.shape == (40, 4)
    for k in range(4):
        single = _solve(x, y, amat[:, k], b, epsilon=0.1, lse_mode=True)
        assert_allclose(out.dense_plan(column=k).numpy(), single.dense_plan().numpy(), atol=1e-10)


def test_column_batches_equal_one_solve():
    x, y, a, _ = _problem(19)
    bmat = np.random.default_rng(19).random((40, 7)) + 0.05
    bmat /= bmat.sum(0)
    whole = _solve(x, y, a, bmat, epsilon=0.1)
    solver = cot.Sinkhorn(epsilon=0.1, tol=1e-12, max_iter=100_000, column_batch_size=3)
    parts = solver(cot.LinearProblem(cot.PointCloud(x, y), a, bmat))
    assert parts.f.shape == (30, 7) and parts.converged
    assert_allclose(parts.primal_cost.numpy(), whole.primal_cost.numpy(), rtol=1e-10)
    for k in (0, 4, 6):
        assert_allclose(
            parts.dense_plan(column=k).numpy(), whole.dense_plan(column=k).numpy(), atol=1e-12
        )


def test_chunked_point_cloud_equals_dense():
    x, y, a, b = _problem(8, n=53, m=47)
    full = _solve(x, y, a, b, epsilon=0.05)
    chunked = _solve(x, y, a, b, epsilon=0.05, batch_size=7)
    dense = _solve(cot.DenseGeometry(pot.dist(x, y)), a=a, b=b, epsilon=0.05)
    assert_allclose(chunked.dense_plan().numpy(), full.dense_plan().numpy(), atol=1e-12)
    assert_allclose(dense.dense_plan().numpy(), full.dense_plan().numpy(), atol=1e-12)


def _knn_cost(n: int, k: int, seed: int) -> sp.csr_matrix:
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(seed)
    pts = rng.random((n, 2))
    dist, idx = cKDTree(pts).query(pts, k=k)
    rows = np.repeat(np.arange(n), k)
    c = sp.csr_matrix((dist.ravel() ** 2 + 1e-6, (rows, idx.ravel())), shape=(n, n))
    return c.maximum(c.T).tocsr()


@pytest.mark.parametrize("lse_mode", MODES)
def test_sparse_geometry_equals_dense_with_infinite_costs(lse_mode):
    cost = _knn_cost(80, 8, 9)
    rng = np.random.default_rng(9)
    bmat = np.full((80, 3), 1 / 80) * (1 + 0.3 * rng.random((80, 3)))
    bmat /= bmat.sum(0)
    geom = cot.SparseGeometry(cost)
    solver = cot.Sinkhorn(epsilon=0.01, tol=1e-11, max_iter=50_000, lse_mode=lse_mode)
    out = solver(cot.LinearProblem(geom, None, bmat))
    ref = cot.Sinkhorn(epsilon=0.01, tol=1e-11, max_iter=50_000, lse_mode=True)(
        cot.LinearProblem(cot.DenseGeometry(geom.cost_matrix()), None, bmat)
    )
    for k in range(3):
        assert_allclose(
            out.dense_plan(column=k).numpy(), ref.dense_plan(column=k).numpy(), atol=1e-12
        )
    assert_allclose(out.primal_cost.numpy(), ref.primal_cost.numpy(), rtol=1e-9)
    topk = out.plan(3, column=0)
    assert topk.nnz == 3 * 80


# ------------------------------------------------------------ outputs
def test_apply_projection_and_topk_match_dense_plan():
    x, y, a, b = _problem(10)
    out = _solve(x, y, a, b, epsilon=0.1)
    plan = out.dense_plan().numpy()
    v = np.random.default_rng(0).normal(size=(40, 3))
    assert_allclose(out.apply(v).numpy(), plan @ v, atol=1e-12)
    assert_allclose(out.apply(x, axis=0).numpy(), plan.T @ x, atol=1e-12)
    assert_allclose(
        out.barycentric_projection(y).numpy(), plan @ y / plan.sum(1, keepdims=True), atol=1e-12
    )
    sparse_plan = out.plan(k=5).toarray()
    for i in range(30):
        top = np.sort(np.argsort(plan[i])[-5:])
        assert_allclose(np.sort(np.nonzero(sparse_plan[i])[0]), top)
        assert_allclose(sparse_plan[i, top], plan[i, top], rtol=1e-12)
    assert_allclose(out.marginals(1).numpy(), a, atol=1e-10)


def test_warm_start_converges_immediately():
    x, y, a, b = _problem(11)
    first = _solve(x, y, a, b, epsilon=0.05, tol=1e-10)
    again = _solve(x, y, a, b, epsilon=0.05, tol=1e-10, init=(first.f, first.g))
    assert again.converged
    assert again.n_iter <= 10 < first.n_iter


def test_progress_callback_and_nonconvergence_warning():
    x, y, a, b = _problem(12)
    seen = []
    solver = cot.Sinkhorn(
        epsilon=0.001, max_iter=20, tol=1e-12, progress=lambda i, e: seen.append(i)
    )
    with pytest.warns(ConvergenceWarning):
        out = solver(cot.LinearProblem(cot.PointCloud(x, y), a, b))
    assert not out.converged
    assert seen == [10, 20]
    assert out.errors.shape == (2,)


# ----------------------------------------------------------- gradients
def test_envelope_gradient_gradcheck():
    rng = np.random.default_rng(13)
    x = torch.tensor(rng.normal(size=(5, 2)), requires_grad=True)
    y = torch.tensor(rng.normal(size=(6, 2)))

    def value(xx):
        solver = cot.Sinkhorn(epsilon=0.5, tol=1e-14, max_iter=100_000, lse_mode=True)
        return solver(cot.LinearProblem(cot.PointCloud(xx, y))).reg_ot_cost

    assert torch.autograd.gradcheck(value, (x,), eps=1e-6, atol=1e-6)


def test_envelope_gradient_wrt_cost_is_plan():
    x, y, a, b = _problem(14, n=8, m=9)
    c = torch.tensor(pot.dist(x, y), requires_grad=True)
    out = cot.Sinkhorn(epsilon=0.1, tol=1e-13, max_iter=100_000)(
        cot.LinearProblem(cot.DenseGeometry(c), a, b)
    )
    (grad,) = torch.autograd.grad(out.reg_ot_cost, c)
    assert_allclose(grad.numpy(), out.dense_plan().detach().numpy(), atol=1e-10)


def test_unbalanced_gradient_wrt_weights_gradcheck():
    rng = np.random.default_rng(15)
    x, y = rng.normal(size=(4, 2)), rng.normal(size=(5, 2))
    a = torch.tensor(rng.random(4) + 0.2, requires_grad=True)
    b = torch.tensor(rng.random(5) + 0.2)

    def value(aa):
        solver = cot.Sinkhorn(epsilon=0.5, tol=1e-14, max_iter=100_000, lse_mode=True)
        prob = cot.LinearProblem(cot.PointCloud(x, y), aa, b, tau_a=0.7, tau_b=0.7)
        return solver(prob).reg_ot_cost

    assert torch.autograd.gradcheck(value, (a,), eps=1e-6, atol=1e-6)


def test_unrolled_potentials_carry_gradients():
    rng = np.random.default_rng(16)
    x = torch.tensor(rng.normal(size=(6, 2)), requires_grad=True)
    y = torch.tensor(rng.normal(size=(7, 2)))
    out = cot.Sinkhorn(epsilon=0.3, tol=1e-12, n_unroll=5)(cot.LinearProblem(cot.PointCloud(x, y)))
    loss = out.barycentric_projection(y).pow(2).sum()
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


# ---------------------------------------------------------- invariants
points = st.integers(min_value=3, max_value=12)


@settings(max_examples=25, deadline=None)
@given(n=points, m=points, seed=st.integers(0, 10_000), eps=st.sampled_from([0.05, 0.3, 1.0]))
def test_invariants(n, m, seed, eps):
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(n, 2)), rng.normal(size=(m, 2))
    a, b = rng.random(n) + 0.05, rng.random(m) + 0.05
    a, b = a / a.sum(), b / b.sum()
    out = _solve(x, y, a, b, epsilon=eps)
    plan = out.dense_plan().numpy()
    # non-negativity and marginals
    assert (plan >= 0).all()
    assert_allclose(plan.sum(1), a, atol=1e-9)
    assert_allclose(plan.sum(0), b, atol=1e-9)
    # transposition symmetry
    swapped = _solve(y, x, b, a, epsilon=eps)
    assert_allclose(swapped.dense_plan().numpy(), plan.T, atol=1e-9)
    # a constant shift of the cost leaves the plan unchanged
    shifted = _solve(cot.DenseGeometry(pot.dist(x, y) + 3.7), a=a, b=b, epsilon=eps)
    assert_allclose(shifted.dense_plan().numpy(), plan, atol=1e-9)
    # log domain and stabilised kernel agree
    lse = _solve(x, y, a, b, epsilon=eps, lse_mode=True)
    assert_allclose(lse.dense_plan().numpy(), plan, atol=1e-9)


# -------------------------------------------------------------- errors
def test_input_errors():
    x, y, a, b = _problem(17)
    geom = cot.PointCloud(x, y)
    with pytest.raises(ValueError, match="shape"):
        cot.LinearProblem(geom, a[:-1], b)
    with pytest.raises(ValueError, match="negative"):
        cot.LinearProblem(geom, -a, b)
    with pytest.raises(ValueError, match="NaN"):
        cot.LinearProblem(geom, np.full(30, np.nan), b)
    with pytest.raises(ValueError, match="equal total mass"):
        cot.LinearProblem(geom, 2 * a, b)
    with pytest.raises(ValueError, match="tau_a"):
        cot.LinearProblem(geom, a, b, tau_a=1.5)
    with pytest.raises(ValueError, match="both be 0"):
        cot.LinearProblem(geom, a, b, tau_a=0.0, tau_b=0.0)
    with pytest.raises(ValueError, match="same number of columns"):
        cot.PointCloud(x, np.zeros((4, 3)))
    with pytest.raises(ValueError, match="column="):
        bm = np.ones((40, 2)) / 40
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _solve(x, y, a, bm, epsilon=0.5).dense_plan()


# ----------------------------------------------------------- over-relaxation
@pytest.mark.parametrize("lse_mode", MODES)
@pytest.mark.parametrize("tau_a", [1.0, 0.998])
def test_overrelaxation_reaches_the_same_plan_in_fewer_iterations(tau_a, lse_mode):
    """Small epsilon, where plain Sinkhorn is slow: the over-relaxed iterations end at
    the same plan (POT's, when balanced), in fewer iterations; a too-large factor is
    halved by the guard."""
    x, y, a, b = _problem(3, n=60, m=70)
    cost = pot.dist(x, y)
    eps = 0.005 * float(cost.mean())
    kw = {"epsilon": eps, "tau_a": tau_a, "lse_mode": lse_mode, "tol": 1e-10}
    plain = _solve(x, y, a, b, **kw)
    assert plain.converged and plain.n_iter > 300
    if tau_a == 1.0:
        ref = pot.sinkhorn(
            a, b, cost, eps, method="sinkhorn_log", numItermax=200_000, stopThr=1e-13
        )
        assert_allclose(plain.dense_plan().numpy(), ref, atol=1e-8)
    else:  # POT's unbalanced solvers overflow at this epsilon; the plain plan is tested above
        ref = plain.dense_plan().numpy()
    for w in ("auto", 1.5, 1.99):
        out = _solve(x, y, a, b, overrelaxation=w, **kw)
        assert out.converged, w
        assert_allclose(out.dense_plan().numpy(), ref, atol=1e-8)
        if w != 1.99:
            assert out.n_iter < 0.6 * plain.n_iter, (w, out.n_iter, plain.n_iter)


@pytest.mark.parametrize("tau_a", [1.0, 0.998])
def test_auto_overrelaxation_raises_a_factor_set_too_low(tau_a):
    """Two 2-D clusters moved, epsilon 0.003 of the mean cost: the warm-up's transient
    makes the first estimate of the factor too small (the solve took 1,480 / 910
    iterations with it alone); raising it from the over-relaxed rate (Young's relation)
    reaches the same cost in under 800 / 500."""
    rng = np.random.default_rng(0)
    n = 800
    x = np.r_[rng.normal(size=(n // 2, 2)) * 0.3, rng.normal(size=(n // 2, 2)) * 0.3 + [2, 0]]
    y = np.r_[
        rng.normal(size=(n // 2, 2)) * 0.3 + [0.5, 1],
        rng.normal(size=(n // 2, 2)) * 0.5 + [2.5, 0.5],
    ]
    a = b = np.full(n, 1.0 / n)
    geom = cot.PointCloud(x, y)
    eps = 0.003 * float(geom.mean_cost)
    prob = cot.LinearProblem(geom, a, b, tau_a=tau_a)
    kw = {"epsilon": eps, "tol": 1e-6, "max_iter": 20000, "warn": False}
    auto = cot.Sinkhorn(overrelaxation="auto", **kw)(prob)
    plain = cot.Sinkhorn(**kw)(prob)
    assert auto.converged and plain.converged
    assert auto.n_iter < (800 if tau_a == 1.0 else 500) < plain.n_iter
    assert_allclose(float(auto.reg_ot_cost), float(plain.reg_ot_cost), rtol=1e-7)


@pytest.mark.parametrize("lse_mode", MODES)
@pytest.mark.parametrize("w", ["auto", 1.5])
def test_overrelaxation_with_zero_masses(w, lse_mode):
    """A zero-mass point has a -inf potential; over-relaxing it must not give NaN (it once
    did, and the NaN error then read as converged)."""
    x, y, a, b = _problem(5, n=50, m=60)
    a = a.copy()
    a[:3] = 0.0
    a /= a.sum()
    eps = 0.01 * float(pot.dist(x, y, metric="euclidean").mean())
    kw = {"epsilon": eps, "cost": "euclidean", "tol": 1e-9, "lse_mode": lse_mode}
    ref = _solve(x, y, a, b, max_iter=50_000, **kw)
    out = _solve(x, y, a, b, overrelaxation=w, max_iter=20_000, **kw)
    assert out.converged and torch.isfinite(out.f[3:]).all() and torch.isfinite(out.g).all()
    assert torch.isneginf(out.f[:3]).all()
    assert_allclose(float(out.reg_ot_cost), float(ref.reg_ot_cost), rtol=1e-8)
    assert out.n_iter < ref.n_iter


def test_overrelaxation_checks_its_factor():
    for bad in (0.5, 2.0, "fast"):
        with pytest.raises(ValueError, match="overrelaxation"):
            cot.Sinkhorn(overrelaxation=bad)
