"""``tl.undiffuse``, ``tl.simulate_diffusion``: AnnData layer of :mod:`chronotope.undiffuse`."""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData

from chronotope._errors import ChronotopeInputError
from chronotope._settings import resolve_device
from chronotope._validate import check_coordinates, check_counts, get_obsm
from chronotope.parallel import (
    Scheduler,
    check_scheduler,
    describe_scheduler,
    scheduler_client,
)

__all__ = ["simulate_diffusion", "undiffuse"]

logger = logging.getLogger("chronotope")

# Genes (top by total) whose Moran's I is reported as a diagnostic.
_MORAN_GENES = 200


def _counts(adata: AnnData, layer: str | None) -> tuple[sp.csr_matrix, str]:
    if layer is not None and layer not in adata.layers:
        raise ChronotopeInputError(
            f"layer {layer!r} not found in adata.layers (have: {list(adata.layers)})"
        )
    x = adata.X if layer is None else adata.layers[layer]
    where = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
    if x is None:
        raise ChronotopeInputError(f"{where} is empty")
    check_counts(x, where)
    return sp.csr_matrix(x, dtype=np.float64), where


def _tissue(adata: AnnData, tissue_key: str | None) -> np.ndarray:
    if tissue_key is None:
        return np.ones(adata.n_obs, dtype=bool)
    if tissue_key not in adata.obs:
        raise ChronotopeInputError(
            f"adata.obs[{tissue_key!r}] not found: give the in-tissue flag of every spot (0/1), "
            "or tissue_key=None to estimate the tissue (H&E image or a learned count cut)"
        )
    col = adata.obs[tissue_key]
    vals = col.to_numpy()
    if vals.dtype == bool:
        tis = vals
    else:
        num = pd.to_numeric(pd.Series(vals), errors="coerce").to_numpy()
        if np.isnan(num).any() or not np.isin(num, (0, 1)).all():
            raise ChronotopeInputError(f"adata.obs[{tissue_key!r}] must hold 0/1 or booleans")
        tis = num.astype(bool)
    if not tis.any():
        raise ChronotopeInputError(f"adata.obs[{tissue_key!r}] marks no spot as tissue")
    return tis


def _geometry(
    adata: AnnData, spatial_key: str, kernel_method: str
) -> tuple[np.ndarray, float, Any]:
    from chronotope.undiffuse import infer_lattice, spot_spacing

    coords = check_coordinates(
        get_obsm(adata, spatial_key, made_by="chronotope.io.read_visium"),
        adata.n_obs,
        f"adata.obsm[{spatial_key!r}]",
    )
    spacing = spot_spacing(coords)
    lattice = None
    if kernel_method in ("auto", "fft"):
        if "array_row" in adata.obs and "array_col" in adata.obs:
            lattice = infer_lattice(
                array_row=adata.obs["array_row"].to_numpy(),
                array_col=adata.obs["array_col"].to_numpy(),
            )
        if lattice is None:
            lattice = infer_lattice(coords)
        if lattice is None and kernel_method == "fft":
            raise ChronotopeInputError(
                "kernel_method='fft' needs spots on a lattice (obs array_row/array_col, or a "
                "square grid of coordinates); use kernel_method='sparse'"
            )
    return coords / spacing, spacing, lattice


def _param(value: float | str, name: str, lo: float, hi: float) -> float | None:
    if isinstance(value, str):
        if value != "auto":
            raise ChronotopeInputError(f"{name} must be a number or 'auto', got {value!r}")
        return None
    v = float(value)
    if not np.isfinite(v) or not lo <= v <= hi:
        raise ChronotopeInputError(f"{name} must lie in [{lo}, {hi}], got {value!r}")
    return v


