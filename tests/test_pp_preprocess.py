"""Tests for the optional expression preprocessing in :mod:`chronotope.pp`."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.decomposition import PCA

import chronotope.pp as pp
from chronotope._errors import ChronotopeInputError
from chronotope.pp._preprocess import _loess

N_PLANTED = 10


def _counts(n_obs: int = 300, n_vars: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Poisson genes over a range of means, plus ``N_PLANTED`` overdispersed genes.

    The planted genes (negative binomial, dispersion 0.5) have the same means as
    Poisson genes but a far larger variance.
    """
    rng = np.random.default_rng(seed)
    mu = np.exp(rng.uniform(np.log(0.2), np.log(30.0), n_vars))
    counts = rng.poisson(mu, size=(n_obs, n_vars)).astype(np.float32)
    planted = rng.choice(n_vars, N_PLANTED, replace=False)
    r = 0.5
    counts[:, planted] = rng.negative_binomial(r, r / (r + mu[planted]), size=(n_obs, N_PLANTED))
    return counts, np.sort(planted)


def _adata(fmt: str = "csr", seed: int = 0, **kwargs: int) -> tuple[ad.AnnData, np.ndarray]:
    counts, planted = _counts(seed=seed, **kwargs)
    x = counts if fmt == "dense" else sp.csr_matrix(counts).asformat(fmt)
    adata = ad.AnnData(x)
    adata.var_names = [f"g{i}" for i in range(adata.n_vars)]
    adata.obs["batch"] = np.where(np.arange(adata.n_obs) % 2 == 0, "a", "b")
    return adata, planted


def _dense(x) -> np.ndarray:
    return x.toarray() if sp.issparse(x) else np.asarray(x)


# ---- .X is never modified; formats are kept -------------------------------------------


@pytest.mark.parametrize("fmt", ["csr", "csc", "dense"])
def test_x_never_changes(fmt):
    adata, _ = _adata(fmt)
    x_before = adata.X.copy()
    pp.preprocess(adata, n_top_genes=50)
    pp.scale(adata)
    pp.pca(adata, n_comps=5)
    pp.highly_variable_genes(
        adata, flavor="seurat", layer="log1p", n_top_genes=50, key_added="hv_seurat"
    )
    assert type(adata.X) is type(x_before)
    assert adata.X.dtype == x_before.dtype
    np.testing.assert_array_equal(_dense(adata.X), _dense(x_before))
    if sp.issparse(x_before):
        assert adata.X.format == fmt


@pytest.mark.parametrize("fmt", ["csr", "csc"])
def test_sparse_stays_sparse(fmt):
    adata, _ = _adata(fmt)
    pp.normalize_total(adata)
    pp.log1p(adata)
    for key in ("normalized", "log1p"):
        layer = adata.layers[key]
        assert sp.issparse(layer)
        assert layer.format == fmt
        assert layer.dtype == np.float32
        assert layer.nnz == adata.X.nnz


def test_dense_stays_dense():
    adata, _ = _adata("dense")
    pp.normalize_total(adata)
    pp.log1p(adata)
    assert isinstance(adata.layers["log1p"], np.ndarray)
    assert adata.layers["log1p"].dtype == np.float32


# ---- normalize_total / log1p -----------------------------------------------------------


def test_normalize_total_sums():
    adata, _ = _adata("csr")
    x = adata.X.tolil()
    x[3] = 0  # an observation with no counts
    adata.X = x.tocsr()
    pp.normalize_total(adata, target_sum=100.0)
    sums = np.asarray(adata.layers["normalized"].sum(axis=1)).ravel()
    expected = np.full(adata.n_obs, 100.0)
    expected[3] = 0.0
    np.testing.assert_allclose(sums, expected, rtol=1e-5)
    assert adata.uns["normalized"]["params"]["target_sum"] == 100.0


def test_normalize_total_median_target():
    adata, _ = _adata("dense")
    totals = adata.X.sum(axis=1)
    pp.normalize_total(adata, target_sum=None, key_added="norm")
    np.testing.assert_allclose(
        adata.layers["norm"].sum(axis=1), np.full(adata.n_obs, np.median(totals)), rtol=1e-5
    )


