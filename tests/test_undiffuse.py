"""Tests of the diffusion correction (core, tl, pl, CLI) on small synthetic arrays."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from anndata import AnnData

from chronotope.undiffuse import (
    DiffusionOperator,
    LatticeKernel,
    SparseKernel,
    em_deconvolve,
    estimate_parameters,
    infer_lattice,
    lowrank_deconvolve,
    make_kernel,
    round_keep_totals,
)
from chronotope.undiffuse.metrics import gap_closure, morans_i, per_gene_pearson, per_gene_rmse


def _grid(n: int = 24) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:n, 0:n]
    coords = np.c_[xx.ravel(), yy.ravel()].astype(float)
    c = (n - 1) / 2
    tissue = ((coords - c) ** 2).sum(1) <= (0.33 * n) ** 2
    return coords, tissue


def _truth(coords: np.ndarray, tissue: np.ndarray, n_genes: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    # three spatial "cell types" as blobs, genes mix them
    centres = rng.uniform(6, 18, (3, 2))
    prof = np.stack([np.exp(-((coords - c) ** 2).sum(1) / 10.0) for c in centres], 1)
    w = rng.gamma(1.0, 1.0, (3, n_genes)) * 40
    z = prof @ w + 2.0
    z[~tissue] = 0
    return rng.poisson(z).astype(np.float64)


def _adata(seed: int = 0, sigma=1.5, bleed=0.5, background=0.2) -> tuple[AnnData, np.ndarray]:
    coords, tissue = _grid()
    z = _truth(coords, tissue, seed=seed)
    lat = infer_lattice(coords)
    op = DiffusionOperator(
        make_kernel(coords, sigma, lattice=lat, dtype=torch.float64), tissue, bleed, background
    )
    rate = op.forward(torch.as_tensor(z[tissue])).numpy()
    x = np.random.default_rng(seed + 1).poisson(rate).astype(np.float32)
    ad = AnnData(
        sp.csr_matrix(x),
        obs=pd.DataFrame({"in_tissue": tissue.astype(int)}, index=[f"s{i}" for i in range(len(x))]),
    )
    ad.var_names = [f"g{j}" for j in range(x.shape[1])]
    ad.obsm["spatial"] = coords * 10.0  # spacing 10 units
    return ad, z


def test_kernels_column_stochastic_and_fft_matches_sparse():
    coords, _ = _grid(16)
    lat = infer_lattice(coords)
    assert lat is not None and lat.kind == "square"
    kf = LatticeKernel(lat, 1.3, truncate=6.0, dtype=torch.float64)
    ks = SparseKernel(coords, 1.3, truncate=6.0, dtype=torch.float64)
    # box (FFT) and disc (sparse) truncation at 6 sigma both keep all the mass that matters
    ones = torch.ones(coords.shape[0], 2, dtype=torch.float64)
    np.testing.assert_allclose(kf.apply_t(ones).numpy(), 1.0, atol=1e-10)
    np.testing.assert_allclose(ks.apply_t(ones).numpy(), 1.0, atol=1e-10)
    z = torch.rand(
        coords.shape[0], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    np.testing.assert_allclose(kf.apply(z).numpy(), ks.apply(z).numpy(), atol=1e-7)
    r = torch.rand_like(z)
    # adjoint identity <K z, r> = <z, K^T r>
    np.testing.assert_allclose(float((kf.apply(z) * r).sum()), float((z * kf.apply_t(r)).sum()))


def test_hex_lattice_from_array_indices():
    rows, cols = np.meshgrid(np.arange(6), np.arange(12), indexing="ij")
    keep = (rows + cols) % 2 == 0
    lat = infer_lattice(array_row=rows[keep], array_col=cols[keep])
    assert lat.kind == "hex"
    k = LatticeKernel(lat, 1.0, dtype=torch.float64)
    ones = torch.ones(lat.rows.size, 1, dtype=torch.float64)
    np.testing.assert_allclose(k.apply_t(ones).numpy(), 1.0, atol=1e-10)
    # a hex neighbour (one row, one column) is at distance 1 spacing: same weight as the
    # in-row neighbour (two columns)
    z = torch.zeros(lat.rows.size, 1, dtype=torch.float64)
    centre = np.flatnonzero((lat.rows == 2) & (lat.cols == 6))[0]
    z[centre] = 1.0
    out = k._raw(z)[:, 0].numpy()
    a = out[np.flatnonzero((lat.rows == 2) & (lat.cols == 8))[0]]
    b = out[np.flatnonzero((lat.rows == 3) & (lat.cols == 7))[0]]
    np.testing.assert_allclose(a, b, rtol=1e-6)
    np.testing.assert_allclose(a / out[centre], np.exp(-0.5), rtol=1e-6)


def test_operator_adjoint_and_mass():
    coords, tissue = _grid(12)
    k = make_kernel(coords, 1.0, lattice=infer_lattice(coords), dtype=torch.float64)
    op = DiffusionOperator(k, tissue, 0.4, 0.3)
    g = torch.Generator().manual_seed(1)
    z = torch.rand(int(tissue.sum()), 2, dtype=torch.float64, generator=g)
    r = torch.rand(coords.shape[0], 2, dtype=torch.float64, generator=g)
    np.testing.assert_allclose(float((op.forward(z) * r).sum()), float((z * op.adjoint(r)).sum()))
    np.testing.assert_allclose(op.forward(z).sum(0).numpy(), z.sum(0).numpy())
    np.testing.assert_allclose(op.adjoint(torch.ones_like(r)).numpy(), 1.0, atol=1e-12)


def test_em_fixed_point_is_kkt_and_keeps_totals():
    ad, _ = _adata()
    coords = ad.obsm["spatial"] / 10
    tissue = ad.obs["in_tissue"].to_numpy().astype(bool)
    k = make_kernel(coords, 1.5, lattice=infer_lattice(coords), dtype=torch.float64)
    op = DiffusionOperator(k, tissue, 0.5, 0.2)
    x = ad.X.toarray()[:, :3]
    res = em_deconvolve(x, op, n_iter=400, dtype=torch.float64)
    np.testing.assert_allclose(res.z.sum(0), x.sum(0), rtol=1e-5)
    # KKT of the Poisson likelihood: A^T (x / Az) = 1 where z > 0, <= 1 where z = 0
    zt = torch.as_tensor(res.z, dtype=torch.float64)
    grad = op.adjoint(torch.as_tensor(x) / op.forward(zt)).numpy()
    big = res.z > 1e-2 * res.z.max(0)
    np.testing.assert_allclose(grad[big], 1.0, atol=0.02)
    assert (grad[~big] < 1.05).all()


def test_estimation_recovers_parameters():
    ad, _ = _adata(sigma=1.5, bleed=0.5, background=0.2)
    coords = ad.obsm["spatial"] / 10
    tissue = ad.obs["in_tissue"].to_numpy().astype(bool)
    est = estimate_parameters(
        np.asarray(ad.X.sum(1)).ravel(),
        tissue,
        coords,
        lattice=infer_lattice(coords),
        n_grid=7,
        n_refine=6,
    )
    assert abs(est.sigma - 1.5) < 0.2
    assert abs(est.bleed - 0.5) < 0.06
    assert abs(est.background - 0.2) < 0.06


def test_lowrank_improves_on_raw_and_reference_signatures():
    ad, z = _adata()
    coords = ad.obsm["spatial"] / 10
    tissue = ad.obs["in_tissue"].to_numpy().astype(bool)
    op = DiffusionOperator(
        make_kernel(coords, 1.5, lattice=infer_lattice(coords)), tissue, 0.5, 0.2
    )
    res = lowrank_deconvolve(ad.X, op, rank=4)
    est = np.zeros_like(z)
    est[tissue] = res.sources()
    x = ad.X.toarray()
    floor = np.random.default_rng(5).poisson(z)
    gc = gap_closure(per_gene_rmse(est, z), per_gene_rmse(x, z), per_gene_rmse(floor, z))
    assert np.nanmedian(gc) > 0.5
    assert np.nanmedian(per_gene_pearson(est, z)) > np.nanmedian(per_gene_pearson(x, z))
    np.testing.assert_allclose(est.sum(0), x.sum(0), rtol=1e-3)
    assert est[~tissue].sum() == 0
    assert res.diffusion_fraction[~tissue].min() == pytest.approx(1.0)
    # a fixed signature block: only abundances are learned for it
    sig = np.abs(np.random.default_rng(0).normal(size=(2, x.shape[1])))
    res2 = lowrank_deconvolve(ad.X, op, rank=2, signatures=sig, n_iter=20)
    np.testing.assert_allclose(res2.w[:2], sig / sig.sum(1, keepdims=True), rtol=1e-5)


def test_round_keep_totals():
    z = np.random.default_rng(0).gamma(0.5, 2.0, (50, 4))
    tot = np.rint(z.sum(0))
    r = round_keep_totals(z, tot)
    np.testing.assert_array_equal(r.sum(0), tot)
    assert (r >= 0).all() and np.all(np.abs(r - z) < 1.0 + 1e-9)


def test_morans_i_known_values():
    coords, _ = _grid(10)
    from chronotope.graph import radius_graph

    w, _ = radius_graph(coords, 1.0)  # rook adjacency
    x = np.c_[coords[:, 0], (coords.sum(1) % 2)]  # smooth gradient, checkerboard
    mi = morans_i(x, w)
    assert mi[0] > 0.85
    np.testing.assert_allclose(mi[1], -1.0, atol=1e-12)


def test_tl_undiffuse_writes_results_and_roundtrips(tmp_path):
    import anndata

    import chronotope as ct

    ad, _ = _adata()
    ct.tl.undiffuse(ad, rank=4, round_counts=True)
    lay = ad.layers["undiffused"]
    assert sp.issparse(lay) and lay.dtype == np.float32 and lay.shape == ad.shape
    np.testing.assert_array_equal(np.asarray(lay.sum(0)).ravel(), np.asarray(ad.X.sum(0)).ravel())
    tissue = ad.obs["in_tissue"].to_numpy().astype(bool)
    assert lay[~tissue].sum() == 0
    u = ad.uns["undiffused"]
    assert abs(u["sigma"] - 1.5) < 0.25 and abs(u["spacing"] - 10.0) < 1e-9
    assert u["params"]["method"] == "lowrank"
    assert "diffusion_fraction" in ad.obs
    assert u["diagnostics"]["out_of_tissue_fraction_after"] == 0.0
    ad.write_h5ad(tmp_path / "u.h5ad")
    back = anndata.read_h5ad(tmp_path / "u.h5ad")
    assert back.uns["undiffused"]["bleed"] == pytest.approx(u["bleed"])


def test_tl_undiffuse_pergene_and_fixed_parameters():
    import chronotope as ct

    ad, _ = _adata()
    out = ct.tl.undiffuse(
        ad,
        sigma=1.5,
        bleed=0.5,
        background=0.2,
        method="pergene",
        n_iter=5,
        diagnostics=False,
        copy=True,
    )
    assert out.uns["undiffused"]["sigma"] == 1.5
    np.testing.assert_array_equal(out.var["undiffused_n_iter"].to_numpy(), 5)
    assert "undiffused" not in ad.layers


def test_simulate_diffusion_keeps_mass_in_expectation():
    import chronotope as ct

    ad, z = _adata()
    truth = AnnData(sp.csr_matrix(z.astype(np.float32)), obs=ad.obs.copy(), var=ad.var.copy())
    truth.obsm["spatial"] = ad.obsm["spatial"]
    sim = ct.tl.simulate_diffusion(truth, 2.0, 0.5, background=0.1, seed=3)
    assert sim.shape == truth.shape
    tot_sim, tot_true = float(sim.X.sum()), float(z.sum())
    assert abs(tot_sim - tot_true) < 5 * np.sqrt(tot_true)
    tissue = ad.obs["in_tissue"].to_numpy().astype(bool)
    assert sim.X[~tissue].sum() > 0 and sim.layers["truth"][~tissue].sum() == 0


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ("no_tissue_key", "in_tissue"),
        ("negative", "negative"),
        ("nan", "NaN"),
        ("bad_sigma", "sigma"),
        ("no_spatial", "spatial"),
    ],
)
def test_tl_undiffuse_bad_input(change, match):
    import chronotope as ct

    ad, _ = _adata()
    kw = {}
    if change == "no_tissue_key":
        del ad.obs["in_tissue"]
    elif change == "negative":
        ad.X = ad.X.toarray()
        ad.X[0, 0] = -1
    elif change == "nan":
        ad.X = ad.X.toarray()
        ad.X[0, 0] = np.nan
    elif change == "bad_sigma":
        kw["sigma"] = -2.0
    elif change == "no_spatial":
        del ad.obsm["spatial"]
    with pytest.raises(ValueError, match=match):
        ct.tl.undiffuse(ad, **kw)


def test_cli_undiffuse_exact_form(tmp_path, capsys):
    import anndata

    from chronotope.cli import main

    ad, _ = _adata()
    ad.write_h5ad(tmp_path / "in.h5ad")
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "undiffuse",
                str(tmp_path / "in.h5ad"),
                "-o",
                str(tmp_path / "out.h5ad"),
                "--figures",
                str(tmp_path / "fig"),
            ]
        )
    assert (exc.value.code or 0) == 0, capsys.readouterr().err
    out = anndata.read_h5ad(tmp_path / "out.h5ad")
    assert out.layers["undiffused"].shape == ad.shape
    assert list(out.obs_names) == list(ad.obs_names)
    assert list(out.var_names) == list(ad.var_names)
    assert (tmp_path / "fig" / "undiffuse.png").is_file()
    assert (tmp_path / "fig" / "out_of_tissue.png").is_file()
    assert "sigma" in capsys.readouterr().out
