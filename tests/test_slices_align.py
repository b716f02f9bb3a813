"""Slice alignment: rigid fit, pairwise FGW alignment, tl.align_slices, CLI align."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from anndata import AnnData

import chronotope as ct
from chronotope._errors import ChronotopeInputError
from chronotope.slices import align_pair, fit_rigid, shared_features


def _rot(deg: float) -> np.ndarray:
    t = np.radians(deg)
    return np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])


def _tissue(n_side: int = 30, n_genes: int = 80, seed: int = 0):
    """Grid spots whose expression follows 8 spatial bumps (10 genes each) + background."""
    rng = np.random.default_rng(seed)
    g = np.arange(n_side, dtype=float)
    xy = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
    centres = rng.uniform(0, n_side, size=(8, 2))
    bumps = np.exp(-((xy[:, None] - centres[None]) ** 2).sum(-1) / (2 * (n_side / 6) ** 2))
    rate = 0.5 + 20 * np.repeat(bumps, 10, axis=1)[:, :n_genes]
    return xy, rate


def _slice(xy: np.ndarray, rate: np.ndarray, seed: int) -> AnnData:
    rng = np.random.default_rng(seed)
    a = AnnData(sp.csr_matrix(rng.poisson(rate).astype(np.float32)))
    a.var_names = [f"g{i}" for i in range(rate.shape[1])]
    a.obsm["spatial"] = xy
    return a


def _pair(angle: float = 30.0, crop: float = 0.8, mirror: bool = False):
    xy, rate = _tissue()
    ref = _slice(xy, rate, 1)
    keep = (xy[:, 0] < crop * xy[:, 0].max() + 1e-9) if crop < 1 else np.ones(len(xy), bool)
    rng = np.random.default_rng(2)
    true_r, true_t = _rot(angle), np.array([50.0, -20.0])
    moved = xy[keep] @ (np.diag([1, -1]) if mirror else np.eye(2)).T
    moved = moved @ true_r.T + true_t + rng.normal(0, 0.1, size=(keep.sum(), 2))
    mov = _slice(moved, rate[keep], 3)
    return ref, mov, xy[keep]


# ---- fit_rigid -------------------------------------------------------------------------


@pytest.mark.parametrize("angle", [0.0, 37.0, -120.0, 179.0])
def test_fit_rigid_recovers_known_transform(angle):
    rng = np.random.default_rng(0)
    y = rng.normal(size=(50, 2)) * 10
    r, t = _rot(angle), np.array([3.0, -4.0])
    x = (y - t) @ r  # y = R x + t
    tr = fit_rigid(y, x, sp.identity(50, format="csr"))
    np.testing.assert_allclose(tr.apply(x), y, atol=1e-8)
    assert abs((tr.angle_degrees - angle + 180) % 360 - 180) < 1e-6
    assert not tr.reflected and tr.residual < 1e-12
    assert tr.residual_reflected > 1.0


def test_fit_rigid_reflection_and_scale():
    rng = np.random.default_rng(1)
    y = rng.normal(size=(40, 2))
    x = y @ np.diag([1.0, -1.0]) * 0.5  # mirrored and shrunk
    plan = np.eye(40)
    proper = fit_rigid(y, x, plan, scaling=True)
    assert not proper.reflected and proper.residual > 0.1
    assert proper.residual_reflected < 1e-12
    mirrored = fit_rigid(y, x, plan, scaling=True, allow_reflection=True)
    assert mirrored.reflected and abs(mirrored.scale - 2.0) < 1e-9
    np.testing.assert_allclose(mirrored.apply(x), y, atol=1e-9)


def test_fit_rigid_compose():
    a = ct.slices.RigidTransform(_rot(20), np.array([1.0, 2.0]), scale=2.0)
    b = ct.slices.RigidTransform(_rot(-50), np.array([-3.0, 0.5]))
    x = np.random.default_rng(0).normal(size=(5, 2))
    np.testing.assert_allclose(a.compose(b).apply(x), b.apply(a.apply(x)), atol=1e-12)


def test_fit_rigid_errors():
    with pytest.raises(ChronotopeInputError, match="no mass"):
        fit_rigid(np.zeros((3, 2)), np.zeros((3, 2)), sp.csr_matrix((3, 3)))
    with pytest.raises(ChronotopeInputError, match="shape"):
        fit_rigid(np.zeros((3, 2)), np.zeros((4, 2)), np.eye(3))


# ---- align_pair / align_slices ---------------------------------------------------------


@pytest.mark.parametrize("n_patches", [1000, 200])  # spot by spot, and through patches
def test_align_pair_recovers_rotation(n_patches):
    ref, mov, truth = _pair(angle=30.0, crop=1.0)
    fa, fb = shared_features([ref, mov], n_comps=10)
    res = align_pair(fa, ref.obsm["spatial"], fb, mov.obsm["spatial"], n_patches=n_patches)
    assert abs(res.transform.angle_degrees - (-30.0)) < 1.0  # maps moving back
    rmse = np.sqrt(((res.aligned - truth) ** 2).sum(1).mean())
    assert rmse < 0.5  # in spot spacings (grid pitch 1)
    assert res.plan.shape == (ref.n_obs, mov.n_obs)
    assert 0.9 < res.plan.sum() <= 1.0 + 1e-6
    # the plan pairs each moved spot with the reference spot it came from (or a neighbour)
    best = np.asarray(res.plan.argmax(axis=0)).ravel()
    dist = np.linalg.norm(ref.obsm["spatial"][best] - truth, axis=1)
    assert np.median(dist) <= 1.0
    assert res.info["path"] == ("spots" if n_patches >= ref.n_obs else "patches")


def test_align_pair_partial_overlap():
    """A slice cropped to 80 %: partial transport keeps the rotation and most of the shift."""
    ref, mov, truth = _pair(angle=30.0, crop=0.8)
    fa, fb = shared_features([ref, mov], n_comps=10)
    res = align_pair(fa, ref.obsm["spatial"], fb, mov.obsm["spatial"], mass=0.8)
    assert abs(res.transform.angle_degrees - (-30.0)) < 1.0
    # balanced transport centres the crop (about 3 spacings off); partial is closer
    assert np.sqrt(((res.aligned - truth) ** 2).sum(1).mean()) < 1.5
    assert res.plan.sum() < 0.9


def test_align_slices_list_roundtrip(tmp_path):
    ref, mov, truth = _pair(angle=-15.0, crop=1.0)
    x_before = mov.X.copy()
    (plan,) = ct.tl.align_slices([ref, mov], n_comps=10)
    np.testing.assert_allclose(ref.obsm["spatial_aligned"], ref.obsm["spatial"])
    assert np.sqrt(((mov.obsm["spatial_aligned"] - truth) ** 2).sum(1).mean()) < 0.5
    assert (mov.X != x_before).nnz == 0
    mov.write_h5ad(tmp_path / "m.h5ad")
    back = ct.io.read_h5ad(tmp_path / "m.h5ad")
    stored = back.uns["alignment"]["plan"]
    assert sp.issparse(stored) and (stored != plan).nnz == 0
    assert back.uns["alignment"]["partner"] == 0


def test_align_slices_mirrored_needs_permission():
    ref, mov, truth = _pair(angle=10.0, crop=1.0, mirror=True)
    ct.tl.align_slices([ref, mov], n_comps=10, allow_reflection=True)
    assert bool(mov.uns["alignment"]["transform"]["reflected"])
    assert np.sqrt(((mov.obsm["spatial_aligned"] - truth) ** 2).sum(1).mean()) < 0.5


def test_align_slices_batch_key_and_policies():
    xy, rate = _tissue()
    slices = [_slice(xy @ _rot(a).T + 5 * i, rate, 10 + i) for i, a in enumerate((0, 20, 40))]
    joint = ct.io.concat_slices(slices) if hasattr(ct.io, "concat_slices") else None
    if joint is None:
        import anndata as ad

        joint = ad.concat(slices, label="section", keys=["s0", "s1", "s2"], index_unique="-")
    for policy in ("sequential", "star"):
        ct.tl.align_slices(joint, batch_key="section", policy=policy, n_comps=10)
        al = joint.obsm["spatial_aligned"]
        for k in range(3):
            rows = np.flatnonzero(joint.obs["section"].to_numpy() == f"s{k}")
            assert np.sqrt(((al[rows] - xy) ** 2).sum(1).mean()) < 0.5, (policy, k)
        plan = joint.obsp["alignment_plan"]
        assert plan.shape == (joint.n_obs, joint.n_obs) and plan.nnz > 0
        assert set(joint.uns["alignment"]["transforms"]) == {"s0", "s1", "s2"}


def test_align_slices_bad_input():
    ref, mov, _ = _pair()
    with pytest.raises(ChronotopeInputError, match="policy"):
        ct.tl.align_slices([ref, mov], policy="chain")
    other = mov.copy()
    other.var_names = [f"x{i}" for i in range(other.n_vars)]
    with pytest.raises(ChronotopeInputError, match="share 0 gene"):
        ct.tl.align_slices([ref, other])
    missing = mov.copy()
    del missing.obsm["spatial"]
    with pytest.raises(ChronotopeInputError, match="spatial"):
        ct.tl.align_slices([ref, missing])
    bad = mov.copy()
    bad.X.data[0] = -1
    with pytest.raises(ChronotopeInputError, match="negative"):
        ct.tl.align_slices([ref, bad])
    with pytest.raises(ChronotopeInputError, match="two slices"):
        ct.tl.align_slices([ref])


def test_cli_align(tmp_path):
    from chronotope.cli import main

    ref, mov, truth = _pair(angle=25.0, crop=1.0)
    ref.write_h5ad(tmp_path / "a.h5ad")
    mov.write_h5ad(tmp_path / "b.h5ad")
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "align",
                str(tmp_path / "a.h5ad"),
                str(tmp_path / "b.h5ad"),
                "-o",
                str(tmp_path / "plan.npz"),
                "--aligned-out",
                str(tmp_path / "out"),
            ]
        )
    assert exit_info.value.code in (0, None)
    plan = sp.load_npz(tmp_path / "plan.npz")
    assert plan.shape == (ref.n_obs, mov.n_obs)
    back = ct.io.read_h5ad(tmp_path / "out" / "b.h5ad")
    assert np.sqrt(((back.obsm["spatial_aligned"] - truth) ** 2).sum(1).mean()) < 0.5
    assert "spatial_aligned_displacement" not in back.obsm
    args = ["align", str(tmp_path / "a.h5ad"), str(tmp_path / "b.h5ad")]
    args += ["-o", str(tmp_path / "plan2.npz"), "--aligned-out", str(tmp_path / "out2")]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--nonrigid", "2"])
    assert exit_info.value.code in (0, None)
    back = ct.io.read_h5ad(tmp_path / "out2" / "b.h5ad")
    assert back.obsm["spatial_aligned_displacement"].shape == (mov.n_obs, 2)
    assert np.sqrt(((back.obsm["spatial_aligned"] - truth) ** 2).sum(1).mean()) < 0.5


# ---- interpolation ---------------------------------------------------------------------


def _shifted_pair():
    """Two sections of one tissue (independent counts, same coordinates)."""
    xy, rate = _tissue()
    return _slice(xy, rate, 21), _slice(xy, rate, 22), xy


def test_interpolate_pair_positions_and_expression():
    from chronotope.slices import interpolate_pair

    ya = np.stack(np.meshgrid(np.arange(10.0), np.arange(10.0)), -1).reshape(-1, 2)
    xb = ya + np.array([4.0, 0.0])  # B is A moved 4 spacings right
    plan = sp.identity(100, format="csr") / 100
    ea = np.c_[np.ones(100), np.zeros(100)]
    eb = np.c_[np.zeros(100), np.ones(100)]
    for t in (0.0, 0.25, 0.5, 1.0):
        pos, expr, dens = interpolate_pair(plan, ya, xb, ea, eb, t)
        assert len(pos) == 100 and (dens > 0).all()
        np.testing.assert_allclose(pos.mean(0), ya.mean(0) + np.array([4 * t, 0]), atol=0.3)
        np.testing.assert_allclose(expr.mean(0), [1 - t, t], atol=1e-5)
        # a lattice at the interpolated spacing (here 1), every spot with a neighbour
        assert cKDTree_nn(pos) == pytest.approx(1.0)
    with pytest.raises(ChronotopeInputError, match="t must be"):
        interpolate_pair(plan, ya, xb, ea, eb, 1.5)


def cKDTree_nn(p: np.ndarray) -> float:
    from scipy.spatial import cKDTree

    return float(np.median(cKDTree(p).query(p, k=2)[0][:, 1]))


def test_interpolate_slices_between_and_sequence():
    a, b, xy = _shifted_pair()
    mid = ct.tl.interpolate_slices(a, b, t=0.5, n_comps=10)
    assert abs(mid.n_obs - 900) <= 5
    assert mid.X.dtype == np.float32 and np.isfinite(mid.X).all()
    assert list(mid.var_names) == list(a.var_names)
    # expression: the generated slice resembles the (identical) tissue spot by spot
    from scipy.spatial import cKDTree

    nn = cKDTree(mid.obsm["spatial"]).query(xy)[1]
    from chronotope.tl._slices import _log_normalised

    truth = _log_normalised(a.X).toarray()
    r = np.corrcoef(truth[:, :10].sum(1), mid.X[nn][:, :10].sum(1))[0, 1]
    assert r > 0.8
    a.obs["region"] = np.where(xy[:, 0] < 15, "left", "right")
    b.obs["region"] = a.obs["region"].to_numpy()
    third = _slice(xy, _tissue()[1], 23)
    third.obs["region"] = a.obs["region"].to_numpy()
    seq = ct.tl.interpolate_slices([a, b, third], t=1.25, labels_key="region", n_comps=10)
    assert seq.uns["interpolation"]["pair"].tolist() == [1, 2]
    assert abs(seq.uns["interpolation"]["fraction"] - 0.25) < 1e-12
    left = seq.obs["region"].to_numpy() == "left"
    assert (seq.obsm["spatial"][left, 0] < 16).mean() > 0.9
    with pytest.raises(ChronotopeInputError, match="t must be"):
        ct.tl.interpolate_slices([a, b, third], t=2.5)


def test_cli_interpolate(tmp_path):
    from chronotope.cli import main

    a, b, _ = _shifted_pair()
    a.write_h5ad(tmp_path / "a.h5ad")
    b.write_h5ad(tmp_path / "b.h5ad")
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "interpolate",
                str(tmp_path / "a.h5ad"),
                str(tmp_path / "b.h5ad"),
                "--t",
                "0.3",
                "-o",
                str(tmp_path / "mid.h5ad"),
            ]
        )
    assert exit_info.value.code in (0, None)
    mid = ct.io.read_h5ad(tmp_path / "mid.h5ad")
    assert mid.n_obs == a.n_obs and mid.uns["interpolation"]["t"] == pytest.approx(0.3)