def test_normalize_total_scales_rows():
    adata, _ = _adata("csr")
    pp.normalize_total(adata)
    x = adata.X.toarray().astype(np.float64)
    expected = x / x.sum(axis=1, keepdims=True) * 1e4
    np.testing.assert_allclose(adata.layers["normalized"].toarray(), expected, rtol=1e-6)


@pytest.mark.parametrize("fmt", ["csr", "dense"])
def test_log1p_values(fmt):
    adata, _ = _adata(fmt)
    pp.normalize_total(adata)
    pp.log1p(adata)
    np.testing.assert_allclose(
        _dense(adata.layers["log1p"]),
        np.log1p(_dense(adata.layers["normalized"]).astype(np.float64)),
        rtol=1e-6,
    )


def test_log1p_of_another_layer():
    adata, _ = _adata("csr")
    pp.log1p(adata, layer=None, key_added="log_counts")
    np.testing.assert_allclose(
        adata.layers["log_counts"].toarray(), np.log1p(adata.X.toarray()), rtol=1e-6
    )


# ---- loess -----------------------------------------------------------------------------

# scikit-misc 0.5.3 ``loess(x, y, span=0.3, degree=2)`` (what scanpy's seurat_v3 calls),
# default surface="interpolate" and surface="direct", on the data of _loess_data().
SKMISC_INTERPOLATE = [
    -0.9798451347, 0.8242316623, 0.2762284443, 0.201321001, 0.7534523244,
    -0.1693873985, 0.597049491, 0.8730051843, -0.0590576362, 1.2451660794,
    0.092304004, 0.8309423016, 0.8416652769, -0.6740508684, 0.7027701479,
    0.3863181387, 0.1108491482, 0.797671642, -0.0398811985, 0.7084931722,
    0.9484119462, -0.0211344851, 1.2259584365, 0.0855933364, 0.7664858468,
    0.7640516375, -0.4299028729, 0.6149768193, 0.4850106689, 0.0493290435,
    0.8825507644, 0.0598624855, 0.7902377201, 0.9341776926, 0.0288759285,
    1.1937162438, 0.1118424477, 0.6191707523, 0.7082778695, -0.2448226257,
    0.5926781769, 0.5802845501, -0.006972143, 0.993454049, 0.0911863602,
    0.8307654845, 0.9024345628, 0.0870947142, 1.1286067817, 0.1416445098,
    0.4225507732, 0.7572895412, -0.1134866849, 0.5861942901, 0.6780105621,
    -0.0475716941, 1.1172087248, 0.0919297769, 0.8056581181, 0.8466952038,
]  # fmt: skip
SKMISC_DIRECT = [
    -0.979555813, 0.8242316623, 0.2762284443, 0.1876870965, 0.7324723417,
    -0.1691925137, 0.5983491296, 0.9095110706, -0.0590576362, 1.2451660794,
    0.0878052219, 0.8309423016, 0.8416652769, -0.6740508684, 0.6745381908,
    0.3846623073, 0.1108491482, 0.797671642, -0.0399630124, 0.6921343446,
    0.9484119462, -0.0223132831, 1.2168999448, 0.0855933364, 0.7664858468,
    0.7485537156, -0.4289762946, 0.6149768193, 0.4850106689, 0.0478744959,
    0.8714478356, 0.0598624855, 0.7902377201, 0.9320420126, 0.0271847154,
    1.1937162438, 0.0820309553, 0.6478174062, 0.7082778695, -0.2448226257,
    0.5933504136, 0.5779877551, -0.006972143, 0.993454049, 0.1105785805,
    0.8375509637, 0.9024345628, 0.0862135753, 1.1266522067, 0.0764496786,
    0.4225507732, 0.7369193672, -0.1134866849, 0.5861942901, 0.6780105621,
    -0.0506080606, 1.154297957, 0.0919297769, 0.8119382479, 0.8509634509,
]  # fmt: skip


