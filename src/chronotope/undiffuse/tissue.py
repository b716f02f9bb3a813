"""Tissue mask when no in-tissue flag is given: a learned cut on total counts, or the image.

Counts (:func:`learn_tissue`). The in-tissue decision is a threshold on the log total
count per spot, but not a fixed quantile: the cut ``c`` is a parameter of the forward
model and is learned by gradient descent on its Poisson likelihood. The sources are the
observed totals ``t`` gated by a soft mask,

    z = kappa * sigmoid((log1p(t) - c) / T) * t,     rate = A z,

with ``kappa`` keeping the total mass. A background spot let into the mask would
predict its own counts on top of what diffusion already brings there (the rate
overshoots); a tissue spot left out would be explained by diffusion alone (the rate
undershoots): the likelihood has its optimum at the tissue edge and ``c`` gets a
gradient through it. The temperature ``T`` starts at a fraction of the spread of
``log1p(t)`` (the sigmoid is not flat: every spot near the cut contributes to the
gradient, unlike the seed's ``beta = 50`` sigmoid on raw counts) and is annealed
geometrically; the diffusion parameters are re-estimated on the new mask between rounds
(:func:`chronotope.undiffuse.estimate.estimate_parameters`). The start is Otsu's
threshold of ``log1p(t)``.

Image (:func:`image_tissue`): the H&E image of a Visium library (``uns["spatial"]``):
the saturation of the image averaged over each spot's footprint, Otsu-thresholded; a
per-spot tissue probability by a logistic of the distance to the threshold, averaged
over the spot's nearest neighbours (soft majority vote).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from chronotope._errors import ChronotopeInputError
from chronotope.undiffuse.estimate import estimate_parameters
from chronotope.undiffuse.kernels import Lattice, Profile, make_kernel
from chronotope.undiffuse.model import DiffusionOperator
from chronotope.undiffuse.prior import rgb_image, saturation, spot_means

__all__ = ["TissueFit", "image_tissue", "learn_tissue", "otsu_threshold", "soft_mask_loss"]

logger = logging.getLogger("chronotope")


def otsu_threshold(v: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of the values ``v`` (maximal between-class variance)."""
    v = np.asarray(v, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0 or v.min() == v.max():
        return float(v.min()) if v.size else 0.0
    hist, edges = np.histogram(v, bins=bins)
    mid = 0.5 * (edges[1:] + edges[:-1])
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * mid)
    ok = (w0 > 0) & (w1 > 0)
    m0 = np.where(ok, s0 / np.where(ok, w0, 1.0), 0.0)
    m1 = np.where(ok, (s0[-1] - s0) / np.where(ok, w1, 1.0), 0.0)
    between = np.where(ok, w0 * w1 * (m0 - m1) ** 2, -1.0)
    return float(edges[int(np.argmax(between)) + 1])


def soft_mask_loss(
    t: torch.Tensor,
    ell: torch.Tensor,
    cut: torch.Tensor,
    temperature: float,
    op_all: DiffusionOperator,
) -> torch.Tensor:
    """Negative Poisson log-likelihood of the totals under the soft-mask sources.

    ``op_all`` is the forward model with every spot allowed as a source; ``cut`` is a
    0-d tensor (requires grad for learning).
    """
    p = torch.sigmoid((ell - cut) / temperature)
    u = p * t
    z = u * (t.sum() / u.sum().clamp_min(1e-30))
    rate = op_all.forward(z[:, None])[:, 0].clamp_min(1e-12)
    return -(torch.xlogy(t, rate) - rate).sum() / t.sum()


@dataclass
class TissueFit:
    """Learned tissue: hard mask, soft probability, cut (on ``log1p`` totals), traces."""

    mask: np.ndarray
    prob: np.ndarray
    cut: float
    cut_init: float
    temperature: float
    grad_init: float
    sigma: float
    bleed: float
    background: float
    trace: list = field(default_factory=list)