def _signatures(
    reference: AnnData | pd.DataFrame | None, reference_key: str | None, var_names: pd.Index
) -> tuple[np.ndarray | None, list[str]]:
    """Reference profiles ``(types, genes)`` on ``var_names`` (missing genes: 0)."""
    if reference is None:
        return None, []
    if isinstance(reference, pd.DataFrame):
        prof = reference.astype(float)
    elif isinstance(reference, AnnData):
        if reference_key is None or reference_key not in reference.obs:
            raise ChronotopeInputError(
                "reference is an AnnData: give reference_key, the obs column of its cell "
                "types or domains"
            )
        lab = reference.obs[reference_key].astype(str).to_numpy()
        x = sp.csr_matrix(reference.X, dtype=np.float64)
        check_counts(x, "reference.X")
        cats = [c for c in pd.unique(lab) if c != "nan"]
        rows = []
        for c in cats:
            m = lab == c
            rows.append(np.asarray(x[m].sum(axis=0)).ravel() / max(int(m.sum()), 1))
        prof = pd.DataFrame(np.vstack(rows), index=cats, columns=reference.var_names)
    else:
        raise ChronotopeInputError(
            "reference must be an AnnData (with reference_key) or a DataFrame types x genes"
        )
    shared = var_names.intersection(prof.columns)
    if len(shared) == 0:
        raise ChronotopeInputError("reference shares no gene name with adata.var_names")
    out = prof.reindex(columns=var_names, fill_value=0.0).to_numpy(dtype=np.float64)
    if not np.isfinite(out).all() or (out < 0).any():
        raise ChronotopeInputError("reference profiles must be finite and non-negative")
    keep = out.sum(axis=1) > 0
    return out[keep], [str(i) for i, k in zip(prof.index, keep, strict=True) if k]


