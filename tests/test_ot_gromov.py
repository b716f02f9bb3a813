"""Fused Gromov-Wasserstein: low-rank algebra, agreement with POT, invariants."""

from __future__ import annotations

import numpy as np
import ot
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chronotope.ot import DenseGeometry, PointCloud, sinkhorn
from chronotope.ot.gromov import (
    FGWOutput,
    GromovWasserstein,
    QuadraticProblem,
    _Cost,
    _sqeuclidean_factors,
    fused_gromov_wasserstein,
    gw_gradient,
    gw_objective,
)

# no annealing: the same iteration as POT's entropic solver, run to convergence
TIGHT = {
    "tol": 1e-10,
    "inner_tol": 1e-12,
    "max_iter": 20000,
    "max_outer": 500,
    "epsilon_init": None,
}


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float64))


def _einsum_gw(c1: torch.Tensor, c2: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """GW objective through the explicit n x m x n x m tensor (small cases only)."""
    lt = (c1[:, None, :, None] - c2[None, :, None, :]) ** 2  # (i, j, k, l)
    return torch.einsum("ijkl,ij,kl->", lt, p, p)


def _problem(n=14, m=11, d=2, p=4, seed=0):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(n, d)),
        rng.normal(size=(m, d)),
        rng.normal(size=(n, p)),
        rng.normal(size=(m, p)),
    )


# --------------------------------------------------------------- low-rank algebra
def test_sqeuclidean_factors_reproduce_cost():
    x = _problem(d=3)[0]
    a_f, b_f = _sqeuclidean_factors(_t(x) + 100.0, _t(x) + 100.0, 2.0)
    assert a_f.shape == (x.shape[0], 5)
    np.testing.assert_allclose((a_f @ b_f.T).numpy(), ot.dist(x, x) / 2.0, atol=1e-9)


