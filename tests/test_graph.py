"""Tests for chronotope.graph (builders, ops) and chronotope.pp.spatial_neighbors."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy.spatial.distance import cdist

from chronotope import graph, pp
from chronotope._errors import ChronotopeInputError
from chronotope.graph import (
    block_diagonal,
    gaussian_weights,
    grid_graph,
    knn_graph,
    normalize_adjacency,
    propagate,
    radius_graph,
    to_torch_sparse,
)

DATA_DIR = Path(
    os.environ.get(
        "CHRONOTOPE_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
    )
)
DLPFC = DATA_DIR / "dlpfc_151673_151674" / "humanpilot_10x"


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def hex_lattice(n_rows: int, n_cols: int, spacing: float = 1.0):
    """Hexagonal lattice in "doubled" array coordinates, like Visium's (row, col)."""
    r, c = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    col2 = 2 * c + (r % 2)  # Visium: neighbours at (0, +-2), (+-1, +-1)
    xy = np.column_stack([col2.ravel() * spacing / 2, r.ravel() * spacing * np.sqrt(3) / 2])
    return xy, r.ravel(), col2.ravel()


def hex_hops(row: np.ndarray, col2: np.ndarray) -> np.ndarray:
    """Pairwise hop distance on a hex lattice in doubled coordinates."""
    dr = np.abs(row[:, None] - row[None, :])
    dc = np.abs(col2[:, None] - col2[None, :])
    return dr + np.maximum(0, (dc - dr) // 2)


def rotate(xy: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return xy @ np.array([[c, -s], [s, c]]).T


def edges(conn: sp.csr_matrix) -> np.ndarray:
    """Dense boolean adjacency of a small graph."""
    return conn.toarray().astype(bool)


def check_graph(conn: sp.csr_matrix, dist: sp.csr_matrix, coords: np.ndarray) -> None:
    """Invariants shared by every builder."""
    n = coords.shape[0]
    assert isinstance(conn, sp.csr_matrix) and isinstance(dist, sp.csr_matrix)
    assert conn.shape == dist.shape == (n, n)
    assert conn.dtype == np.float32
    np.testing.assert_array_equal(conn.data, 1.0)
    assert (conn != conn.T).nnz == 0  # symmetric
    np.testing.assert_array_equal(conn.indptr, dist.indptr)  # same structure
    np.testing.assert_array_equal(conn.indices, dist.indices)
    assert conn.has_sorted_indices
    rows = np.repeat(np.arange(n), np.diff(conn.indptr))
    expected = np.linalg.norm(coords[rows] - coords[conn.indices], axis=1)
    np.testing.assert_allclose(dist.data, expected, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------
# grid
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("n_rings", "expected"), [(1, 6), (2, 18), (3, 36)])
def test_grid_hex_known_neighbourhoods(n_rings, expected):
    xy, row, col2 = hex_lattice(16, 16, spacing=137.0)
    xy = rotate(xy, 0.3) + np.array([5000.0, -200.0])  # arbitrary orientation and offset
    conn, dist = grid_graph(xy, n_rings)
    check_graph(conn, dist, xy)
    hops = hex_hops(row, col2)
    truth = (hops >= 1) & (hops <= n_rings)
    np.testing.assert_array_equal(edges(conn), truth)
    interior = truth.sum(axis=1) == expected
    assert interior.sum() > 50
    np.testing.assert_array_equal(np.diff(conn.indptr)[interior], expected)


@pytest.mark.parametrize("n_rings", [1, 2, 3])
def test_grid_hex_tolerates_jitter_and_missing_spots(n_rings):
    rng = np.random.default_rng(n_rings)
    xy, row, col2 = hex_lattice(30, 30, spacing=100.0)
    keep = rng.random(len(xy)) > 0.15  # 15 % spots missing
    xy = xy[keep] + rng.normal(scale=5.0, size=(keep.sum(), 2))  # jitter 5 % of spacing
    row, col2 = row[keep], col2[keep]
    conn, dist = grid_graph(rotate(xy, 1.0), n_rings)
    check_graph(conn, dist, rotate(xy, 1.0))
    hops = hex_hops(row, col2)
    # rings count steps on the lattice, so missing spots do not cut anything off
    np.testing.assert_array_equal(edges(conn), (hops >= 1) & (hops <= n_rings))


def test_grid_square_with_missing_spots_and_anisotropy():
    rng = np.random.default_rng(8)
    ij = np.stack(np.meshgrid(np.arange(20), np.arange(20), indexing="ij"), -1).reshape(-1, 2)
    ij = ij[rng.random(len(ij)) > 0.2]
    xy = ij * [150.0, 160.0] + rng.normal(scale=4.0, size=ij.shape)  # x / y scaled differently
    conn, dist = grid_graph(xy, 2, kind="square")
    check_graph(conn, dist, xy)
    hops = np.abs(ij[:, None, :] - ij[None, :, :]).sum(-1)
    np.testing.assert_array_equal(edges(conn), (hops >= 1) & (hops <= 2))


@pytest.mark.parametrize(
    ("n_rings", "diagonals", "expected"),
    [(1, False, 4), (2, False, 12), (1, True, 8), (2, True, 24)],
)
def test_grid_square_known_neighbourhoods(n_rings, diagonals, expected):
    ij = np.stack(np.meshgrid(np.arange(15), np.arange(15), indexing="ij"), -1).reshape(-1, 2)
    xy = rotate(ij * 200.0, -0.2)
    conn, dist = grid_graph(xy, n_rings, diagonals=diagonals)  # kind inferred as square
    check_graph(conn, dist, xy)
    d = np.abs(ij[:, None, :] - ij[None, :, :])
    hops = d.max(-1) if diagonals else d.sum(-1)
    np.testing.assert_array_equal(edges(conn), (hops >= 1) & (hops <= n_rings))
    assert np.diff(conn.indptr).max() == expected


def test_grid_kind_forced_and_spacing_given():
    xy, _, _ = hex_lattice(8, 8, spacing=2.0)
    conn_auto, _ = grid_graph(xy)
    conn_hex, _ = grid_graph(xy, kind="hex", spacing=2.0)
    assert (conn_auto != conn_hex).nnz == 0
    # Forcing "square" on a hex lattice only shrinks the cut-off: still the 6 neighbours
    # at the spacing (the cut-off 1.21 s excludes the sqrt(3) s shell).
    conn_sq, _ = grid_graph(xy, kind="square")
    assert (conn_sq != conn_hex).nnz == 0


# --------------------------------------------------------------------------------------
# kNN and radius against brute force
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("k", [1, 6])
def test_knn_matches_brute_force(dim, k):
    rng = np.random.default_rng(dim * 10 + k)
    xy = rng.normal(size=(150, dim))
    full = cdist(xy, xy)
    np.fill_diagonal(full, np.inf)
    nn = np.argsort(full, axis=1)[:, :k]
    directed = np.zeros_like(full, dtype=bool)
    directed[np.repeat(np.arange(len(xy)), k), nn.ravel()] = True
    conn, dist = knn_graph(xy, k)
    check_graph(conn, dist, xy)
    np.testing.assert_array_equal(edges(conn), directed | directed.T)
    conn_m, dist_m = knn_graph(xy, k, symmetrize="mutual")
    check_graph(conn_m, dist_m, xy)
    np.testing.assert_array_equal(edges(conn_m), directed & directed.T)
    assert np.diff(conn.indptr).min() >= k
    assert np.diff(conn_m.indptr).max() <= k


def test_knn_coincident_spots_keep_zero_distances():
    rng = np.random.default_rng(1)
    xy = rng.normal(size=(40, 2))
    xy = np.vstack([xy, xy[:5], xy[:5]])  # three spots at each of 5 positions
    conn, dist = knn_graph(xy, 3)
    check_graph(conn, dist, xy)
    assert conn.diagonal().sum() == 0  # never a self loop
    assert np.diff(conn.indptr).min() >= 3
    # twins are connected, and their distance-0 edges are stored explicitly
    for i in range(5):
        for j in (40 + i, 45 + i):
            assert conn[i, j] == 1
    assert (dist.data == 0).sum() == 5 * 6  # 3 twins -> 6 directed zero-length edges each


def test_radius_matches_brute_force():
    rng = np.random.default_rng(2)
    xy = rng.uniform(0, 10, size=(300, 2))
    conn, dist = radius_graph(xy, 1.3)
    check_graph(conn, dist, xy)
    full = cdist(xy, xy)
    truth = full <= 1.3
    np.fill_diagonal(truth, False)
    np.testing.assert_array_equal(edges(conn), truth)
    assert dist.data.max() <= 1.3


def test_include_self_stores_explicit_zero_diagonal():
    xy = np.random.default_rng(3).normal(size=(50, 2))
    for conn, dist in (
        knn_graph(xy, 4, include_self=True),
        radius_graph(xy, 0.5, include_self=True),
        grid_graph(hex_lattice(6, 6)[0], include_self=True),
    ):
        n = conn.shape[0]
        np.testing.assert_array_equal(conn.diagonal(), 1.0)
        assert dist.nnz == conn.nnz
        np.testing.assert_array_equal(dist.diagonal(), 0.0)
        assert (dist.data == 0).sum() >= n  # the zeros are stored, not implicit


def test_degenerate_inputs():
    conn, _ = radius_graph(np.zeros((1, 2)), 1.0)
    assert conn.nnz == 0 and conn.shape == (1, 1)
    conn, _ = grid_graph(np.array([[0.0, 0.0]]))
    assert conn.nnz == 0
    with pytest.warns(UserWarning, match="only 3 spot"):
        conn, _ = knn_graph(np.random.default_rng(0).normal(size=(3, 2)), 6)
    assert np.diff(conn.indptr).tolist() == [2, 2, 2]


# --------------------------------------------------------------------------------------
# libraries / block diagonal
# --------------------------------------------------------------------------------------
def test_library_never_connects_samples():
    rng = np.random.default_rng(4)
    xy, _, _ = hex_lattice(12, 12, spacing=10.0)
    xy = xy + rng.normal(scale=0.3, size=xy.shape)
    other = xy[::-1] + 0.01  # second sample on top of the first, reversed order
    both = np.vstack([xy, other])
    lib = np.array(["a"] * len(xy) + ["b"] * len(other))
    perm = rng.permutation(len(both))  # interleave the samples
    both, lib = both[perm], lib[perm]
    builders = [
        lambda c, **kw: knn_graph(c, 6, **kw),
        lambda c, **kw: radius_graph(c, 12.0, **kw),
        lambda c, **kw: grid_graph(c, 2, **kw),
    ]
    for build in builders:
        conn, dist = build(both, library=lib)
        check_graph(conn, dist, both)
        rows, cols = conn.nonzero()
        assert (lib[rows] == lib[cols]).all()
        # each block equals the graph of that sample alone
        blocks, positions = [], []
        for name in ("a", "b"):
            idx = np.flatnonzero(lib == name)
            c_alone, _ = build(both[idx])
            assert (conn[idx][:, idx] != c_alone).nnz == 0
            blocks.append(c_alone)
            positions.append(idx)
        assert (block_diagonal(blocks, positions) != conn).nnz == 0


def test_block_diagonal_keeps_explicit_zeros():
    d1 = sp.csr_matrix((np.array([0.0, 2.0]), np.array([0, 1]), np.array([0, 1, 2])), (2, 2))
    d2 = sp.csr_matrix((np.array([0.0]), np.array([0]), np.array([0, 1])), (1, 1))
    out = block_diagonal([d1, d2])
    assert out.nnz == 3
    np.testing.assert_array_equal(out.toarray(), [[0, 0, 0], [0, 2, 0], [0, 0, 0]])
    out = block_diagonal([d1, d2], [np.array([2, 0]), np.array([1])])
    assert out.nnz == 3 and out[0, 0] == 2
    with pytest.raises(ChronotopeInputError, match="exactly once"):
        block_diagonal([d1, d2], [np.array([0, 0]), np.array([1])])


def test_library_with_nan_label_errors():
    xy = np.random.default_rng(0).normal(size=(5, 2))
    with pytest.raises(ChronotopeInputError, match="missing"):
        knn_graph(xy, 2, library=["a", "a", None, "b", "b"])


# --------------------------------------------------------------------------------------
# ops
# --------------------------------------------------------------------------------------
def _small_graph():
    xy = np.random.default_rng(5).uniform(0, 5, size=(40, 2))
    conn, dist = radius_graph(xy, 1.0)
    assert (np.diff(conn.indptr) == 0).any()  # has isolated nodes
    return conn, dist


@pytest.mark.parametrize("self_loops", [True, False])
def test_normalize_row_and_sym(self_loops):
    conn, _ = _small_graph()
    P = normalize_adjacency(conn, mode="row", self_loops=self_loops)
    assert isinstance(P, sp.csr_matrix) and P.dtype == np.float32
    sums = np.asarray(P.sum(axis=1)).ravel()
    deg = np.diff(conn.indptr) + self_loops
    np.testing.assert_allclose(sums[deg > 0], 1.0, rtol=1e-6)
    np.testing.assert_array_equal(sums[deg == 0], 0.0)  # isolated, no NaN

    S = normalize_adjacency(conn, mode="sym", self_loops=self_loops)
    Sd = S.toarray().astype(np.float64)
    assert np.isfinite(Sd).all()
    np.testing.assert_allclose(Sd, Sd.T, atol=1e-7)
    A = conn.toarray() + np.eye(conn.shape[0]) * self_loops
    d = A.sum(1)
    inv = np.where(d > 0, 1 / np.sqrt(np.where(d > 0, d, 1)), 0)
    np.testing.assert_allclose(Sd, inv[:, None] * A * inv[None, :], rtol=1e-6, atol=1e-7)
    eig = np.linalg.eigvalsh(Sd)
    assert eig.max() == pytest.approx(1.0, abs=1e-5)
    assert eig.min() >= -1 - 1e-5
    v = np.sqrt(d)
    np.testing.assert_allclose(Sd @ v, v, rtol=1e-5, atol=1e-6)  # D^1/2 1 is fixed


def test_normalize_rejects_negative_and_nonsquare():
    with pytest.raises(ChronotopeInputError, match="negative"):
        normalize_adjacency(sp.csr_matrix(np.array([[0, -1.0], [-1.0, 0]])))
    with pytest.raises(ChronotopeInputError, match="square"):
        normalize_adjacency(sp.csr_matrix(np.ones((2, 3))))
    with pytest.raises(ChronotopeInputError, match="mode"):
        normalize_adjacency(sp.identity(3, format="csr"), mode="col")


@pytest.mark.parametrize("normalize", ["sym", "row", None])
def test_propagate_equals_dense_matrix_powers(normalize):
    conn, _ = _small_graph()
    X = np.random.default_rng(6).normal(size=(conn.shape[0], 3))
    if normalize is None:
        P = conn.toarray().astype(np.float64)
    else:
        P = normalize_adjacency(conn.astype(np.float64), mode=normalize).toarray()
    hops = propagate(conn.astype(np.float64), X, 3, normalize=normalize)
    assert len(hops) == 4
    for k, h in enumerate(hops):
        assert isinstance(h, np.ndarray)
        np.testing.assert_allclose(h, np.linalg.matrix_power(P, k) @ X, rtol=1e-10, atol=1e-12)
    # 1-D, scipy sparse and torch inputs give the same numbers in their own type
    vec = propagate(conn, X[:, 0], 3, normalize=normalize)
    np.testing.assert_allclose(vec[3], hops[3][:, 0], rtol=1e-5, atol=1e-6)
    sparse_hops = propagate(conn, sp.csr_matrix(X), 3, normalize=normalize)
    assert all(sp.issparse(h) for h in sparse_hops)
    np.testing.assert_allclose(sparse_hops[3].toarray(), hops[3], rtol=1e-5, atol=1e-6)

    torch = pytest.importorskip("torch")
    Xt = torch.from_numpy(X)
    th = propagate(conn, Xt, 3, normalize=normalize)
    assert all(isinstance(h, torch.Tensor) and h.device == Xt.device for h in th)
    assert th[3].dtype == torch.float64
    np.testing.assert_allclose(th[3].numpy(), hops[3], rtol=1e-5, atol=1e-6)
    assert propagate(conn, X, 0)[0] is X


def test_propagate_errors():
    conn, _ = _small_graph()
    with pytest.raises(ChronotopeInputError, match="rows"):
        propagate(conn, np.ones((3, 2)), 1)
    with pytest.raises(ChronotopeInputError, match="n_hops"):
        propagate(conn, np.ones((conn.shape[0], 2)), -1)


def test_to_torch_sparse_round_trip():
    torch = pytest.importorskip("torch")
    conn, dist = _small_graph()
    t = to_torch_sparse(dist, device="cpu")
    assert t.layout == torch.sparse_csr and t.dtype == torch.float64
    np.testing.assert_array_equal(t.to_dense().numpy(), dist.toarray())
    t32 = to_torch_sparse(conn, dtype=torch.float32)
    assert t32.dtype == torch.float32 and t32.device.type == "cpu"


def test_gaussian_weights_keeps_structure():
    xy = np.random.default_rng(7).normal(size=(30, 2))
    conn, dist = knn_graph(xy, 4, include_self=True)
    W = gaussian_weights(dist, 0.5)
    np.testing.assert_array_equal(W.indptr, conn.indptr)
    np.testing.assert_array_equal(W.indices, conn.indices)
    np.testing.assert_array_equal(W.diagonal(), 1.0)  # distance 0 -> weight 1, kept
    np.testing.assert_allclose(W.data, np.exp(-(dist.data**2) / (2 * 0.25)))
    W_auto = gaussian_weights(dist)
    assert W_auto.nnz == conn.nnz and (W_auto.data > 0).all() and (W_auto.data <= 1).all()
    with pytest.raises(ChronotopeInputError, match="sigma"):
        gaussian_weights(dist, 0.0)


# --------------------------------------------------------------------------------------
# pp.spatial_neighbors
# --------------------------------------------------------------------------------------
def _adata(n_side: int = 10, **obs) -> ad.AnnData:
    xy, _, _ = hex_lattice(n_side, n_side, spacing=100.0)
    a = ad.AnnData(np.zeros((len(xy), 3), dtype=np.float32))
    a.obsm["spatial"] = xy
    for k, v in obs.items():
        a.obs[k] = v
    return a


@pytest.mark.parametrize(
    ("method", "kwargs"),
    [("knn", {"n_neighbors": 6}), ("radius", {"radius": 150.0}), ("grid", {"n_rings": 2})],
)
def test_spatial_neighbors_writes_squidpy_layout_and_round_trips(tmp_path, method, kwargs):
    a = _adata(library=pd.Categorical(["s1"] * 50 + ["s2"] * 50))
    assert pp.spatial_neighbors(a, method=method, include_self=True, **kwargs) is None
    conn = a.obsp["spatial_connectivities"]
    dist = a.obsp["spatial_distances"]
    assert isinstance(conn, sp.csr_matrix) and isinstance(dist, sp.csr_matrix)
    check_graph(conn, dist, a.obsm["spatial"])
    uns = a.uns["spatial_neighbors"]
    assert uns["connectivities_key"] == "spatial_connectivities"
    assert uns["distances_key"] == "spatial_distances"
    assert uns["params"]["method"] == method
    for k, v in kwargs.items():
        assert uns["params"][k] == v
    if method == "grid":
        assert uns["params"]["lattice"]["kind"] == "hex"
        assert uns["params"]["lattice"]["spacing"] == pytest.approx(100.0)

    path = tmp_path / "a.h5ad"
    a.write_h5ad(path)
    b = ad.read_h5ad(path)
    for key in ("spatial_connectivities", "spatial_distances"):
        np.testing.assert_array_equal(b.obsp[key].indptr, a.obsp[key].indptr)
        np.testing.assert_array_equal(b.obsp[key].indices, a.obsp[key].indices)
        np.testing.assert_array_equal(b.obsp[key].data, a.obsp[key].data)
    assert (b.obsp["spatial_distances"].data == 0).sum() == a.n_obs  # explicit zeros survive
    assert b.uns["spatial_neighbors"]["params"]["method"] == method

    # with a library key: no edge between s1 and s2, params per library for grids
    pp.spatial_neighbors(a, method=method, library_key="library", key_added="lib", **kwargs)
    rows, cols = a.obsp["lib_connectivities"].nonzero()
    lib = a.obs["library"].to_numpy()
    assert (lib[rows] == lib[cols]).all()
    assert a.uns["lib_neighbors"]["params"]["library_key"] == "library"
    if method == "grid":
        assert set(a.uns["lib_neighbors"]["params"]["lattice"]["spacing"]) == {"s1", "s2"}
    a.write_h5ad(path)
    c = ad.read_h5ad(path)
    assert (c.obsp["lib_connectivities"] != a.obsp["lib_connectivities"]).nnz == 0
    sub = c[c.obs["library"] == "s1"]  # subsetting keeps a valid graph
    assert sub.obsp["lib_connectivities"].shape == (50, 50)


def test_spatial_neighbors_copy():
    a = _adata()
    b = pp.spatial_neighbors(a, method="grid", copy=True)
    assert "spatial_connectivities" in b.obsp and "spatial_connectivities" not in a.obsp
    assert "spatial_neighbors" not in a.uns


def test_spatial_neighbors_errors():
    a = _adata(library=["x"] * 100)
    with pytest.raises(ChronotopeInputError, match=r"obsm\['coords'\] not found.*'spatial'"):
        pp.spatial_neighbors(a, spatial_key="coords")
    with pytest.raises(ChronotopeInputError, match=r"'batch' is not a column.*'library'"):
        pp.spatial_neighbors(a, library_key="batch")
    with pytest.raises(ChronotopeInputError, match="needs radius"):
        pp.spatial_neighbors(a, method="radius")
    with pytest.raises(ChronotopeInputError, match="only used with method='radius'"):
        pp.spatial_neighbors(a, radius=3.0)
    with pytest.raises(ChronotopeInputError, match="method must be"):
        pp.spatial_neighbors(a, method="delaunay")
    bad = a.copy()
    bad.obsm["spatial"] = bad.obsm["spatial"].copy()
    bad.obsm["spatial"][3, 1] = np.nan
    with pytest.raises(ChronotopeInputError, match="NaN"):
        pp.spatial_neighbors(bad)
    bad.obsm["spatial"] = np.zeros((100, 1))
    with pytest.raises(ChronotopeInputError, match="shape"):
        pp.spatial_neighbors(bad)
    bad.obsm["spatial"] = np.random.default_rng(0).normal(size=(100, 3))
    with pytest.raises(ChronotopeInputError, match="2-D"):
        pp.spatial_neighbors(bad, method="grid")
    bad.obs["library"] = [None] + ["x"] * 99
    with pytest.raises(ChronotopeInputError, match="missing"):
        pp.spatial_neighbors(bad, library_key="library")
    assert "spatial_connectivities" not in a.obsp  # nothing written on failure


def test_public_signatures_are_keyword_only_after_three():
    funcs = [getattr(graph, name) for name in graph.__all__] + [pp.spatial_neighbors]
    for f in funcs:
        params = inspect.signature(f).parameters.values()
        positional = [p for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
        assert len(positional) <= 3, f.__name__
    assert len(inspect.signature(pp.spatial_neighbors).parameters) > 1
    first = list(inspect.signature(pp.spatial_neighbors).parameters.values())
    assert first[1].kind is first[1].KEYWORD_ONLY


# --------------------------------------------------------------------------------------
# real data: DLPFC Visium slices 151673 / 151674
# --------------------------------------------------------------------------------------
def _read_positions(sample: str) -> pd.DataFrame:
    df = pd.read_csv(
        DLPFC / sample / "tissue_positions_list.txt",
        header=None,
        names=["barcode", "in_tissue", "row", "col", "pxl_row", "pxl_col"],
    )
    return df[df["in_tissue"] == 1].reset_index(drop=True)


def _array_hop_truth(df: pd.DataFrame, n_rings: int):
    """Neighbours from the Visium array indices, and spots whose full ball is in tissue."""
    row, col = df["row"].to_numpy(), df["col"].to_numpy()
    hops = hex_hops(row, col)
    truth = (hops >= 1) & (hops <= n_rings)
    full = 3 * n_rings * (n_rings + 1)
    return truth, truth.sum(axis=1) == full


@pytest.mark.skipif(not DLPFC.is_dir(), reason="DLPFC data not available")
@pytest.mark.parametrize("n_rings", [1, 2])
def test_dlpfc_grid_matches_visium_array(n_rings):
    df = _read_positions("151673")
    xy = df[["pxl_col", "pxl_row"]].to_numpy(dtype=float)
    conn, dist = grid_graph(xy, n_rings)
    check_graph(conn, dist, xy)
    truth, interior = _array_hop_truth(df, n_rings)
    assert interior.mean() > 0.8
    deg = np.diff(conn.indptr)
    np.testing.assert_array_equal(deg[interior], 3 * n_rings * (n_rings + 1))
    np.testing.assert_array_equal(edges(conn), truth)  # every spot, borders included
    if n_rings == 1:  # the 6 nearest neighbours of interior spots are the same spots
        knn, _ = knn_graph(xy, 6, symmetrize="mutual")
        np.testing.assert_array_equal(edges(knn)[interior], truth[interior])


@pytest.mark.skipif(not DLPFC.is_dir(), reason="DLPFC data not available")
def test_dlpfc_two_slices_block_diagonal():
    dfs = [_read_positions(s) for s in ("151673", "151674")]
    # the two slices share the same pixel frame, so their spots overlap in space
    a = ad.AnnData(np.zeros((sum(map(len, dfs)), 1), dtype=np.float32))
    a.obsm["spatial"] = np.vstack([d[["pxl_col", "pxl_row"]].to_numpy(float) for d in dfs])
    a.obs["sample"] = pd.Categorical(np.repeat(["151673", "151674"], [len(d) for d in dfs]))
    pp.spatial_neighbors(a, method="grid", library_key="sample")
    conn = a.obsp["spatial_connectivities"]
    rows, cols = conn.nonzero()
    lab = a.obs["sample"].to_numpy()
    assert (lab[rows] == lab[cols]).all()
    n0 = len(dfs[0])
    for block, df in ((conn[:n0, :n0], dfs[0]), (conn[n0:, n0:], dfs[1])):
        truth, _ = _array_hop_truth(df, 1)
        np.testing.assert_array_equal(edges(block), truth)
    spacing = a.uns["spatial_neighbors"]["params"]["lattice"]["spacing"]
    assert set(spacing) == {"151673", "151674"}
    assert all(130 < s < 150 for s in spacing.values())  # ~100 um at ~0.73 um / px