def undiffuse(
    adata: AnnData,
    layer: str | None = None,
    *,
    spatial_key: str = "spatial",
    tissue_key: str | None = "in_tissue",
    kernel: Literal["gaussian", "student"] = "gaussian",
    kernel_method: Literal["auto", "fft", "sparse"] = "auto",
    sigma: float | str = "auto",
    bleed: float | str = "auto",
    background: float | str = "auto",
    n_iter: int | str = "auto",
    method: Literal["lowrank", "pergene"] = "lowrank",
    rank: int = 30,
    refine: bool | str = "auto",
    reference: AnnData | pd.DataFrame | None = None,
    reference_key: str | None = None,
    genes: list[str] | np.ndarray | None = None,
    round_counts: bool = False,
    diagnostics: bool = True,
    seed: int = 0,
    device: str | None = "cpu",
    memory_gb: float = 2.0,
    scheduler: Scheduler = None,
    progress: bool = False,
    key_added: str = "undiffused",
    copy: bool = False,
    sigma_modules: int | None = None,
    tissue_method: Literal["auto", "image", "counts", "all"] = "auto",
    image_prior: bool | float | str = "auto",
) -> AnnData | None:
    """Undo lateral mRNA diffusion: maximum-likelihood sources of the observed counts.

    Model: ``X[:, g] ~ Poisson(A Z[:, g])`` with ``A = (1 - bleed) I + bleed * [(1 -
    background) K_sigma + background * uniform]`` over all spots of the array, sources
    ``Z`` on tissue spots only. ``sigma``, ``bleed`` and ``background`` are estimated by
    profile likelihood on the total counts per spot (out-of-tissue spots carry the
    information); ``Z`` is fitted by EM (Richardson-Lucy), either as a low-rank Poisson
    NMF shared by all genes (``method="lowrank"``, cost independent of the number of
    genes) or per gene (``method="pergene"``), with early stopping by the held-out
    likelihood of binomially thinned counts. See ``docs/undiffuse.md``.

    Parameters
    ----------
    adata
        Raw counts of every spot of the array (in and out of tissue).
    layer
        Layer with the counts (``None``: ``.X``).
    spatial_key
        ``obsm`` key of the coordinates. Visium ``obs["array_row"]`` / ``["array_col"]``
        or a square grid of coordinates enable the FFT kernel.
    tissue_key
        ``obs`` column with the in-tissue flag (0/1); ``None``: the tissue is estimated
        (``tissue_method``) and written to ``obs["undiffuse_tissue"]`` (and its
        probability to ``obs["undiffuse_tissue_prob"]``).
    kernel
        Kernel profile: ``"gaussian"`` (diffusion) or ``"student"`` (heavy tails).
    kernel_method
        ``"auto"`` (FFT on a lattice, else sparse radius graph), ``"fft"``, ``"sparse"``.
    sigma, bleed, background
        Kernel width in spot spacings, share of molecules that move, share of the moved
        molecules spread uniformly; ``"auto"``: estimated.
    n_iter
        EM iterations, or ``"auto"`` (held-out likelihood of thinned counts).
    method
        ``"lowrank"`` or ``"pergene"`` (see above).
    rank
        Free components of the low-rank model.
    refine
        With ``method="lowrank"``: add per-gene Richardson-Lucy steps from the low-rank
        sources, their number chosen per gene by held-out likelihood (needs
        ``n_iter="auto"``). ``"auto"``: on when spots x genes <= 2e7 (it costs kernel
        applications per gene).
    reference, reference_key
        Optional reference of the same tissue with little diffusion (single cell or
        spatial): an AnnData with counts and labels in ``obs[reference_key]``, or a
        DataFrame (types x genes). Its mean profiles enter the low-rank model as fixed
        components beside the free ones (deconvolution inside the same EM).
    genes
        Genes to correct (default all); the others are copied unchanged.
    round_counts
        Round the corrected counts to integers that keep every gene's total.
    diagnostics
        Compute Moran's I (raw and corrected, top genes) and out-of-tissue fractions.
    seed
        Seed of the thinning and initialisation.
    device
        Torch device.
    memory_gb
        Memory budget of the per-gene EM's gene batches.
    scheduler
        Where the gene batches of the per-gene EM (``method="pergene"``, and the per-gene
        refinement of ``"lowrank"``) run: ``None`` (in-process), ``"local:N"`` (a local
        Dask cluster of ``N`` workers), a Dask scheduler address or a
        ``distributed.Client`` (see :func:`chronotope.parallel.parallel_map`). The same
        result on every scheduler; the joint low-rank fit couples the genes and stays
        in-process.
    progress
        Progress bars.
    key_added
        Name of the layer and of the ``uns`` entry.
    copy
        Return a modified copy instead of writing in place.
    sigma_modules
        ``None``: one ``sigma`` for all genes. An int ``k``: cluster the genes into ``k``
        modules by spatial co-expression, estimate a multiplier on ``sigma`` (and
        ``bleed``, ``background`` unless given) per module by profile likelihood on the
        module's summed counts, and correct each module with its own parameters
        (:mod:`chronotope.undiffuse.modules`). Writes ``var[f"{key_added}_module"]`` and
        ``uns[key_added]["modules"]``.
    tissue_method
        Without ``tissue_key``: ``"auto"`` (the H&E image of ``uns["spatial"]`` when there
        is one, else ``"counts"``), ``"image"`` (saturation of the image over each spot,
        Otsu cut), ``"counts"`` (a cut on log total counts learned by gradient through
        the forward model's likelihood, :mod:`chronotope.undiffuse.tissue`) or
        ``"all"`` (every spot may hold sources; the parameters are then weakly
        identified: give them). With the image, ``uns[key_added]["diagnostics"]`` holds
        the SSIM of the image density and the corrected totals (needs kornia).
    image_prior
        The H&E image of ``uns["spatial"][library]["images"]`` (the lookup of
        ``tissue_method="image"``) as a Gamma prior on each spot's *total* source
        density over the corrected genes (not per gene), its mean an affine-in-log
        function of the spot's hematoxylin / eosin optical density and saturation,
        fitted inside the EM (:mod:`chronotope.undiffuse.prior`). ``"auto"``: with an
        image, the strength is chosen by held-out likelihood of binomially thinned
        total counts among no prior and a grid (no prior wins when the image does not
        predict the density); without an image, off. ``True``: the same selection,
        but an image is required. A number ``>= 1``: that strength (Gamma shape; the
        squared inverse coefficient of variation of the densities around the image's
        prediction). ``False`` or ``0``: off. Needs ``method="lowrank"`` and no
        ``sigma_modules`` (``"auto"`` is then off). The choice is in
        ``uns[key_added]["params"]["image_prior_alpha"]`` (0: off) and the details in
        ``uns[key_added]["image_prior"]``.

    Returns
    -------
    AnnData or None
        Writes ``layers[key_added]`` (CSR float32, same spots and genes; zero outside the
        tissue), ``obs["diffusion_fraction"]`` (share of each spot's molecules that came
        from another spot), ``var[f"{key_added}_n_iter"]`` (per-gene EM) and
        ``uns[key_added]`` (``params``, fitted ``sigma`` / ``bleed`` / ``background``,
        the estimation grid, likelihood traces, diagnostics, ``seconds``).
    """
    from chronotope.undiffuse import (
        DiffusionOperator,
        em_deconvolve,
        estimate_parameters,
        lowrank_deconvolve,
        make_kernel,
        round_keep_totals,
    )
    from chronotope.undiffuse.model import refine_pergene

    t0 = time.perf_counter()
    params = {
        "layer": layer,
        "spatial_key": spatial_key,
        "tissue_key": tissue_key,
        "kernel": kernel,
        "kernel_method": kernel_method,
        "sigma": sigma,
        "bleed": bleed,
        "background": background,
        "n_iter": n_iter,
        "method": method,
        "rank": rank,
        "refine": refine,
        "reference_key": reference_key,
        "round_counts": round_counts,
        "seed": seed,
        "sigma_modules": sigma_modules,
        "tissue_method": tissue_method if tissue_key is None else None,
        "scheduler": describe_scheduler(scheduler),
        "image_prior": image_prior,
    }
    if kernel not in ("gaussian", "student"):
        raise ChronotopeInputError(f"kernel must be 'gaussian' or 'student', got {kernel!r}")
    if method not in ("lowrank", "pergene"):
        raise ChronotopeInputError(f"method must be 'lowrank' or 'pergene', got {method!r}")
    if kernel_method not in ("auto", "fft", "sparse"):
        raise ChronotopeInputError(f"kernel_method must be auto, fft or sparse: {kernel_method!r}")
    check_scheduler(scheduler)
    prior_mode, prior_alpha = _image_prior_arg(image_prior)
    prior_reason = None
    if prior_mode != "off" and (method != "lowrank" or sigma_modules is not None):
        what = "sigma_modules" if sigma_modules is not None else f"method={method!r}"
        if prior_mode == "auto":
            prior_mode, prior_reason = "off", f"not available with {what}"
        else:
            raise ChronotopeInputError(
                f"image_prior needs method='lowrank' without sigma_modules (got {what})"
            )
    prior_img = None
    if prior_mode != "off":
        from chronotope.tl._undiffuse_tissue import prior_image

        prior_img, why = prior_image(adata, spatial_key, required=prior_mode != "auto")
        if prior_img is None:
            prior_mode, prior_reason = "off", why
    s_fix = _param(sigma, "sigma", 1e-3, 1e3)
    b_fix = _param(bleed, "bleed", 0.0, 1.0)
    g_fix = _param(background, "background", 0.0, 1.0)
    if s_fix is not None and s_fix <= 0:
        raise ChronotopeInputError("sigma must be > 0")
    x, _where = _counts(adata, layer)
    tis = _tissue(adata, tissue_key) if tissue_key is not None else None
    coords, spacing, lattice = _geometry(adata, spatial_key, kernel_method)
    tissue_info = None
    if tis is None:
        from chronotope.tl._undiffuse_tissue import estimate_tissue

        tis, tissue_info = estimate_tissue(
            adata,
            x,
            coords,
            lattice,
            tissue_method=tissue_method,
            spatial_key=spatial_key,
            kernel=kernel,
            kernel_method=kernel_method,
            fixed=(s_fix, b_fix, g_fix),
            device=device,
        )
    if genes is None:
        gmask = np.ones(adata.n_vars, dtype=bool)
    else:
        gmask = adata.var_names.isin(list(genes))
        missing = pd.Index(list(genes)).difference(adata.var_names)
        if len(missing):
            raise ChronotopeInputError(
                f"{len(missing)} genes not in adata.var_names: {list(missing[:5])}"
            )
    if not gmask.any():
        raise ChronotopeInputError("no gene to correct")
    if isinstance(n_iter, str) and n_iter != "auto":
        raise ChronotopeInputError(f"n_iter must be 'auto' or a positive integer: {n_iter!r}")
    if reference is not None and method != "lowrank":
        raise ChronotopeInputError("reference needs method='lowrank'")
    sig, sig_names = _signatures(reference, reference_key, adata.var_names[gmask])
    if adata.is_view:
        adata._init_as_actual(adata.copy())
    adata = adata.copy() if copy else adata
    dev = resolve_device(device or "cpu")

    totals = np.asarray(x.sum(axis=1)).ravel()
    t_est = time.perf_counter()
    est = estimate_parameters(
        totals,
        tis,
        coords,
        lattice=lattice,
        method=kernel_method,
        kind=kernel,
        sigma=s_fix,
        bleed=b_fix,
        background=g_fix,
        device=dev,
    )
    t_est = time.perf_counter() - t_est
    logger.info(
        "undiffuse: sigma=%.3g spacings, bleed=%.3g, background=%.3g (%.1f s)",
        est.sigma,
        est.bleed,
        est.background,
        t_est,
    )
    k = make_kernel(
        coords, est.sigma, lattice=lattice, method=kernel_method, kind=kernel, device=dev
    )
    op = DiffusionOperator(k, tis, est.bleed, est.background)
    xg = sp.csr_matrix(x[:, np.flatnonzero(gmask)])
    prior, prior_info = _build_prior(
        prior_mode, prior_alpha, prior_img, xg, op, tis, seed, prior_reason
    )
    params["image_prior_alpha"] = prior_info["alpha"]
    t_fit = time.perf_counter()
    if sigma_modules is not None:
        from chronotope.tl._undiffuse_modules import fit_by_module

        # one cluster for all modules (each module's correction runs on it)
        with scheduler_client(scheduler) as client:
            z, n_it, frac, trace, htrace, extra = fit_by_module(
                adata,
                xg,
                tis,
                coords,
                lattice,
                est,
                sigma_modules,
                var_names=adata.var_names[gmask],
                spatial_key=spatial_key,
                kernel=kernel,
                kernel_method=kernel_method,
                fixed=(b_fix, g_fix),
                sub_kwargs={
                    "n_iter": n_iter,
                    "method": method,
                    "rank": rank,
                    "refine": refine,
                    "reference": reference,
                    "reference_key": reference_key,
                    "memory_gb": memory_gb,
                    "progress": progress,
                    "scheduler": client,
                    "image_prior": False,
                },
                device=dev,
                seed=seed,
            )
    elif method == "lowrank":
        res = lowrank_deconvolve(
            xg,
            op,
            rank=min(rank, max(1, xg.shape[1] - 1)) if sig is None else rank,
            signatures=sig,
            n_iter=n_iter,
            seed=seed,
            progress=progress,
            prior=prior,
        )
        z = res.sources()
        n_it = np.full(xg.shape[1], res.n_iter, dtype=np.float64)
        do_refine = refine is True or (
            refine == "auto" and xg.shape[0] * xg.shape[1] <= 2e7 and n_iter == "auto"
        )
        if do_refine and res.half is not None:
            z, steps = refine_pergene(
                xg,
                op,
                z,
                half=res.half,
                memory_gb=memory_gb,
                scheduler=scheduler,
                progress=progress,
                prior_factor=res.prior_factor,
            )
            if res.gene_scale is not None:  # RL keeps totals; undo the low-rank rescale drift
                tot = z.sum(axis=0)
                gt = np.asarray(xg.sum(axis=0)).ravel()
                z *= np.where(tot > 0, gt / np.maximum(tot, 1e-300), 1.0)[None, :]
            n_it = n_it + steps
        trace, htrace, frac = res.trace, res.heldout_trace, res.diffusion_fraction
        extra = {
            "rank": int(res.w.shape[0] - res.n_fixed),
            "n_reference_types": res.n_fixed,
            "n_iter_lowrank": int(res.n_iter),
            "refined": bool(do_refine and res.half is not None),
        }
        if res.n_fixed:
            share = res.h[:, : res.n_fixed].sum() * 1.0
            extra["reference_share"] = float(
                share / max(float((res.h.sum(axis=0) * res.w.sum(axis=1)).sum()), 1e-300)
            )
            extra["reference_types"] = sig_names
    else:
        er = em_deconvolve(
            xg,
            op,
            n_iter=n_iter,
            memory_gb=memory_gb,
            seed=seed,
            progress=progress,
            scheduler=scheduler,
        )
        z, n_it, frac = er.z, er.n_iter, er.diffusion_fraction
        trace, htrace = er.heldout_trace, er.heldout_trace if n_iter == "auto" else np.zeros(0)
        extra = dict(er.extra)
    t_fit = time.perf_counter() - t_fit
    gtot = np.asarray(xg.sum(axis=0)).ravel()
    if round_counts:
        z = round_keep_totals(z, gtot)
    # layer: tissue rows from z, other rows zero; uncorrected genes copied
    out = _rows_to_csr(z, tis)
    del z
    if not gmask.all():
        keep = sp.csr_matrix(x, dtype=np.float32).tolil()
        idx = np.flatnonzero(gmask)
        keep[:, idx] = out
        out = sp.csr_matrix(keep)
    out.eliminate_zeros()
    adata.layers[key_added] = out if out.dtype == np.float32 else out.astype(np.float32)
    adata.obs["diffusion_fraction"] = np.asarray(frac, dtype=np.float32)
    ncol = np.zeros(adata.n_vars)
    ncol[gmask] = n_it
    adata.var[f"{key_added}_n_iter"] = ncol
    if tissue_info is not None:
        adata.obs["undiffuse_tissue"] = tis
        if "prob" in tissue_info:
            adata.obs["undiffuse_tissue_prob"] = tissue_info.pop("prob").astype(np.float32)
    if "module_labels" in extra:
        mcol = np.full(adata.n_vars, -1, dtype=np.int64)
        mcol[gmask] = extra.pop("module_labels")
        adata.var[f"{key_added}_module"] = mcol
    info: dict[str, Any] = {
        "params": {k_: ("auto" if v is None else v) for k_, v in params.items()},
        "sigma": est.sigma,
        "sigma_units": "spot spacings",
        "spacing": spacing,
        "bleed": est.bleed,
        "background": est.background,
        "kernel_method": "fft" if type(k).__name__ == "LatticeKernel" else "sparse",
        "estimation": {
            "sigma": est.grid_sigma,
            "loglik": est.grid_loglik,
            "bleed": est.grid_bleed,
            "background": est.grid_background,
        },
        "loglik_trace": np.asarray(trace, dtype=np.float64),
        "heldout_trace": np.asarray(htrace, dtype=np.float64),
        "genes_corrected": int(gmask.sum()),
        "seconds_estimate": t_est,
        "seconds_fit": t_fit,
        **extra,
    }
    if tissue_info is not None:
        info["tissue"] = tissue_info
    if method == "lowrank" and sigma_modules is None and res.prior_coef is not None:
        prior_info["coef_final"] = np.asarray(res.prior_coef, dtype=np.float64)
    info["image_prior"] = prior_info
    if diagnostics:
        info["diagnostics"] = _diagnostics(adata, x, out, tis, gmask, spatial_key)
        if tissue_info is not None and "saturation" in tissue_info:
            from chronotope.tl._undiffuse_tissue import ssim_diagnostic

            info["diagnostics"]["ssim_image_corrected"] = ssim_diagnostic(
                tissue_info["saturation"], np.asarray(out.sum(axis=1)).ravel(), lattice
            )
            info["diagnostics"]["ssim_image_raw"] = ssim_diagnostic(
                tissue_info["saturation"], np.asarray(x.sum(axis=1)).ravel(), lattice
            )
    info["seconds"] = time.perf_counter() - t0
    adata.uns[key_added] = info
    logger.info(
        "undiffuse: %d genes x %d spots in %.1f s", gmask.sum(), adata.n_obs, info["seconds"]
    )
    return adata if copy else None


