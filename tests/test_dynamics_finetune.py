"""Optional rollout fine-tune: unbalanced Sinkhorn divergence and a decreasing loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chronotope._errors import ChronotopeInputError
from chronotope.dynamics import DynamicsModel
from chronotope.dynamics.finetune import finetune_rollouts, sinkhorn_divergence


def test_sinkhorn_divergence_known_values() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(150, 2, generator=g, dtype=torch.float64)
    a = torch.full((150,), 1 / 150, dtype=torch.float64)
    assert abs(float(sinkhorn_divergence(a, x, a, x, eps=0.01, rho=1.0))) < 1e-10
    # nearly balanced, small blur: a translation by d costs about |d|^2 / 2
    y = (x + torch.tensor([1.0, 0.0], dtype=torch.float64)).requires_grad_(True)
    s = sinkhorn_divergence(a, x, a, y, eps=0.01, rho=1e4)
    assert float(s.detach()) == pytest.approx(0.5, rel=0.1)
    s.backward()
    # the gradient moves y back towards x
    assert y.grad.sum(0)[0] > 0.8 and abs(float(y.grad.sum(0)[1])) < 0.1
    # a mass difference is penalised
    s2 = sinkhorn_divergence(a, x, 2 * a, x, eps=0.01, rho=1.0)
    assert float(s2) > 0.1
    with pytest.raises(ChronotopeInputError):
        sinkhorn_divergence(a, x, a, x, eps=0.0, rho=1.0)


def _dense_uot(a, x, b, y, eps, rho, n_iter=1000):
    """Reference: plain alternating log-domain iterations, float64, to convergence."""
    c = 0.5 * torch.cdist(x, y) ** 2
    lam = rho / (rho + eps)
    la, lb = torch.log(a), torch.log(b)
    f, g = torch.zeros_like(la), torch.zeros_like(lb)
    for _ in range(n_iter):
        f = -lam * eps * torch.logsumexp(lb[None, :] + (g[None, :] - c) / eps, dim=1)
        g = -lam * eps * torch.logsumexp(la[:, None] + (f[:, None] - c) / eps, dim=0)
    plan = a[:, None] * b[None, :] * torch.exp((f[:, None] + g[None, :] - c) / eps)
    return float(
        (a * rho * (1 - torch.exp(-f / rho))).sum()
        + (b * rho * (1 - torch.exp(-g / rho))).sum()
        - eps * (plan.sum() - a.sum() * b.sum())
    )


def test_sinkhorn_divergence_is_converged() -> None:
    # 10-D clouds at the fine-tune's blur: 50 plain iterations (the earlier solver) were
    # 3 % off the converged value
    g = torch.Generator().manual_seed(1)
    x = torch.randn(120, 10, generator=g, dtype=torch.float64)
    y = 1.1 * torch.randn(120, 10, generator=g, dtype=torch.float64) + 0.3
    a = torch.full((120,), 1 / 120, dtype=torch.float64)
    b = 1.2 * a
    eps, rho = 0.01, 1.0
    ref = (
        _dense_uot(a, x, b, y, eps, rho)
        - 0.5 * _dense_uot(a, x, a, x, eps, rho)
        - 0.5 * _dense_uot(b, y, b, y, eps, rho)
        + 0.5 * eps * float(a.sum() - b.sum()) ** 2
    )
    value = float(sinkhorn_divergence(a, x, b, y, eps=eps, rho=rho, tol=1e-9))
    assert value == pytest.approx(ref, rel=1e-6)


@pytest.mark.slow
def test_finetune_lowers_divergence() -> None:
    rng = np.random.default_rng(0)
    drift = np.array([1.0, -0.5])
    x = np.vstack([rng.normal(size=(80, 2)) * 0.5 + k * drift for k in range(3)])
    t = np.repeat([0.0, 1.0, 2.0], 80)
    model = DynamicsModel(hidden=16, n_layers=1, n_steps=5, batch_size=64).fit(x, t)
    before = model.simulate(x[t == 0], 0.0, 2.0).final[0].mean(0)
    hist = finetune_rollouts(
        model, x, t, n_steps=25, batch_size=64, n_sub=3, learning_rate=3e-3, seed=0
    )
    assert hist["divergence"].shape == (25,)
    assert hist["divergence"][-5:].mean() < 0.75 * hist["divergence"][:5].mean()
    after = model.simulate(x[t == 0], 0.0, 2.0).final[0].mean(0)
    assert np.linalg.norm(after - 2 * drift) < np.linalg.norm(before - 2 * drift)
    with pytest.raises(ChronotopeInputError, match="training time points"):
        finetune_rollouts(model, x[t < 2], t[t < 2], n_steps=1)


def test_chained_finetune_lowers_divergence_of_the_push_from_the_first_time() -> None:
    rng = np.random.default_rng(1)
    drift = np.array([1.0, -0.5])
    x = np.vstack([rng.normal(size=(60, 2)) * 0.5 + k * drift for k in range(4)])
    t = np.repeat([0.0, 1.0, 2.0, 3.0], 60)
    model = DynamicsModel(
        hidden=16, n_layers=1, n_steps=5, batch_size=64, extrapolate="landscape"
    ).fit(x, t)
    before = model.simulate(x[t == 0], 0.0, 3.0).final[0].mean(0)
    growth = [p.detach().clone() for p in model.networks.growth.parameters()]
    hist = finetune_rollouts(
        model, x, t, n_steps=25, batch_size=64, n_sub=3, learning_rate=3e-3,
        rollouts="chained", seed=0,
    )  # fmt: skip
    # growth is left as fitted by chained rollouts
    for old, new in zip(growth, model.networks.growth.parameters(), strict=True):
        assert torch.equal(old, new.detach())
    assert hist["divergence"].shape == (25,)
    # velocity only (growth as fitted), so less of the divergence can go than above
    assert hist["divergence"][-5:].mean() < 0.85 * hist["divergence"][:5].mean()
    after = model.simulate(x[t == 0], 0.0, 3.0).final[0].mean(0)
    assert np.linalg.norm(after - 3 * drift) < np.linalg.norm(before - 3 * drift)
    with pytest.raises(ChronotopeInputError, match="rollouts"):
        finetune_rollouts(model, x, t, n_steps=1, rollouts="from-start")