@pytest.mark.parametrize("symmetric", [True, False])
def test_lowrank_gradient_equals_dense_tensor_formula(symmetric):
    x, y, _, _ = _problem()
    rng = np.random.default_rng(1)
    plan = _t(rng.random((x.shape[0], y.shape[0])) / 50.0).requires_grad_(True)
    if symmetric:
        cx = _Cost(factors=_sqeuclidean_factors(_t(x), _t(x), 1.0), symmetric=True)
        cy = _Cost(factors=_sqeuclidean_factors(_t(y), _t(y), 1.0), symmetric=True)
    else:  # non-symmetric low-rank costs: x vs a perturbed copy of x
        xb = x + 0.3 * rng.normal(size=x.shape)
        yb = y + 0.3 * rng.normal(size=y.shape)
        cx = _Cost(factors=_sqeuclidean_factors(_t(x), _t(xb), 1.0), symmetric=False)
        cy = _Cost(factors=_sqeuclidean_factors(_t(y), _t(yb), 1.0), symmetric=False)
    dense_x, dense_y = cx.matrix().detach(), cy.matrix().detach()
    value = _einsum_gw(dense_x, dense_y, plan)
    (autograd,) = torch.autograd.grad(value, plan)
    with torch.no_grad():
        grad = gw_gradient(cx, cy, plan)
        np.testing.assert_allclose(grad.numpy(), autograd.numpy(), rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(
            float(gw_objective(cx, cy, plan)), float(value), rtol=1e-10, atol=1e-12
        )
        # the dense path agrees with the factor path
        dx, dy = _Cost(dense=dense_x), _Cost(dense=dense_y)
        assert dx.symmetric is symmetric
        np.testing.assert_allclose(gw_gradient(dx, dy, plan).numpy(), grad.numpy(), atol=1e-9)


def test_gradient_matches_pot_gwggrad():
    x, y, _, _ = _problem()
    c1, c2 = ot.dist(x, x), ot.dist(y, y)
    rng = np.random.default_rng(2)
    plan = rng.random((x.shape[0], y.shape[0]))
    plan /= plan.sum()
    const_c, h1, h2 = ot.gromov.init_matrix(c1, c2, plan.sum(1), plan.sum(0))
    expected = ot.gromov.gwggrad(const_c, h1, h2, plan)
    cx = _Cost(factors=_sqeuclidean_factors(_t(x), _t(x), 1.0), symmetric=True)
    cy = _Cost(factors=_sqeuclidean_factors(_t(y), _t(y), 1.0), symmetric=True)
    np.testing.assert_allclose(gw_gradient(cx, cy, _t(plan)).numpy(), expected, atol=1e-10)
    np.testing.assert_allclose(
        float(gw_objective(cx, cy, _t(plan))),
        ot.gromov.gwloss(const_c, h1, h2, plan),
        rtol=1e-12,
    )


def test_linearized_cost_lowrank_equals_dense_geometries():
    x, y, fx, fy = _problem()
    low = QuadraticProblem(
        PointCloud(x, scale_cost="mean"),
        PointCloud(y, scale_cost="mean"),
        PointCloud(fx, fy, scale_cost="mean"),
        alpha=0.3,
    )
    dense = QuadraticProblem(
        DenseGeometry(ot.dist(x, x), scale_cost="mean"),
        DenseGeometry(ot.dist(y, y), scale_cost="mean"),
        DenseGeometry(ot.dist(fx, fy), scale_cost="mean"),
        alpha=0.3,
    )
    assert low.is_lowrank and not dense.is_lowrank
    plan = _t(np.random.default_rng(3).random(low.shape) / 100)
    np.testing.assert_allclose(
        low.linearized_cost(plan).numpy(), dense.linearized_cost(plan).numpy(), atol=1e-10
    )
    np.testing.assert_allclose(float(low.fgw_cost(plan)), float(dense.fgw_cost(plan)), rtol=1e-10)


# ------------------------------------------------------------ agreement with POT
@pytest.mark.filterwarnings("ignore:Sinkhorn did not converge:UserWarning")
@pytest.mark.parametrize("alpha", [0.25, 0.5, 1.0])
def test_matches_pot_entropic_fgw(alpha):
    x, y, fx, fy = _problem()
    c1, c2, m = ot.dist(x, x), ot.dist(y, y), ot.dist(fx, fy)
    c1, c2, m = c1 / c1.mean(), c2 / c2.mean(), m / m.mean()
    eps = 0.05
    expected = ot.gromov.entropic_fused_gromov_wasserstein(
        m, c1, c2, alpha=alpha, epsilon=eps, max_iter=2000, tol=1e-12, stopThr=1e-13
    )
    out = fused_gromov_wasserstein(
        x, y, features_x=fx, features_y=fy, alpha=alpha, epsilon=eps, **TIGHT
    )
    assert isinstance(out, FGWOutput) and out.converged
    np.testing.assert_allclose(out.dense_plan().numpy(), expected, atol=1e-6)
    pot_cost = (1 - alpha) * (m * expected).sum() + alpha * ot.gromov.gwloss(
        *ot.gromov.init_matrix(c1, c2, expected.sum(1), expected.sum(0)), expected
    )
    np.testing.assert_allclose(out.fgw_cost, pot_cost, rtol=1e-6)


def _permuted_copy(n=25, seed=4, reflect=False, noise=0.0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 10, size=(n, 2))
    fx = rng.normal(size=(n, 5))
    perm = rng.permutation(n)
    th = 0.9
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    if reflect:
        rot = rot @ np.diag([1.0, -1.0])
    y = x[perm] @ rot.T + np.array([3.0, -7.0]) + noise * rng.normal(size=(n, 2))
    fy = fx[perm] + noise * rng.normal(size=fx.shape)
    return x, y, fx, fy, perm


@pytest.mark.parametrize(("alpha", "reflect"), [(0.5, False), (1.0, False), (1.0, True)])
def test_recovers_permuted_rotated_copy_like_pot_exact(alpha, reflect):
    x, y, fx, fy, perm = _permuted_copy(reflect=reflect)
    n = x.shape[0]
    out = fused_gromov_wasserstein(
        x, y, features_x=fx, features_y=fy, alpha=alpha, epsilon=3e-3, tol=1e-7
    )
    assert out.converged
    plan = out.dense_plan().numpy()
    # y[j] is x[perm[j]]: the plan must put the mass of x[perm[j]] on y[j]
    np.testing.assert_array_equal(plan.argmax(0), perm)
    assert plan[perm, np.arange(n)].sum() > 0.9999
    c1, c2, m = ot.dist(x, x), ot.dist(y, y), ot.dist(fx, fy)
    c1, c2, m = c1 / c1.mean(), c2 / c2.mean(), m / m.mean()
    pot = ot.gromov.fused_gromov_wasserstein(m, c1, c2, alpha=alpha)
    pot_cost = (1 - alpha) * (m * pot).sum() + alpha * ot.gromov.gwloss(
        *ot.gromov.init_matrix(c1, c2, pot.sum(1), pot.sum(0)), pot
    )
    assert out.fgw_cost <= pot_cost + 1e-5


def test_objective_not_worse_than_pot_exact_on_noisy_copy():
    x, y, fx, fy, _ = _permuted_copy(n=30, seed=5, noise=0.2)
    c1, c2, m = ot.dist(x, x), ot.dist(y, y), ot.dist(fx, fy)
    c1, c2, m = c1 / c1.mean(), c2 / c2.mean(), m / m.mean()
    pot = ot.gromov.fused_gromov_wasserstein(m, c1, c2, alpha=0.5)
    pot_cost = 0.5 * (m * pot).sum() + 0.5 * ot.gromov.gwloss(
        *ot.gromov.init_matrix(c1, c2, pot.sum(1), pot.sum(0)), pot
    )
    out = fused_gromov_wasserstein(
        x, y, features_x=fx, features_y=fy, alpha=0.5, epsilon=1e-3, tol=1e-7
    )
    assert out.fgw_cost <= pot_cost + 1e-3


# ------------------------------------------------------------------- alpha = 0
@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_alpha0_equals_linear_ot(tau):
    x, y, fx, fy = _problem()
    rng = np.random.default_rng(6)
    a = rng.random(x.shape[0]) + 0.1
    b = rng.random(y.shape[0]) + 0.1
    a, b = a / a.sum(), b / b.sum()
    m = ot.dist(fx, fy)
    m /= m.mean()
    eps = 0.05
    out = fused_gromov_wasserstein(
        x, y, cost_xy=m, scale_cost=None, alpha=0.0, a=a, b=b, tau_a=tau, tau_b=tau,
        epsilon=eps, **TIGHT,
    )  # fmt: skip
    lin = sinkhorn(DenseGeometry(m), a=a, b=b, epsilon=eps, tau_a=tau, tau_b=tau, tol=1e-12,
                   max_iter=20000)  # fmt: skip
    np.testing.assert_allclose(out.dense_plan().numpy(), lin.dense_plan().numpy(), atol=1e-6)
    if tau == 1.0:
        expected = ot.sinkhorn(a, b, m, eps, method="sinkhorn_log", stopThr=1e-13)
    else:
        rho = eps * tau / (1 - tau)
        expected = ot.unbalanced.sinkhorn_unbalanced(a, b, m, eps, rho, stopThr=1e-14)
    np.testing.assert_allclose(out.dense_plan().numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(out.linear_cost, (m * expected).sum(), rtol=1e-6)


# ------------------------------------------------------------------ invariances
def test_gw_rotation_reflection_invariance():
    x, y, _, _ = _problem(n=12, m=10, d=3, seed=7)
    q, _ = np.linalg.qr(np.random.default_rng(8).normal(size=(3, 3)))
    q = q @ np.diag([1.0, 1.0, -1.0])  # improper: includes a reflection
    kw = {"alpha": 1.0, "epsilon": 0.05, **TIGHT}
    ref = fused_gromov_wasserstein(x, y, **kw)
    moved = fused_gromov_wasserstein(x, y @ q.T + 5.0, **kw)
    np.testing.assert_allclose(moved.dense_plan().numpy(), ref.dense_plan().numpy(), atol=1e-8)
    np.testing.assert_allclose(moved.gw_cost, ref.gw_cost, rtol=1e-8)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(2, 7),
    m=st.integers(2, 7),
    alpha=st.floats(0.0, 1.0),
    seed=st.integers(0, 10_000),
)
def test_hypothesis_swap_symmetry_and_marginals(n, m, alpha, seed):
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(n, 2)), rng.normal(size=(m, 2))
    fx, fy = rng.normal(size=(n, 3)), rng.normal(size=(m, 3))
    kw = {"alpha": alpha, "epsilon": 0.5, "tol": 1e-8, "inner_tol": 1e-9, "max_iter": 5000}
    fwd = fused_gromov_wasserstein(x, y, features_x=fx, features_y=fy, **kw)
    bwd = fused_gromov_wasserstein(y, x, features_x=fy, features_y=fx, **kw)
    # Pure GW (alpha = 1) is non-convex and its outer loop may cycle on a random
    # example; the algorithm is symmetric, so the transposition holds regardless.
    if alpha < 1.0:
        assert fwd.converged and bwd.converged
    p = fwd.dense_plan().numpy()
    np.testing.assert_allclose(bwd.dense_plan().numpy().T, p, atol=1e-5)
    np.testing.assert_allclose(p.sum(1), np.full(n, 1 / n), atol=1e-8)
    np.testing.assert_allclose(p.sum(0), np.full(m, 1 / m), atol=1e-8)
    assert fwd.fgw_cost >= -1e-12
    assert fwd.gw_cost >= -1e-12


