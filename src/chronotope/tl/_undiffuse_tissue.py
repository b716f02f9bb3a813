"""Tissue of ``tl.undiffuse`` without an in-tissue flag: H&E image or a learned count cut.

``tissue_key=None`` in :func:`chronotope.tl.undiffuse` lands here
(``tissue_method="auto"``: the image of ``uns["spatial"]`` when there is one, else the
cut on total counts learned through the forward model,
:mod:`chronotope.undiffuse.tissue`). Also the SSIM diagnostic between the image-derived
density and the corrected total counts (kornia, optional).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

from chronotope._errors import ChronotopeInputError

logger = logging.getLogger("chronotope")

TISSUE_METHODS = ("auto", "image", "counts", "all")


def find_image(adata: AnnData, spatial_key: str) -> tuple[np.ndarray, np.ndarray, float] | None:
    """``(image, spot pixels in that image, spot radius in pixels)`` or ``None``.

    The ``"hires"`` image of the (first) library of ``uns["spatial"]`` if present, else
    ``"lowres"``, scaled by its ``tissue_*_scalef``; ``obsm[spatial_key]`` holds the
    full-resolution pixel coordinates (x, y).
    """
    libs = adata.uns.get("spatial")
    if not isinstance(libs, dict) or not libs:
        return None
    lib = next(iter(libs.values()))
    if not isinstance(lib, dict):
        return None
    images = lib.get("images", {}) or {}
    sf = lib.get("scalefactors", {}) or {}
    for name in ("hires", "lowres"):
        if name in images and f"tissue_{name}_scalef" in sf:
            scale = float(sf[f"tissue_{name}_scalef"])
            px = np.asarray(adata.obsm[spatial_key], dtype=np.float64)[:, :2] * scale
            d = float(sf.get("spot_diameter_fullres", 0.0)) * scale
            return np.asarray(images[name]), px, max(d / 2.0, 1.0)
    return None


def prior_image(
    adata: AnnData, spatial_key: str, *, required: bool
) -> tuple[tuple[np.ndarray, np.ndarray, float] | None, str | None]:
    """The image for ``tl.undiffuse(image_prior=...)``, as :func:`find_image` finds it.

    Returns ``(image, None)``, or ``(None, why)`` when there is none and ``required`` is
    false; raises a clear error when it is required.
    """
    img = find_image(adata, spatial_key)
    if img is not None:
        return img, None
    libs = adata.uns.get("spatial")
    lib = next(iter(libs.values()), None) if isinstance(libs, dict) and libs else None
    images = (lib.get("images", {}) or {}) if isinstance(lib, dict) else {}
    if not any(n in images for n in ("hires", "lowres")):
        why = (
            "image_prior needs an H&E image in uns['spatial'][library]['images']['hires' or "
            "'lowres'] (chronotope.io.read_visium loads it); found none"
        )
    else:
        have = [n for n in ("hires", "lowres") if n in images]
        why = (
            f"image_prior needs the scale factor of the {have[0]!r} image: "
            f"uns['spatial'][library]['scalefactors']['tissue_{have[0]}_scalef'] is missing"
        )
    if required:
        raise ChronotopeInputError(why)
    return None, why


def estimate_tissue(
    adata: AnnData,
    x: sp.csr_matrix,
    coords: np.ndarray,
    lattice: Any,
    *,
    tissue_method: str,
    spatial_key: str,
    kernel: str,
    kernel_method: str,
    fixed: tuple[float | None, float | None, float | None],
    device: Any,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Tissue mask, and what to record (``obs`` columns are written by the caller).

    Returns ``(mask, info)``; ``info["prob"]`` is the per-spot tissue probability.
    """
    from chronotope.undiffuse.tissue import image_tissue, learn_tissue

    if tissue_method not in TISSUE_METHODS:
        raise ChronotopeInputError(
            f"tissue_method must be one of {TISSUE_METHODS}, got {tissue_method!r}"
        )
    if tissue_method == "all":
        return np.ones(adata.n_obs, dtype=bool), {"method": "all"}
    img = find_image(adata, spatial_key) if tissue_method in ("auto", "image") else None
    if tissue_method == "image" and img is None:
        raise ChronotopeInputError(
            "tissue_method='image' needs uns['spatial'][library]['images']['hires' or "
            "'lowres'] with its scalefactors (chronotope.io.read_visium loads them)"
        )
    if img is not None:
        prob, sat, thr = image_tissue(*img)
        mask = prob > 0.5
        info = {
            "method": "image",
            "prob": prob,
            "saturation": sat,
            "threshold": thr,
            "image_shape": list(img[0].shape),
        }
    else:
        totals = np.asarray(x.sum(axis=1)).ravel()
        fit = learn_tissue(
            totals,
            coords,
            lattice=lattice,
            method=kernel_method,
            kind=kernel,
            sigma=fixed[0],
            bleed=fixed[1],
            background=fixed[2],
            device=device,
        )
        mask, prob = fit.mask, fit.prob
        info = {
            "method": "counts",
            "prob": prob,
            "cut_log1p": fit.cut,
            "cut_log1p_init": fit.cut_init,
            "cut_counts": float(np.expm1(fit.cut)),
            "temperature": fit.temperature,
            "grad_init": fit.grad_init,
            "cut_trace": np.array([d["cut"] for d in fit.trace]),
        }
    if not mask.any():
        raise ChronotopeInputError("the estimated tissue mask is empty")
    info["n_tissue"] = int(mask.sum())
    logger.info("undiffuse: tissue from %s, %d of %d spots", info["method"], mask.sum(), mask.size)
    return mask, info


def ssim_diagnostic(
    density: np.ndarray, corrected_totals: np.ndarray, lattice: Any, window: int = 7
) -> float | None:
    """SSIM (kornia) between an image-derived density and the corrected totals per spot.

    Both are rasterised on the spot lattice (cells without a spot are 0) and scaled to
    [0, 1]. ``None`` without a lattice or without kornia. A diagnostic, not an objective.
    """
    if lattice is None:
        return None
    try:
        import kornia
    except ImportError:  # optional extra
        logger.info("undiffuse: kornia not installed; no SSIM diagnostic")
        return None
    import torch

    h, w = lattice.shape

    def raster(v: np.ndarray) -> torch.Tensor:
        v = np.asarray(v, dtype=np.float64)
        v = (v - v.min()) / max(float(v.max() - v.min()), 1e-300)
        g = np.zeros((h, w), dtype=np.float32)
        g[lattice.rows, lattice.cols] = v
        if lattice.kind == "hex":  # fill the empty half of the cells from the row neighbour
            e = np.zeros_like(g)
            e[lattice.rows, np.minimum(lattice.cols + 1, w - 1)] = v
            g = np.maximum(g, e)
        return torch.as_tensor(g)[None, None]

    a, b = raster(density), raster(np.log1p(np.maximum(corrected_totals, 0.0)))
    return float(kornia.metrics.ssim(a, b, window, max_val=1.0).mean())