def _rows_to_csr(z: np.ndarray, rows: np.ndarray, chunk: int = 4096) -> sp.csr_matrix:
    """CSR (float32) with the dense ``z`` on the rows where ``rows`` is true, zero elsewhere.

    Built chunk by chunk into preallocated arrays: no dense array of all spots and no
    COO copy with 64-bit indices of every non-zero (at 50k spots x 2,000 genes those
    were 0.4 and 1.2 GB on top of the result).
    """
    n, g = rows.size, z.shape[1]
    per_row = np.zeros(n, dtype=np.int64)
    at = np.flatnonzero(rows)
    for lo in range(0, z.shape[0], chunk):
        per_row[at[lo : lo + chunk]] = np.count_nonzero(z[lo : lo + chunk], axis=1)
    indptr = np.concatenate([[0], np.cumsum(per_row)])
    nnz = int(indptr[-1])
    idx_dtype = np.int32 if max(nnz, g) < 2**31 - 1 else np.int64
    data = np.empty(nnz, dtype=np.float32)
    indices = np.empty(nnz, dtype=idx_dtype)
    pos = 0
    for lo in range(0, z.shape[0], chunk):
        blk = z[lo : lo + chunk]
        nz = blk != 0
        _, c = np.nonzero(nz)
        k = c.size
        indices[pos : pos + k] = c
        data[pos : pos + k] = blk[nz]
        pos += k
    return sp.csr_matrix((data, indices, indptr.astype(idx_dtype)), shape=(n, g))