# ------------------------------------------------------------ unbalanced / partial
def _overlapping_slices(n=40, seed=9):
    """Two strips overlapping on half their length; features = position-dependent."""
    rng = np.random.default_rng(seed)
    x = rng.uniform([0, 0], [2, 1], size=(n, 2))
    y = rng.uniform([1, 0], [3, 1], size=(n, 2))

    def feat(c):
        return np.stack([np.sin(3 * c[:, 0]), np.cos(3 * c[:, 0]), c[:, 1]], 1)

    return x, y, feat(x), feat(y)


def test_unbalanced_transports_less_mass_when_slices_partly_overlap():
    x, y, fx, fy = _overlapping_slices()
    # spatial costs in the frame of each slice cannot see the shift; the features can.
    kw = {"features_x": fx, "features_y": fy, "alpha": 0.3, "epsilon": 0.02, "tol": 1e-5}
    bal = fused_gromov_wasserstein(x, y, **kw)
    unb = fused_gromov_wasserstein(x, y, tau_a=0.9, tau_b=0.9, **kw)
    assert bal.converged and unb.converged
    np.testing.assert_allclose(bal.transported_mass, 1.0, atol=1e-5)
    assert unb.transported_mass < 0.9
    row = unb.marginals(1).numpy()
    col = unb.marginals(0).numpy()
    # mass leaves from the overlap (x in [1, 2]) and arrives in it (y in [1, 2])
    assert row[x[:, 0] > 1.2].mean() > 2 * row[x[:, 0] < 0.8].mean()
    assert col[y[:, 0] < 1.8].mean() > 2 * col[y[:, 0] > 2.2].mean()