def _loess_data() -> tuple[np.ndarray, np.ndarray]:
    i = np.arange(60)
    x = np.round(-2 + 4 * ((i * 37) % 60) / 60 + 0.05 * np.sin(i), 6)
    y = np.round(np.cos(x) + 0.3 * np.sin(7 * x) + 0.1 * x, 6)
    return x, y


def test_loess_matches_scikit_misc():
    x, y = _loess_data()
    np.testing.assert_allclose(_loess(x, y), SKMISC_INTERPOLATE, rtol=0, atol=1e-9)
    np.testing.assert_allclose(_loess(x, y, surface="direct"), SKMISC_DIRECT, rtol=0, atol=1e-9)


def _loess_brute(x: np.ndarray, y: np.ndarray, span: float = 0.3) -> np.ndarray:
    """One weighted least-squares problem per point (the definition)."""
    n = x.size
    q = int(np.floor(n * span))
    out = np.empty(n)
    for i in range(n):
        d = np.abs(x - x[i])
        h = np.sort(d)[q - 1]
        w = np.sqrt(np.clip(1 - (d / h) ** 3, 0, None) ** 3)
        design = np.stack([np.ones(n), x - x[i], (x - x[i]) ** 2], axis=1)
        out[i] = np.linalg.lstsq(design * w[:, None], y * w, rcond=None)[0][0]
    return out


def test_loess_direct_matches_definition_with_ties():
    rng = np.random.default_rng(1)
    x = np.round(rng.normal(size=400), 2)  # many tied x
    y = np.sin(2 * x) + rng.normal(0, 0.3, x.size)
    np.testing.assert_allclose(_loess(x, y, surface="direct"), _loess_brute(x, y), atol=1e-9)
    # blocks of a few weights give the same answer
    np.testing.assert_allclose(
        _loess(x, y, surface="direct", max_block=500), _loess_brute(x, y), atol=1e-9
    )


@pytest.mark.parametrize("surface", ["interpolate", "direct"])
def test_loess_reproduces_quadratic(surface):
    x = np.random.default_rng(2).uniform(-3, 2, 2000)
    y = 1 + 2 * x - 0.5 * x**2
    np.testing.assert_allclose(_loess(x, y, surface=surface), y, atol=1e-8)


def test_loess_degenerate_inputs():
    np.testing.assert_allclose(_loess(np.array([1.0]), np.array([2.0])), [2.0])
    # a third of the points share one x: finite, and their fit is their mean
    x = np.r_[np.zeros(50), np.linspace(0.1, 1.0, 50)]
    y = np.r_[np.ones(50), 1 + np.linspace(0.1, 1.0, 50)]
    fitted = _loess(x, y)
    assert np.isfinite(fitted).all()
    np.testing.assert_allclose(fitted[:50], 1.0, atol=1e-6)


# ---- highly variable genes -------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csr", "csc", "dense"])
def test_hvg_seurat_v3_finds_overdispersed_genes(fmt):
    adata, planted = _adata(fmt)
    pp.highly_variable_genes(adata, n_top_genes=N_PLANTED)
    found = np.flatnonzero(adata.var["highly_variable"].to_numpy())
    np.testing.assert_array_equal(found, planted)
    rank = adata.var["highly_variable_rank"].to_numpy()
    assert sorted(rank[planted]) == list(range(N_PLANTED))
    assert np.isnan(np.delete(rank, planted)).all()
    assert adata.var["highly_variable"].dtype == bool
    assert adata.uns["hvg"]["flavor"] == "seurat_v3"
    for col in ("means", "variances", "variances_norm"):
        assert np.isfinite(adata.var[col].to_numpy()).all()


def test_hvg_seurat_v3_statistics():
    """Means, variances and normalised variances follow their definitions."""
    adata, _ = _adata("csr")
    pp.highly_variable_genes(adata, n_top_genes=20)
    x = adata.X.toarray().astype(np.float64)
    n = x.shape[0]
    mean, var = x.mean(axis=0), x.var(axis=0, ddof=1)
    np.testing.assert_allclose(adata.var["means"], mean, rtol=1e-10)
    np.testing.assert_allclose(adata.var["variances"], var, rtol=1e-10)
    reg_std = np.sqrt(10 ** _loess(np.log10(mean), np.log10(var)))
    z = np.minimum((x - mean) / reg_std, np.sqrt(n))
    expected = (z**2).sum(axis=0) / (n - 1)
    np.testing.assert_allclose(adata.var["variances_norm"], expected, rtol=1e-8)
    order = np.argsort(-expected, kind="stable")[:20]
    np.testing.assert_array_equal(np.flatnonzero(adata.var["highly_variable"]), np.sort(order))