def _image_prior_arg(value: bool | float | str) -> tuple[str, float]:
    """``("off" | "auto" | "select" | "fixed", alpha)`` from ``image_prior``."""
    if isinstance(value, str):
        if value != "auto":
            raise ChronotopeInputError(
                f"image_prior must be True, False, 'auto' or a strength >= 1, got {value!r}"
            )
        return "auto", 0.0
    if isinstance(value, (bool, np.bool_)):
        return ("select", 0.0) if value else ("off", 0.0)
    try:
        a = float(value)
    except (TypeError, ValueError):
        raise ChronotopeInputError(
            f"image_prior must be True, False, 'auto' or a strength >= 1, got {value!r}"
        ) from None
    if a == 0.0:
        return "off", 0.0
    if not np.isfinite(a) or a < 1.0:
        raise ChronotopeInputError(
            f"image_prior strength must be 0 (off) or >= 1 (a Gamma shape), got {value!r}"
        )
    return "fixed", a


def _build_prior(
    mode: str,
    alpha: float,
    img: tuple | None,
    xg: sp.csr_matrix,
    op: Any,
    tis: np.ndarray,
    seed: int,
    reason: str | None,
) -> tuple[Any, dict[str, Any]]:
    """The image prior (or ``None``) and what to record in ``uns[key]["image_prior"]``."""
    from chronotope.undiffuse.prior import GammaImagePrior, image_density, select_strength

    info: dict[str, Any] = {"mode": mode, "alpha": 0.0, "used": False}
    if mode == "off":
        info["reason"] = reason or "off"
        return None, info
    t0 = time.perf_counter()
    dens, names = image_density(*img)
    dens_t = dens[tis]
    info["features"] = names
    if mode in ("auto", "select"):
        sel = select_strength(np.asarray(xg.sum(axis=1)).ravel(), op, dens_t, seed=seed)
        alpha = sel.alpha
        info.update(
            grid_alpha=sel.alphas,
            grid_heldout=sel.heldout,
            grid_n_iter=sel.n_iter,
            heldout_gain=sel.gain,
            coef_totals=sel.coef,
            correlation_totals=sel.correlation,
        )
        if alpha == 0:
            info["reason"] = "held-out likelihood chose no prior"
    info["alpha"] = float(alpha)
    info["seconds"] = time.perf_counter() - t0
    if alpha <= 0:
        return None, info
    info["used"] = True
    logger.info("undiffuse: image prior on spot totals, strength %.3g", alpha)
    return GammaImagePrior.from_density(dens_t, alpha), info


