"""Tissue without an in-tissue flag: learned count cut (gradient), H&E image mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chronotope.undiffuse import DiffusionOperator, infer_lattice, make_kernel
from chronotope.undiffuse.tissue import image_tissue, learn_tissue, otsu_threshold, soft_mask_loss
from test_undiffuse import _adata, _grid


def _totals():
    ad, _ = _adata(sigma=1.5, bleed=0.5, background=0.2)
    coords, tissue = _grid()
    return np.asarray(ad.X.sum(axis=1)).ravel(), coords, tissue, ad


def test_soft_cut_has_gradient_at_init():
    t, coords, _, _ = _totals()
    lat = infer_lattice(coords)
    op = DiffusionOperator(
        make_kernel(coords, 1.5, lattice=lat, dtype=torch.float64), np.ones(t.size, bool), 0.5, 0.2
    )
    ell = np.log1p(t)
    tt, el = torch.as_tensor(t), torch.as_tensor(ell)
    c = torch.tensor(otsu_threshold(ell) - 0.5, dtype=torch.float64, requires_grad=True)
    soft_mask_loss(tt, el, c, 0.25 * float(ell.std()), op).backward()
    assert np.isfinite(float(c.grad)) and float(c.grad) < 0  # cut too low: push it up


def _best_cut_accuracy(t, tissue):
    ell = np.log1p(t)
    return max(np.mean((ell > c) == tissue) for c in np.unique(ell))


def test_learn_tissue_recovers_simulated_tissue():
    t, coords, tissue, _ = _totals()
    lat = infer_lattice(coords)
    best = _best_cut_accuracy(t, tissue)  # no cut separates this small array perfectly
    kw = {"lattice": lat, "sigma": 1.5, "bleed": 0.5, "background": 0.2, "n_rounds": 1}
    kw["n_steps"] = 60
    low = otsu_threshold(np.log1p(t)) - 1.0  # a poor start
    fit = learn_tissue(t, coords, cut_init=low, **kw)
    high = learn_tissue(t, coords, cut_init=low + 2.0, **kw)
    assert fit.grad_init < 0 < high.grad_init  # the gradient points to the edge from both sides
    assert abs(fit.cut - high.cut) < 0.05
    assert np.mean(fit.mask == tissue) >= best - 0.015
    # parameters estimated too
    fit2 = learn_tissue(t, coords, lattice=lat, n_rounds=1, n_steps=60, n_iter=80)
    assert np.mean(fit2.mask == tissue) >= best - 0.03
    assert abs(fit2.sigma - 1.5) < 0.5


def test_image_tissue_mask_from_saturation():
    coords, tissue = _grid()
    img = np.ones((260, 260, 3))  # white background
    px = coords * 10 + 10
    yy, xx = np.mgrid[0:260, 0:260]
    c = px[tissue].mean(axis=0)
    disc = (xx - c[0]) ** 2 + (yy - c[1]) ** 2 <= (px[tissue] - c).__abs__().max() ** 2
    img[disc] = [0.8, 0.4, 0.6]  # pink tissue
    prob, _, _ = image_tissue(img, px, 3.0)
    assert np.mean((prob > 0.5) == disc[px[:, 1].astype(int), px[:, 0].astype(int)]) > 0.97
    with pytest.raises(ValueError, match="RGB"):
        image_tissue(img[..., 0], px, 3.0)


def test_tl_undiffuse_without_tissue_key():
    import chronotope as ct

    _, coords, tissue, ad = _totals()
    del ad.obs["in_tissue"]
    kw = {"n_iter": 20, "refine": False, "rank": 3, "copy": True, "tissue_key": None}
    out = ct.tl.undiffuse(ad, sigma=1.5, bleed=0.5, background=0.2, **kw)
    est = out.obs["undiffuse_tissue"].to_numpy()
    assert np.mean(est == tissue) >= _best_cut_accuracy(_totals()[0], tissue) - 0.015
    assert out.uns["undiffused"]["tissue"]["method"] == "counts"
    assert out.layers["undiffused"][~est].sum() == 0
    # image path: a pink disc in uns["spatial"] (obsm["spatial"] are "full-res" pixels)
    img = np.ones((250, 250, 3))
    yy, xx = np.mgrid[0:250, 0:250]
    c = coords[tissue].mean(axis=0) * 10
    r = np.sqrt(((coords[tissue] * 10 - c) ** 2).sum(1)).max() + 3.0
    img[(xx - c[0]) ** 2 + (yy - c[1]) ** 2 <= r * r] = [0.8, 0.4, 0.6]
    ad.uns["spatial"] = {
        "lib": {
            "images": {"hires": img},
            "scalefactors": {"tissue_hires_scalef": 1.0, "spot_diameter_fullres": 6.0},
        }
    }
    out = ct.tl.undiffuse(ad, sigma=1.5, bleed=0.5, background=0.2, **kw)
    assert out.uns["undiffused"]["tissue"]["method"] == "image"
    assert np.mean(out.obs["undiffuse_tissue"].to_numpy() == tissue) >= 0.95
    d = out.uns["undiffused"]["diagnostics"]
    assert d["ssim_image_corrected"] is None or -1 <= d["ssim_image_corrected"] <= 1
    with pytest.raises(ValueError, match="tissue_method"):
        ct.tl.undiffuse(ad, tissue_method="nope", **kw)


def test_cli_undiffuse_without_tissue_flag(tmp_path, capsys):
    import anndata

    from chronotope.cli import main

    ad = _totals()[3]
    del ad.obs["in_tissue"]
    ad.write_h5ad(tmp_path / "in.h5ad")
    args = ["undiffuse", str(tmp_path / "in.h5ad"), "-o", str(tmp_path / "out.h5ad")]
    args += ["--tissue-key", "none", "--sigma", "1.5", "--bleed", "0.5", "--background", "0.2"]
    args += ["--n-iter", "10", "--rank", "3"]
    args += ["--figures", str(tmp_path / "fig")]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert (exc.value.code or 0) == 0, capsys.readouterr().err
    out = anndata.read_h5ad(tmp_path / "out.h5ad")
    assert out.layers["undiffused"].shape == ad.shape
    assert "undiffuse_tissue" in out.obs
    assert (tmp_path / "fig" / "out_of_tissue.png").is_file()
