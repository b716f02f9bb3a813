"""Simulated slides for relative-expression learning: batch effects and count noise."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from chronotope._errors import ChronotopeInputError

__all__ = ["simulate"]


def simulate(
    n_slides: int = 6,
    n_spots: int = 300,
    n_genes: int = 100,
    *,
    n_features: int = 32,
    n_latent: int = 6,
    n_types: int = 5,
    batch_effect: float = 1.0,
    slide_depth_sd: float = 0.5,
    depth: float = 2000.0,
    depth_sd: float = 0.4,
    dispersion: float = 5.0,
    composition_shift: float = 0.5,
    feature_noise: float = 0.5,
    seed: int = 0,
) -> AnnData:
    """Simulate slides whose counts follow latent per-spot states, with batch effects.

    Generative model, for spot ``i`` of slide ``k`` and gene ``g``:

    1. cell-type mixture: slide ``k`` has type proportions ``pi_k ~ Dirichlet(a 1)``
       with ``a = 1 / composition_shift`` (small ``a``: slides differ strongly); each
       spot draws a type ``c_i ~ pi_k`` and a latent state
       ``z_i = m_{c_i} + 0.5 e_i`` (``m_c, e_i ~ N(0, I_{n_latent})``);
    2. true log-rate ``eta[i, g] = a_g + z_i B_g`` (``a_g ~ N(-7, 1)``, gene loadings
       ``B ~ N(0, 0.7^2 / n_latent)``): ``layers["log_rate"]``;
    3. batch factor ``log beta[k, g] ~ N(0, batch_effect^2)`` plus a slide-wide depth shift
       ``N(0, slide_depth_sd^2)``;
    4. depth ``l_i = depth * exp(N(0, depth_sd^2))``;
    5. counts ``y[i, g] ~ NB(mean = l_i beta[k, g] exp(eta[i, g]), theta = dispersion)``
       (``depth`` of a few hundred gives the sparse regime);
    6. features ``x_i = tanh(z_i A) + feature_noise * N(0, I)`` with ``A`` an
       ``n_latent x n_features`` Gaussian matrix (a nonlinear view of the state, as image
       features are of the tissue).

    Parameters
    ----------
    n_slides, n_spots, n_genes
        Slides, spots per slide and genes.
    n_features, n_latent, n_types
        Feature width, latent dimension, number of cell types.
    batch_effect
        Standard deviation of the per-(slide, gene) log batch factor (0: none).
    slide_depth_sd
        Standard deviation of the per-slide log depth shift.
    depth, depth_sd
        Median total count scale per spot and its per-spot log standard deviation.
    dispersion
        NB inverse dispersion ``theta`` (``inf``: Poisson).
    composition_shift
        How much the slides' type proportions differ (``1 / Dirichlet concentration``).
    feature_noise
        Standard deviation of the feature noise.
    seed
        Random seed.

    Returns
    -------
    AnnData
        ``n_slides * n_spots`` spots: raw counts in ``.X`` (CSR float32),
        ``obsm["features"]``, ``obs["slide"]`` (categorical ``s0``, ``s1``, ...),
        ``obs["cell_type"]``, ``obs["depth"]``, ``layers["log_rate"]`` (true ``eta``),
        ``varm["batch_log_factor"]`` (``(n_genes, n_slides)``, ``log beta``) and
        ``uns["simulation"]`` (the parameters).
    """
    for name, v in (("n_slides", n_slides), ("n_spots", n_spots), ("n_genes", n_genes),
                    ("n_features", n_features), ("n_latent", n_latent), ("n_types", n_types)):
        if int(v) < 1:
            raise ChronotopeInputError(f"{name} must be >= 1, got {v}")
    if batch_effect < 0 or depth <= 0 or dispersion <= 0 or composition_shift <= 0:
        raise ChronotopeInputError(
            "batch_effect must be >= 0; depth, dispersion and composition_shift > 0"
        )
    rng = np.random.default_rng(seed)
    n = n_slides * n_spots
    means = rng.normal(size=(n_types, n_latent))
    slide = np.repeat(np.arange(n_slides), n_spots)
    types = np.empty(n, dtype=np.int64)
    for k in range(n_slides):
        pi = rng.dirichlet(np.full(n_types, 1.0 / composition_shift))
        types[slide == k] = rng.choice(n_types, size=n_spots, p=pi)
    z = means[types] + 0.5 * rng.normal(size=(n, n_latent))
    base = rng.normal(-7.0, 1.0, size=n_genes)
    load = rng.normal(0.0, 0.7 / np.sqrt(n_latent), size=(n_latent, n_genes)) * 2.0
    eta = base[None, :] + z @ load
    log_beta = rng.normal(0.0, batch_effect, size=(n_slides, n_genes)) if batch_effect else (
        np.zeros((n_slides, n_genes))
    )
    log_beta = log_beta + rng.normal(0.0, slide_depth_sd, size=(n_slides, 1))
    lib = depth * np.exp(rng.normal(0.0, depth_sd, size=n))
    mu = lib[:, None] * np.exp(eta + log_beta[slide])
    if np.isinf(dispersion):
        y = rng.poisson(mu)
    else:
        y = rng.poisson(rng.gamma(dispersion, mu / dispersion))
    a = rng.normal(size=(n_latent, n_features)) / np.sqrt(n_latent)
    feats = np.tanh(z @ a) + feature_noise * rng.normal(size=(n, n_features))
    obs = pd.DataFrame(
        {
            "slide": pd.Categorical([f"s{k}" for k in slide], categories=[
                f"s{k}" for k in range(n_slides)
            ]),
            "cell_type": pd.Categorical([f"t{c}" for c in types]),
            "depth": lib,
        },
        index=[f"spot{i}" for i in range(n)],
    )
    adata = AnnData(
        X=sp.csr_matrix(y.astype(np.float32)),
        obs=obs,
        var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]),
    )
    adata.obsm["features"] = feats.astype(np.float32)
    adata.layers["log_rate"] = eta.astype(np.float32)
    adata.varm["batch_log_factor"] = log_beta.T.astype(np.float32)
    adata.uns["simulation"] = {
        "n_slides": n_slides, "n_spots": n_spots, "n_genes": n_genes, "batch_effect": batch_effect,
        "slide_depth_sd": slide_depth_sd, "depth": depth, "depth_sd": depth_sd,
        "dispersion": float(dispersion), "composition_shift": composition_shift,
        "feature_noise": feature_noise, "seed": seed,
    }
    return adata
