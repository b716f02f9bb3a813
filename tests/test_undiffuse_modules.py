"""Per-gene-module sigma multipliers of the diffusion correction (issue 8)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from anndata import AnnData

from chronotope.undiffuse import DiffusionOperator, infer_lattice, make_kernel
from chronotope.undiffuse.modules import gene_modules, module_multipliers


def _two_sigma(sigmas=(1.0, 3.0), n: int = 26, n_per: int = 6, seed: int = 0):
    """Two co-expression groups (two blobs), each diffused with its own sigma."""
    yy, xx = np.mgrid[0:n, 0:n]
    coords = np.c_[xx.ravel(), yy.ravel()].astype(float)
    tissue = ((coords - (n - 1) / 2) ** 2).sum(1) <= (0.36 * n) ** 2
    rng = np.random.default_rng(seed)
    lat = infer_lattice(coords)
    centres = np.array([[0.35 * n, 0.35 * n], [0.66 * n, 0.64 * n]])
    prof = np.stack([np.exp(-((coords - c) ** 2).sum(1) / 20.0) for c in centres], 1)
    xs, truth = [], []
    for grp, s in enumerate(sigmas):
        z = prof[:, [grp]] * (rng.gamma(2.0, 1.0, n_per) * 60) + 1.0
        z[~tissue] = 0
        z = rng.poisson(z).astype(float)
        k = make_kernel(coords, s, lattice=lat, dtype=torch.float64)
        op = DiffusionOperator(k, tissue, 0.5, 0.2)
        xs.append(rng.poisson(op.forward(torch.as_tensor(z[tissue])).numpy()))
        truth.append(z)
    x = np.hstack(xs).astype(np.float32)
    ad = AnnData(
        sp.csr_matrix(x),
        obs=pd.DataFrame({"in_tissue": tissue.astype(int)}, index=[f"s{i}" for i in range(n * n)]),
    )
    ad.var_names = [f"g{j}" for j in range(x.shape[1])]
    ad.obsm["spatial"] = coords * 10.0
    group = np.repeat(np.arange(len(sigmas)), n_per)
    return ad, np.hstack(truth), group, coords, tissue, lat


def test_gene_modules_separate_coexpression_groups():
    ad, _, group, coords, _, _ = _two_sigma()
    lab = gene_modules(ad.X, coords, 2)
    # same partition as the generating groups (labels up to permutation)
    assert len({(a, b) for a, b in zip(lab, group, strict=True)}) == 2
    assert gene_modules(ad.X, coords, 1).max() == 0


def test_module_multipliers_recover_two_sigmas_and_one_sigma():
    ad, _, group, coords, tissue, lat = _two_sigma()
    fit = module_multipliers(ad.X, group, tissue, coords, 1.7, lattice=lat, n_iter=150)
    assert abs(fit.sigma[0] - 1.0) < 0.2 and abs(fit.sigma[1] - 3.0) < 0.4
    assert (fit.loglik_gain > 0).all()
    ad1, _, group1, coords, tissue, lat = _two_sigma((2.0, 2.0), seed=1)
    fit1 = module_multipliers(ad1.X, group1, tissue, coords, 2.0, lattice=lat, n_iter=150)
    assert np.all(np.abs(fit1.multiplier - 1.0) < 0.15)


def test_tl_undiffuse_sigma_modules_improves_on_two_sigma_data():
    import chronotope as ct
    from chronotope.undiffuse.metrics import gap_closure, per_gene_rmse

    ad, truth, group, *_ = _two_sigma()
    x = ad.X.toarray()
    floor = np.random.default_rng(5).poisson(truth)
    kw = {"n_iter": 60, "refine": False, "rank": 4, "diagnostics": False, "copy": True}
    kw["sigma"] = 1.7  # a global sigma between the two; the modules' multipliers are estimated
    one = ct.tl.undiffuse(ad, **kw)
    mod = ct.tl.undiffuse(ad, sigma_modules=2, **kw)

    def gc(o):
        e = o.layers["undiffused"].toarray()
        return np.median(
            gap_closure(
                per_gene_rmse(e, truth), per_gene_rmse(x, truth), per_gene_rmse(floor, truth)
            )
        )

    assert gc(mod) > gc(one) + 0.02
    u = mod.uns["undiffused"]["modules"]
    assert u["n_modules"] == 2 and sorted(u["n_genes"].tolist()) == [6, 6]
    lab = mod.var["undiffused_module"].to_numpy()
    assert len({(a, b) for a, b in zip(lab, group, strict=True)}) == 2
    assert sorted(np.round(u["sigma"]).tolist()) == [1.0, 3.0]
    # totals kept per gene, zero outside the tissue
    out = mod.layers["undiffused"]
    np.testing.assert_allclose(np.asarray(out.sum(0)).ravel(), x.sum(0), rtol=1e-3)
    assert out[mod.obs["in_tissue"].to_numpy() == 0].sum() == 0


def test_sigma_modules_bad_value():
    import chronotope as ct

    ad, *_ = _two_sigma(n=12, n_per=2)
    with pytest.raises(ValueError, match="sigma_modules"):
        ct.tl.undiffuse(ad, sigma_modules=0, sigma=1.0, bleed=0.5, background=0.2, n_iter=2)
