"""Per-gene-module sigma multipliers for ``tl.undiffuse(..., sigma_modules=k)``.

The modules are batches of genes: each is corrected by :func:`chronotope.tl.undiffuse`
with its own fixed ``sigma * m``, ``bleed`` and ``background`` (estimated by
:func:`chronotope.undiffuse.modules.module_multipliers`).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from chronotope._errors import ChronotopeInputError

logger = logging.getLogger("chronotope")


def fit_by_module(
    adata: AnnData,
    xg: sp.csr_matrix,
    tis: np.ndarray,
    coords: np.ndarray,
    lattice: Any,
    est: Any,
    n_modules: int,
    *,
    var_names: pd.Index,
    spatial_key: str,
    kernel: str,
    kernel_method: str,
    fixed: tuple[float | None, float | None],
    sub_kwargs: dict[str, Any],
    device: Any,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """Modules, their multipliers, and the correction module by module.

    Returns ``(z, n_iter, diffusion_fraction, trace, heldout_trace, extra)`` like the
    branches of :func:`chronotope.tl.undiffuse`; ``extra["modules"]`` holds the labels and
    the per-module parameters.
    """
    from chronotope.tl._undiffuse import undiffuse
    from chronotope.undiffuse.modules import gene_modules, module_multipliers

    if isinstance(n_modules, bool) or not isinstance(n_modules, (int, np.integer)):
        raise ChronotopeInputError(f"sigma_modules must be None or an int >= 1: {n_modules!r}")
    if n_modules < 1:
        raise ChronotopeInputError(f"sigma_modules must be None or an int >= 1: {n_modules!r}")
    labels = gene_modules(xg, coords, int(n_modules), tissue=tis, seed=seed)
    fit = module_multipliers(
        xg,
        labels,
        tis,
        coords,
        est.sigma,
        lattice=lattice,
        method=kernel_method,
        kind=kernel,
        bleed=fixed[0],
        background=fixed[1],
        device=device,
    )
    n, g = xg.shape
    z = np.zeros((int(tis.sum()), g), dtype=np.float32)
    n_it = np.zeros(g, dtype=np.float64)
    stayed_w = np.zeros(n, dtype=np.float64)
    observed = np.zeros(n, dtype=np.float64)
    traces, htraces = [], []
    obs = pd.DataFrame({"in_tissue": tis.astype(np.int8)}, index=adata.obs_names)
    for c in ("array_row", "array_col"):
        if c in adata.obs:
            obs[c] = adata.obs[c].to_numpy()
    for m in range(len(fit.multiplier)):
        cols = np.flatnonzero(labels == m)
        if cols.size == 0:
            continue
        b = est.bleed if not np.isfinite(fit.bleed[m]) else float(fit.bleed[m])
        bg = est.background if not np.isfinite(fit.background[m]) else float(fit.background[m])
        sub = AnnData(sp.csr_matrix(xg[:, cols], dtype=np.float32), obs=obs.copy())
        sub.var_names = pd.Index(var_names[cols]).astype(str)
        sub.obsm[spatial_key] = np.asarray(adata.obsm[spatial_key])
        undiffuse(
            sub,
            spatial_key=spatial_key,
            tissue_key="in_tissue",
            kernel=kernel,
            kernel_method=kernel_method,
            sigma=float(fit.sigma[m]),
            bleed=float(np.clip(b, 0.0, 1.0)),
            background=float(np.clip(bg, 0.0, 1.0)),
            diagnostics=False,
            device=None if device is None else str(device),
            seed=seed,
            **sub_kwargs,
        )
        z[:, cols] = sub.layers["undiffused"][np.flatnonzero(tis)].toarray()
        n_it[cols] = sub.var["undiffused_n_iter"].to_numpy()
        cnt = np.asarray(sub.X.sum(axis=1)).ravel()
        stayed_w += cnt * sub.obs["diffusion_fraction"].to_numpy(dtype=np.float64)
        observed += cnt
        traces.append(np.asarray(sub.uns["undiffused"]["loglik_trace"]))
        htraces.append(np.asarray(sub.uns["undiffused"]["heldout_trace"]))
    frac = np.where(observed > 0, stayed_w / np.maximum(observed, 1e-300), 0.0)
    extra = {
        "modules": {
            "n_modules": len(fit.multiplier),
            "n_genes": np.bincount(labels, minlength=len(fit.multiplier)),
            "multiplier": fit.multiplier,
            "sigma": fit.sigma,
            "bleed": fit.bleed,
            "background": fit.background,
            "loglik_gain": fit.loglik_gain,
        },
        "module_labels": labels,
    }
    return z, n_it, frac, _sum_padded(traces), _sum_padded(htraces), extra


def _sum_padded(traces: list[np.ndarray]) -> np.ndarray:
    """Sum traces of different lengths, carrying each last value forward."""
    traces = [t for t in traces if t.size]
    if not traces:
        return np.zeros(0)
    n = max(t.size for t in traces)
    return np.sum([np.concatenate([t, np.full(n - t.size, t[-1])]) for t in traces], axis=0)