def learn_tissue(
    totals: np.ndarray,
    coords: np.ndarray,
    *,
    lattice: Lattice | None = None,
    method: str = "auto",
    kind: Profile = "gaussian",
    sigma: float | None = None,
    bleed: float | None = None,
    background: float | None = None,
    cut_init: float | None = None,
    n_rounds: int = 2,
    n_steps: int = 120,
    t_start: float = 0.25,
    t_end: float = 0.02,
    lr: float = 0.05,
    margin: float = 0.0,
    n_iter: int = 150,
    device: str | torch.device | None = None,
) -> TissueFit:
    """Learn the in-tissue cut on ``log1p(totals)`` through the forward model's likelihood.

    Parameters
    ----------
    totals
        Total counts per spot ``(N,)``.
    coords
        Spot coordinates in spacing units.
    lattice, method, kind
        Kernel construction (:func:`chronotope.undiffuse.kernels.make_kernel`).
    sigma, bleed, background
        Fixed diffusion parameters, or ``None``: estimated on the current mask each round.
    cut_init
        Start of the cut (``log1p`` scale); default Otsu's threshold.
    n_rounds
        Rounds of (estimate parameters on the mask, learn the cut).
    n_steps, lr
        Adam steps and learning rate (in units of the spread of ``log1p(t)``) per round.
    t_start, t_end
        Temperature of the sigmoid, relative to the spread (standard deviation) of
        ``log1p(t)``, annealed geometrically from ``t_start`` to ``t_end``.
    margin
        The parameters are estimated with sources allowed down to ``cut - margin *
        spread`` (``> 0``: a generous mask; on the real raw mouse brain 0.5 made the mask
        worse, 0.80 against 0.92 agreement with the in-tissue flag, hence 0).
    n_iter
        EM iterations per likelihood evaluation of the parameter estimate.
    device
        Torch device.
    """
    t_np = np.asarray(totals, dtype=np.float64)
    if t_np.ndim != 1 or t_np.size < 4:
        raise ChronotopeInputError("totals must be a vector over at least 4 spots")
    if (t_np < 0).any() or not np.isfinite(t_np).all():
        raise ChronotopeInputError("totals must be finite and non-negative")
    ell_np = np.log1p(t_np)
    spread = float(ell_np.std()) or 1.0
    c0 = otsu_threshold(ell_np) if cut_init is None else float(cut_init)
    dev = torch.device(device or "cpu")
    t = torch.as_tensor(t_np, device=dev)
    ell = torch.as_tensor(ell_np, device=dev)
    every = np.ones(t_np.size, dtype=bool)
    cut = torch.tensor(c0, dtype=torch.float64, device=dev, requires_grad=True)
    trace: list[dict] = []
    grad_init = math.nan
    temp = t_start * spread
    s_, b_, g_ = sigma, bleed, background
    for rnd in range(n_rounds):
        # generous mask for the parameters: spots near the cut may hold sources, so the
        # spots that inform sigma / bleed / background are clearly outside
        mask = ell_np > float(cut.detach()) - margin * spread
        if mask.all() or not mask.any():
            mask = ell_np > np.median(ell_np)
        if sigma is None or bleed is None or background is None:
            est = estimate_parameters(
                t_np,
                mask,
                coords,
                lattice=lattice,
                method=method,
                kind=kind,
                sigma=sigma,
                bleed=bleed,
                background=background,
                n_grid=7,
                n_refine=5,
                n_iter=n_iter,
                device=dev,
            )
            s_, b_, g_ = est.sigma, est.bleed, est.background
        k = make_kernel(
            coords, s_, lattice=lattice, method=method, kind=kind, device=dev, dtype=torch.float64
        )
        op_all = DiffusionOperator(k, every, b_, g_)
        opt = torch.optim.Adam([cut], lr=lr * spread)
        for step in range(n_steps):
            frac = step / max(n_steps - 1, 1)
            temp = spread * t_start * (t_end / t_start) ** frac
            opt.zero_grad()
            loss = soft_mask_loss(t, ell, cut, temp, op_all)
            loss.backward()
            if rnd == 0 and step == 0:
                grad_init = float(cut.grad.detach())
            opt.step()
            trace.append({"round": rnd, "cut": float(cut.detach()), "loss": float(loss.detach())})
        logger.info(
            "undiffuse tissue round %d: sigma %.3g bleed %.3g background %.3g cut %.3f",
            rnd,
            s_,
            b_,
            g_,
            float(cut.detach()),
        )
    c = float(cut.detach())
    prob = 1.0 / (1.0 + np.exp(-(ell_np - c) / temp))
    mask = ell_np > c
    if not mask.any():
        raise ChronotopeInputError("the learned tissue mask is empty")
    return TissueFit(
        mask=mask,
        prob=prob,
        cut=c,
        cut_init=c0,
        temperature=temp,
        grad_init=grad_init,
        sigma=float(s_),
        bleed=float(b_),
        background=float(g_),
        trace=trace,
    )


def image_tissue(
    image: np.ndarray,
    pixels: np.ndarray,
    radius: float,
    *,
    sharpness: float = 4.0,
    n_neighbors: int = 6,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Per-spot tissue probability from an H&E image.

    Parameters
    ----------
    image
        RGB(A) image, ``(H, W, 3|4)``, floats in [0, 1] or uint8.
    pixels
        Spot centres in image pixels, ``(N, 2)`` as (x = column, y = row).
    radius
        Spot radius in image pixels (at least 1 pixel is used).
    sharpness
        Slope of the logistic around the Otsu threshold, in units of the spread of the
        spot saturations.
    n_neighbors
        The probability is averaged over each spot and its ``n_neighbors`` nearest spots
        (a soft majority vote: pale spots inside the tissue, dark dust outside); 0: off.

    Returns
    -------
    (prob, saturation, threshold)
        Tissue probability per spot, the mean saturation per spot, and Otsu's threshold.
    """
    spot_sat = spot_means(saturation(rgb_image(image)), pixels, radius)
    px = np.asarray(pixels, dtype=np.float64)
    thr = otsu_threshold(spot_sat)
    spread = float(spot_sat.std()) or 1.0
    prob = 1.0 / (1.0 + np.exp(-sharpness * (spot_sat - thr) / spread))
    if n_neighbors > 0 and px.shape[0] > n_neighbors:
        import scipy.sparse as sp

        from chronotope.graph import knn_graph

        w, _ = knn_graph(px, n_neighbors, include_self=True)
        w = sp.csr_matrix(w, dtype=np.float64)
        prob = (w @ prob) / np.maximum(np.asarray(w.sum(axis=1)).ravel(), 1e-300)
    return prob, spot_sat, thr
