"""Profile-likelihood estimation of ``sigma``, ``bleed`` and ``background`` on total counts.

The total count per spot (sum over genes) follows the same model as one gene,
``t ~ Poisson(A z)`` with ``z >= 0`` on the tissue. For a fixed ``sigma`` the weights of
the three mixture components (stay, kernel, uniform) and the sources ``z`` are fitted
jointly by EM (the weights are mixture proportions: their M-step is the share of
molecules the E-step assigns to each component). The profile log-likelihood
``max_{z, bleed, background} log L(sigma)`` is evaluated on a log-spaced grid of
``sigma`` and refined by a bounded scalar search around the best grid point.

The information comes from the spots outside the tissue (their sources are 0, so every
molecule there moved) and from the tissue edge; inside the tissue, free sources could
explain any field. With high counts per spot (totals over genes) the fit is precise.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from chronotope._errors import ChronotopeInputError
from chronotope.undiffuse.kernels import Lattice, Profile, make_kernel

__all__ = ["Estimate", "estimate_parameters", "fit_totals"]

logger = logging.getLogger("chronotope")

_TINY = 1e-300


@dataclass
class Estimate:
    """Fitted diffusion parameters and the profile likelihood they came from."""

    sigma: float
    bleed: float
    background: float
    loglik: float
    grid_sigma: np.ndarray
    grid_loglik: np.ndarray
    grid_bleed: np.ndarray
    grid_background: np.ndarray
    evaluations: list[dict] = field(default_factory=list)


def fit_totals(
    t: np.ndarray,
    tissue: np.ndarray,
    kernel,
    *,
    bleed: float | None = None,
    background: float | None = None,
    n_iter: int = 300,
    z0: torch.Tensor | None = None,
    tol: float = 1e-9,
) -> tuple[float, float, float, torch.Tensor]:
    """EM for sources and mixture weights on one total-count vector at a fixed kernel.

    ``bleed`` / ``background`` given: held fixed; ``None``: estimated.
    Returns ``(loglik, bleed, background, z)``.
    """
    dev = kernel.device
    x = torch.as_tensor(np.asarray(t, dtype=np.float64), device=dev)[:, None]
    tis = torch.as_tensor(np.flatnonzero(tissue), device=dev)
    n = x.shape[0]
    b0 = 0.5 if bleed is None else float(bleed)
    g0 = 0.1 if background is None else float(background)
    w = torch.tensor([1 - b0, b0 * (1 - g0), b0 * g0], dtype=torch.float64)
    if z0 is None:
        z = x[tis].clone() * (x.sum() / x[tis].sum().clamp_min(_TINY)) + 1e-6
    else:
        z = z0.clone()
    last = -math.inf
    ll = -math.inf
    for _ in range(n_iter):
        full = torch.zeros_like(x)
        full[tis] = z
        r_self = full
        r_k = kernel.apply(full.to(kernel.dtype)).to(torch.float64).clamp_min(0.0)
        r_u = torch.full_like(x, float(z.sum()) / n)
        rate = w[0] * r_self + w[1] * r_k + w[2] * r_u
        rate = rate.clamp_min(_TINY)
        ll = float((torch.xlogy(x, rate) - rate).sum())
        q = torch.where(rate > 1e-12 * float(rate.max()), x / rate, torch.zeros_like(rate))
        back = w[0] * q + w[1] * kernel.apply_t(q.to(kernel.dtype)).to(torch.float64)
        back = back + w[2] * q.sum() / n
        tot = float(x.sum())
        share = torch.stack(
            [
                (w[0] * r_self * q).sum(),
                (w[1] * r_k * q).sum(),
                (w[2] * r_u * q).sum(),
            ]
        ) / max(tot, _TINY)
        z = z * back[tis]
        if bleed is None and background is None:
            w = share
        elif bleed is None:  # background fixed: split the moved share
            mv = share[1] + share[2]
            w = torch.stack([1 - mv, mv * (1 - g0), mv * g0])
        elif background is None:  # bleed fixed: split the moved part
            s = float(share[1] + share[2])
            g = float(share[2]) / s if s > 0 else g0
            w = torch.tensor([1 - b0, b0 * (1 - g), b0 * g], dtype=torch.float64)
        if abs(ll - last) <= tol * abs(ll):
            break
        last = ll
    b = float(w[1] + w[2])
    g = float(w[2] / (w[1] + w[2])) if b > 0 else 0.0
    return ll, b, g, z


def estimate_parameters(
    totals: np.ndarray,
    tissue: np.ndarray,
    coords: np.ndarray,
    *,
    lattice: Lattice | None = None,
    method: str = "auto",
    kind: Profile = "gaussian",
    sigma: float | None = None,
    bleed: float | None = None,
    background: float | None = None,
    sigma_range: tuple[float, float] = (0.3, 8.0),
    n_grid: int = 9,
    n_refine: int = 8,
    n_iter: int = 300,
    device: str | torch.device | None = None,
) -> Estimate:
    """Profile-likelihood estimate of the parameters that are ``None``.

    Parameters
    ----------
    totals
        Total counts per spot over all genes, ``(N,)``.
    tissue
        Boolean mask of tissue spots; at least one spot must lie outside, unless all
        three parameters are given.
    coords
        Spot coordinates in spacing units.
    lattice, method, kind
        Kernel construction (:func:`chronotope.undiffuse.kernels.make_kernel`).
    sigma, bleed, background
        Fixed values, or ``None`` to estimate.
    sigma_range, n_grid, n_refine
        Log-spaced grid of ``sigma`` (spacings) and the number of refinement steps
        (golden-section search between the neighbours of the best grid point).
    n_iter
        EM iterations per likelihood evaluation.
    device
        Torch device.
    """
    t = np.asarray(totals, dtype=np.float64)
    tissue = np.asarray(tissue, dtype=bool)
    if not tissue.any():
        raise ChronotopeInputError("no spot is marked as tissue")
    if tissue.all() and (bleed is None or background is None or sigma is None):
        logger.warning(
            "undiffuse: every spot is tissue; the diffusion parameters are weakly identified "
            "without out-of-tissue spots (give sigma, bleed and background)"
        )
    evals: list[dict] = []
    cache: dict[float, tuple[float, float, float]] = {}
    warm: dict[str, torch.Tensor] = {}

    def profile_ll(s: float) -> float:
        s = float(s)
        if s in cache:
            return cache[s][0]
        k = make_kernel(
            coords, s, lattice=lattice, method=method, kind=kind, device=device, dtype=torch.float64
        )
        ll, b, g, z = fit_totals(
            t, tissue, k, bleed=bleed, background=background, n_iter=n_iter, z0=warm.get("z")
        )
        warm["z"] = z
        cache[s] = (ll, b, g)
        evals.append({"sigma": s, "loglik": ll, "bleed": b, "background": g})
        logger.debug("undiffuse estimate: sigma=%.3f loglik=%.6g bleed=%.3f bg=%.3f", s, ll, b, g)
        return ll

    if sigma is not None:
        profile_ll(float(sigma))
        best = float(sigma)
        grid = np.array([best])
    else:
        lo, hi = sigma_range
        grid = np.exp(np.linspace(math.log(lo), math.log(hi), n_grid))
        for s in grid:
            profile_ll(s)
        vals = np.array([cache[float(s)][0] for s in grid])
        i = int(np.argmax(vals))
        a = math.log(grid[max(i - 1, 0)])
        c = math.log(grid[min(i + 1, len(grid) - 1)])
        # golden-section search in log sigma on [a, c]
        phi = (math.sqrt(5) - 1) / 2
        x1, x2 = c - phi * (c - a), a + phi * (c - a)
        f1, f2 = profile_ll(math.exp(x1)), profile_ll(math.exp(x2))
        for _ in range(max(0, n_refine - 2)):
            if f1 > f2:
                c, x2, f2 = x2, x1, f1
                x1 = c - phi * (c - a)
                f1 = profile_ll(math.exp(x1))
            else:
                a, x1, f1 = x1, x2, f2
                x2 = a + phi * (c - a)
                f2 = profile_ll(math.exp(x2))
        best = max(cache, key=lambda s: cache[s][0])
    ll, b, g = cache[best]
    order = sorted(cache)
    return Estimate(
        sigma=float(best),
        bleed=float(b),
        background=float(g),
        loglik=float(ll),
        grid_sigma=np.array(order),
        grid_loglik=np.array([cache[s][0] for s in order]),
        grid_bleed=np.array([cache[s][1] for s in order]),
        grid_background=np.array([cache[s][2] for s in order]),
        evaluations=evals,
    )
