"""H&E image as a prior on the per-spot total source density (MAP-EM).

The prior is on the *total* source of a spot over the corrected genes,
``s_j = sum_g Z_jg``, not per gene: the image says where there is more tissue (more
nuclei, denser stroma), not which genes are expressed. It is a conjugate Gamma prior

    s_j ~ Gamma(shape alpha, mean mu_j),   log mu_j = theta_0 + sum_f theta_f F_jf,

with ``F`` a few standardised log image densities over the spot's footprint
(:func:`image_density`: hematoxylin and eosin optical densities by colour deconvolution,
and the saturation that the tissue mask uses). ``alpha`` is the prior strength: the
squared inverse coefficient of variation of the true densities around the image's
prediction; it is scale-free, so the same ``alpha`` serves a thinned half and the full
data. ``theta`` (a monotone, affine-in-log map from image to density, either sign) is
fitted in the M-step: a Gamma GLM with log link on the current totals.

EM with the prior. With ``C_j`` the E-step's expected number of molecules released at
spot ``j`` (summed over genes, ``C_jg = Z_jg [A^T (X / A Z)]_jg``), the complete-data
posterior splits into the spot's gene shares and its total, and the M-step is closed::

    Z_jg = C_jg / C_j * s_j,     s_j = (C_j + alpha - 1) / (1 + alpha / mu_j),

i.e. Richardson-Lucy times one factor per spot, ``(C_j + alpha - 1) / ((1 + alpha /
mu_j) C_j)``, shared by all genes (``alpha >= 1`` keeps it positive). In the low-rank
model ``Z = H W`` with the rows of ``W`` on the simplex, ``s_j = sum_k H_jk`` and the
same factor multiplies the ``H`` update (an exact ECM step). Where a step treats genes
one batch at a time (per-gene refinement, the per-gene EM), the totals of the other
genes are held at a reference field ``s`` and the prior enters as a one-step-late
factor ``1 / (1 + alpha / mu_j - (alpha - 1) / s_j)`` (equal to ``s_j / C_j`` at the
MAP point).

Strength from the data (:func:`select_strength`): the totals are split by binomial
thinning, ``t = t1 + t2``; for each ``alpha`` of a grid (and no prior) the MAP-EM of the
totals on ``t1`` keeps the iterate that best predicts ``t2`` (the early stopping the
correction uses), and ``alpha`` with the highest held-out log-likelihood wins. No prior
is in the grid: an image that does not predict the density is not used.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from chronotope._errors import ChronotopeInputError

__all__ = [
    "DEFAULT_ALPHAS",
    "GammaImagePrior",
    "image_density",
    "select_strength",
    "spot_means",
]

logger = logging.getLogger("chronotope")

_TINY = 1e-12

# prior strengths tried by select_strength (Gamma shapes; CV 1 ... 0.01)
DEFAULT_ALPHAS = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0)

# Ruifrok & Johnston (2001) H&E(-DAB) stain vectors (optical density per RGB channel)
_STAINS = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64)
_STAINS = _STAINS / np.linalg.norm(_STAINS, axis=1, keepdims=True)


def rgb_image(image: np.ndarray) -> np.ndarray:
    """An RGB(A) image (uint8 or floats in [0, 1]) as float64 RGB in [0, 1]."""
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] < 3:
        raise ChronotopeInputError(f"image must be H x W x 3 (RGB), got shape {img.shape}")
    rgb = img[..., :3].astype(np.float64)
    return rgb / 255.0 if rgb.max() > 1.0 else rgb


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation ``(max - min) / max`` of a float RGB image (0 where black)."""
    mx, mn = rgb.max(axis=2), rgb.min(axis=2)
    return np.where(mx > 0, (mx - mn) / np.maximum(mx, _TINY), 0.0)


def spot_means(channel: np.ndarray, pixels: np.ndarray, radius: float) -> np.ndarray:
    """Mean of a 2-D image ``channel`` over each spot's disc (as :func:`image_tissue`).

    ``pixels``: spot centres ``(N, 2)`` as (x = column, y = row) in that image's pixels;
    ``radius`` in pixels (at least 1).
    """
    h, w = channel.shape
    px = np.asarray(pixels, dtype=np.float64)
    r = max(1, round(radius))
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    disc = (dy * dy + dx * dx) <= r * r
    cy = np.clip(np.rint(px[:, 1]).astype(np.int64)[:, None] + dy[disc][None, :], 0, h - 1)
    cx = np.clip(np.rint(px[:, 0]).astype(np.int64)[:, None] + dx[disc][None, :], 0, w - 1)
    return channel[cy, cx].mean(axis=1)


