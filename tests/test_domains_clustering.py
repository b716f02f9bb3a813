"""Tests for chronotope.domains.clustering (gmm_eee, kmeans, leiden, refine_labels)."""

from __future__ import annotations

import sys
import tracemalloc
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.metrics import adjusted_rand_score
from sklearn.mixture import GaussianMixture

from chronotope._errors import ChronotopeInputError, ConvergenceWarning
from chronotope.domains import clustering
from chronotope.domains.clustering import (
    cluster_embedding,
    gmm_eee,
    kmeans,
    leiden,
    refine_labels,
)


# --------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------
def _rotation(d: int, rng: np.random.Generator) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return q


def shared_cov_blobs(seed: int = 0, n_per: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Four well-separated clusters in 5-D sharing one anisotropic covariance."""
    rng = np.random.default_rng(seed)
    centres = np.array([[0, 0, 0, 0, 0], [12, 0, 0, 0, 0], [0, 12, 0, 0, 0], [12, 12, 6, 0, 0]])
    truth = np.repeat(np.arange(4), n_per)
    scales = np.array([2.0, 1.0, 0.7, 0.5, 0.5])  # shared, axis-aligned before rotation
    X = centres[truth] + rng.standard_normal((len(truth), 5)) * scales
    return X @ _rotation(5, rng), truth


def parallel_strips(seed: int = 0, n_per: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """Three long parallel clusters (sd 5 along them, 1 across, 6 apart), rotated."""
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(3), n_per)
    X = np.column_stack([np.zeros(len(truth)), (truth - 1) * 6.0])
    X = X + rng.standard_normal((len(truth), 2)) * [5.0, 1.0]
    return X @ _rotation(2, rng), truth


def isotropic_blobs(n_centres: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.uniform(-20, 20, size=(n_centres, 10))
    truth = np.repeat(np.arange(n_centres), 80)
    return centres[truth] + rng.standard_normal((len(truth), 10)), truth


def small_noisy_tail(seed: int = 0, n_per: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Five clusters on 2 signal dimensions plus 18 heavy-tailed low-variance ones.

    The shape of the mouse olfactory bulb embedding (262 spots, PCA 20): two strong
    components and a flat tail of noise, noisier in one cluster (low-count spots).
    """
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(5), n_per)
    signal = np.c_[truth * 6.0, np.zeros(len(truth))] + rng.standard_normal((len(truth), 2))
    scale = np.where(truth == 4, 3.0, 1.0)[:, None]
    tail = rng.standard_t(5, size=(len(truth), 18)) * 0.5 * scale
    return np.c_[signal, tail], truth


def ari(a: np.ndarray, b: np.ndarray) -> float:
    return float(adjusted_rand_score(a, b))


# --------------------------------------------------------------------------------------
# gmm_eee and kmeans
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("func", [gmm_eee, kmeans])
def test_recovers_shared_covariance_blobs(func):
    X, truth = shared_cov_blobs()
    labels = func(X, 4)
    assert ari(labels, truth) > 0.99


def test_gmm_eee_beats_kmeans_on_elongated_clusters():
    X, truth = parallel_strips()
    score_gmm = ari(gmm_eee(X, 3), truth)
    score_km = ari(kmeans(X, 3), truth)
    assert score_gmm > 0.95
    assert score_km < 0.6  # k-means cuts across the strips


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gmm_eee_small_data_does_not_collapse(seed):
    """The full tied covariance (210 parameters at d = 20) on 250 points fits the noisy
    tail: some components hold only a few outliers each (the mouse olfactory bulb gave
    225, 14, 8, 8, 7 spots, ARI 0.05). BIC then prefers the spherical tied model."""
    X, truth = small_noisy_tail(seed)
    eee = gmm_eee(X, 5, covariance="EEE")
    assert ari(eee, truth) < 0.3  # the collapse, kept reachable on purpose
    assert (np.bincount(eee, minlength=5) < 13).sum() >= 2  # components of a few outliers
    labels = gmm_eee(X, 5)
    assert ari(labels, truth) > 0.9
    np.testing.assert_array_equal(labels, gmm_eee(X, 5, covariance="EII"))