def _diagnostics(
    adata: AnnData,
    x: sp.csr_matrix,
    out: sp.csr_matrix,
    tis: np.ndarray,
    gmask: np.ndarray,
    spatial_key: str,
) -> dict[str, Any]:
    from chronotope.graph import knn_graph
    from chronotope.undiffuse.metrics import morans_i

    before = float(x[~tis].sum() / max(x.sum(), 1e-300))
    after = float(out[~tis].sum() / max(out.sum(), 1e-300))
    idx = np.flatnonzero(gmask)
    tot = np.asarray(x[:, idx].sum(axis=0)).ravel()
    top = idx[np.argsort(-tot)[:_MORAN_GENES]]
    coords = np.asarray(adata.obsm[spatial_key], dtype=np.float64)[tis]
    d = {"out_of_tissue_fraction_before": before, "out_of_tissue_fraction_after": after}
    if tis.sum() >= 8:
        w, _ = knn_graph(coords, 6)
        xt = x[np.flatnonzero(tis)][:, top]
        ot = out[np.flatnonzero(tis)][:, top]
        mi_raw, mi_new = morans_i(xt, w), morans_i(ot, w)
        d["morans_i_genes"] = np.asarray(adata.var_names[top], dtype=str)
        d["morans_i_raw"] = mi_raw
        d["morans_i_undiffused"] = mi_new
        d["morans_i_median_raw"] = float(np.nanmedian(mi_raw))
        d["morans_i_median_undiffused"] = float(np.nanmedian(mi_new))
    return d