def test_partial_fgw_transports_mass_on_overlap():
    x, y, fx, fy = _overlapping_slices()
    out = fused_gromov_wasserstein(
        x, y, features_x=fx, features_y=fy, alpha=0.3, mass=0.5, epsilon=0.01, tol=1e-6
    )
    assert out.converged
    np.testing.assert_allclose(out.transported_mass, 0.5, atol=1e-6)
    row, col = out.marginals(1).numpy(), out.marginals(0).numpy()
    assert (row <= 1 / 40 + 1e-7).all() and (col <= 1 / 40 + 1e-7).all()
    assert row[x[:, 0] > 1.0].sum() > 0.4
    plan = out.dense_plan().numpy()
    np.testing.assert_allclose(out.apply(np.ones(40)).numpy(), plan.sum(1), atol=1e-12)
    sp_plan = out.plan(k=3)
    assert sp_plan.shape == (40, 40) and (np.diff(sp_plan.indptr) <= 3).all()


def test_partial_linear_matches_pot_exact_partial():
    rng = np.random.default_rng(10)
    n, m = 9, 7
    a, b = np.full(n, 1 / n), np.full(m, 1 / m)
    cost = rng.random((n, m))
    s = 0.6
    expected = ot.partial.partial_wasserstein(a, b, cost, m=s)
    out = fused_gromov_wasserstein(
        rng.normal(size=(n, 2)), rng.normal(size=(m, 2)), cost_xy=cost, scale_cost=None,
        alpha=0.0, mass=s, epsilon=2e-3, tol=1e-9, inner_tol=1e-10, max_iter=50000,
    )  # fmt: skip
    np.testing.assert_allclose(out.transported_mass, s, atol=1e-8)
    np.testing.assert_allclose(out.linear_cost, (cost * expected).sum(), atol=5e-3)
    np.testing.assert_allclose(out.dense_plan().numpy(), expected, atol=2e-2)


