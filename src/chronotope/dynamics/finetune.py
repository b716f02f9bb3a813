r"""Optional short fine-tune of a fitted model by rollouts (unbalanced Sinkhorn + WFR action).

After the simulation-free fit, the velocity and growth networks can be refined on whole
intervals: cells of ``t_k`` (masses ``M_k / B``) are pushed by the probability-flow ODE
(RK4, masses grown by ``g``) to ``t_{k+1}`` and compared with cells of ``t_{k+1}``
(masses ``M_{k+1} / B``) by the unbalanced Sinkhorn divergence

.. math::

    S_{\varepsilon,\rho}(\alpha,\beta) = \mathrm{OT}_{\varepsilon,\rho}(\alpha,\beta)
    - \tfrac12\mathrm{OT}_{\varepsilon,\rho}(\alpha,\alpha)
    - \tfrac12\mathrm{OT}_{\varepsilon,\rho}(\beta,\beta)
    + \tfrac{\varepsilon}{2}(m(\alpha)-m(\beta))^2

(Séjourné et al. 2019; cost :math:`|x-y|^2/2` in standardised units, KL marginal
penalties of strength :math:`\rho`), plus the Wasserstein-Fisher-Rao action
:math:`\int\!\!\int (|v|^2 + \alpha_g g^2)\,d\rho_t\,dt` along the rollout. The potentials
are found without gradients (log-domain iterations); the loss is the dual objective at
those potentials, whose gradient (envelope theorem) flows through the cost and the
particle masses. The score network is left as fitted.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from tqdm.auto import tqdm

from chronotope._errors import ChronotopeInputError
from chronotope.dynamics._validate import check_snapshots
from chronotope.dynamics.model import DynamicsModel

__all__ = ["finetune_rollouts", "sinkhorn_divergence"]

logger = logging.getLogger("chronotope")


def _uot(
    a: torch.Tensor,
    x: torch.Tensor,
    b: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    rho: float,
    n_iter: int,
) -> torch.Tensor:
    """Unbalanced entropic OT (KL marginals), dual value at converged potentials."""
    cost = 0.5 * torch.cdist(x, y) ** 2
    lam = rho / (rho + eps)
    with torch.no_grad():
        c = cost.detach()
        la, lb = torch.log(a.detach()), torch.log(b.detach())
        f = torch.zeros_like(la)
        g = torch.zeros_like(lb)
        for _ in range(n_iter):
            f = -lam * eps * torch.logsumexp(lb[None, :] + (g[None, :] - c) / eps, dim=1)
            g = -lam * eps * torch.logsumexp(la[:, None] + (f[:, None] - c) / eps, dim=0)
    plan = a[:, None] * b[None, :] * torch.exp((f[:, None] + g[None, :] - cost) / eps)
    return (
        (a * rho * (1 - torch.exp(-f / rho))).sum()
        + (b * rho * (1 - torch.exp(-g / rho))).sum()
        - eps * (plan.sum() - a.sum() * b.sum())
    )


def sinkhorn_divergence(
    a: torch.Tensor,
    x: torch.Tensor,
    b: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    rho: float,
    n_iter: int = 50,
) -> torch.Tensor:
    """Debiased unbalanced Sinkhorn divergence between weighted point clouds (differentiable).

    Parameters
    ----------
    a, x
        ``(n,)`` positive masses and ``(n, d)`` positions.
    b, y
        ``(m,)`` and ``(m, d)``.
    eps
        Entropic regularisation (units of the cost ``|x - y|^2 / 2``).
    rho
        Strength of the KL marginal penalties (``inf``-like large values: balanced).
    n_iter
        Potential updates.
    """
    if not (eps > 0 and rho > 0):
        raise ChronotopeInputError("eps and rho must be > 0.")
    return (
        _uot(a, x, b, y, eps, rho, n_iter)
        - 0.5 * _uot(a, x, a, x, eps, rho, n_iter)
        - 0.5 * _uot(b, y, b, y, eps, rho, n_iter)
        + 0.5 * eps * (a.sum() - b.sum()) ** 2
    )


def finetune_rollouts(
    model: DynamicsModel,
    x: np.ndarray,
    time: np.ndarray,
    *,
    n_steps: int = 100,
    batch_size: int = 256,
    n_sub: int = 5,
    learning_rate: float = 1e-4,
    blur: float = 0.1,
    reach: float = 1.0,
    action_weight: float = 0.01,
    growth_action_weight: float = 1.0,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Refine ``v`` and ``g`` of a fitted model by short rollouts between snapshots.

    Parameters
    ----------
    model
        A fitted model (modified in place).
    x, time
        ``(n, d)`` cells and ``(n,)`` times: the training snapshots (their time points
        must be the model's training time points).
    n_steps
        Optimisation steps (each rolls one batch over every interval).
    batch_size
        Cells drawn per side and interval.
    n_sub
        RK4 steps per interval.
    learning_rate
        Adam learning rate.
    blur
        ``sqrt(eps)`` of the Sinkhorn divergence, in standardised units.
    reach
        ``sqrt(rho)`` of the KL marginal penalties, in standardised units.
    action_weight, growth_action_weight
        Weight of the WFR action and of its growth part (``alpha_g``).
    seed
        Seed of the batches.
    progress
        Progress bar.

    Returns
    -------
    dict
        ``loss``, ``divergence`` and ``action`` per step.
    """
    nets, frame = model._require_fit()
    x, t, times = check_snapshots(x, time, min_cells=1, name="x")
    train = np.asarray(model.times_, dtype=np.float64)
    if times.shape != train.shape or not np.allclose(times, train):
        raise ChronotopeInputError(
            f"the snapshots' time points ({', '.join(f'{v:g}' for v in times)}) are not the "
            f"model's training time points ({', '.join(f'{v:g}' for v in train)})."
        )
    if model.dim != x.shape[1]:
        raise ChronotopeInputError(f"x must have {model.dim} columns, got {x.shape[1]}.")
    if n_steps < 0 or batch_size < 1 or n_sub < 1:
        raise ChronotopeInputError("n_steps >= 0, batch_size >= 1 and n_sub >= 1 are required.")
    dev = model.device
    z = torch.as_tensor(frame.z(x), dtype=torch.float32, device=dev)
    pools = [torch.as_tensor(np.flatnonzero(t == tv), device=dev) for tv in times]
    masses = np.asarray(model.masses_, dtype=np.float64)
    eps, rho = blur**2, reach**2
    params = list(nets.velocity.parameters()) + list(nets.growth.parameters())
    opt = torch.optim.Adam(params, lr=learning_rate)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    hist: dict[str, list[float]] = {"loss": [], "divergence": [], "action": []}
    nets.train()
    for _ in tqdm(range(n_steps), desc="fine-tune", disable=not progress, leave=False):
        div = torch.zeros((), device=dev)
        act = torch.zeros((), device=dev)
        for k in range(len(times) - 1):
            src = pools[k][torch.randint(len(pools[k]), (batch_size,), generator=gen).to(dev)]
            tgt = pools[k + 1][
                torch.randint(len(pools[k + 1]), (batch_size,), generator=gen).to(dev)
            ]
            zk = z[src]
            logw = torch.full((batch_size,), math.log(masses[k] / batch_size), device=dev)
            tau = frame.tau(float(times[k]))
            h = (frame.tau(float(times[k + 1])) - tau) / n_sub
            for _s in range(n_sub):

                def f(zz: torch.Tensor, tt: float) -> tuple[torch.Tensor, torch.Tensor]:
                    tt_t = torch.tensor([[tt]], dtype=zz.dtype, device=dev)
                    return nets.v(zz, tt_t), nets.g(zz, tt_t)

                k1, g1 = f(zk, tau)
                k2, g2 = f(zk + 0.5 * h * k1, tau + 0.5 * h)
                k3, g3 = f(zk + 0.5 * h * k2, tau + 0.5 * h)
                k4, g4 = f(zk + h * k3, tau + h)
                w = torch.exp(logw)
                act = act + h * (w * ((k1**2).sum(1) + growth_action_weight * g1**2)).sum()
                zk = zk + h / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
                logw = logw + h / 6.0 * (g1 + 2 * g2 + 2 * g3 + g4)
                tau += h
            b = torch.full((batch_size,), masses[k + 1] / batch_size, device=dev)
            div = div + sinkhorn_divergence(torch.exp(logw), zk, b, z[tgt], eps=eps, rho=rho)
        loss = div + action_weight * act
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        hist["loss"].append(float(loss.detach()))
        hist["divergence"].append(float(div.detach()))
        hist["action"].append(float(act.detach()))
    nets.eval()
    logger.info(
        "fine-tune: %d steps, divergence %.4g -> %.4g",
        n_steps,
        hist["divergence"][0] if hist["divergence"] else float("nan"),
        hist["divergence"][-1] if hist["divergence"] else float("nan"),
    )
    return {k: np.asarray(v) for k, v in hist.items()}