def simulate_diffusion(
    adata: AnnData,
    sigma: float = 3.0,
    bleed: float = 0.5,
    *,
    background: float = 0.2,
    layer: str | None = None,
    spatial_key: str = "spatial",
    tissue_key: str | None = "in_tissue",
    kernel: Literal["gaussian", "student"] = "gaussian",
    nu: float = 1.0,
    kernel_method: Literal["auto", "fft", "sparse"] = "auto",
    seed: int = 0,
) -> AnnData:
    """Diffuse known counts with the forward model and draw Poisson counts.

    Parameters
    ----------
    adata
        Truth counts (``.X`` or ``layer``) on every spot of the array; counts on spots
        outside the tissue (``obs[tissue_key] == 0``) are ignored (the truth is 0 there).
    sigma, bleed, background
        Parameters of the forward model (``sigma`` in spot spacings).
    layer, spatial_key, tissue_key
        Where the truth, coordinates and the tissue flag are.
    kernel, nu
        Profile of the generating kernel (``"student"``: heavy tails, ``nu`` degrees).
    kernel_method
        As :func:`undiffuse`.
    seed
        Seed of the Poisson draw.

    Returns
    -------
    AnnData
        A new object: simulated counts in ``.X`` (CSR float32), the truth (zero outside the
        tissue) in ``layers["truth"]``, parameters in ``uns["simulate_diffusion"]``.
    """
    from chronotope.undiffuse import DiffusionOperator, make_kernel

    x, _ = _counts(adata, layer)
    tis = _tissue(adata, tissue_key)
    coords, spacing, lattice = _geometry(adata, spatial_key, kernel_method)
    k = make_kernel(
        coords,
        float(sigma),
        lattice=lattice,
        method=kernel_method,
        kind=kernel,
        nu=nu,
        dtype=torch.float64,
    )
    op = DiffusionOperator(k, tis, float(bleed), float(background))
    rng = np.random.default_rng(seed)
    xt = x[np.flatnonzero(tis)]
    cols = []
    step = 256
    for lo in range(0, x.shape[1], step):
        z = torch.as_tensor(xt[:, lo : lo + step].toarray(), dtype=torch.float64)
        rate = op.forward(z).clamp_min(0.0).numpy()
        cols.append(sp.csr_matrix(rng.poisson(rate).astype(np.float32)))
    sim = AnnData(sp.hstack(cols, format="csr"), obs=adata.obs.copy(), var=adata.var.copy())
    sim.obsm[spatial_key] = np.asarray(adata.obsm[spatial_key]).copy()
    truth = sp.csr_matrix(x, dtype=np.float32)
    truth = sp.csr_matrix(sp.diags(tis.astype(np.float32)) @ truth)
    truth.eliminate_zeros()
    sim.layers["truth"] = truth
    sim.uns["simulate_diffusion"] = {
        "params": {
            "sigma": float(sigma),
            "bleed": float(bleed),
            "background": float(background),
            "kernel": kernel,
            "nu": float(nu),
            "seed": int(seed),
            "spacing": spacing,
        }
    }
    return sim