# --------------------------------------------------------------- API and errors
def test_object_api_accessors_and_float32():
    x, y, fx, fy = _problem(n=16, m=12)
    prob = QuadraticProblem(
        PointCloud(x, scale_cost="mean", dtype=torch.float32),
        PointCloud(y, scale_cost="mean", dtype=torch.float32),
        PointCloud(fx, fy, scale_cost="mean", dtype=torch.float32),
        alpha=0.5,
    )
    out = GromovWasserstein(epsilon=0.1, tol=1e-5, track_cost=True)(prob)
    assert out.f.dtype == torch.float32 and out.f.shape == (16,) and out.g.shape == (12,)
    assert out.costs.shape == (out.n_outer,) and out.errors.shape == (out.n_outer,)
    ref = fused_gromov_wasserstein(x, y, features_x=fx, features_y=fy, alpha=0.5, epsilon=0.1)
    plan = out.dense_plan().double().numpy()
    np.testing.assert_allclose(plan, ref.dense_plan().numpy(), atol=1e-4)
    v = np.random.default_rng(0).normal(size=(12, 3))
    np.testing.assert_allclose(out.apply(v).double().numpy(), plan @ v, atol=1e-5)
    proj = ref.barycentric_projection(y).numpy()
    pd = ref.dense_plan().numpy()
    np.testing.assert_allclose(proj, pd @ y / pd.sum(1, keepdims=True), atol=1e-10)
    top = ref.plan(k=2).toarray()
    assert ((top > 0).sum(1) == 2).all()
    np.testing.assert_allclose(top.max(1), pd.max(1), rtol=1e-10)


def test_epsilon_relative_and_annealing():
    x, y, fx, fy = _problem()
    prob = QuadraticProblem(
        PointCloud(x), PointCloud(y), PointCloud(fx, fy, scale_cost="mean"), alpha=0.5
    )
    first = prob.linearized_cost(prob.initial_plan())
    assert float(first.min()) >= 0.0
    out = GromovWasserstein(epsilon=0.05, relative_epsilon=True, epsilon_init=1.0)(prob)
    np.testing.assert_allclose(out.epsilon, 0.05 * float(first.mean()), rtol=1e-12)
    assert out.converged


def test_input_errors():
    x, y, fx, fy = _problem()
    with pytest.raises(ValueError, match="alpha"):
        fused_gromov_wasserstein(x, y, features_x=fx, features_y=fy, alpha=1.5)
    with pytest.raises(ValueError, match="required"):
        fused_gromov_wasserstein(x, y, alpha=0.5)
    with pytest.raises(ValueError, match="together"):
        fused_gromov_wasserstein(x, y, features_x=fx, alpha=0.5)
    with pytest.raises(ValueError, match="expected"):
        fused_gromov_wasserstein(x, y, cost_xy=np.ones((3, 3)), alpha=0.5)
    with pytest.raises(ValueError, match="equal mass"):
        fused_gromov_wasserstein(x, y, alpha=1.0, a=np.ones(x.shape[0]))
    with pytest.raises(ValueError, match="mass"):
        fused_gromov_wasserstein(x, y, alpha=1.0, mass=2.0)
    with pytest.raises(ValueError, match="tau"):
        fused_gromov_wasserstein(x, y, alpha=1.0, mass=0.5, tau_a=0.5)
    with pytest.raises(ValueError, match="square"):
        fused_gromov_wasserstein(np.ones((3, 4)), np.ones((3, 3)), alpha=1.0,
                                 spatial_cost="precomputed")  # fmt: skip