def test_gmm_eee_bic_keeps_eee_when_data_pay_for_it():
    X, truth = parallel_strips()
    np.testing.assert_array_equal(gmm_eee(X, 3), gmm_eee(X, 3, covariance="EEE"))
    assert ari(gmm_eee(X, 3, covariance="EII"), truth) < 0.6  # spherical cuts across


def test_spherical_em_matches_kmeans_model():
    """EII EM: one shared variance, the mean of the per-dimension within variances."""
    X, truth = isotropic_blobs(3)
    _, start = clustering._eee_em(X, truth, 3, max_iter=0, tol=1e-6, reg_covar=0.0, spherical=True)
    means = np.array([X[truth == j].mean(axis=0) for j in range(3)])
    sigma2 = ((X - means[truth]) ** 2).mean()
    np.testing.assert_allclose(start["means_init"], means, atol=1e-10)
    np.testing.assert_allclose(start["precisions_init"], np.eye(10) / sigma2, rtol=1e-6)


def test_gmm_eee_float32_and_canonical_labels():
    X, truth = shared_cov_blobs(seed=3, n_per=400)
    sizes = np.array([50, 400, 120, 230])
    keep = np.concatenate([np.flatnonzero(truth == k)[: sizes[k]] for k in range(4)])
    X, truth = X[keep].astype(np.float32), truth[keep]
    labels = gmm_eee(X, 4)
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(labels), np.sort(sizes)[::-1])
    np.testing.assert_array_equal(labels, gmm_eee(X, 4))  # deterministic
    assert ari(labels, truth) == 1.0


def test_canonical_labels_order():
    labels = np.array([5, 5, 2, 9, 9, 9, 2, 7])
    # sizes: 9 -> 3, 5 -> 2, 2 -> 2 (5 appears first), 7 -> 1
    np.testing.assert_array_equal(clustering._canonical_labels(labels), [1, 1, 2, 0, 0, 0, 2, 3])


def test_screening_em_matches_sklearn():
    """The numpy EM that ranks starting points reaches scikit-learn's tied-GMM optimum."""
    X, truth = shared_cov_blobs(seed=5, n_per=100)
    part = (truth + (np.arange(len(truth)) % 7 == 0)) % 4  # a perturbed partition
    ll, start = clustering._eee_em(X, part, 4, max_iter=500, tol=1e-10, reg_covar=1e-6)
    gm = GaussianMixture(
        4,
        covariance_type="tied",
        init_params="random_from_data",
        tol=1e-10,
        max_iter=500,
        **clustering._eee_em(X, part, 4, max_iter=0, tol=1e-10, reg_covar=1e-6)[1],
    ).fit(X)
    np.testing.assert_allclose(ll, gm.lower_bound_, rtol=1e-6)
    np.testing.assert_allclose(start["means_init"], gm.means_, atol=1e-5)
    np.testing.assert_allclose(start["precisions_init"], gm.precisions_, rtol=1e-4, atol=1e-6)


def test_gmm_eee_warns_without_convergence():
    X, _ = parallel_strips(seed=2)
    with pytest.warns(ConvergenceWarning, match="max_iter=1"):
        gmm_eee(X, 5, max_iter=1, tol=1e-12)


def test_gmm_eee_warns_on_empty_components():
    X = np.repeat(np.eye(3), 10, axis=0)  # 3 distinct rows
    with pytest.warns(UserWarning, match="only 3 are non-empty"):
        labels = gmm_eee(X, 4)
    np.testing.assert_array_equal(np.bincount(labels), [10, 10, 10])


# --------------------------------------------------------------------------------------
# leiden
# --------------------------------------------------------------------------------------
@pytest.fixture
def leiden_runs(monkeypatch):
    """Count (and record the resolution of) every Leiden run."""
    pytest.importorskip("leidenalg")
    pytest.importorskip("igraph")
    runs: list[float] = []
    original = clustering._run_leiden

    def counting(graph, resolution, seed):
        runs.append(resolution)
        return original(graph, resolution, seed)

    monkeypatch.setattr(clustering, "_run_leiden", counting)
    return runs


