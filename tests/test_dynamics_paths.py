"""Multi-marginal spline paths: Hermite knots and derivative, Catmull-Rom tangents, chains."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.interpolate import CubicHermiteSpline

from chronotope._errors import ChronotopeInputError
from chronotope.dynamics import DynamicsModel, DynamicsParams
from chronotope.dynamics.paths import (
    NeighbourSampler,
    SplineMeans,
    catmull_rom_tangents,
    hermite,
    linear_mass_rate,
    path_mass_weight,
)

F64 = torch.float64


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_hermite_interpolates_knots_and_matches_finite_differences() -> None:
    x0, x1, m0, m1 = (_rand(6, 3, seed=k) for k in range(4))
    h = 0.7
    zero, one = torch.zeros(6, 1, dtype=F64), torch.ones(6, 1, dtype=F64)
    p0, v0 = hermite(x0, x1, m0, m1, zero, h)
    p1, v1 = hermite(x0, x1, m0, m1, one, h)
    torch.testing.assert_close(p0, x0)
    torch.testing.assert_close(p1, x1)
    torch.testing.assert_close(v0, m0)
    torch.testing.assert_close(v1, m1)
    s = torch.rand(6, 1, generator=torch.Generator().manual_seed(9), dtype=F64)
    e = 1e-6
    pa, _ = hermite(x0, x1, m0, m1, s + e, h)
    pb, _ = hermite(x0, x1, m0, m1, s - e, h)
    _, v = hermite(x0, x1, m0, m1, s, h)
    torch.testing.assert_close(v, (pa - pb) / (2 * e * h), atol=1e-7, rtol=1e-6)
    # agrees with scipy's cubic Hermite spline on the interval [2, 2 + h]
    ref = CubicHermiteSpline([2.0, 2.0 + h], np.stack([x0, x1]), np.stack([m0, m1]), axis=0)
    want = np.stack([ref(2.0 + h * float(s[i, 0]))[i] for i in range(6)])
    np.testing.assert_allclose(hermite(x0, x1, m0, m1, s, h)[0].numpy(), want, atol=1e-12)


def test_catmull_rom_chain_interpolates_every_knot_and_is_c1() -> None:
    # one chain through 4 knots at uneven times; the piecewise curve passes through all
    # knots and its velocity is continuous at the inner knots
    times = torch.tensor([0.0, 2.0, 3.0, 4.5], dtype=F64)
    knots = _rand(4, 1, 2, seed=3)
    pieces = []
    for k in range(3):
        has_prev = torch.tensor([k > 0])
        has_next = torch.tensor([k < 2])
        kp, kn = max(k - 1, 0), min(k + 2, 3)
        m0, m1 = catmull_rom_tangents(
            knots[kp],
            knots[k],
            knots[k + 1],
            knots[kn],
            times[kp].reshape(1, 1) - float(k == 0),
            times[k].reshape(1, 1),
            times[k + 1].reshape(1, 1),
            times[kn].reshape(1, 1) + float(k == 2),
            has_prev,
            has_next,
        )
        h = float(times[k + 1] - times[k])
        pieces.append((m0, m1, h))
        for s, want in ((0.0, knots[k]), (1.0, knots[k + 1])):
            p, _ = hermite(knots[k], knots[k + 1], m0, m1, torch.full((1, 1), s, dtype=F64), h)
            torch.testing.assert_close(p, want)
    for k in range(2):
        torch.testing.assert_close(pieces[k][1], pieces[k + 1][0])  # C1 at inner knots
    # end tangents are the secants; inner ones the central differences
    torch.testing.assert_close(pieces[0][0], (knots[1] - knots[0]) / 2.0)
    torch.testing.assert_close(pieces[0][1], (knots[2] - knots[0]) / 3.0)


def test_catmull_rom_reproduces_straight_lines_at_constant_speed() -> None:
    # knots on a line at uneven times with constant velocity: the curve is that line
    vel = torch.tensor([[1.0, -0.5]], dtype=F64)
    times = [0.0, 2.0, 3.0, 4.5]
    knots = [vel * t for t in times]
    m0, m1 = catmull_rom_tangents(
        knots[0],
        knots[1],
        knots[2],
        knots[3],
        *(torch.full((1, 1), t, dtype=F64) for t in times),
        torch.tensor([True]),
        torch.tensor([True]),
    )
    s = torch.tensor([[0.3]], dtype=F64)
    p, v = hermite(knots[1], knots[2], m0, m1, s, 1.0)
    torch.testing.assert_close(p, vel * 2.3)
    torch.testing.assert_close(v, vel)


def test_neighbour_sampler_draws_from_the_conditional() -> None:
    pairs = torch.tensor([[0, 5], [0, 6], [1, 7], [3, 5], [0, 5]])
    gen = torch.Generator().manual_seed(0)
    succ = NeighbourSampler(pairs, key=0)
    cells = torch.tensor([0] * 3000 + [1, 2, 3])
    other, ok = succ.draw(cells, gen)
    assert ok[:3000].all() and ok[3000] and not ok[3001] and ok[3002]
    assert other[3000] == 7 and other[3002] == 5
    frac5 = float((other[:3000] == 5).double().mean())
    assert abs(frac5 - 2 / 3) < 0.03 and set(other[:3000].tolist()) == {5, 6}
    pred = NeighbourSampler(pairs, key=1)
    other, ok = pred.draw(torch.tensor([7, 4, 6]), gen)
    assert ok.tolist() == [True, False, True] and other[0] == 1 and other[2] == 0


def test_spline_means_fall_back_to_the_straight_line_without_neighbours() -> None:
    z = _rand(10, 2, seed=4)
    # interval 0: cells 0-2 -> 3-5; interval 1: cells 3-5 -> 6-9, but cell 5 sends nothing
    p0 = torch.tensor([[0, 3], [1, 4], [2, 5]])
    p1 = torch.tensor([[3, 6], [4, 7], [3, 8]])
    sm = SplineMeans(
        [p0, p1], torch.tensor([0.0, 0.5], dtype=F64), torch.tensor([0.5, 0.5], dtype=F64)
    )
    idx = torch.tensor([[2, 5], [0, 3]])
    which = torch.tensor([0, 0])
    s = torch.full((2, 1), 0.25, dtype=F64)
    mu, dmu = sm.mean(z, idx, which, s, torch.Generator().manual_seed(0))
    # row 0: no successor of cell 5 and no predecessor (first interval): straight line
    torch.testing.assert_close(mu[0], 0.75 * z[2] + 0.25 * z[5])
    torch.testing.assert_close(dmu[0], (z[5] - z[2]) / 0.5)
    # row 1: the successor of 3 is 6 or 8; the curve still passes through both knots
    for sv, want in ((0.0, z[0]), (1.0, z[3])):
        m, _ = sm.mean(
            z, idx, which, torch.full((2, 1), sv, dtype=F64), torch.Generator().manual_seed(1)
        )
        torch.testing.assert_close(m[1], want)


def test_spline_default_trains_and_linear_option_kept() -> None:
    rng = np.random.default_rng(0)
    drift = np.array([1.0, -0.5])
    x = np.vstack([rng.normal(size=(60, 2)) * 0.3 + k * drift for k in range(4)])
    t = np.repeat([0.0, 1.0, 2.0, 3.0], 60)
    small = {"hidden": 32, "n_layers": 2, "n_steps": 200, "batch_size": 128}
    assert DynamicsParams().paths == "spline"
    model = DynamicsModel(**small).fit(x, t)
    np.testing.assert_allclose(model.velocity(x[t == 1], 1.5).mean(0), drift, atol=0.15)
    lin = DynamicsModel(paths="linear", **small).fit(x, t)
    np.testing.assert_allclose(lin.velocity(x[t == 1], 1.5).mean(0), drift, atol=0.15)
    assert not np.allclose(model.velocity(x[:5], 1.5), lin.velocity(x[:5], 1.5))
    with pytest.raises(ChronotopeInputError, match="paths"):
        DynamicsParams(paths="natural")


@pytest.mark.parametrize("growth_path", ["linear", "exponential"])
def test_path_mass_weight_ends_and_rate(growth_path: str) -> None:
    rate = torch.tensor([-0.7, 0.0, 0.4, 1.3], dtype=F64)
    h = torch.tensor([0.5, 1.0, 2.0, 1.5], dtype=F64)
    rho = torch.exp(rate * h)
    one, zero = torch.ones(4, dtype=F64), torch.zeros(4, dtype=F64)
    # a pair stands for the mass its source sends: weight 1 on arrival, 1/rho at the start
    torch.testing.assert_close(path_mass_weight(rate, one, h, growth_path), one)
    torch.testing.assert_close(path_mass_weight(rate, zero, h, growth_path), 1.0 / rho)
    # d log m / ds = h * (growth rate at s) of the same mass path
    s = torch.tensor([0.1, 0.35, 0.6, 0.9], dtype=F64)
    step = 1e-6
    fd = (
        torch.log(path_mass_weight(rate, s + step, h, growth_path))
        - torch.log(path_mass_weight(rate, s - step, h, growth_path))
    ) / (2 * step)
    want = linear_mass_rate(rate, s, h) if growth_path == "linear" else rate
    torch.testing.assert_close(fd, h * want, rtol=1e-6, atol=1e-8)


def test_mass_path_weight_option_trains_and_reduces_to_plan_without_growth() -> None:
    rng = np.random.default_rng(1)
    drift = np.array([1.0, 0.5])
    x = np.vstack([rng.normal(size=(60, 2)) * 0.3 + k * drift for k in range(3)])
    t = np.repeat([0.0, 1.0, 2.0], 60)
    small = {"hidden": 32, "n_layers": 2, "n_steps": 150, "batch_size": 128}
    assert DynamicsParams().path_weight == "plan"
    # equal counts, balanced plans: every path keeps its mass, the weights are all 1
    bal = {"tau_a": 1.0, **small}
    plan = DynamicsModel(**bal).fit(x, t)
    mass = DynamicsModel(path_weight="mass", **bal).fit(x, t)
    np.testing.assert_allclose(mass.velocity(x, 0.5), plan.velocity(x, 0.5), atol=1e-3)
    # fewer cells on one side at t = 2: the weights differ, the flow is the same flow
    keep = ~((t == 2) & (x[:, 0] - 2 * drift[0] < 0) & (rng.random(t.size) < 0.7))
    grown_plan = DynamicsModel(**small).fit(x[keep], t[keep])
    grown = DynamicsModel(path_weight="mass", **small).fit(x[keep], t[keep])
    v, v_plan = grown.velocity(x[t == 1], 1.5), grown_plan.velocity(x[t == 1], 1.5)
    assert np.isfinite(v).all()
    np.testing.assert_allclose(v.mean(0), v_plan.mean(0), atol=0.1)
    assert not np.allclose(v, v_plan, atol=1e-3)
    with pytest.raises(ChronotopeInputError, match="path_weight"):
        DynamicsParams(path_weight="cells")
