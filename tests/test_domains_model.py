"""Spatial domains: model, tl.spatial_domains, figures and the CLI on planted tissues."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from anndata import AnnData
from sklearn.metrics import adjusted_rand_score

from chronotope import pl, tl
from chronotope._errors import ChronotopeInputError
from chronotope.domains import DomainModel
from chronotope.graph import knn_graph

FAST = {"max_epochs": 40, "n_top_genes": 120, "n_comps": 20}


def banded_tissue(n_side: int = 30, n_genes: int = 200, seed: int = 0) -> AnnData:
    """Three horizontal bands; genes 0-29 mark one band each (10 per band), the rest noise."""
    rng = np.random.default_rng(seed)
    gx, gy = np.meshgrid(np.arange(n_side), np.arange(n_side))
    coords = np.c_[gx.ravel() + 0.5 * (gy.ravel() % 2), gy.ravel() * 0.87].astype(float)
    band = np.minimum((gy.ravel() * 3) // n_side, 2)
    mu = np.full((coords.shape[0], n_genes), 2.0)
    for b in range(3):  # markers keep the noise genes' mean (2.0) over the tissue
        mu[:, b * 10 : (b + 1) * 10] = 0.5
        mu[band == b, b * 10 : (b + 1) * 10] = 5.0
    counts = rng.poisson(mu * rng.uniform(0.7, 1.3, size=(coords.shape[0], 1)))
    adata = AnnData(sp.csr_matrix(counts.astype(np.float32)))
    adata.var_names = [f"g{i}" for i in range(n_genes)]
    adata.obsm["spatial"] = coords
    adata.obs["band"] = band.astype(str)
    return adata


@pytest.fixture(scope="module")
def fitted() -> AnnData:
    adata = banded_tissue()
    tl.spatial_domains(adata, 3, seed=0, **FAST)
    return adata


def test_recovers_planted_domains(fitted):
    ari = adjusted_rand_score(fitted.obs["band"], fitted.obs["domain"])
    assert ari > 0.8, ari


def test_outputs_and_x_untouched():
    adata = banded_tissue()
    before = adata.X.copy()
    out = tl.spatial_domains(adata, 3, seed=0, copy=True, **FAST)
    assert (adata.X != before).nnz == 0 and "domain" not in adata.obs
    assert (out.X != before).nnz == 0
    assert out.obs["domain"].dtype == "category"
    assert out.obsm["X_domain"].shape == (out.n_obs, 20)
    assert out.obsm["X_domain_latent"].shape == (out.n_obs, 64)
    uns = out.uns["domain"]
    np.testing.assert_allclose(uns["hop_weights"].sum(), 1.0, rtol=1e-5)
    assert uns["params"]["n_domains"] == 3 and uns["params"]["max_epochs"] == 40
    imp = out.var["gene_importance"].to_numpy()
    hv = out.var["highly_variable"].to_numpy()
    assert np.isnan(imp[~hv]).all() and np.isfinite(imp[hv]).all()


def test_h5ad_roundtrip(fitted, tmp_path):
    import anndata as ad

    fitted.write_h5ad(tmp_path / "d.h5ad")
    back = ad.read_h5ad(tmp_path / "d.h5ad")
    assert (back.obs["domain"] == fitted.obs["domain"]).all()
    np.testing.assert_array_equal(
        back.uns["domain"]["hop_weights"], fitted.uns["domain"]["hop_weights"]
    )


def test_marker_genes_rank_above_noise(fitted):
    imp = fitted.var["gene_importance"]
    markers = imp[[f"g{i}" for i in range(30)]].dropna()
    noise = imp.drop(index=[f"g{i}" for i in range(30)]).dropna()
    assert len(markers) == 30
    assert markers.median() > noise.quantile(0.9)


def test_seed_reproducible():
    a, b = banded_tissue(), banded_tissue()
    tl.spatial_domains(a, 3, seed=3, **FAST)
    tl.spatial_domains(b, 3, seed=3, **FAST)
    np.testing.assert_array_equal(a.obsm["X_domain"], b.obsm["X_domain"])


def test_minibatch_path_matches_quality():
    adata = banded_tissue()
    tl.spatial_domains(adata, 3, seed=0, batch_size=200, **FAST)
    assert adjusted_rand_score(adata.obs["band"], adata.obs["domain"]) > 0.8


def test_two_slices_with_batch_key():
    a, b = banded_tissue(seed=1), banded_tissue(seed=2)
    joint = AnnData(sp.vstack([a.X, b.X]).tocsr(), var=a.var)
    joint.obsm["spatial"] = np.vstack([a.obsm["spatial"], b.obsm["spatial"]])
    joint.obs["slice"] = ["a"] * a.n_obs + ["b"] * b.n_obs
    joint.obs["band"] = np.r_[a.obs["band"], b.obs["band"]]
    joint.obs_names_make_unique()
    tl.spatial_domains(joint, 3, batch_key="slice", seed=0, **FAST)
    conn = joint.obsp["spatial_connectivities"]
    assert conn[: a.n_obs, a.n_obs :].nnz == 0  # no edges across slices
    for s in ("a", "b"):
        m = (joint.obs["slice"] == s).to_numpy()
        assert adjusted_rand_score(joint.obs["band"][m], joint.obs["domain"][m]) > 0.8
    # shared weights: both slices use the same domain ids for the same band
    assert adjusted_rand_score(joint.obs["band"], joint.obs["domain"]) > 0.8


def test_hop_layer_is_aggregation_of_projected_features():
    """(sum_k w_k Â^k T) M == sum_k w_k Â^k (T M): the precomputed stack is exact."""
    import torch

    from chronotope.domains.model import _hop_stack, _Network
    from chronotope.graph import normalize_adjacency

    rng = np.random.default_rng(0)
    coords = rng.uniform(size=(200, 2))
    conn, _ = knn_graph(coords, n_neighbors=6)
    A = normalize_adjacency(conn, mode="sym")
    T = rng.normal(size=(200, 8)).astype(np.float32)
    V = np.linalg.qr(rng.normal(size=(30, 8)))[0].astype(np.float32)
    net = _Network(30, 8, 5, 2)
    with torch.no_grad():
        net.hop_logit.copy_(torch.tensor([0.3, -0.2, 0.5]))
        h = net.encode(torch.from_numpy(_hop_stack(A, T, 2)), torch.from_numpy(V)).numpy()
        M = (torch.from_numpy(V).T @ (net.gate()[:, None] * net.gene_directions())).numpy()
        w = net.hop_weights().numpy()
    TM = T @ M
    expected = w[0] * TM + w[1] * (A @ TM) + w[2] * (A @ (A @ TM))
    np.testing.assert_allclose(h, expected, rtol=1e-4, atol=1e-5)


def test_save_load_roundtrip_and_gene_check(tmp_path):
    rng = np.random.default_rng(0)
    coords = rng.uniform(size=(300, 2))
    conn, _ = knn_graph(coords, n_neighbors=6)
    T = rng.normal(size=(300, 10)).astype(np.float32)
    V = np.linalg.qr(rng.normal(size=(50, 10)))[0].astype(np.float32)
    genes = [f"g{i}" for i in range(50)]
    model = DomainModel(max_epochs=5).fit(T, V, conn, var_names=genes)
    model.save(tmp_path / "m")
    with pytest.raises(FileExistsError):
        model.save(tmp_path / "m")
    back = DomainModel.load(tmp_path / "m", var_names=genes)
    np.testing.assert_allclose(back.get_embedding(T, V, conn), model.get_embedding(), rtol=1e-5)
    np.testing.assert_allclose(back.gene_importance_, model.gene_importance_, rtol=1e-6)
    with pytest.raises(ChronotopeInputError, match="training genes"):
        DomainModel.load(tmp_path / "m", var_names=genes[::-1])
    with pytest.raises(ChronotopeInputError, match="50 genes"):
        back.get_embedding(T, V[:40], conn)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda a: a.obsm.pop("spatial"), "spatial"),
        (lambda a: setattr(a, "X", sp.csr_matrix(a.shape, dtype=np.float32)), "all zero"),
        (lambda a: a.X.data.__setitem__(0, np.nan), "NaN|finite"),
        (lambda a: a.X.data.__setitem__(0, -1.0), "negative"),
    ],
)
def test_bad_input_fails_before_training(mutate, match):
    adata = banded_tissue(n_side=10)
    mutate(adata)
    with pytest.raises(ValueError, match=match):
        tl.spatial_domains(adata, 3, **FAST)


def test_too_few_spots():
    adata = banded_tissue(n_side=4)
    with pytest.raises(ChronotopeInputError, match="too few"):
        tl.spatial_domains(adata, 7, **FAST)


def test_figures(fitted):
    import matplotlib

    matplotlib.use("Agg")
    fig = pl.domains(fitted, labels_key="band")
    assert len(fig.axes) >= 2 and "ARI" in fig.axes[0].get_title()
    fig2 = pl.gene_importance(fitted, n_top=10)
    assert len(fig2.axes[0].patches) == 10


def test_cli_bad_input_one_line_error(tmp_path, capsys):
    from chronotope.cli import main

    adata = banded_tissue(n_side=10)
    del adata.obsm["spatial"]
    adata.write_h5ad(tmp_path / "in.h5ad")
    with pytest.raises(SystemExit) as exc:
        main(["domains", str(tmp_path / "in.h5ad"), "-o", str(tmp_path / "o.h5ad")])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "spatial" in err
    assert not (tmp_path / "o.h5ad").exists()


def test_cli_domains(tmp_path):
    from chronotope.cli import main

    adata = banded_tissue()
    adata.write_h5ad(tmp_path / "in.h5ad")
    import anndata as ad

    # the exact form external checks use (with defaults for everything else)
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "-q",
                "domains",
                str(tmp_path / "in.h5ad"),
                "-o",
                str(tmp_path / "out.h5ad"),
                "--n-domains",
                "3",
                "--figures",
                str(tmp_path / "fig"),
            ]
        )
    assert exc.value.code in (0, None)
    out = ad.read_h5ad(tmp_path / "out.h5ad")
    assert out.obs["domain"].nunique() == 3
    assert adjusted_rand_score(out.obs["band"], out.obs["domain"]) > 0.8
    assert (tmp_path / "fig" / "domains.png").stat().st_size > 1000
    assert (tmp_path / "fig" / "gene_importance.png").exists()


def test_demo_section_registered_and_available():
    from chronotope import demo as demo_mod

    sec = {s.name: s for s in demo_mod.SECTIONS}["domains"]
    for req in sec.requires:
        module, attr = req.split(":")
        import importlib

        assert hasattr(importlib.import_module(module), attr)


@pytest.mark.slow
def test_demo_domains_section_on_dlpfc(tmp_path):
    """The demo section on the embedded DLPFC 151673 (about a minute)."""
    import json

    from chronotope.demo import run_demo

    res = run_demo(tmp_path, only=["domains"], progress=False)
    assert res.status["domains"] == "ok", res.errors
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    text = json.dumps(metrics)
    assert "ARI vs manual layers" in text
