"""Label and value transfer along a plan: slices.transfer_labels / transfer_values, tl wrapper."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData

import chronotope as ct
from chronotope._errors import ChronotopeInputError
from chronotope.slices.transfer import transfer_labels, transfer_values
from chronotope.tl._transfer import transfer_labels as tl_transfer_labels

# ---- a hand-made plan with a known answer ----------------------------------------------
# rows = 4 source spots, columns = 4 target spots; target 3 receives nothing.
PLAN = np.array(
    [
        [0.20, 0.00, 0.10, 0.0],  # a
        [0.30, 0.10, 0.00, 0.0],  # b
        [0.20, 0.00, 0.00, 0.0],  # a
        [0.00, 0.05, 0.00, 0.0],  # c
    ]
)
LABELS = np.array(["a", "b", "a", "c"], dtype=object)
# target 0: a 0.4, b 0.3 -> a (4/7); target 1: b 0.1, c 0.05 -> b (2/3); target 2: a 0.1
EXPECTED = ["a", "b", "a", None]
CONFIDENCE = [4 / 7, 2 / 3, 1.0, np.nan]
MASS = [0.7, 0.15, 0.1, 0.0]
TARGET_XY = np.array([[0.0, 0.0], [1.0, 0.0], [5.0, 0.0], [4.8, 0.0]])


def _as_list(cat: pd.Categorical) -> list[object]:
    return [None if pd.isna(v) else v for v in np.asarray(cat, dtype=object)]


@pytest.mark.parametrize("kind", ["csr", "csc", "dense"])
def test_transfer_labels_known_answer(kind):
    plan = {"csr": sp.csr_matrix, "csc": sp.csc_matrix, "dense": np.asarray}[kind](PLAN)
    res = transfer_labels(plan, LABELS, axis=0)
    assert list(res.labels.categories) == ["a", "b", "c"]
    assert _as_list(res.labels) == EXPECTED
    np.testing.assert_allclose(res.confidence, CONFIDENCE, atol=1e-12)
    np.testing.assert_allclose(res.mass, MASS, atol=1e-12)
    assert not res.filled.any()


def test_transfer_labels_both_directions():
    # the same transfer with the plan stored the other way round
    res = transfer_labels(sp.csr_matrix(PLAN.T), LABELS, axis=1)
    assert _as_list(res.labels) == EXPECTED
    np.testing.assert_allclose(res.confidence, CONFIDENCE, atol=1e-12)
    # and the other direction: labels of the columns go to the rows
    cols = pd.Categorical(["x", "y", "x", "z"], categories=["z", "y", "x"])
    back = transfer_labels(sp.csr_matrix(PLAN), cols, axis=1)
    # row 0: x 0.3; row 1: x 0.3, y 0.1; row 2: x 0.2; row 3: y 0.05
    assert _as_list(back.labels) == ["x", "x", "x", "y"]
    assert list(back.labels.categories) == ["z", "y", "x"]  # the categorical's order is kept
    np.testing.assert_allclose(back.confidence, [1.0, 0.75, 1.0, 1.0], atol=1e-12)
    np.testing.assert_allclose(back.mass, PLAN.sum(axis=1), atol=1e-12)


def test_transfer_labels_min_mass_and_fallback():
    # mean incoming mass 0.95 / 4 = 0.2375: target 1 has 0.63 of it, target 2 0.42
    res = transfer_labels(PLAN, LABELS, axis=0, min_mass=0.5)
    assert _as_list(res.labels) == ["a", "b", None, None]
    assert np.isnan(res.confidence[2:]).all()
    res = transfer_labels(PLAN, LABELS, axis=0, min_mass=0.7)
    assert _as_list(res.labels) == ["a", None, None, None]
    # fallback: the nearest target spot with a label
    res = transfer_labels(PLAN, LABELS, axis=0, fallback="nearest", coords=TARGET_XY)
    assert _as_list(res.labels) == ["a", "b", "a", "a"]  # target 3 (at 4.8) <- target 2 (at 5)
    assert res.filled.tolist() == [False, False, False, True]
    assert np.isnan(res.confidence[3]) and res.mass[3] == 0.0
    res = transfer_labels(PLAN, LABELS, axis=0, min_mass=0.5, fallback="nearest", coords=TARGET_XY)
    assert _as_list(res.labels) == ["a", "b", "b", "b"]  # both <- target 1 (at 1)
    assert res.filled.tolist() == [False, False, True, True]


def test_transfer_labels_missing_source_labels():
    labels = LABELS.copy()
    labels[1] = np.nan
    with pytest.raises(ChronotopeInputError, match="1 of 4 source spots have no label"):
        transfer_labels(PLAN, labels, axis=0)
    res = transfer_labels(PLAN, labels, axis=0, ignore_missing=True)
    # the unlabelled spot's mass is left out: target 0 gets a only, target 1 c only
    assert _as_list(res.labels) == ["a", "c", "a", None]
    np.testing.assert_allclose(res.mass, [0.4, 0.05, 0.1, 0.0], atol=1e-12)
    np.testing.assert_allclose(res.confidence[:3], 1.0)
    labels[:] = None
    with pytest.raises(ChronotopeInputError, match="no labelled source spot"):
        transfer_labels(PLAN, labels, axis=0, ignore_missing=True)


def test_transfer_labels_errors():
    with pytest.raises(ChronotopeInputError, match=r"3 rows, but 4 source values"):
        transfer_labels(PLAN[:3], LABELS, axis=0)
    with pytest.raises(ChronotopeInputError, match="axis must be 0"):
        transfer_labels(PLAN, LABELS, axis=2)
    with pytest.raises(ChronotopeInputError, match="no mass"):
        transfer_labels(sp.csr_matrix((4, 4)), LABELS, axis=0)
    with pytest.raises(ChronotopeInputError, match="non-negative"):
        transfer_labels(-PLAN, LABELS, axis=0)
    with pytest.raises(ChronotopeInputError, match="NaN or infinite"):
        transfer_labels(np.where(PLAN > 0.25, np.nan, PLAN), LABELS, axis=0)
    with pytest.raises(ChronotopeInputError, match="not among the categories: 'c'"):
        transfer_labels(PLAN, LABELS, axis=0, categories=["a", "b"])
    with pytest.raises(ChronotopeInputError, match="needs coords"):
        transfer_labels(PLAN, LABELS, axis=0, fallback="nearest")
    with pytest.raises(ChronotopeInputError, match="coords has shape"):
        transfer_labels(PLAN, LABELS, axis=0, fallback="nearest", coords=TARGET_XY[:3])
    with pytest.raises(ChronotopeInputError, match="fallback must be"):
        transfer_labels(PLAN, LABELS, axis=0, fallback="mode", coords=TARGET_XY)
    with pytest.raises(ChronotopeInputError, match="min_mass"):
        transfer_labels(PLAN, LABELS, axis=0, min_mass=1.5)


def test_transfer_values_barycentric():
    v = np.array([1.0, 2.0, 3.0, 4.0])
    out = transfer_values(PLAN, v, axis=0)
    # target 0: (0.2 + 0.6 + 0.6) / 0.7; target 1: (0.2 + 0.2) / 0.15; target 2: 1
    np.testing.assert_allclose(out[:3], [2.0, 8 / 3, 1.0], atol=1e-12)
    assert np.isnan(out[3])
    two = transfer_values(sp.csr_matrix(PLAN.T), np.c_[v, 10 * v], axis=1)
    np.testing.assert_allclose(two[:3], np.c_[out, 10 * out][:3], atol=1e-12)
    assert np.isnan(two[3]).all()
    np.testing.assert_allclose(
        transfer_values(PLAN, sp.csr_matrix(np.c_[v, 10 * v]), axis=0)[:3], two[:3], atol=1e-12
    )
    # constants stay constant; the other direction is the column-weighted mean
    np.testing.assert_allclose(transfer_values(PLAN, np.full(4, 7.0), axis=0)[:3], 7.0)
    np.testing.assert_allclose(
        transfer_values(PLAN, np.array([1.0, 2.0, 3.0, 9.0]), axis=1),
        [(0.2 + 0.3) / 0.3, (0.3 + 0.2) / 0.4, 1.0, 2.0],
        atol=1e-12,
    )
    # missing rule and fallback as for labels
    assert np.isnan(transfer_values(PLAN, v, axis=0, min_mass=0.5)[2:]).all()
    filled = transfer_values(PLAN, v, axis=0, fallback="nearest", coords=TARGET_XY)
    assert filled[3] == pytest.approx(1.0)  # from target 2
    # labels' confidence is the transferred one-hot of the winning class
    onehot = (LABELS[:, None] == np.array(["a", "b", "c"])[None]).astype(float)
    share = transfer_values(PLAN, onehot, axis=0)
    np.testing.assert_allclose(share[:3].max(axis=1), CONFIDENCE[:3], atol=1e-12)


def test_transfer_values_errors():
    with pytest.raises(ChronotopeInputError, match="NaN or infinite"):
        transfer_values(PLAN, np.array([1.0, np.nan, 3.0, 4.0]), axis=0)
    with pytest.raises(ChronotopeInputError, match="4 columns, but 3 source values"):
        transfer_values(PLAN, np.ones(3), axis=1)
    with pytest.raises(ChronotopeInputError, match="1-D or 2-D"):
        transfer_values(PLAN, np.ones((4, 2, 2)), axis=0)


# ---- tl.transfer_labels on aligned AnnData slices -----------------------------------------


def _rot(deg: float) -> np.ndarray:
    t = np.radians(deg)
    return np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])


def _tissue(n_side: int = 24, n_genes: int = 60, seed: int = 0):
    rng = np.random.default_rng(seed)
    g = np.arange(n_side, dtype=float)
    xy = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
    centres = rng.uniform(0, n_side, size=(6, 2))
    bumps = np.exp(-((xy[:, None] - centres[None]) ** 2).sum(-1) / (2 * (n_side / 6) ** 2))
    return xy, 0.5 + 20 * np.repeat(bumps, 10, axis=1)[:, :n_genes]


def _slice(xy: np.ndarray, rate: np.ndarray, seed: int) -> AnnData:
    rng = np.random.default_rng(seed)
    a = AnnData(sp.csr_matrix(rng.poisson(rate).astype(np.float32)))
    a.var_names = [f"g{i}" for i in range(rate.shape[1])]
    a.obs_names = [f"s{seed}-{i}" for i in range(a.n_obs)]
    a.obsm["spatial"] = xy
    return a


def _regions(xy: np.ndarray) -> np.ndarray:
    return np.where(xy[:, 0] < 8, "left", np.where(xy[:, 1] < 12, "bottom", "top"))


@pytest.fixture(scope="module")
def aligned_pair():
    """Reference (labelled) and a rotated copy without its right fifth, aligned (partial)."""
    xy, rate = _tissue()
    ref = _slice(xy, rate, 1)
    ref.obs["region"] = pd.Categorical(_regions(xy))
    keep = xy[:, 0] <= 19
    mov = _slice(xy[keep] @ _rot(40).T + np.array([30.0, -8.0]), rate[keep], 2)
    ct.tl.align_slices([ref, mov], n_comps=10, mass=0.8)
    return ref, mov, _regions(xy[keep])


def test_tl_transfer_labels_onto_moving_slice(aligned_pair):
    ref, mov, truth = aligned_pair
    mov = mov.copy()
    x_before = mov.X.copy()
    assert tl_transfer_labels(mov, ref, key="region") is None
    got = mov.obs["region_transferred"]
    assert isinstance(got.dtype, pd.CategoricalDtype)
    assert list(got.cat.categories) == list(ref.obs["region"].cat.categories)
    assert (got.to_numpy() == truth).mean() > 0.92
    conf = mov.obs["region_transferred_confidence"].to_numpy()
    assert conf.dtype == np.float64 and np.nanmin(conf) > 0 and np.nanmax(conf) <= 1 + 1e-12
    params = mov.uns["region_transferred"]["params"]
    assert params["plan"] == "adata.uns['alignment']['plan']" and params["key"] == "region"
    assert (mov.X != x_before).nnz == 0
    # the explicit plan gives the same labels (rows = source spots: axis inferred)
    plan = mov.uns["alignment"]["plan"]
    out = tl_transfer_labels(mov, ref, plan, key="region", key_added="again", copy=True)
    assert "again" not in mov.obs
    np.testing.assert_array_equal(out.obs["again"].to_numpy(), got.to_numpy())
    tl_transfer_labels(mov, ref, plan.T.tocsr(), key="region", key_added="t")
    np.testing.assert_array_equal(mov.obs["t"].to_numpy(), got.to_numpy())


def test_tl_transfer_labels_onto_reference(aligned_pair, tmp_path):
    """The other way: the plan is the source's, transposed; spots outside the crop fill."""
    ref, mov, mov_truth = aligned_pair
    ref = ref.copy()
    mov = mov.copy()
    mov.obs["region"] = pd.Categorical(mov_truth)
    truth = ref.obs["region"].to_numpy()
    tl_transfer_labels(ref, mov, key="region", min_mass=0.5, key_added="back")
    assert ref.uns["back"]["params"]["plan"] == "source.uns['alignment']['plan']"
    got = ref.obs["back"].to_numpy()
    inside = ref.obsm["spatial"][:, 0] <= 17  # well inside the crop
    assert (got[inside] == truth[inside]).mean() > 0.92
    outside = ref.obsm["spatial"][:, 0] >= 22  # no moving spot there: too little mass
    assert pd.isna(got[outside]).mean() > 0.9
    assert ref.uns["back"]["n_missing"] == int(pd.isna(got).sum())
    tl_transfer_labels(ref, mov, key="region", min_mass=0.5, fallback="nearest", key_added="fb")
    filled = ref.obs["fb"].to_numpy()
    assert not pd.isna(filled).any() and ref.uns["fb"]["n_filled"] == ref.uns["back"]["n_missing"]
    assert np.isnan(ref.obs["fb_confidence"].to_numpy()[pd.isna(got)]).all()
    ref.write_h5ad(tmp_path / "ref.h5ad")
    back = ct.io.read_h5ad(tmp_path / "ref.h5ad")
    assert back.obs["fb"].tolist() == ref.obs["fb"].tolist()


