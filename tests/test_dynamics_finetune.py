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
    s = sinkhorn_divergence(a, x, a, y, eps=0.01, rho=1e4, n_iter=300)
    assert float(s.detach()) == pytest.approx(0.5, rel=0.1)
    s.backward()
    # the gradient moves y back towards x
    assert y.grad.sum(0)[0] > 0.8 and abs(float(y.grad.sum(0)[1])) < 0.1
    # a mass difference is penalised
    s2 = sinkhorn_divergence(a, x, 2 * a, x, eps=0.01, rho=1.0)
    assert float(s2) > 0.1
    with pytest.raises(ChronotopeInputError):
        sinkhorn_divergence(a, x, a, x, eps=0.0, rho=1.0)


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
