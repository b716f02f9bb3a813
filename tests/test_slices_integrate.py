"""Cross-platform integration: batch-centred PCA, tl.integrate_slices, CLI integrate."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from anndata import AnnData

import chronotope as ct
from chronotope._errors import ChronotopeInputError


def _tissue(n_side: int = 30, n_genes: int = 80, seed: int = 0):
    """Grid spots; 8 spatial bumps of 10 genes each; region = the strongest bump."""
    rng = np.random.default_rng(seed)
    g = np.arange(n_side, dtype=float)
    xy = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
    centres = rng.uniform(0, n_side, size=(8, 2))
    bumps = np.exp(-((xy[:, None] - centres[None]) ** 2).sum(-1) / (2 * (n_side / 6) ** 2))
    rate = 0.5 + 20 * np.repeat(bumps, 10, axis=1)[:, :n_genes]
    return xy, rate, bumps.argmax(axis=1).astype(str)


def _platforms(angle: float = 20.0, units: float = 0.5):
    """A fine slice and a 2x2-binned one in other units, with gene-specific capture."""
    xy, rate, region = _tissue()
    rng = np.random.default_rng(1)
    fine = AnnData(sp.csr_matrix(rng.poisson(rate).astype(np.float32)))
    fine.var_names = [f"g{i}" for i in range(rate.shape[1])]
    fine.obsm["spatial"] = xy
    fine.obs["region"] = region
    # second platform: counts of 2x2 blocks, 60-80 % capture per gene, 10 genes unmeasured
    cell = (xy // 2).astype(int)
    key, inv = np.unique(cell, axis=0, return_inverse=True)
    inv = inv.ravel()
    pool = sp.csr_matrix((np.ones(len(inv)), (inv, np.arange(len(inv)))))
    capture = rng.uniform(0.3, 1.0, rate.shape[1])
    counts = rng.poisson(np.asarray(pool @ (rate * capture)))[:, 10:]
    centre = key * 2 + 0.5
    t = np.radians(angle)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    coarse = AnnData(sp.csr_matrix(counts.astype(np.float32)))
    coarse.var_names = [f"g{i}" for i in range(10, rate.shape[1])]
    coarse.obsm["spatial"] = (centre @ rot.T) * units + np.array([100.0, 40.0])
    votes = np.zeros((len(key), 8))
    np.add.at(votes, (inv, region.astype(int)), 1)
    coarse.obs["region"] = votes.argmax(axis=1).astype(str)
    return fine, coarse, centre


def test_batch_centred_pca_matches_dense():
    rng = np.random.default_rng(0)
    x = sp.random(300, 40, density=0.3, random_state=1, format="csr") * 5
    batch = np.repeat(["a", "b", "c"], 100)
    dense = x.toarray()
    dense[batch == "b"] += rng.uniform(0, 3, 40)  # a batch shift of every gene
    a = AnnData(sp.csr_matrix(dense))
    a.obs["batch"] = batch
    ct.pp.pca(a, n_comps=5, layer=None, use_highly_variable=False, batch_key="batch")
    z = dense.copy()
    for b in "abc":
        block = z[batch == b] - z[batch == b].mean(0)
        z[batch == b] = block / block.std(0, ddof=1)
    u, s, _ = np.linalg.svd(z, full_matrices=False)
    ref, got = u[:, :5] * s[:5], a.obsm["X_pca"].astype(float)
    cos = np.abs((ref * got).sum(0)) / np.linalg.norm(ref, axis=0) / np.linalg.norm(got, axis=0)
    np.testing.assert_allclose(cos, 1.0, atol=1e-5)
    np.testing.assert_allclose(a.uns["pca"]["variance_ratio"], s[:5] ** 2 / (s**2).sum(), rtol=1e-5)
    # without the batch key the shift is the first component
    ct.pp.pca(a, n_comps=5, layer=None, use_highly_variable=False)
    first = a.obsm["X_pca"][:, 0]
    assert abs(first[batch == "b"].mean() - first[batch != "b"].mean()) > first.std()


def test_integrate_slices_two_platforms():
    fine, coarse, centre = _platforms()
    before_x = coarse.X.copy()
    joint = ct.tl.integrate_slices([fine, coarse], names=["fine", "coarse"], n_domains=8)
    assert joint.n_obs == fine.n_obs + coarse.n_obs and joint.n_vars == 70
    assert list(joint.obs["slice"].cat.categories) == ["fine", "coarse"]
    assert (coarse.X != before_x).nnz == 0 and "spatial_aligned" not in coarse.obsm
    m = (joint.obs["slice"] == "coarse").to_numpy()
    # one frame: the binned slice lands on its blocks' centres, in the fine slice's units
    err = np.sqrt(((joint.obsm["spatial_aligned"][m] - centre) ** 2).sum(1).mean())
    assert err < 0.7, err
    own, ref = (
        joint.uns["integration"]["spacing_own_units"],
        joint.uns["integration"]["spacing_reference_units"],
    )
    assert own[1] == pytest.approx(1.0) and ref[1] == pytest.approx(2.0, rel=0.05)
    # one embedding: a kNN classifier trained on the fine slice labels the coarse one
    from sklearn.neighbors import KNeighborsClassifier

    emb, region = joint.obsm["X_domain"], joint.obs["region"].to_numpy()
    clf = KNeighborsClassifier(10).fit(emb[~m], region[~m])
    assert (clf.predict(emb[m]) == region[m]).mean() > 0.6
    assert set(joint.obs["domain"][m]) & set(joint.obs["domain"][~m])


def test_integrate_slices_bad_input():
    fine, coarse, _ = _platforms()
    with pytest.raises(ChronotopeInputError, match="at least two"):
        ct.tl.integrate_slices([fine])
    with pytest.raises(ChronotopeInputError, match="distinct"):
        ct.tl.integrate_slices([fine, coarse], names=["a", "a"])
    other = coarse.copy()
    other.var_names = [f"x{i}" for i in range(other.n_vars)]
    with pytest.raises(ChronotopeInputError, match="share 0 gene names"):
        ct.tl.integrate_slices([fine, other])
    del other.obsm["spatial"]
    with pytest.raises(ChronotopeInputError, match="spatial"):
        ct.tl.integrate_slices([fine, other])


def test_cli_integrate(tmp_path):
    from chronotope.cli import main

    fine, coarse, _ = _platforms()
    fine.write_h5ad(tmp_path / "visium.h5ad")
    coarse.write_h5ad(tmp_path / "binned.h5ad")
    args = [str(tmp_path / "visium.h5ad"), str(tmp_path / "binned.h5ad")]
    out = tmp_path / "joint.h5ad"
    with pytest.raises(SystemExit) as exit_info:
        main(["integrate", *args, "-o", str(out), "--n-domains", "8", "--figures", str(tmp_path)])
    assert exit_info.value.code in (0, None)
    joint = ct.io.read_h5ad(out)
    assert joint.n_obs == fine.n_obs + coarse.n_obs
    assert set(joint.obs["slice"]) == {"visium", "binned"}
    assert {"spatial_aligned", "X_domain"} <= set(joint.obsm)
    assert (tmp_path / "integration.png").stat().st_size > 0