def test_tl_transfer_labels_errors(aligned_pair):
    ref, mov, _ = aligned_pair
    fresh = ref.copy()
    del fresh.uns["alignment"]
    other = mov.copy()
    del other.uns["alignment"]
    with pytest.raises(ChronotopeInputError, match="align_slices"):
        tl_transfer_labels(other, fresh, key="region")
    with pytest.raises(ChronotopeInputError, match=r"source.obs\['nope'\] not found"):
        tl_transfer_labels(mov, ref, key="nope")
    third = mov[:100].copy()  # aligned onto ref, but not the slice the plan was made with
    with pytest.raises(ChronotopeInputError, match="no stored plan pairs these slices"):
        tl_transfer_labels(third, ref, key="region")
    square = sp.identity(ref.n_obs, format="csr")
    with pytest.raises(ChronotopeInputError, match="square"):
        tl_transfer_labels(fresh.copy(), ref, square, key="region")
    out = tl_transfer_labels(fresh.copy(), ref, square, key="region", axis=0, copy=True)
    assert out.obs["region_transferred"].tolist() == ref.obs["region"].tolist()
    with pytest.raises(ChronotopeInputError, match=r"with axis=1 it must be"):
        tl_transfer_labels(mov, ref, mov.uns["alignment"]["plan"], key="region", axis=1)
    scores = ref.copy()
    scores.obs["score"] = np.linspace(0, 1, scores.n_obs)
    with pytest.raises(ChronotopeInputError, match="transfer_values"):
        tl_transfer_labels(mov, scores, key="score")
    gaps = ref.copy()
    gaps.obs["region"] = gaps.obs["region"].astype(object)
    gaps.obs.iloc[:5, gaps.obs.columns.get_loc("region")] = np.nan
    with pytest.raises(ChronotopeInputError, match="ignore_missing=True"):
        tl_transfer_labels(mov, gaps, key="region")
    tl_transfer_labels(mov.copy(), gaps, key="region", ignore_missing=True)