@pytest.mark.parametrize("n_centres", [4, 7])
def test_leiden_finds_blobs(leiden_runs, n_centres):
    X, truth = isotropic_blobs(n_centres)
    labels, resolution = leiden(X, n_centres)
    assert len(np.unique(labels)) == n_centres
    assert ari(labels, truth) > 0.99
    assert resolution > 0
    assert len(leiden_runs) <= 8


@pytest.mark.parametrize("n_clusters", [4, 7, 12])
def test_leiden_bisection_hits_count_in_few_runs(leiden_runs, n_clusters):
    # Uniform points: no natural count, the resolution alone decides.
    X = np.random.default_rng(0).random((800, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "closest found" warning
        labels, resolution = leiden(X, n_clusters)
    assert len(np.unique(labels)) == n_clusters
    np.testing.assert_array_equal(np.bincount(labels), np.sort(np.bincount(labels))[::-1])
    # Doubling/halving from 1, then log bisection: about log2 of the range, not 30.
    assert 1 <= len(leiden_runs) <= 12
    assert resolution in leiden_runs
    # The returned resolution reproduces the partition.
    again, res_again = leiden(X, resolution=resolution)
    assert res_again == resolution
    np.testing.assert_array_equal(again, labels)


def test_leiden_on_a_graph(leiden_runs):
    from chronotope.graph import knn_graph

    X, truth = isotropic_blobs(4)
    conn, _ = knn_graph(X, 10)
    labels, _ = leiden(conn, 4)
    assert ari(labels, truth) > 0.99
    # A directed (non-symmetric) graph is symmetrised, not rejected.
    labels_directed, _ = leiden(sp.triu(conn).tocsr(), 4)
    assert ari(labels_directed, truth) > 0.99


def test_leiden_fewer_clusters_than_components(leiden_runs):
    X, _ = isotropic_blobs(7)  # 7 far-apart blobs: 7 components of the kNN graph
    with pytest.warns(UserWarning, match="7 connected components"):
        labels, _ = leiden(X, 4)
    assert len(np.unique(labels)) == 7
    assert len(leiden_runs) <= 3


def test_leiden_closest_with_warning(leiden_runs):
    X = np.random.default_rng(0).random((300, 2))
    with pytest.warns(UserWarning, match="closest"):
        labels, _ = leiden(X, 25, max_iter_search=2)
    assert len(leiden_runs) == 2
    assert len(np.unique(labels)) != 25


def test_leiden_missing_dependency(monkeypatch):
    monkeypatch.setitem(sys.modules, "leidenalg", None)
    with pytest.raises(ImportError, match=r"pip install 'chronotope\[leiden\]'"):
        leiden(np.random.default_rng(0).random((50, 2)), 3)


# --------------------------------------------------------------------------------------
# refine_labels
# --------------------------------------------------------------------------------------
def _checkerboard(side: int = 40, block: int = 10) -> tuple[np.ndarray, np.ndarray]:
    ii, jj = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    coords = np.column_stack([ii.ravel(), jj.ravel()]).astype(float)
    labels = ((ii // block + jj // block) % 2).ravel()
    return coords, labels


def test_refine_fixes_isolated_flips():
    coords, clean = _checkerboard()
    # Spots at least 2 away from every block border, and 3 apart from each other.
    inner = (coords % 10 >= 2).all(axis=1) & (coords % 10 <= 7).all(axis=1)
    pick = np.flatnonzero(inner & (coords % 3 == 0).all(axis=1))
    noisy = clean.copy()
    noisy[pick] = 1 - noisy[pick]
    refined = refine_labels(noisy, coords)
    assert len(pick) > 50
    np.testing.assert_array_equal(refined[pick], clean[pick])
    assert (refined == clean).mean() > 0.98


def test_refine_leaves_clean_blocks_mostly_unchanged():
    coords, clean = _checkerboard()
    refined = refine_labels(clean, coords)
    assert (refined == clean).mean() > 0.98
    interior = (coords % 10 >= 1).all(axis=1) & (coords % 10 <= 8).all(axis=1)
    np.testing.assert_array_equal(refined[interior], clean[interior])


def test_refine_ties():
    # A tie that includes the own label keeps it.
    two = np.array([[0.0, 0.0], [1.0, 0.0]])
    np.testing.assert_array_equal(
        refine_labels(np.array(["a", "b"]), two, n_neighbors=1), ["a", "b"]
    )
    # A tie between other labels goes to the nearest of the tied spots.
    coords = np.array([[0.0, 0.0], [0.0, 1.0], [0.0, -2.0], [2.5, 0.0], [-3.0, 0.0]])
    labels = np.array(["x", "b", "a", "a", "b"])
    assert refine_labels(labels, coords, n_neighbors=4)[0] == "b"
    # Majority wins; labels keep their dtype.
    out = refine_labels(np.array([7, 3, 3, 3, 3]), coords, n_neighbors=4)
    assert out.dtype == np.int64
    assert out[0] == 3


def test_refine_large_input_is_sparse_and_fast():
    rng = np.random.default_rng(0)
    n = 200_000
    coords = rng.random((n, 2)) * 1000
    labels = (coords[:, 0] > 500).astype(np.int64) + 2 * (coords[:, 1] > 500)
    tracemalloc.start()
    try:
        refined = refine_labels(labels, coords, n_neighbors=6)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert refined.shape == (n,)
    assert (refined == labels).mean() > 0.99
    assert peak < 200e6  # O(n k); a dense n x n array would be 40 GB


# --------------------------------------------------------------------------------------
# dispatcher and input checks
# --------------------------------------------------------------------------------------
def test_cluster_embedding_dispatches():
    X, _ = shared_cov_blobs(n_per=60)
    np.testing.assert_array_equal(cluster_embedding(X, 4), gmm_eee(X, 4))
    np.testing.assert_array_equal(
        cluster_embedding(X, 4, method="kmeans", n_init=3), kmeans(X, 4, n_init=3)
    )
    with pytest.raises(ChronotopeInputError, match="needs n_clusters"):
        cluster_embedding(X, None, method="kmeans")


def test_cluster_embedding_leiden(leiden_runs):
    X, _ = isotropic_blobs(4)
    labels = cluster_embedding(X, 4, method="leiden", n_neighbors=10)
    np.testing.assert_array_equal(labels, leiden(X, 4, n_neighbors=10)[0])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("method", ["gmm", "kmeans", "leiden"])
def test_non_finite_embedding(bad, method):
    X, _ = shared_cov_blobs(n_per=20)
    X[3, 1] = bad
    with pytest.raises(ChronotopeInputError, match="NaN or infinite"):
        cluster_embedding(X, 3, method=method)


@pytest.mark.parametrize("n_clusters", [1, 0, 81, 2.5, True])
@pytest.mark.parametrize("func", [gmm_eee, kmeans])
def test_bad_n_clusters(func, n_clusters):
    X, _ = shared_cov_blobs(n_per=20)  # 80 observations
    with pytest.raises(ChronotopeInputError, match="between 2 and the number of observations"):
        func(X, n_clusters)


def test_bad_inputs():
    X, _ = shared_cov_blobs(n_per=20)
    with pytest.raises(ChronotopeInputError, match="'gmm', 'kmeans', 'leiden'"):
        cluster_embedding(X, 3, method="mclust")
    with pytest.raises(ChronotopeInputError, match="2-D"):
        gmm_eee(X[:, 0], 3)
    with pytest.raises(ChronotopeInputError, match="dense"):
        kmeans(sp.csr_matrix(X), 3)
    with pytest.raises(ChronotopeInputError, match="n_init"):
        gmm_eee(X, 3, n_init=0)
    with pytest.raises(ChronotopeInputError, match="covariance"):
        gmm_eee(X, 3, covariance="VVV")
    coords = np.random.default_rng(0).random((80, 2))
    with pytest.raises(ChronotopeInputError, match="80 rows"):
        refine_labels(np.zeros(79), coords)
    with pytest.raises(ChronotopeInputError, match="NaN"):
        refine_labels(np.r_[np.zeros(79), np.nan], coords)
    with pytest.raises(ChronotopeInputError, match="n_neighbors"):
        refine_labels(np.zeros(80), coords, n_neighbors=0)
