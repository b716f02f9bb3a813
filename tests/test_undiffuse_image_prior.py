"""H&E image as a prior on spot total densities in ``tl.undiffuse`` (image_prior)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from anndata import AnnData

import chronotope as ct
from chronotope.undiffuse import DiffusionOperator, infer_lattice, make_kernel
from chronotope.undiffuse.metrics import per_gene_rmse
from chronotope.undiffuse.prior import GammaImagePrior, image_density, select_strength
from test_undiffuse import _grid

_H = np.array([0.65, 0.70, 0.29]) / np.linalg.norm([0.65, 0.70, 0.29])


def _case(seed: int = 0, n_genes: int = 10):
    """Truth = per-spot density d (log-normal, spot to spot) times smooth gene profiles."""
    coords, tissue = _grid()
    rng = np.random.default_rng(seed)
    centres = rng.uniform(6, 18, (3, 2))
    prof = np.stack([np.exp(-((coords - c) ** 2).sum(1) / 30.0) for c in centres], 1)
    w = rng.gamma(2.0, 1.0, (3, n_genes))
    p = prof @ w + 0.2
    p = p / p.sum(axis=1, keepdims=True)
    d = np.exp(rng.normal(0.0, 0.6, coords.shape[0])) * 60.0
    z = d[:, None] * p
    z[~tissue] = 0
    z = rng.poisson(z).astype(np.float64)
    lat = infer_lattice(coords)
    op = DiffusionOperator(
        make_kernel(coords, 1.5, lattice=lat, dtype=torch.float64), tissue, 0.6, 0.1
    )
    x = rng.poisson(op.forward(torch.as_tensor(z[tissue])).numpy()).astype(np.float32)
    ad = AnnData(
        sp.csr_matrix(x),
        obs=pd.DataFrame({"in_tissue": tissue.astype(int)}, index=[f"s{i}" for i in range(len(x))]),
    )
    ad.var_names = [f"g{j}" for j in range(n_genes)]
    ad.obsm["spatial"] = coords * 10.0 + 5.0
    return ad, z, d, tissue


def _image(ad: AnnData, od_per_spot: np.ndarray) -> dict:
    """A 'hires' image: each spot's 10 x 10 pixel cell stained with hematoxylin OD."""
    n = int(np.sqrt(ad.n_obs))
    od = np.zeros((10 * n, 10 * n))
    ij = ((ad.obsm["spatial"] - 5.0) / 10.0).astype(int)
    for (i, j), v in zip(ij, od_per_spot, strict=True):
        od[10 * j : 10 * j + 10, 10 * i : 10 * i + 10] = v
    img = 10.0 ** (-od[..., None] * _H[None, None, :])
    return {
        "lib": {
            "images": {"hires": img},
            "scalefactors": {"tissue_hires_scalef": 1.0, "spot_diameter_fullres": 6.0},
        }
    }


_KW = {"sigma": 1.5, "bleed": 0.6, "background": 0.1, "rank": 4, "copy": True}
_KW.update(diagnostics=False, refine=False)


def _rmse(out, z, tissue):
    return float(np.median(per_gene_rmse(out.layers["undiffused"].toarray(), z)))


def test_image_density_reads_hematoxylin():
    ad, _, d, _tissue = _case()
    od = 0.1 + 0.5 * d / d.max()
    lib = _image(ad, od)["lib"]
    dens, names = image_density(lib["images"]["hires"], ad.obsm["spatial"], 3.0)
    assert names[0] == "hematoxylin_od" and dens.shape == (ad.n_obs, 3)
    assert np.corrcoef(dens[:, 0], od)[0, 1] > 0.99
    assert np.abs(dens[:, 1]).max() < 0.05  # no eosin in a pure hematoxylin stain


def test_prior_from_informative_image_improves_rmse():
    ad, z, d, tissue = _case()
    none = ct.tl.undiffuse(ad, image_prior=False, **_KW)
    assert none.uns["undiffused"]["params"]["image_prior_alpha"] == 0.0
    ad.uns["spatial"] = _image(ad, 0.05 + 0.4 * d / d.max())
    out = ct.tl.undiffuse(ad, image_prior="auto", **_KW)
    info = out.uns["undiffused"]["image_prior"]
    assert info["used"] and info["alpha"] >= 1
    assert out.uns["undiffused"]["params"]["image_prior_alpha"] == info["alpha"]
    assert info["heldout_gain"] > 0
    assert info["correlation_totals"] > 0.8  # the image explains the totals
    r0, r1 = _rmse(none, z, tissue), _rmse(out, z, tissue)
    assert r1 < 0.92 * r0, (r0, r1)  # measured 1.877 -> 1.624
    # every gene's total is kept; nothing outside the tissue
    np.testing.assert_allclose(
        np.asarray(out.layers["undiffused"].sum(axis=0)).ravel(),
        np.asarray(ad.X.sum(axis=0)).ravel(),
        rtol=1e-4,
    )
    assert out.layers["undiffused"][~tissue].sum() == 0