def image_density(
    image: np.ndarray, pixels: np.ndarray, radius: float
) -> tuple[np.ndarray, list[str]]:
    """Per-spot image densities: hematoxylin and eosin optical density, saturation.

    Colour deconvolution (Ruifrok & Johnston) of the optical density ``-log10(I)`` of
    the RGB image into hematoxylin, eosin and a residual stain; each density and the
    saturation ``(max - min) / max`` are averaged over the spot's disc.

    Returns
    -------
    (densities, names)
        ``(N, 3)`` non-negative array and its column names.
    """
    rgb = rgb_image(image)
    od = -np.log10(np.clip(rgb, 1.0 / 255.0, 1.0))
    conc = od.reshape(-1, 3) @ np.linalg.inv(_STAINS)
    conc = np.clip(conc, 0.0, None).reshape(od.shape)
    cols = [conc[..., 0], conc[..., 1], saturation(rgb)]
    dens = np.stack([spot_means(c, pixels, radius) for c in cols], axis=1)
    return dens, ["hematoxylin_od", "eosin_od", "saturation"]


def _design(density: np.ndarray) -> np.ndarray:
    """Intercept and standardised ``log`` densities (tissue spots x 1 + features)."""
    d = np.asarray(density, dtype=np.float64)
    if d.ndim == 1:
        d = d[:, None]
    f = np.log(d + 1e-3 * max(float(np.median(d[d > 0])) if (d > 0).any() else 1.0, _TINY))
    sd = f.std(axis=0)
    f = np.where(sd > 0, (f - f.mean(axis=0)) / np.where(sd > 0, sd, 1.0), 0.0)
    return np.c_[np.ones(f.shape[0]), f]


@dataclass
class GammaImagePrior:
    """Gamma prior on per-spot totals with an image-dependent mean (tissue spots only).

    Attributes
    ----------
    alpha
        Shape (strength); ``>= 1``.
    design
        ``(n_tissue, 1 + p)``: intercept and standardised log image densities.
    coef
        ``theta`` of ``log mu = design @ theta``; refitted by :meth:`refit`.
    """

    alpha: float
    design: np.ndarray
    coef: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @classmethod
    def from_density(cls, density: np.ndarray, alpha: float) -> GammaImagePrior:
        if not np.isfinite(alpha) or alpha < 1.0:
            raise ChronotopeInputError(f"image prior strength must be >= 1, got {alpha!r}")
        x = _design(density)
        return cls(float(alpha), x, np.zeros(x.shape[1]))

    def mean(self) -> np.ndarray:
        return np.exp(np.clip(self.design @ self.coef, -700, 700))

    def refit(self, s: np.ndarray, n_newton: int = 5) -> None:
        """M-step of ``theta``: Gamma GLM (log link) of the totals ``s`` on the design.

        Maximises ``sum_j -eta_j - s_j exp(-eta_j)`` (the ``theta`` part of the Gamma
        log-density) by damped Newton steps from the current ``theta``.
        """
        s = np.maximum(np.asarray(s, dtype=np.float64), _TINY)
        x = self.design
        th = self.coef.copy()
        if not th.any():
            th[0] = math.log(float(s.mean()))

        def obj(t: np.ndarray) -> float:
            eta = x @ t
            return float(np.sum(eta + s * np.exp(-np.clip(eta, -700, 700))))

        cur = obj(th)
        for _ in range(n_newton):
            eta = x @ th
            r = s * np.exp(-np.clip(eta, -700, 700))
            grad = x.T @ (1.0 - r)
            hess = (x * r[:, None]).T @ x + 1e-9 * np.eye(x.shape[1])
            step = np.linalg.solve(hess, grad)
            lam = 1.0
            while lam > 1e-4:
                new = th - lam * step
                val = obj(new)
                if val <= cur:
                    th, cur = new, val
                    break
                lam *= 0.5
            else:
                break
        self.coef = th

    def em_factor(self, c: torch.Tensor) -> torch.Tensor:
        """Per-spot M-step factor ``(C + alpha - 1) / ((1 + alpha / mu) C)`` (torch, n_tissue)."""
        mu = torch.as_tensor(self.mean(), dtype=torch.float64, device=c.device)
        cd = c.double().clamp_min(_TINY)
        return ((cd + self.alpha - 1.0) / ((1.0 + self.alpha / mu) * cd)).to(c.dtype)

    def osl_factor(self, s: np.ndarray) -> np.ndarray:
        """One-step-late factor ``1 / (1 + alpha / mu - (alpha - 1) / s)`` at totals ``s``."""
        s = np.maximum(np.asarray(s, dtype=np.float64), _TINY)
        den = 1.0 + self.alpha / self.mean() - (self.alpha - 1.0) / s
        return 1.0 / np.maximum(den, 0.1)

    def correlation(self, s: np.ndarray) -> float:
        """Pearson correlation of ``log s`` and ``log mu`` (how much the image explains)."""
        a = np.log(np.maximum(np.asarray(s, dtype=np.float64), _TINY))
        b = self.design @ self.coef
        if a.std() == 0 or b.std() == 0:
            return 0.0
        return float(np.corrcoef(a, b)[0, 1])