def test_tl_transfer_labels_picks_the_plan_of_the_pair():
    """Three slices of one size in a chain 0 <- 1 <- 2: only neighbours share a plan."""
    xy, rate = _tissue(n_side=16)
    rng = np.random.default_rng(0)
    orders = [np.arange(len(xy)), rng.permutation(len(xy)), rng.permutation(len(xy))]
    moves = [np.eye(2), _rot(25), _rot(-20)]  # each slice lists its spots in its own order
    s0, s1, s2 = (
        _slice(xy[o] @ m.T + 4.0 * i, rate[o], 10 + i)
        for i, (o, m) in enumerate(zip(orders, moves, strict=True))
    )
    for s, o in zip((s0, s1, s2), orders, strict=True):
        s.obs["region"] = pd.Categorical(np.where(xy[o, 0] < 8, "left", "right"))
    ct.tl.align_slices([s0, s1, s2], n_comps=10)
    truth = s2.obs["region"].to_numpy()
    del s2.obs["region"]
    # both s2's plan (rows = s1) and s1's (with s0, transposed) have shape (256, 256)
    tl_transfer_labels(s2, s1, key="region")
    assert s2.uns["region_transferred"]["params"]["plan"] == "adata.uns['alignment']['plan']"
    assert (s2.obs["region_transferred"].to_numpy() == truth).mean() > 0.92
    tl_transfer_labels(s1, s2, key="region_transferred", key_added="back")
    assert s1.uns["back"]["params"]["plan"] == "source.uns['alignment']['plan']"
    assert (s1.obs["back"].to_numpy() == s1.obs["region"].to_numpy()).mean() > 0.92
    with pytest.raises(ChronotopeInputError, match="made for another pair of slices"):
        tl_transfer_labels(s2, s0, key="region")
