"""Gene modules from spatial co-expression, and a sigma multiplier per module.

Genes do not all diffuse alike (transcript length, localisation, capture), but
estimating a width per gene is hopeless at Visium depth. Genes that share a spatial
pattern share a module; each module gets one multiplier ``m`` on the global ``sigma``,
estimated by profile likelihood on the module's summed counts (the same estimator as
the global one: :func:`chronotope.undiffuse.estimate.estimate_parameters`, on a narrow
grid around the global value, golden-section refinement).

Modules: each gene's profile over every spot of the array (in and out of the tissue,
so the halo that diffusion puts around the tissue is part of it) is normalised to its
total, smoothed on the sparse kNN spot graph, square-root transformed (variance
stabilising for counts), reduced by PCA and clustered by k-means.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch

from chronotope._errors import ChronotopeInputError
from chronotope.undiffuse.estimate import estimate_parameters
from chronotope.undiffuse.kernels import Lattice, Profile

__all__ = ["ModuleFit", "gene_modules", "module_multipliers"]

logger = logging.getLogger("chronotope")


def gene_modules(
    x: sp.spmatrix | np.ndarray,
    coords: np.ndarray,
    n_modules: int,
    *,
    n_neighbors: int = 6,
    n_smooth: int = 2,
    n_pcs: int = 20,
    max_spots: int = 20000,
    tissue: np.ndarray | None = None,
    halo_weight: float = 1.0,
    seed: int = 0,
) -> np.ndarray:
    """Cluster genes by their spatially smoothed, normalised profiles.

    Parameters
    ----------
    x
        Counts ``N x G`` (all spots).
    coords
        Spot coordinates ``(N, 2)``.
    n_modules
        Number of modules (k-means clusters); clipped to the number of expressed genes.
    n_neighbors, n_smooth
        kNN graph (:func:`chronotope.graph.knn_graph`) and the number of averaging steps.
    n_pcs
        PCA components of the gene x spot profile matrix before k-means.
    max_spots
        Spots used for the features (an evenly spaced subset above this).
    tissue
        Optional tissue mask: adds the halo shape of every gene, ``log`` of its counts
        2-6 spacings outside the tissue over those within 2 spacings (wider diffusion
        carries more of the halo further), standardised and weighted so that it carries
        ``halo_weight`` times the variance of all PCA components together.
    halo_weight
        Weight of the halo feature.
    seed
        Seed of k-means.

    Returns
    -------
    numpy.ndarray
        Module label per gene, ``(G,)`` int64 in ``0 .. n_modules - 1``; ordered by
        decreasing module size.
    """
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    from chronotope.graph import knn_graph

    xs = sp.csr_matrix(x, dtype=np.float64)
    n, g = xs.shape
    if n_modules < 1:
        raise ChronotopeInputError(f"sigma_modules must be >= 1, got {n_modules}")
    tot = np.asarray(xs.sum(axis=0)).ravel()
    expressed = np.flatnonzero(tot > 0)
    k = int(min(n_modules, expressed.size))
    labels = np.zeros(g, dtype=np.int64)
    if k <= 1:
        return labels
    w, _ = knn_graph(np.asarray(coords, dtype=np.float64), n_neighbors, include_self=True)
    w = sp.csr_matrix(w, dtype=np.float64)
    w = sp.diags(1.0 / np.maximum(np.asarray(w.sum(axis=1)).ravel(), 1e-300)) @ w
    prof = xs[:, expressed] @ sp.diags(1.0 / tot[expressed])
    for _ in range(n_smooth):
        prof = w @ prof
    prof = prof.toarray() if sp.issparse(prof) else np.asarray(prof)
    if n > max_spots:
        prof = prof[np.linspace(0, n - 1, max_spots).astype(np.int64)]
    feats = np.sqrt(np.maximum(prof, 0.0)).T  # genes x spots
    feats = feats - feats.mean(axis=1, keepdims=True)
    nc = int(min(n_pcs, feats.shape[0] - 1, feats.shape[1]))
    if nc >= 2:
        feats = PCA(nc, random_state=seed).fit_transform(feats)
    if tissue is not None:
        h = _halo(xs[:, expressed], np.asarray(coords, dtype=np.float64), tissue)
        if h is not None and h.std() > 0:
            h = (h - h.mean()) / h.std()
            scale = np.sqrt(halo_weight * float((feats**2).sum(axis=1).mean()))
            feats = np.c_[feats, h * scale]
    lab = KMeans(k, n_init=4, random_state=seed).fit_predict(feats)
    order = np.argsort(-np.bincount(lab, minlength=k), kind="stable")
    rank = np.empty(k, dtype=np.int64)
    rank[order] = np.arange(k)
    labels[expressed] = rank[lab]
    return labels


def _halo(x: sp.csr_matrix, coords: np.ndarray, tissue: np.ndarray) -> np.ndarray | None:
    """Per gene ``log((far + 1) / (near + 1))`` of its counts outside the tissue."""
    from scipy.spatial import cKDTree

    from chronotope.undiffuse.kernels import spot_spacing

    tissue = np.asarray(tissue, dtype=bool)
    if tissue.all() or not tissue.any():
        return None
    d, _ = cKDTree(coords[tissue]).query(coords[~tissue])
    d = d / spot_spacing(coords)
    out = np.flatnonzero(~tissue)
    near, far = out[d <= 2.0], out[(d > 2.0) & (d <= 6.0)]
    if near.size == 0 or far.size == 0:
        return None
    cn = np.asarray(x[near].sum(axis=0)).ravel()
    cf = np.asarray(x[far].sum(axis=0)).ravel()
    return np.log((cf + 1.0) / (cn + 1.0))


@dataclass
class ModuleFit:
    """Per-module parameters: ``sigma = multiplier * global sigma``, and its bleed, background."""

    labels: np.ndarray
    multiplier: np.ndarray
    sigma: np.ndarray
    bleed: np.ndarray
    background: np.ndarray
    loglik_gain: np.ndarray
    evaluations: list = field(default_factory=list)


def module_multipliers(
    x: sp.spmatrix | np.ndarray,
    labels: np.ndarray,
    tissue: np.ndarray,
    coords: np.ndarray,
    sigma: float,
    *,
    lattice: Lattice | None = None,
    method: str = "auto",
    kind: Profile = "gaussian",
    bleed: float | None = None,
    background: float | None = None,
    span: float = 2.5,
    n_grid: int = 5,
    n_refine: int = 6,
    n_iter: int = 300,
    min_counts: float = 1e4,
    device: str | torch.device | None = None,
) -> ModuleFit:
    """Profile-likelihood multiplier on ``sigma`` for every gene module.

    For module ``k`` the summed counts ``t_k = X[:, genes of k].sum(1)`` follow the same
    model as the totals; ``sigma_k`` is searched on a log grid over
    ``[sigma / span, sigma * span]`` and refined by golden section; ``bleed`` and
    ``background`` are re-fitted per module unless fixed. A module with fewer than
    ``min_counts`` molecules keeps multiplier 1 (and the global parameters).

    ``loglik_gain`` is the module's profile log-likelihood at its own sigma minus that
    at the global sigma (>= 0 when the global sigma lies on the module's grid).
    """
    xs = sp.csc_matrix(x, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    k = int(labels.max()) + 1 if labels.size else 0
    mult, sig, bl, bg, gain, evals = [], [], [], [], [], []
    for m in range(k):
        cols = np.flatnonzero(labels == m)
        t = np.asarray(xs[:, cols].sum(axis=1)).ravel()
        if t.sum() < min_counts:
            mult.append(1.0)
            sig.append(float(sigma))
            bl.append(np.nan if bleed is None else float(bleed))
            bg.append(np.nan if background is None else float(background))
            gain.append(0.0)
            evals.append([])
            continue
        lo, hi = float(sigma) / span, float(sigma) * span
        est = estimate_parameters(
            t,
            tissue,
            coords,
            lattice=lattice,
            method=method,
            kind=kind,
            bleed=bleed,
            background=background,
            sigma_range=(lo, hi),
            n_grid=n_grid,
            n_refine=n_refine,
            n_iter=n_iter,
            device=device,
        )
        # the global sigma is the middle point of the odd grid: its loglik is in the cache
        at_global = est.grid_loglik[int(np.argmin(np.abs(np.log(est.grid_sigma / sigma))))]
        mult.append(est.sigma / float(sigma))
        sig.append(est.sigma)
        bl.append(est.bleed)
        bg.append(est.background)
        gain.append(float(est.loglik - at_global))
        evals.append(est.evaluations)
        logger.info(
            "undiffuse module %d (%d genes): sigma x %.3f, bleed %.3f, background %.3f",
            m,
            cols.size,
            mult[-1],
            est.bleed,
            est.background,
        )
    return ModuleFit(
        labels=labels,
        multiplier=np.array(mult),
        sigma=np.array(sig),
        bleed=np.array(bl),
        background=np.array(bg),
        loglik_gain=np.array(gain),
        evaluations=evals,
    )
