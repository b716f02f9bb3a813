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

from chronotope import ot
from chronotope._errors import ChronotopeInputError
from chronotope.dynamics._validate import check_snapshots
from chronotope.dynamics.model import DynamicsModel

__all__ = ["ROLLOUTS", "finetune_rollouts", "sinkhorn_divergence"]

#: The rollouts of :func:`finetune_rollouts`.
ROLLOUTS = ("intervals", "chained")

logger = logging.getLogger("chronotope")


def _penalty(eps: float, rho: float) -> float:
    """``tau = rho / (rho + eps)``: the engine's unbalancedness for KL penalties ``rho``."""
    return rho / (rho + eps)


def _self_term(
    a: torch.Tensor, x: torch.Tensor, eps: float, rho: float, tol: float, max_iter: int
) -> tuple[torch.Tensor, bool]:
    """``OT_{eps,rho}(a, a)`` by the averaged symmetric update (no oscillation)."""
    out = ot.symmetric_sinkhorn(
        ot.PointCloud(x, x, scale_cost=2.0),
        a,
        epsilon=eps,
        tau=_penalty(eps, rho),
        tol=tol,
        max_iter=max_iter,
    )
    return out.reg_ot_cost, out.converged


def _divergence(
    a: torch.Tensor,
    x: torch.Tensor,
    b: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    rho: float,
    tol: float,
    max_iter: int,
) -> tuple[torch.Tensor, bool]:
    """The debiased divergence and whether its three solves reached ``tol``."""
    # cross term by the engine's log-domain Sinkhorn, cost |x - y|^2 / 2; the potentials
    # are found without gradients, the dual value at them carries the gradients
    # (envelope theorem, see SinkhornOutput.reg_ot_cost)
    tau = _penalty(eps, rho)
    solver = ot.Sinkhorn(
        epsilon=eps, tol=tol, max_iter=max_iter, lse_mode=True, overrelaxation="auto", warn=False
    )
    cross = solver(
        ot.LinearProblem(ot.PointCloud(x, y, scale_cost=2.0), a, b, tau_a=tau, tau_b=tau)
    )
    ab, c_ab = cross.reg_ot_cost, cross.converged
    aa, c_aa = _self_term(a, x, eps, rho, tol, max_iter)
    bb, c_bb = _self_term(b, y, eps, rho, tol, max_iter)
    value = ab - 0.5 * aa - 0.5 * bb + 0.5 * eps * (a.sum() - b.sum()) ** 2
    return value, c_ab and c_aa and c_bb


def sinkhorn_divergence(
    a: torch.Tensor,
    x: torch.Tensor,
    b: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    rho: float,
    tol: float = 1e-5,
    max_iter: int = 2000,
) -> torch.Tensor:
    """Debiased unbalanced Sinkhorn divergence between weighted point clouds (differentiable).

    The cross term is solved by the OT engine (:class:`~chronotope.ot.Sinkhorn`, log
    domain, adaptive over-relaxation), the two self terms by the averaged symmetric update
    (:func:`~chronotope.ot.symmetric_sinkhorn`), each to ``tol``.

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
    tol
        Marginal error at which each of the three solves stops.
    max_iter
        Most iterations per solve.
    """
    if not (eps > 0 and rho > 0):
        raise ChronotopeInputError("eps and rho must be > 0.")
    return _divergence(a, x, b, y, eps, rho, tol, max_iter)[0]


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
    action_weight: float | None = None,
    growth_action_weight: float = 1.0,
    rollouts: str = "intervals",
    tol: float = 1e-5,
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
        Weight of the WFR action and of its growth part (``alpha_g``). ``None``: 0.01
        with ``rollouts="intervals"``, 0 with ``"chained"`` (there the action held the
        fine-tune back: TIGON bifurcation t = 3 held out, 0.895 with 0.01, 0.814 with 0).
    rollouts
        ``"intervals"`` (default): each interval's rollout starts from cells of its own
        first time point. ``"chained"``: one rollout starts from cells of the first time
        point and crosses every interval, compared with each later snapshot on the way,
        so the velocity learns to pull back a spread that the interval-by-interval fit
        lets grow from interval to interval; growth is left as fitted (the rollout's
        mass error would compound over the intervals). ``docs/dynamics.md``, *Session 20*.
    tol
        Marginal error at which each Sinkhorn solve of the divergence stops (the
        gradient is exact only at converged potentials).
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
    if rollouts not in ROLLOUTS:
        raise ChronotopeInputError(
            f"rollouts must be 'intervals' or 'chained', got {rollouts!r}."
        )
    if action_weight is None:
        action_weight = 0.01 if rollouts == "intervals" else 0.0
    dev = model.device
    z = torch.as_tensor(frame.z(x), dtype=torch.float32, device=dev)
    pools = [torch.as_tensor(np.flatnonzero(t == tv), device=dev) for tv in times]
    masses = np.asarray(model.masses_, dtype=np.float64)
    eps, rho = blur**2, reach**2
    params = list(nets.velocity.parameters())
    if rollouts == "intervals":
        # chained rollouts leave growth as fitted: their mass error compounds over the
        # intervals and the divergence holds the total mass only weakly (eps/2 dm^2)
        params += list(nets.growth.parameters())
    opt = torch.optim.Adam(params, lr=learning_rate)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    hist: dict[str, list[float]] = {"loss": [], "divergence": [], "action": []}
    n_unconverged = 0
    nets.train()
    for _ in tqdm(range(n_steps), desc="fine-tune", disable=not progress, leave=False):
        div = torch.zeros((), device=dev)
        act = torch.zeros((), device=dev)
        for k in range(len(times) - 1):
            if k == 0 or rollouts == "intervals":
                # a fresh batch of this interval's source cells; "chained" goes on with
                # the particles pushed from the first time point
                src = pools[k][
                    torch.randint(len(pools[k]), (batch_size,), generator=gen).to(dev)
                ]
                zk = z[src]
                logw = torch.full((batch_size,), math.log(masses[k] / batch_size), device=dev)
            tgt = pools[k + 1][
                torch.randint(len(pools[k + 1]), (batch_size,), generator=gen).to(dev)
            ]
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
            d_k, ok = _divergence(torch.exp(logw), zk, b, z[tgt], eps, rho, tol, 2000)
            div = div + d_k
            n_unconverged += not ok
        loss = div + action_weight * act
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        hist["loss"].append(float(loss.detach()))
        hist["divergence"].append(float(div.detach()))
        hist["action"].append(float(act.detach()))
    nets.eval()
    if n_unconverged:
        logger.warning(
            "fine-tune: %d of %d divergence solves stopped before tol %.0e; their gradients "
            "are approximate (raise blur).",
            n_unconverged,
            n_steps * (len(times) - 1),
            tol,
        )
    logger.info(
        "fine-tune: %d steps, divergence %.4g -> %.4g",
        n_steps,
        hist["divergence"][0] if hist["divergence"] else float("nan"),
        hist["divergence"][-1] if hist["divergence"] else float("nan"),
    )
    return {k: np.asarray(v) for k, v in hist.items()}
