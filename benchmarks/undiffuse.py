"""Benchmark of the diffusion correction (issue 8): known truth, real out-of-tissue, scale.

Run (each part separately keeps runs short on a shared machine)::

    OMP_NUM_THREADS=1 python benchmarks/undiffuse.py truth --data mouse_brain --genes 100
    OMP_NUM_THREADS=1 python benchmarks/undiffuse.py truth --data dlpfc --genes 1000
    OMP_NUM_THREADS=1 python benchmarks/undiffuse.py reference --genes 1000
    OMP_NUM_THREADS=1 python benchmarks/undiffuse.py real
    OMP_NUM_THREADS=1 python benchmarks/undiffuse.py modules --data mouse_brain --genes 100
    OMP_NUM_THREADS=1 python benchmarks/undiffuse.py tissue
    OMP_NUM_THREADS=1 python benchmarks/undiffuse.py image_prior --data mouse_brain --genes 200
    OMP_NUM_THREADS=1 python benchmarks/undiffuse.py scale --spots 50000 --genes 2000
    OMP_NUM_THREADS=1 python benchmarks/undiffuse.py scale --spots 500000 --genes 200

``--device`` (default cpu) and ``--scheduler`` (none, local:N, a Dask address: where the
per-gene batches run) go to every ``tl.undiffuse`` call; the first line names the device.

Known truth: real in-tissue counts (DLPFC 151673 placed on its full 4,992-barcode array,
zero outside the tissue; the raw mouse brain's in-tissue counts) are the sources Z;
``X ~ Poisson(A Z)`` at three settings (mild: sigma 1, bleed 0.3; realistic: sigma 3,
bleed 0.5, background 0.2; mis-specified: heavy-tailed Student-t kernel generating, the
Gaussian fitting). Every line prints per-gene RMSE gap closure ``(RMSE_raw - RMSE) /
(RMSE_raw - RMSE_floor)`` (floor: a Poisson resample of the truth), median Pearson and
log1p-Pearson, the off-tissue mass, the median |delta Moran's I| to the truth, wall time
and the peak resident memory increase of the method.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PeakRSS, add_device_argument, data_dir, use_device

# device= and scheduler= of every tl.undiffuse call (set from --device, --scheduler)
LIB: dict = {}

SETTINGS = {
    "mild": {"sigma": 1.0, "bleed": 0.3, "background": 0.0, "kernel": "gaussian"},
    "realistic": {"sigma": 3.0, "bleed": 0.5, "background": 0.2, "kernel": "gaussian"},
    "misspecified": {"sigma": 2.0, "bleed": 0.5, "background": 0.2, "kernel": "student"},
}


# --------------------------------------------------------------------------- truths
def truth_dlpfc(n_genes: int):
    from anndata import AnnData

    import chronotope as ct
    from chronotope.io._visium import read_tissue_positions

    ad = ct.datasets.dlpfc("151673", load_image=False)
    pos = read_tissue_positions(
        data_dir() / "dlpfc_151673_151674/humanpilot_10x/151673/tissue_positions_list.txt"
    )
    x = sp.csr_matrix(ad.X)
    top = np.argsort(-np.asarray(x.sum(axis=0)).ravel())[:n_genes]
    rows = pos.index.get_indexer(ad.obs_names)
    full = (
        sp.csr_matrix(
            (np.ones(len(rows)), (rows, np.arange(len(rows)))), shape=(len(pos), ad.n_obs)
        )
        @ x[:, top]
    )
    obs = pd.DataFrame(
        {
            "in_tissue": np.isin(np.arange(len(pos)), rows).astype(int),
            "array_row": pos["array_row"].to_numpy(),
            "array_col": pos["array_col"].to_numpy(),
        },
        index=pos.index,
    )
    t = AnnData(sp.csr_matrix(full, dtype=np.float32), obs=obs, var=ad.var.iloc[top][[]])
    t.obsm["spatial"] = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float)
    layer = np.full(len(pos), "nan", dtype=object)
    layer[rows] = ad.obs["layer"].astype(str).to_numpy()
    t.obs["layer"] = layer
    return t


def truth_mouse_brain(n_genes: int):
    import chronotope as ct

    ad = ct.datasets.mouse_brain_raw(load_image=False)
    tis = ad.obs["in_tissue"].to_numpy().astype(bool)
    x = sp.csr_matrix(sp.diags(tis.astype(np.float32)) @ ad.X)
    x.eliminate_zeros()
    ad.X = x
    top = np.argsort(-np.asarray(x.sum(axis=0)).ravel())[:n_genes]
    return ad[:, top].copy()


# --------------------------------------------------------------------------- baselines
def mask_rescale(x: sp.csr_matrix, tis: np.ndarray) -> np.ndarray:
    d = x.toarray().astype(np.float64)
    tot = d.sum(axis=0)
    d[~tis] = 0
    return d * (tot / np.maximum(d.sum(axis=0), 1e-300))


def rl_guessed(sim, sigma: float = 1.5, n_iter: int = 30) -> np.ndarray:
    import chronotope as ct

    out = ct.tl.undiffuse(
        sim,
        sigma=sigma,
        bleed=1.0,
        background=0.0,
        method="pergene",
        n_iter=n_iter,
        diagnostics=False,
        copy=True,
        **LIB,
    )
    return out.layers["undiffused"].toarray()


def seed_pot(sim, genes: np.ndarray, reg: float = 1.0) -> tuple[np.ndarray, float, float]:
    """Seed 003 per gene with POT: Moran-maximising soft threshold b, balanced Sinkhorn a -> b.

    Returns the corrected field (plan column sums times the gene total), the largest
    |plan^T 1 - b| (it is b again), and seconds per gene.
    """
    import ot

    from chronotope.graph import knn_graph
    from chronotope.undiffuse.metrics import morans_i

    xy = np.asarray(sim.obsm["spatial"], float)
    from chronotope.undiffuse import spot_spacing

    xy = xy / spot_spacing(xy)
    m = ot.dist(xy, xy)  # squared Euclidean, N x N dense (the seed's cost)
    w, _ = knn_graph(xy, 6)
    x = sim.X.tocsc()
    out = np.zeros((sim.n_obs, len(genes)))
    worst = 0.0
    t0 = time.perf_counter()
    for k, g in enumerate(genes):
        v = x[:, g].toarray().ravel().astype(np.float64)
        qs = np.linspace(0.0, 0.95, 20)
        best, bq = -np.inf, 0.0
        rng = v.max() - v.min() or 1.0
        for q in qs:
            cut = np.quantile(v, q)
            b = v / (1 + np.exp(-50 * (v - cut) / rng))
            mi = morans_i(b[:, None], w)[0]
            if mi > best:
                best, bq = mi, q
        cut = np.quantile(v, bq)
        b = v / (1 + np.exp(-50 * (v - cut) / rng))
        a, bb = v / v.sum(), b / b.sum()
        plan = ot.bregman.sinkhorn_stabilized(a, bb, m, reg, numItermax=200)
        col = plan.sum(axis=0)
        worst = max(worst, float(np.abs(col - bb).max() / bb.max()))
        out[:, k] = col * v.sum()
    return out, worst, (time.perf_counter() - t0) / len(genes)


# --------------------------------------------------------------------------- scoring
def score(name, est, truth, raw, floor, tis, w_t, mi_truth, top, extra=""):
    from chronotope.undiffuse.metrics import (
        gap_closure,
        morans_i,
        per_gene_pearson,
        per_gene_rmse,
    )

    est = est.toarray() if sp.issparse(est) else np.asarray(est, dtype=np.float64)
    gc = gap_closure(
        per_gene_rmse(est, truth), per_gene_rmse(raw, truth), per_gene_rmse(floor, truth)
    )
    t_in = np.flatnonzero(tis)
    pear = per_gene_pearson(est[t_in], truth[t_in])
    lpear = per_gene_pearson(est[t_in], truth[t_in], log1p=True)
    oot = est[~tis].sum() / max(est.sum(), 1e-300)
    mi = morans_i(est[t_in][:, top], w_t)
    dmi = np.nanmedian(np.abs(mi - mi_truth))
    return (
        f"{name:<22} gap_closure_median {np.nanmedian(gc):6.3f}  mean {np.nanmean(gc):6.3f}  "
        f"pearson {np.nanmedian(pear):.4f}  log1p_pearson {np.nanmedian(lpear):.4f}  "
        f"off_tissue_mass {oot:.4f}  |dMoranI| {dmi:.4f}{extra}"
    )


def run_truth(args) -> None:
    import chronotope as ct
    from chronotope.graph import knn_graph
    from chronotope.undiffuse.metrics import morans_i

    truth_ad = truth_dlpfc(args.genes) if args.data == "dlpfc" else truth_mouse_brain(args.genes)
    tis = truth_ad.obs["in_tissue"].to_numpy().astype(bool)
    truth = truth_ad.X.toarray().astype(np.float64)
    floor = np.random.default_rng(99).poisson(truth).astype(np.float64)
    t_in = np.flatnonzero(tis)
    w_t, _ = knn_graph(np.asarray(truth_ad.obsm["spatial"], float)[t_in], 6)
    top = np.argsort(-truth.sum(axis=0))[: min(200, truth.shape[1])]
    mi_truth = morans_i(truth[t_in][:, top], w_t)
    print(
        f"# truth {args.data}: {truth_ad.n_obs} spots ({tis.sum()} tissue) x {truth_ad.n_vars} "
        f"genes, median UMI per tissue spot {np.median(truth[tis].sum(1)):.0f}"
    )
    for setting in args.settings:
        p = SETTINGS[setting]
        sim = ct.tl.simulate_diffusion(
            truth_ad,
            p["sigma"],
            p["bleed"],
            background=p["background"],
            kernel=p["kernel"],
            seed=1,
        )
        raw = sim.X.toarray().astype(np.float64)
        print(f"## {args.data} {setting}: generating {p}")

        def sc(n, e, x="", raw=raw):
            return score(n, e, truth, raw, floor, tis, w_t, mi_truth, top, x)

        print(sc("raw", raw))
        print(sc("mask_and_rescale", mask_rescale(sim.X, tis)))
        with PeakRSS() as m:
            est = rl_guessed(sim)
        print(
            sc(
                "rl_guessed_sigma1.5",
                est,
                f"  time_s {m.wall:.1f}  peak_rss_gb +{m.delta / 2**30:.2f}",
            )
        )
        with PeakRSS() as m:
            out = ct.tl.undiffuse(sim, copy=True, diagnostics=False, **LIB)
        u = out.uns["undiffused"]
        print(
            sc(
                "undiffuse_estimated",
                out.layers["undiffused"],
                f"  time_s {m.wall:.1f}  peak_rss_gb +{m.delta / 2**30:.2f}  "
                f"sigma {u['sigma']:.3f} "
                f"bleed {u['bleed']:.3f} background {u['background']:.3f} "
                f"n_iter {int(out.var['undiffused_n_iter'].iloc[0])}",
            )
        )
        if args.pergene:
            with PeakRSS() as m:
                out = ct.tl.undiffuse(sim, copy=True, diagnostics=False, method="pergene", **LIB)
            print(
                sc(
                    "undiffuse_pergene",
                    out.layers["undiffused"],
                    f"  time_s {m.wall:.1f}  peak_rss_gb +{m.delta / 2**30:.2f}",
                )
            )
        if args.seed_genes:
            genes = top[: args.seed_genes]
            with PeakRSS() as m:
                est, worst, per = seed_pot(sim, genes)

            def sub(a, genes=genes):
                return a[:, genes]

            line = score(
                f"seed_pot_{len(genes)}genes",
                est,
                sub(truth),
                sub(raw),
                sub(floor),
                tis,
                w_t,
                mi_truth[: len(genes)],
                np.arange(len(genes)),
                f"  s_per_gene {per:.1f}  peak_rss_gb +{m.delta / 2**30:.2f}  "
                f"max|plan^T1-b|/max(b) {worst:.2e}",
            )
            print(line)
            print(
                score(
                    f"raw_same_{len(genes)}genes",
                    raw[:, genes],
                    sub(truth),
                    sub(raw),
                    sub(floor),
                    tis,
                    w_t,
                    mi_truth[: len(genes)],
                    np.arange(len(genes)),
                )
            )


def run_reference(args) -> None:
    """Matching reference (adjacent slice 151674 layer profiles) vs mismatched vs none."""
    import chronotope as ct
    from chronotope.undiffuse.metrics import gap_closure, per_gene_pearson, per_gene_rmse

    truth_ad = truth_dlpfc(args.genes)
    tis = truth_ad.obs["in_tissue"].to_numpy().astype(bool)
    truth = truth_ad.X.toarray().astype(np.float64)
    floor = np.random.default_rng(99).poisson(truth).astype(np.float64)
    p = SETTINGS["realistic"]
    sim = ct.tl.simulate_diffusion(
        truth_ad, p["sigma"], p["bleed"], background=p["background"], seed=1
    )
    raw = sim.X.toarray().astype(np.float64)
    ref = ct.datasets.dlpfc("151674", load_image=False)
    ref = ref[ref.obs["layer"].notna()].copy()
    rng = np.random.default_rng(0)
    mis = ref.copy()
    mis.var_names = np.asarray(ref.var_names)[rng.permutation(ref.n_vars)]
    n_shared = len(truth_ad.var_names.intersection(ref.var_names))
    print(
        f"# reference: DLPFC 151674 layer means ({n_shared} of {truth_ad.n_vars} genes shared);"
        " mismatched = gene labels permuted"
    )
    for name, r in (("none", None), ("matching_151674", ref), ("mismatched", mis)):
        t0 = time.perf_counter()
        out = ct.tl.undiffuse(
            sim,
            copy=True,
            diagnostics=False,
            reference=r,
            reference_key="layer" if r is not None else None,
            **LIB,
        )
        est = out.layers["undiffused"].toarray()
        gc = gap_closure(
            per_gene_rmse(est, truth), per_gene_rmse(raw, truth), per_gene_rmse(floor, truth)
        )
        lp = per_gene_pearson(est[tis], truth[tis], log1p=True)
        share = out.uns["undiffused"].get("reference_share", 0.0)
        print(
            f"reference {name:<16} gap_closure_median {np.nanmedian(gc):.3f}  log1p_pearson "
            f"{np.nanmedian(lp):.4f}  reference_share {share:.3f}  time_s "
            f"{time.perf_counter() - t0:.1f}"
        )


def run_modules(args) -> None:
    """Two gene groups diffusing with different sigma: one global sigma vs sigma modules."""
    from anndata import AnnData

    import chronotope as ct
    from chronotope.undiffuse.metrics import gap_closure, per_gene_rmse

    truth_ad = truth_dlpfc(args.genes) if args.data == "dlpfc" else truth_mouse_brain(args.genes)
    truth = truth_ad.X.toarray().astype(np.float64)
    floor = np.random.default_rng(99).poisson(truth).astype(np.float64)
    g = truth.shape[1]
    if args.split == "random":
        group = np.random.default_rng(0).permutation(np.arange(g) % 2)
    else:  # two spatial co-expression modules of the truth itself
        from chronotope.undiffuse.modules import gene_modules

        group = gene_modules(truth_ad.X, np.asarray(truth_ad.obsm["spatial"]), 2)
    p = SETTINGS["realistic"]
    cases = {
        f"two_sigma_{args.split}": (2.0, 4.0),
        "single_sigma": (p["sigma"], p["sigma"]),
    }
    for case, sig in cases.items():
        parts = []
        for k in (0, 1):
            cols = np.flatnonzero(group == k)
            sim_k = ct.tl.simulate_diffusion(
                truth_ad[:, cols].copy(),
                sig[k],
                p["bleed"],
                background=p["background"],
                seed=1 + k,
            )
            parts.append((cols, sim_k))
        x = sp.lil_matrix(truth.shape, dtype=np.float32)
        for cols, sim_k in parts:
            x[:, cols] = sim_k.X
        sim = AnnData(sp.csr_matrix(x), obs=parts[0][1].obs.copy(), var=truth_ad.var.copy())
        sim.obsm["spatial"] = parts[0][1].obsm["spatial"]
        raw = sim.X.toarray().astype(np.float64)
        rr, rf = per_gene_rmse(raw, truth), per_gene_rmse(floor, truth)
        print(
            f"## modules {args.data} {case}: group sizes {np.bincount(group).tolist()}, sigma "
            f"{sig}, bleed {p['bleed']}, background {p['background']}"
        )
        for sm in (None, 2):
            with PeakRSS() as m:
                out = ct.tl.undiffuse(sim, copy=True, diagnostics=False, sigma_modules=sm, **LIB)
            u = out.uns["undiffused"]
            gc = gap_closure(per_gene_rmse(out.layers["undiffused"].toarray(), truth), rr, rf)
            by = "  ".join(
                f"group{k}(sigma {sig[k]:g}) {np.nanmedian(gc[group == k]):.3f}" for k in (0, 1)
            )
            extra = ""
            if sm is not None:
                mo = u["modules"]
                lab = out.var["undiffused_module"].to_numpy()
                agree = max(np.mean(lab == group), np.mean(lab != group))
                extra = (
                    f"  module_sigma {np.round(mo['sigma'], 3).tolist()} multipliers "
                    f"{np.round(mo['multiplier'], 3).tolist()} module/group agreement {agree:.3f}"
                )
            print(
                f"{'global_sigma' if sm is None else 'sigma_modules=2':<16} gap_closure_median "
                f"{np.nanmedian(gc):.3f}  {by}  sigma {u['sigma']:.3f}  time_s {m.wall:.1f}"
                f"{extra}"
            )


def run_tissue(args) -> None:
    """No in-tissue flag: H&E mask and learned count cut on the real raw mouse brain;
    the realistic simulation corrected without its mask (off-tissue mass cut)."""
    import chronotope as ct
    from chronotope.undiffuse.metrics import gap_closure, per_gene_rmse

    ad = ct.datasets.mouse_brain_raw(load_image=True)
    flag = ad.obs["in_tissue"].to_numpy().astype(bool)
    x = sp.csr_matrix(ad.X)
    before = x[~flag].sum() / x.sum()
    for how, kw in (
        ("obs_in_tissue", {"tissue_key": "in_tissue"}),
        ("he_image", {"tissue_key": None, "tissue_method": "image"}),
        ("learned_count_cut", {"tissue_key": None, "tissue_method": "counts"}),
    ):
        with PeakRSS() as m:
            out = ct.tl.undiffuse(ad, copy=True, **kw, **LIB)
        u = out.uns["undiffused"]
        mask = out.obs["undiffuse_tissue"].to_numpy() if how != "obs_in_tissue" else flag
        lay = out.layers["undiffused"]
        after = lay[~flag].sum() / lay.sum()
        d = u["diagnostics"]
        ssim = ""
        if "ssim_image_corrected" in d and d["ssim_image_corrected"] is not None:
            ssim = (
                f"  SSIM(image, log1p totals) raw {d['ssim_image_raw']:.3f} -> corrected "
                f"{d['ssim_image_corrected']:.3f}"
            )
        print(
            f"tissue real mouse_brain_raw {how:<18} mask agreement with obs in_tissue "
            f"{np.mean(mask == flag):.4f} ({int(mask.sum())} vs {int(flag.sum())} spots)  "
            f"UMI fraction outside obs in_tissue {before:.4f} -> {after:.4f}  sigma "
            f"{u['sigma']:.3f} bleed {u['bleed']:.3f} background {u['background']:.3f}  "
            f"time_s {m.wall:.1f}{ssim}"
        )
    truth_ad = truth_mouse_brain(args.genes)
    tis, truth, sim, raw, rr, rf = realistic_simulation(truth_ad)
    off_raw = raw[~tis].sum() / raw.sum()
    for how, kw in (
        ("mask_given", {"tissue_key": "in_tissue"}),
        ("no_mask_learned_cut", {"tissue_key": None, "tissue_method": "counts"}),
    ):
        with PeakRSS() as m:
            out = ct.tl.undiffuse(sim, copy=True, diagnostics=False, **kw, **LIB)
        u = out.uns["undiffused"]
        est = out.layers["undiffused"].toarray()
        gc = gap_closure(per_gene_rmse(est, truth), rr, rf)
        off = est[~tis].sum() / est.sum()
        mask = out.obs["undiffuse_tissue"].to_numpy() if "tissue" in u else tis
        print(
            f"tissue sim mouse_brain realistic {how:<20} gap_closure_median "
            f"{np.nanmedian(gc):.3f}  off_tissue_mass {off_raw:.4f} -> {off:.4f} (cut "
            f"{100 * (1 - off / off_raw):.1f} %)  mask agreement {np.mean(mask == tis):.4f}  "
            f"sigma {u['sigma']:.3f} bleed {u['bleed']:.3f} background {u['background']:.3f}  "
            f"time_s {m.wall:.1f}"
        )


def realistic_simulation(truth_ad):
    """The realistic setting on ``truth_ad``: (tissue mask, truth, simulated AnnData, raw
    counts, per-gene RMSE of raw and of the Poisson floor)."""
    import chronotope as ct
    from chronotope.undiffuse.metrics import per_gene_rmse

    tis = truth_ad.obs["in_tissue"].to_numpy().astype(bool)
    truth = truth_ad.X.toarray().astype(np.float64)
    floor = np.random.default_rng(99).poisson(truth).astype(np.float64)
    p = SETTINGS["realistic"]
    sim = ct.tl.simulate_diffusion(
        truth_ad, p["sigma"], p["bleed"], background=p["background"], seed=1
    )
    raw = sim.X.toarray().astype(np.float64)
    rr, rf = per_gene_rmse(raw, truth), per_gene_rmse(floor, truth)
    return tis, truth, sim, raw, rr, rf


def run_image_prior(args) -> None:
    """Realistic simulation on real counts with the real H&E image attached: no prior,
    the image prior ("auto": strength by held-out thinned totals), and a control with
    the image mirrored left-right (misaligned: it should not be used, or not hurt)."""
    import chronotope as ct
    from chronotope.tl._undiffuse_tissue import find_image
    from chronotope.undiffuse.metrics import gap_closure, per_gene_pearson, per_gene_rmse
    from chronotope.undiffuse.prior import image_density

    if args.data == "dlpfc":
        truth_ad = truth_dlpfc(args.genes)
        spatial = ct.datasets.dlpfc("151673", load_image=True).uns["spatial"]
    else:
        truth_ad = truth_mouse_brain(args.genes)
        spatial = ct.datasets.mouse_brain_raw(load_image=True).uns["spatial"]
    tis, truth, sim, raw, rr, rf = realistic_simulation(truth_ad)
    sim.uns["spatial"] = spatial
    img = find_image(sim, "spatial")
    dens, names = image_density(*img)
    tt = truth[tis].sum(axis=1)
    cors = [np.corrcoef(np.log(dens[tis, k] + 1e-6), np.log1p(tt))[0, 1] for k in range(len(names))]
    print(
        f"# image_prior {args.data}: {truth_ad.n_vars} genes, {int(tis.sum())} tissue spots, "
        f"image {list(img[0].shape)}, spot radius {img[2]:.2f} px; corr(log image density, "
        f"log1p truth totals) on tissue: "
        + ", ".join(f"{n} {c:.3f}" for n, c in zip(names, cors, strict=True))
    )
    lib = next(iter(spatial))
    mirrored = {lib: dict(spatial[lib])}
    mirrored[lib]["images"] = {
        k: np.ascontiguousarray(v[:, ::-1]) for k, v in spatial[lib]["images"].items()
    }

    def line(name, out, m):
        u = out.uns["undiffused"]
        est = out.layers["undiffused"].toarray().astype(np.float64)
        gc = gap_closure(per_gene_rmse(est, truth), rr, rf)
        lp = per_gene_pearson(est[tis], truth[tis], log1p=True)
        pe = per_gene_pearson(est[tis], truth[tis])
        tot_rmse = np.sqrt(np.mean((est[tis].sum(1) - tt) ** 2))
        ip = u["image_prior"]
        extra = ""
        if "heldout_gain" in ip:
            extra = (
                f"  heldout_gain {ip['heldout_gain']:.1f}  corr(log totals, log mu) "
                f"{ip['correlation_totals']:.3f}"
            )
        print(
            f"image_prior {args.data} {name:<10} gap_closure_median {np.nanmedian(gc):.3f}  "
            f"mean {np.nanmean(gc):.3f}  pearson {np.nanmedian(pe):.4f}  log1p_pearson "
            f"{np.nanmedian(lp):.4f}  spot_total_rmse {tot_rmse:.2f}  alpha "
            f"{u['params']['image_prior_alpha']:g}{extra}  sigma {u['sigma']:.3f}  time_s "
            f"{m.wall:.1f}",
            flush=True,
        )

    raw_tot = np.sqrt(np.mean((raw[tis].sum(1) - tt) ** 2))
    lp_raw = np.nanmedian(per_gene_pearson(raw[tis], truth[tis], log1p=True))
    print(
        f"image_prior {args.data} raw        log1p_pearson {lp_raw:.4f}  spot_total_rmse "
        f"{raw_tot:.2f}"
    )
    for name, uns, ip in (
        ("none", spatial, False),
        ("auto", spatial, "auto"),
        ("mirrored", mirrored, "auto"),
    ):
        sim.uns["spatial"] = uns
        with PeakRSS() as m:
            out = ct.tl.undiffuse(sim, copy=True, diagnostics=False, image_prior=ip, **LIB)
        line(name, out, m)
    if args.alpha:
        sim.uns["spatial"] = spatial
        for a in args.alpha:
            with PeakRSS() as m:
                out = ct.tl.undiffuse(sim, copy=True, diagnostics=False, image_prior=a, **LIB)
            line(f"alpha={a:g}", out, m)


def run_real(args) -> None:
    import chronotope as ct

    ad = ct.datasets.mouse_brain_raw(load_image=False)
    with PeakRSS() as m:
        ct.tl.undiffuse(ad, **LIB)
    u = ad.uns["undiffused"]
    d = u["diagnostics"]
    print(
        f"real mouse_brain_raw ({ad.n_obs} barcodes, {int(ad.obs['in_tissue'].sum())} tissue): "
        f"UMI fraction outside tissue {d['out_of_tissue_fraction_before']:.4f} -> "
        f"{d['out_of_tissue_fraction_after']:.4f}; sigma {u['sigma']:.3f} spacings, bleed "
        f"{u['bleed']:.3f}, background {u['background']:.3f}; median diffusion_fraction in "
        f"tissue {np.median(ad.obs['diffusion_fraction'][ad.obs['in_tissue'] == 1]):.3f}; "
        f"Moran's I median {d['morans_i_median_raw']:.3f} -> "
        f"{d['morans_i_median_undiffused']:.3f}; time_s {m.wall:.1f} peak_rss_gb "
        f"+{m.delta / 2**30:.2f}"
    )


def run_scale(args) -> None:
    """Synthetic array tiled from real DLPFC profiles (counts as observed)."""
    from anndata import AnnData

    import chronotope as ct

    src = ct.datasets.dlpfc("151673", load_image=False)
    x = sp.csr_matrix(src.X)
    top = np.argsort(-np.asarray(x.sum(axis=0)).ravel())[: args.genes]
    x = x[:, top]
    n = args.spots
    if args.lattice == "hex":
        side = round(np.sqrt(n))
        r, c = np.meshgrid(np.arange(side), np.arange(2 * side), indexing="ij")
        keep = (r + c) % 2 == 0
        r, c = r[keep], c[keep]
        xy = np.c_[c * 0.5, r * np.sqrt(3) / 2] * 100.0
    else:
        side = round(np.sqrt(n))
        r, c = np.divmod(np.arange(side * side), side)
        xy = np.c_[c, r].astype(float) * 10.0
    n = r.size
    centre = xy.mean(axis=0)
    rad = np.sqrt(((xy - centre) ** 2).sum(1))
    tis = rad <= 0.45 * (xy.max(0) - xy.min(0)).min()
    pick = np.random.default_rng(0).integers(0, x.shape[0], n)
    obs_x = x[pick]
    # outside the tissue: a tenth of a random spot's counts (background-like)
    bgr = sp.diags(np.where(tis, 1.0, 0.1)) @ obs_x
    bgr.data = np.random.default_rng(1).poisson(bgr.data).astype(np.float32)
    bgr.eliminate_zeros()
    obs = pd.DataFrame({"in_tissue": tis.astype(int)}, index=[f"s{i}" for i in range(n)])
    if args.lattice == "hex":
        obs["array_row"], obs["array_col"] = r, c
    ad = AnnData(sp.csr_matrix(bgr, dtype=np.float32), obs=obs)
    ad.obsm["spatial"] = xy
    del src, x, obs_x
    kw = {"n_iter": args.n_iter if args.n_iter != "auto" else "auto"}
    if args.fixed:  # skip the estimation: sigma 1.5, bleed 0.3, background 0.1
        kw.update(sigma=1.5, bleed=0.3, background=0.1)
    with PeakRSS() as m:
        ct.tl.undiffuse(ad, rank=args.rank, diagnostics=False, **kw, **LIB)
    u = ad.uns["undiffused"]
    print(
        f"scale {args.lattice} {n} spots x {args.genes} genes (nnz {ad.X.nnz}): time_s "
        f"{m.wall:.1f} (estimate {u['seconds_estimate']:.1f}, fit {u['seconds_fit']:.1f}), "
        f"peak_rss_gb {m.peak / 2**30:.2f} (+{m.delta / 2**30:.2f}), rank {args.rank}, n_iter "
        f"{args.n_iter}, kernel {u['kernel_method']}, sigma {u['sigma']:.2f}, cpu_s {m.cpu:.1f}"
    )


def run_scale_tiled(args) -> None:
    """Scale on tiles of the real DLPFC 151673 array (layers stay contiguous in a tile).

    The full 4,992-barcode array with its real tissue counts (zero outside) is repeated
    on a grid of tiles until ``--spots`` is reached, then diffused by the forward model
    (sigma 2, bleed 0.3, background 0.1) and Poisson-sampled: spatial structure and
    out-of-tissue spots as on a real array, so sigma is identifiable.
    """
    import chronotope as ct

    one = truth_dlpfc(args.genes)
    k = max(1, round(args.spots / one.n_obs))
    tr = int(np.floor(np.sqrt(k)))
    while k % tr:
        tr -= 1
    tc = k // tr
    h = int(one.obs["array_row"].max()) + 1
    h += h % 2  # keep the row + col parity of the hex array
    w = int(one.obs["array_col"].max()) + 1
    w += w % 2
    rows, cols, tis, xs = [], [], [], []
    for a in range(tr):
        for b in range(tc):
            rows.append(one.obs["array_row"].to_numpy() + a * h)
            cols.append(one.obs["array_col"].to_numpy() + b * w)
            tis.append(one.obs["in_tissue"].to_numpy())
            xs.append(one.X)
    from anndata import AnnData

    r, c = np.concatenate(rows), np.concatenate(cols)
    obs = pd.DataFrame(
        {"in_tissue": np.concatenate(tis), "array_row": r, "array_col": c},
        index=[f"s{i}" for i in range(r.size)],
    )
    truth = AnnData(sp.vstack(xs, format="csr"), obs=obs, var=one.var.copy())
    truth.obsm["spatial"] = np.c_[c * 0.5, r * np.sqrt(3) / 2] * 100.0
    del one, xs
    sim = ct.tl.simulate_diffusion(truth, 2.0, 0.3, background=0.1, seed=1)
    del truth
    ad = AnnData(sim.X, obs=sim.obs, var=sim.var)
    ad.obsm["spatial"] = sim.obsm["spatial"]
    del sim
    kw = {"n_iter": args.n_iter if args.n_iter != "auto" else "auto"}
    with PeakRSS() as m:
        ct.tl.undiffuse(ad, rank=args.rank, diagnostics=False, **kw, **LIB)
    u = ad.uns["undiffused"]
    print(
        f"scale tiled_dlpfc {tr}x{tc} tiles, {ad.n_obs} spots ({int(ad.obs['in_tissue'].sum())} "
        f"tissue) x {args.genes} genes (nnz {ad.X.nnz}): time_s {m.wall:.1f} (estimate "
        f"{u['seconds_estimate']:.1f}, fit {u['seconds_fit']:.1f}), peak_rss_gb "
        f"{m.peak / 2**30:.2f} (+{m.delta / 2**30:.2f}), rank {args.rank}, n_iter {args.n_iter}, "
        f"kernel {u['kernel_method']}, sigma {u['sigma']:.2f} (true 2), bleed {u['bleed']:.3f} "
        f"(0.3), background {u['background']:.3f} (0.1), cpu_s {m.cpu:.1f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "part",
        choices=["truth", "reference", "real", "scale", "modules", "tissue", "image_prior"],
    )
    ap.add_argument("--data", choices=["dlpfc", "mouse_brain"], default="mouse_brain")
    ap.add_argument("--genes", type=int, default=100)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS))
    ap.add_argument("--seed-genes", type=int, default=0, help="genes for the seed's POT run")
    ap.add_argument("--pergene", action="store_true", help="also the per-gene EM")
    ap.add_argument("--spots", type=int, default=50000)
    ap.add_argument("--lattice", choices=["hex", "square"], default="hex")
    ap.add_argument("--rank", type=int, default=30)
    ap.add_argument("--n-iter", default="auto")
    ap.add_argument("--fixed", action="store_true", help="scale: give the parameters")
    add_device_argument(ap)
    ap.add_argument(
        "--scheduler",
        default="none",
        help="where the gene batches run: none, local:N or a Dask scheduler address",
    )
    ap.add_argument("--split", choices=["coexpression", "random"], default="coexpression")
    ap.add_argument(
        "--layout", choices=["tiled", "random"], default="tiled", help="scale: tissue layout"
    )
    ap.add_argument(
        "--alpha", type=float, nargs="*", default=[], help="image_prior: fixed strengths too"
    )
    args = ap.parse_args()
    sched = None if args.scheduler == "none" else args.scheduler
    LIB.update(device=args.device, scheduler=sched)
    print(f"{use_device(args.device)}; scheduler {args.scheduler}", flush=True)
    if args.n_iter != "auto":
        args.n_iter = int(args.n_iter)
    logging.getLogger("chronotope").setLevel(logging.WARNING)
    import torch

    torch.set_num_threads(1)
    parts = {"truth": run_truth, "reference": run_reference, "real": run_real}
    parts.update(scale=run_scale, modules=run_modules, tissue=run_tissue)
    parts["image_prior"] = run_image_prior
    if args.part == "scale" and args.layout == "tiled" and args.lattice == "hex":
        parts["scale"] = run_scale_tiled
    parts[args.part](args)


if __name__ == "__main__":
    main()