@pytest.mark.parametrize("fmt", ["csr", "csc"])
def test_hvg_in_spans_same_and_float64_input_untouched(fmt, monkeypatch):
    """Stored values are processed in spans; float64 input is never modified in place."""
    import chronotope.pp._preprocess as impl

    adata, _ = _adata(fmt)
    adata.X = adata.X.astype(np.float64)
    before = adata.X.copy()
    whole = pp.highly_variable_genes(adata, n_top_genes=20, copy=True)
    monkeypatch.setattr(impl, "_ENTRY_CHUNK", 97)  # spans cut through rows and columns
    pieces = pp.highly_variable_genes(adata, n_top_genes=20, copy=True)
    np.testing.assert_array_equal((adata.X != before).nnz, 0)
    for col in ("means", "variances", "variances_norm"):
        np.testing.assert_allclose(pieces.var[col], whole.var[col], rtol=1e-12)
    np.testing.assert_array_equal(pieces.var["highly_variable"], whole.var["highly_variable"])


def test_hvg_seurat_flavor_finds_overdispersed_genes():
    adata, planted = _adata("csr")
    pp.normalize_total(adata)
    pp.log1p(adata)
    # normalised dispersion is a weaker test than seurat_v3: all planted genes rank in the
    # top 2 * N_PLANTED, and the top half of that list is all planted genes
    pp.highly_variable_genes(adata, flavor="seurat", layer="log1p", n_top_genes=2 * N_PLANTED)
    rank = adata.var["highly_variable_rank"].to_numpy()
    assert (rank[planted] < 2 * N_PLANTED).all()
    top = np.flatnonzero(rank < N_PLANTED // 2)
    assert set(top) <= set(planted)
    assert adata.uns["hvg"]["flavor"] == "seurat"


def test_hvg_seurat_flavor_warns_on_counts():
    adata, _ = _adata("csr")
    with pytest.warns(UserWarning, match="log1p"):
        pp.highly_variable_genes(adata, flavor="seurat", n_top_genes=10)


def test_hvg_seurat_v3_warns_on_non_integers():
    adata, _ = _adata("csr")
    pp.normalize_total(adata)
    with pytest.warns(UserWarning, match="raw counts"):
        pp.highly_variable_genes(adata, layer="normalized", n_top_genes=10)


@pytest.mark.parametrize("flavor", ["seurat_v3", "seurat"])
def test_hvg_batch_key(flavor):
    adata, planted = _adata("csr")
    layer = None
    if flavor == "seurat":
        pp.normalize_total(adata)
        pp.log1p(adata)
        layer = "log1p"
    n_top = 2 * N_PLANTED  # half the obs per batch: weaker evidence than in one batch
    pp.highly_variable_genes(
        adata, n_top_genes=n_top, flavor=flavor, layer=layer, batch_key="batch"
    )
    nbatches = adata.var["highly_variable_nbatches"].to_numpy()
    assert nbatches.max() <= 2
    found = set(np.flatnonzero(adata.var["highly_variable"].to_numpy()))
    assert set(planted) <= found
    assert (nbatches[planted] >= 1).all()
    assert adata.uns["hvg"]["params"]["batch_key"] == "batch"


def test_hvg_batch_combines_ranks_like_scanpy():
    """Median rank among the batches that select a gene, then number of batches."""
    adata, _ = _adata("csr")
    pp.highly_variable_genes(adata, n_top_genes=15, batch_key="batch")
    ranks = []
    for name in ("a", "b"):
        sub = adata[adata.obs["batch"] == name].copy()
        pp.highly_variable_genes(sub, n_top_genes=15)
        ranks.append(sub.var["highly_variable_rank"].to_numpy())
    ranks = np.array(ranks)
    nbatches = (~np.isnan(ranks)).sum(axis=0)
    with np.errstate(all="ignore"), pytest.warns(RuntimeWarning):
        median = np.nanmedian(ranks, axis=0)
    np.testing.assert_array_equal(adata.var["highly_variable_nbatches"], nbatches)
    np.testing.assert_allclose(adata.var["highly_variable_rank"], median)
    key = np.where(np.isnan(median), np.inf, median)
    expected = np.lexsort((-nbatches, key))[:15]
    np.testing.assert_array_equal(np.flatnonzero(adata.var["highly_variable"]), np.sort(expected))


def test_hvg_n_top_genes_clamped():
    adata, _ = _adata("csr", n_vars=40)
    with pytest.warns(UserWarning, match="n_top_genes=100"):
        pp.highly_variable_genes(adata, n_top_genes=100)
    assert adata.var["highly_variable"].all()


# ---- scale / pca -----------------------------------------------------------------------


def _log_adata(fmt: str = "csr") -> ad.AnnData:
    adata, _ = _adata(fmt)
    pp.preprocess(adata, n_top_genes=60)
    return adata


@pytest.mark.parametrize("fmt", ["csr", "dense"])
def test_scale(fmt):
    adata = _log_adata(fmt)
    pp.scale(adata, max_value=None)
    hv = adata.var["highly_variable"].to_numpy()
    out = adata.obsm["scaled"]
    assert out.shape == (adata.n_obs, hv.sum())
    assert out.dtype == np.float32
    np.testing.assert_array_equal(adata.uns["scaled"]["var_names"], adata.var_names[hv])
    x = _dense(adata.layers["log1p"])[:, hv].astype(np.float64)
    expected = (x - x.mean(axis=0)) / x.std(axis=0, ddof=1)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    pp.scale(adata, max_value=1.5, key_added="clipped")
    assert adata.obsm["clipped"].max() <= 1.5
    assert adata.obsm["clipped"].min() >= -1.5
    np.testing.assert_allclose(adata.obsm["clipped"], np.clip(expected, -1.5, 1.5), atol=1e-5)


def test_scale_without_centering_or_hvg():
    adata = _log_adata("csr")
    pp.scale(adata, zero_center=False, max_value=None, use_highly_variable=False)
    x = adata.layers["log1p"].toarray().astype(np.float64)
    std = x.std(axis=0, ddof=1)
    std[std == 0] = 1
    np.testing.assert_allclose(adata.obsm["scaled"], x / std, rtol=1e-5, atol=1e-6)


def _same_up_to_sign(a: np.ndarray, b: np.ndarray, **kwargs: float) -> None:
    signs = np.sign((a * b).sum(axis=0))
    np.testing.assert_allclose(a, b * signs, **kwargs)


def test_pca_matches_sklearn_dense():
    rng = np.random.default_rng(3)
    n_obs, n_genes = 150, 80
    latent = rng.normal(size=(n_obs, 4)) * [5, 3, 2, 1]
    x = np.log1p(np.abs(latent @ rng.normal(size=(4, n_genes)) + rng.normal(size=(n_obs, n_genes))))
    adata = ad.AnnData(x.astype(np.float32))
    adata.layers["log1p"] = adata.X.copy()
    pp.pca(adata, n_comps=5, use_highly_variable=False, max_value=None)
    z = (x - x.mean(axis=0)) / x.std(axis=0, ddof=1)
    ref = PCA(n_components=5, svd_solver="full").fit(z)
    _same_up_to_sign(adata.obsm["X_pca"], ref.transform(z), rtol=1e-3, atol=1e-3)
    _same_up_to_sign(adata.varm["PCs"], ref.components_.T, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(
        adata.uns["pca"]["variance_ratio"], ref.explained_variance_ratio_, rtol=1e-4
    )
    # without scaling: PCA of the centred data
    pp.pca(adata, n_comps=3, use_highly_variable=False, scale=False, key_added="X_raw")
    ref = PCA(n_components=3, svd_solver="full").fit(x)
    _same_up_to_sign(adata.obsm["X_raw"], ref.transform(x), rtol=1e-3, atol=1e-3)


def test_pca_sparse_matches_dense():
    adata = _log_adata("csr")
    dense = adata.copy()
    dense.layers["log1p"] = dense.layers["log1p"].toarray()
    pp.pca(adata, n_comps=5, max_value=None)
    pp.pca(dense, n_comps=5, max_value=None)
    assert sp.issparse(adata.layers["log1p"])
    _same_up_to_sign(adata.obsm["X_pca"], dense.obsm["X_pca"], rtol=1e-3, atol=1e-3)
    hv = adata.var["highly_variable"].to_numpy()
    assert adata.varm["PCs"].shape == (adata.n_vars, 5)
    assert not adata.varm["PCs"][~hv].any()
    assert adata.uns["pca"]["params"]["clipped"] is False
    assert dense.uns["pca"]["params"]["clipped"] is False


def test_pca_clips_dense_input():
    adata = _log_adata("dense")
    pp.pca(adata, n_comps=4, max_value=0.5)
    pp.scale(adata, max_value=0.5)
    ref = PCA(n_components=4, svd_solver="full").fit(adata.obsm["scaled"].astype(np.float64))
    _same_up_to_sign(adata.obsm["X_pca"], ref.transform(adata.obsm["scaled"]), rtol=1e-3, atol=1e-3)
    assert adata.uns["pca"]["params"]["clipped"] is True


def test_pca_n_comps_clamped():
    adata = _log_adata("csr")
    with pytest.warns(UserWarning, match="n_comps=500"):
        pp.pca(adata, n_comps=500)
    assert adata.obsm["X_pca"].shape == (adata.n_obs, 59)


# ---- input errors ----------------------------------------------------------------------


def test_negative_counts_raise():
    adata, _ = _adata("csr")
    adata.X.data[0] = -1
    for func in (pp.normalize_total, pp.highly_variable_genes, pp.preprocess):
        with pytest.raises(ChronotopeInputError, match="negative"):
            func(adata)


@pytest.mark.parametrize("fmt", ["csr", "dense"])
def test_nan_counts_raise(fmt):
    adata, _ = _adata(fmt)
    if fmt == "csr":
        adata.X.data[0] = np.nan
    else:
        adata.X[0, 0] = np.nan
    for func in (pp.normalize_total, pp.highly_variable_genes, pp.preprocess):
        with pytest.raises(ChronotopeInputError, match="NaN"):
            func(adata)


@pytest.mark.parametrize("fmt", ["csr", "dense"])
def test_all_zero_raises(fmt):
    x = np.zeros((20, 10), dtype=np.float32)
    adata = ad.AnnData(sp.csr_matrix(x) if fmt == "csr" else x)
    for func in (pp.normalize_total, pp.highly_variable_genes, pp.preprocess):
        with pytest.raises(ChronotopeInputError, match="all zero"):
            func(adata)


def test_missing_layer_names_available_layers():
    adata, _ = _adata("csr")
    adata.layers["counts"] = adata.X.copy()
    with pytest.raises(ChronotopeInputError, match=r"'normalized'.*'counts'.*normalize_total"):
        pp.log1p(adata)
    with pytest.raises(ChronotopeInputError, match=r"'log1p'.*chronotope.pp.log1p"):
        pp.pca(adata)
    with pytest.raises(ChronotopeInputError, match=r"\['nope'\] not found \(have: 'counts'\)"):
        pp.highly_variable_genes(adata, layer="nope")


def test_pca_and_scale_need_highly_variable():
    adata, _ = _adata("csr")
    pp.normalize_total(adata)
    pp.log1p(adata)
    for func in (pp.pca, pp.scale):
        with pytest.raises(ChronotopeInputError, match="highly_variable_genes"):
            func(adata)


def test_bad_arguments_raise():
    adata, _ = _adata("csr")
    with pytest.raises(ChronotopeInputError, match="flavor"):
        pp.highly_variable_genes(adata, flavor="cell_ranger")
    with pytest.raises(ChronotopeInputError, match="n_top_genes"):
        pp.preprocess(adata, n_top_genes=0)
    with pytest.raises(ChronotopeInputError, match="target_sum"):
        pp.normalize_total(adata, target_sum=-1.0)
    with pytest.raises(ChronotopeInputError, match="batch_key 'nope'"):
        pp.highly_variable_genes(adata, batch_key="nope")
    adata.obs["tiny"] = ["x"] + ["y"] * (adata.n_obs - 1)
    with pytest.raises(ChronotopeInputError, match="at least 2"):
        pp.highly_variable_genes(adata, batch_key="tiny")
    adata.obs["gap"] = pd.Series([None] + ["y"] * (adata.n_obs - 1), index=adata.obs_names)
    with pytest.raises(ChronotopeInputError, match="missing"):
        pp.preprocess(adata, batch_key="gap")
    assert not adata.layers  # nothing written before the error


def test_log1p_rejects_negative_values():
    adata, _ = _adata("dense")
    adata.layers["normalized"] = -np.ones(adata.shape, dtype=np.float32)
    with pytest.raises(ChronotopeInputError, match="negative"):
        pp.log1p(adata)


# ---- copy=True and round trip ----------------------------------------------------------


def test_copy_returns_new_object_and_leaves_input_alone():
    adata, _ = _adata("csr")
    x_before = adata.X.copy()
    var_before = adata.var.copy()
    out = pp.preprocess(adata, n_top_genes=30, copy=True)
    assert out is not adata
    assert not adata.layers and not adata.uns
    pd.testing.assert_frame_equal(adata.var, var_before)
    assert "highly_variable" in out.var and {"normalized", "log1p"} <= set(out.layers)
    out2 = pp.pca(out, n_comps=3, copy=True)
    assert "X_pca" in out2.obsm and "X_pca" not in out.obsm
    out3 = pp.scale(out, copy=True)
    assert "scaled" in out3.obsm and "scaled" not in out.obsm
    assert pp.normalize_total(adata, copy=True) is not adata
    assert pp.highly_variable_genes(adata, n_top_genes=30, copy=True) is not adata
    assert pp.log1p(out, copy=True) is not out
    assert pp.normalize_total(adata) is None
    assert not (adata.X != x_before).nnz


def test_results_survive_h5ad(tmp_path):
    adata, _ = _adata("csr")
    pp.preprocess(adata, n_top_genes=30, batch_key="batch")
    pp.pca(adata, n_comps=3)
    pp.scale(adata)
    path = tmp_path / "pp.h5ad"
    adata.write_h5ad(path)
    back = ad.read_h5ad(path)
    np.testing.assert_array_equal(back.var["highly_variable"], adata.var["highly_variable"])
    np.testing.assert_allclose(back.obsm["X_pca"], adata.obsm["X_pca"])
    assert back.uns["hvg"]["params"]["batch_key"] == "batch"
    assert list(back.uns["scaled"]["var_names"]) == list(adata.uns["scaled"]["var_names"])


# ---- the embedded demo -----------------------------------------------------------------


def test_demo_dlpfc_preprocess():
    from chronotope.datasets import demo

    adata = demo("dlpfc_151673")
    x_before = adata.X.copy()
    pp.preprocess(adata, n_top_genes=500)
    pp.pca(adata, n_comps=10)
    assert (adata.X != x_before).nnz == 0
    assert sp.issparse(adata.layers["log1p"])
    assert adata.var["highly_variable"].sum() == 500
    # highly variable genes are more variable than expected from their mean
    vnorm = adata.var["variances_norm"].to_numpy()
    hv = adata.var["highly_variable"].to_numpy()
    assert vnorm[hv].min() >= vnorm[~hv].max()
    assert adata.obsm["X_pca"].shape == (adata.n_obs, 10)
    ratio = adata.uns["pca"]["variance_ratio"]
    assert np.all(np.diff(ratio) <= 1e-9) and ratio.sum() < 1
    # the first components separate cortical layers better than chance: layer means differ
    layer = adata.obs["layer"].astype(str).to_numpy()
    ok = layer != "nan"
    pc1 = pd.Series(adata.obsm["X_pca"][ok, 0]).groupby(layer[ok]).mean()
    assert pc1.max() - pc1.min() > 1.0