def test_prior_from_noise_image_is_not_worse():
    ad, z, _d, tissue = _case(seed=1)
    none = ct.tl.undiffuse(ad, image_prior=False, **_KW)
    rng = np.random.default_rng(5)
    ad.uns["spatial"] = _image(ad, rng.uniform(0.05, 0.45, ad.n_obs))
    out = ct.tl.undiffuse(ad, **_KW)  # default "auto" with an image present
    info = out.uns["undiffused"]["image_prior"]
    assert info["mode"] == "auto"
    r0, r1 = _rmse(none, z, tissue), _rmse(out, z, tissue)
    assert r1 <= 1.02 * r0, (info["alpha"], r0, r1)


def test_select_strength_zero_for_noise_totals():
    ad, _z, d, tissue = _case(seed=2)
    coords = ad.obsm["spatial"] / 10.0
    op = DiffusionOperator(
        make_kernel(coords, 1.5, lattice=infer_lattice(coords)), tissue, 0.6, 0.1
    )
    t = np.asarray(ad.X.sum(axis=1)).ravel()
    good = select_strength(t, op, d[tissue, None])
    bad = select_strength(t, op, np.random.default_rng(0).lognormal(size=(tissue.sum(), 1)))
    assert good.alpha >= 1 and good.gain > 0
    assert bad.gain < 0.2 * good.gain
    assert good.heldout.shape == good.alphas.shape and good.alphas[0] == 0


def test_gamma_prior_glm_recovers_coefficients():
    rng = np.random.default_rng(0)
    f = rng.lognormal(size=2000)
    pr = GammaImagePrior.from_density(f, 20.0)
    s = rng.gamma(20.0, np.exp(1.0 + 0.5 * pr.design[:, 1]) / 20.0)
    pr.refit(s, n_newton=20)
    np.testing.assert_allclose(pr.coef, [1.0, 0.5], atol=0.03)
    assert pr.correlation(s) > 0.5


def test_image_prior_errors():
    ad, *_ = _case()
    with pytest.raises(ValueError, match="H&E image"):
        ct.tl.undiffuse(ad, image_prior=True, **_KW)
    with pytest.raises(ValueError, match="H&E image"):
        ct.tl.undiffuse(ad, image_prior=30.0, **_KW)
    ad.uns["spatial"] = _image(ad, np.full(ad.n_obs, 0.2))
    del ad.uns["spatial"]["lib"]["scalefactors"]["tissue_hires_scalef"]
    with pytest.raises(ValueError, match="scale factor"):
        ct.tl.undiffuse(ad, image_prior=True, **_KW)
    out = ct.tl.undiffuse(ad, image_prior="auto", **_KW)  # auto: off, with the reason
    assert not out.uns["undiffused"]["image_prior"]["used"]
    assert "scale factor" in out.uns["undiffused"]["image_prior"]["reason"]
    for bad in (0.5, -1.0, "maybe"):
        with pytest.raises(ValueError, match="image_prior"):
            ct.tl.undiffuse(ad, image_prior=bad, **_KW)
    with pytest.raises(ValueError, match="lowrank"):
        ct.tl.undiffuse(ad, image_prior=True, method="pergene", **_KW)


def test_cli_image_prior(tmp_path, capsys):
    import anndata

    from chronotope.cli import main

    ad, *_ = _case()
    ad.write_h5ad(tmp_path / "in.h5ad")
    base = ["undiffuse", str(tmp_path / "in.h5ad"), "-o", str(tmp_path / "out.h5ad")]
    base += ["--sigma", "1.5", "--bleed", "0.6", "--background", "0.1", "--n-iter", "10"]
    base += ["--rank", "3"]
    with pytest.raises(SystemExit) as exc:
        main([*base, "--image-prior", "on"])
    assert exc.value.code != 0
    with pytest.raises(SystemExit) as exc:
        main([*base, "--image-prior", "off"])
    assert (exc.value.code or 0) == 0, capsys.readouterr().err
    out = anndata.read_h5ad(tmp_path / "out.h5ad")
    assert out.uns["undiffused"]["params"]["image_prior_alpha"] == 0.0