def map_totals(
    t: torch.Tensor,
    op,
    prior: GammaImagePrior | None,
    *,
    heldout: torch.Tensor | None = None,
    max_iter: int = 300,
    patience: int = 20,
) -> tuple[torch.Tensor, float, int]:
    """MAP-EM of one total-count field ``t`` (all N spots) under ``op`` and ``prior``.

    With ``heldout``: returns the iterate that best predicts it, its held-out
    log-likelihood and iteration; else the last iterate after ``max_iter``.
    """
    from chronotope.undiffuse.model import _init_sources, _ratio, poisson_loglik

    x = t[:, None]
    s = _init_sources(op, x)
    best, best_ll, best_it = s.clone(), -math.inf, 0
    if prior is not None:
        prior.refit(s[:, 0].double().cpu().numpy())
    for it in range(max_iter):
        c = s * op.adjoint(_ratio(x, op.forward(s)))
        if prior is not None:
            s = c * prior.em_factor(c[:, 0])[:, None]
            prior.refit(s[:, 0].double().cpu().numpy(), n_newton=2)
        else:
            s = c
        if heldout is None:
            continue
        ll = float(poisson_loglik(heldout[:, None], op.forward(s))[0])
        if ll > best_ll:
            best, best_ll, best_it = s.clone(), ll, it + 1
        elif it + 1 - best_it >= patience:
            break
    if heldout is None:
        return s, math.nan, max_iter
    return best, best_ll, best_it


@dataclass
class StrengthSelection:
    """Result of :func:`select_strength`: chosen ``alpha`` (0: no prior) and the grid."""

    alpha: float
    alphas: np.ndarray
    heldout: np.ndarray
    n_iter: np.ndarray
    coef: np.ndarray
    gain: float
    correlation: float


def select_strength(
    totals: np.ndarray,
    op,
    density: np.ndarray,
    *,
    alphas: tuple[float, ...] = DEFAULT_ALPHAS,
    seed: int = 0,
    max_iter: int = 300,
    patience: int = 20,
) -> StrengthSelection:
    """Prior strength by held-out likelihood of thinned totals (``alpha = 0``: no prior).

    Parameters
    ----------
    totals
        Total counts per spot over the genes to correct, ``(N,)`` (all spots).
    op
        :class:`chronotope.undiffuse.model.DiffusionOperator` of the fitted parameters.
    density
        Image densities of the tissue spots, ``(n_tissue, p)`` (:func:`image_density`).
    alphas
        Strengths (``>= 1``) tried besides no prior.
    seed
        Seed of the binomial thinning.
    max_iter, patience
        EM iterations and early-stopping patience of each fit.
    """
    t = np.asarray(totals, dtype=np.float64)
    dens = np.asarray(density, dtype=np.float64)
    if dens.shape[0] != op.n_tissue:
        raise ChronotopeInputError(
            f"density has {dens.shape[0]} rows but the tissue {op.n_tissue} spots"
        )
    rng = np.random.default_rng(seed)
    t1 = rng.binomial(np.rint(t).astype(np.int64), 0.5).astype(np.float64)
    dt = op.kernel.dtype
    dev = op.kernel.device
    t1_t = torch.as_tensor(t1, dtype=dt, device=dev)
    t2_t = torch.as_tensor(t - t1, dtype=dt, device=dev)
    grid = [0.0, *sorted(float(a) for a in alphas)]
    lls, its, coefs, cors = [], [], [], []
    for a in grid:
        pr = None if a == 0 else GammaImagePrior.from_density(dens, a)
        s, ll, it = map_totals(t1_t, op, pr, heldout=t2_t, max_iter=max_iter, patience=patience)
        lls.append(ll)
        its.append(it)
        if pr is None:
            pr = GammaImagePrior.from_density(dens, 1.0)
            pr.refit(s[:, 0].double().cpu().numpy())
        coefs.append(pr.coef.copy())
        cors.append(pr.correlation(s[:, 0].double().cpu().numpy()))
        logger.debug("undiffuse image prior: alpha %g held-out %.6g (it %d)", a, ll, it)
    lls_a = np.array(lls)
    i = int(np.argmax(lls_a))
    return StrengthSelection(
        alpha=grid[i],
        alphas=np.array(grid),
        heldout=lls_a,
        n_iter=np.array(its),
        coef=coefs[i],
        gain=float(lls_a[i] - lls_a[0]),
        correlation=cors[i],
    )
