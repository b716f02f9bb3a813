"""The symmetric self-transport cost equals the alternating Sinkhorn solve of OT(a, a)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose

from chronotope import ot


def _cloud(seed: int, n: int = 120) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.r_[rng.normal(size=(n // 2, 2)), rng.normal(size=(n - n // 2, 2)) + np.array([3.0, 0.0])]
    a = rng.gamma(3.0, 1.0, n)
    return x, a / a.sum()


@pytest.mark.parametrize("cost", ["sqeuclidean", "euclidean"])
@pytest.mark.parametrize("rel_eps", [0.1, 0.03])
def test_matches_sinkhorn(cost: str, rel_eps: float) -> None:
    x, a = _cloud(0)
    geom = ot.PointCloud(x, x, cost=cost)
    eps = rel_eps * float(geom.mean_cost)
    ref = ot.Sinkhorn(epsilon=eps, tol=1e-7, max_iter=50_000, overrelaxation="auto")(
        ot.LinearProblem(geom, a, a)
    )
    assert ref.converged
    value = ot.symmetric_ot_cost(geom, a, epsilon=eps, tol=1e-10)
    assert_allclose(value, float(ref.reg_ot_cost), rtol=1e-6)


def test_row_blocks_and_zero_masses() -> None:
    x, a = _cloud(1, n=90)
    a[:4] = 0.0
    a /= a.sum()
    dense = ot.PointCloud(x, x, cost="euclidean")
    eps = 0.02 * float(dense.mean_cost)
    value = ot.symmetric_ot_cost(dense, a, epsilon=eps, tol=1e-10)
    blocks = ot.symmetric_ot_cost(
        ot.PointCloud(x, x, cost="euclidean", batch_size=16), a, epsilon=eps, tol=1e-10
    )
    assert np.isfinite(value) and value == pytest.approx(blocks, rel=1e-12)
    # the zero-mass points change nothing: the same cost without them
    alone = ot.PointCloud(x[4:], x[4:], cost="euclidean")
    assert value == pytest.approx(
        ot.symmetric_ot_cost(alone, a[4:], epsilon=eps, tol=1e-10), rel=1e-9
    )


def test_fewer_iterations_than_alternating() -> None:
    """The point of it: at a small epsilon the averaged update stops long before."""
    x, a = _cloud(2, n=200)
    geom = ot.PointCloud(x, x, cost="euclidean", dtype=torch.float64)
    eps = 0.005 * float(geom.mean_cost)
    calls = 0
    lse = geom.lse

    def counted(*args, **kwargs):
        nonlocal calls
        calls += 1
        return lse(*args, **kwargs)

    geom.lse = counted  # type: ignore[method-assign]
    ot.symmetric_ot_cost(geom, a, epsilon=eps, tol=1e-6)
    ref = ot.Sinkhorn(epsilon=eps, tol=1e-6, max_iter=100_000, overrelaxation="auto")(
        ot.LinearProblem(ot.PointCloud(x, x, cost="euclidean"), a, a)
    )
    assert calls < ref.n_iter / 3, (calls, ref.n_iter)


def test_checks_its_input() -> None:
    x, a = _cloud(3, n=20)
    with pytest.raises(ValueError, match="square"):
        ot.symmetric_ot_cost(ot.PointCloud(x, x[:10]), a, epsilon=0.1)
    with pytest.raises(ValueError, match="masses"):
        ot.symmetric_ot_cost(ot.PointCloud(x, x), a[:5], epsilon=0.1)


@pytest.mark.parametrize("tau", [0.99, 0.8])
def test_unbalanced_matches_sinkhorn(tau: float) -> None:
    x, a = _cloud(4, n=80)
    a = 1.7 * a  # unbalanced: any total mass
    geom = ot.PointCloud(x, x)
    eps = 0.1 * float(geom.mean_cost)
    ref = ot.Sinkhorn(epsilon=eps, tol=1e-11, max_iter=50_000, lse_mode=True)(
        ot.LinearProblem(geom, a, a, tau_a=tau, tau_b=tau)
    )
    assert ref.converged
    out = ot.symmetric_sinkhorn(geom, a, epsilon=eps, tau=tau, tol=1e-11)
    assert out.converged and out.n_iter < ref.n_iter
    assert_allclose(out.f.numpy(), ref.f.numpy(), atol=1e-7)
    assert float(out.reg_ot_cost) == pytest.approx(float(ref.reg_ot_cost), rel=1e-8)


def test_unbalanced_cost_is_differentiable() -> None:
    x0, a0 = _cloud(5, n=60)
    x = torch.tensor(x0, requires_grad=True)
    a = torch.tensor(a0 * 2.0, requires_grad=True)
    eps, tau = 0.5, 0.9
    value = ot.symmetric_sinkhorn(ot.PointCloud(x, x), a, epsilon=eps, tau=tau, tol=1e-12)
    value.reg_ot_cost.backward()
    # central differences of the converged value in one coordinate and one mass
    for tensor, index in ((x, (3, 0)), (a, (7,))):
        h = 1e-5
        vals = []
        for sign in (1.0, -1.0):
            xs, as_ = x0.copy(), a0 * 2.0
            (xs if tensor is x else as_)[index] += sign * h
            geom = ot.PointCloud(xs, xs)
            out = ot.symmetric_sinkhorn(geom, as_, epsilon=eps, tau=tau, tol=1e-12)
            vals.append(float(out.reg_ot_cost))
        assert float(tensor.grad[index]) == pytest.approx((vals[0] - vals[1]) / (2 * h), rel=1e-5)
