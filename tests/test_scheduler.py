"""``scheduler=`` on the four splittable workloads: a Dask cluster gives the in-process result.

One LocalCluster of two worker processes is shared by the whole module (starting one costs
seconds); ``parallel_map`` accepts the ``distributed.Client`` it yields. The tasks really go
through pickling to other processes, so what is shipped (operators, sparse blocks, model
weights) must survive it.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from chronotope import tl
from chronotope.parallel import describe_scheduler

distributed = pytest.importorskip("distributed")

RTOL = 1e-5


def _maxrel(a: np.ndarray, b: np.ndarray) -> float:
    a = a.toarray() if sp.issparse(a) else np.asarray(a, dtype=np.float64)
    b = b.toarray() if sp.issparse(b) else np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape
    return float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-300))


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        memory_limit="2GB",
    )
    cl = distributed.Client(cluster)
    try:
        yield cl
    finally:
        cl.close()
        cluster.close()


# ------------------------------------------------------------------ diffusion correction
def _undiffuse_data():
    from test_undiffuse import _adata

    ad, _ = _adata()
    return ad


FIXED = {"sigma": 1.5, "bleed": 0.5, "background": 0.2, "diagnostics": False}


@pytest.mark.parametrize("method", ["pergene", "lowrank"])
def test_undiffuse_scheduler_equals_inprocess(client, method):
    ad = _undiffuse_data()
    # a tiny memory budget: several gene batches (tasks) for 12 genes
    kw = {"method": method, "memory_gb": 0.00025, **FIXED}
    if method == "pergene":  # the thinned (n_iter="auto") path: test_em_deconvolve_...
        kw["n_iter"] = 40
    ref = tl.undiffuse(ad, copy=True, **kw)
    got = tl.undiffuse(ad, copy=True, scheduler=client, **kw)
    if method == "pergene":
        assert ref.uns["undiffused"]["n_batches"] >= 3
    else:
        assert ref.uns["undiffused"]["refined"]
    assert _maxrel(ref.layers["undiffused"], got.layers["undiffused"]) < RTOL
    np.testing.assert_allclose(
        ref.obs["diffusion_fraction"], got.obs["diffusion_fraction"], rtol=RTOL, atol=1e-7
    )
    np.testing.assert_array_equal(ref.var["undiffused_n_iter"], got.var["undiffused_n_iter"])
    assert got.uns["undiffused"]["params"]["scheduler"] == describe_scheduler(client)
    assert ref.uns["undiffused"]["params"]["scheduler"] == "in-process"


def test_em_deconvolve_sparse_kernel_ships(client):
    """The torch sparse kernel of an irregular array travels to the workers intact."""
    from chronotope.undiffuse import DiffusionOperator, em_deconvolve, make_kernel

    rng = np.random.default_rng(0)
    coords = rng.uniform(0, 15, (200, 2))
    op = DiffusionOperator(make_kernel(coords, 1.2, method="sparse"), np.ones(200, bool), 0.5, 0.1)
    x = sp.csr_matrix(rng.poisson(3.0, (200, 9)).astype(np.float64))
    ref = em_deconvolve(x, op, n_iter="auto", max_iter=30, batch_size=2)
    got = em_deconvolve(x, op, n_iter="auto", max_iter=30, batch_size=2, scheduler=client)
    assert ref.extra["n_batches"] == 5
    assert _maxrel(ref.z, got.z) < RTOL
    np.testing.assert_array_equal(ref.n_iter, got.n_iter)
    np.testing.assert_allclose(ref.heldout_trace, got.heldout_trace, rtol=RTOL)


def test_bad_scheduler_fails_before_work():
    ad = _undiffuse_data()
    with pytest.raises(ValueError, match="local:N"):
        tl.undiffuse(ad, scheduler="local:0", **FIXED)


# ------------------------------------------------------------------ domains (tiles)
@pytest.fixture(scope="module")
def domain_fit():
    from chronotope import pp
    from chronotope.domains import DomainModel
    from test_domains_model import banded_tissue

    ad = banded_tissue(n_side=20, n_genes=80)
    pp.spatial_neighbors(ad, n_neighbors=6)
    x = np.log1p(ad.X.toarray())
    x = x - x.mean(0)
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    scores, loadings = (u[:, :10] * s[:10]).astype(np.float32), vt[:10].T.astype(np.float32)
    conn = sp.csr_matrix(ad.obsp["spatial_connectivities"])
    model = DomainModel(seed=0, max_epochs=5).fit(scores, loadings, conn)
    return model, scores, loadings, conn


def test_domain_embedding_tiles_equal_one_pass(client, domain_fit):
    model, scores, loadings, conn = domain_fit
    one = model.get_embedding()
    lat = model.get_latent()
    # in-process tiles, Dask tiles, and new data (the hop stack rebuilt) on Dask
    assert _maxrel(one, model.get_embedding(tile_size=37)) < RTOL
    assert _maxrel(one, model.get_embedding(scheduler=client, tile_size=50)) < RTOL
    assert _maxrel(lat, model.get_latent(scheduler=client, tile_size=64)) < RTOL
    new = model.get_embedding(scores, loadings, conn, scheduler=client, tile_size=90)
    assert _maxrel(model.get_embedding(scores, loadings, conn), new) < RTOL
    with pytest.raises(ValueError, match="tile_size"):
        model.get_embedding(tile_size=0)


def test_spatial_domains_scheduler(client):
    from test_domains_model import FAST, banded_tissue

    ad = banded_tissue(n_side=20, n_genes=120)
    fast = {**FAST, "max_epochs": 10}
    ref = tl.spatial_domains(ad, 3, seed=0, copy=True, **fast)
    got = tl.spatial_domains(ad, 3, seed=0, copy=True, scheduler=client, tile_size=100, **fast)
    assert _maxrel(ref.obsm["X_domain"], got.obsm["X_domain"]) < RTOL
    assert _maxrel(ref.obsm["X_domain_latent"], got.obsm["X_domain_latent"]) < RTOL
    assert got.uns["domain"]["params"]["scheduler"].startswith("dask client")

