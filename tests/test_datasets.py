"""Dataset loaders (on the real data, skipped without a data folder) and the demo sets."""

from __future__ import annotations

import inspect
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData

import chronotope.datasets as ds
from chronotope._errors import ChronotopeInputError
from chronotope._validate import MissingFileError

try:
    DATA = ds.get_data_dir()
except MissingFileError:
    DATA = None
needs_data = pytest.mark.skipif(DATA is None, reason="no data folder (set CHRONOTOPE_DATA)")


def _is_counts(adata: AnnData) -> None:
    assert isinstance(adata.X, sp.csr_matrix)
    assert adata.X.dtype == np.float32
    assert adata.X.data.min() >= 0
    np.testing.assert_array_equal(adata.X.data, np.round(adata.X.data))
    assert adata.obs_names.is_unique
    xy = adata.obsm["spatial"]
    assert xy.shape == (adata.n_obs, 2) and np.isfinite(xy).all()


def _counts(series: pd.Series) -> dict:
    return {k: int(v) for k, v in series.value_counts(dropna=False).items()}


# --------------------------------------------------------------------------- registry


def test_registry_and_docstrings() -> None:
    names = ds.available()
    expected = {
        "dlpfc",
        "breast_slice",
        "her2st",
        "mouse_olfactory_bulb",
        "starmap",
        "mouse_brain_raw",
        "emt",
        "weinreb",
        "misa",
        "tigon",
        "deepruot",
        "wot",
    }
    assert expected <= set(names)
    for name in names:
        doc = inspect.getdoc(getattr(ds, name)) or ""
        assert "Citation" in doc, name
        assert "icen" in doc, name  # licence / license
        assert "Source" in doc, name
    with pytest.raises(ChronotopeInputError, match="Unknown dataset"):
        ds.load("nope")


def test_data_dir_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHRONOTOPE_DATA", str(tmp_path / "missing"))
    with pytest.raises(MissingFileError, match="CHRONOTOPE_DATA"):
        ds.get_data_dir()
    monkeypatch.setenv("CHRONOTOPE_DATA", str(tmp_path))
    assert ds.get_data_dir() == tmp_path
    # The folder exists but holds no datasets: each loader names what is missing.
    with pytest.raises(MissingFileError, match="paste_breast_slices"):
        ds.breast_slice(1)
    with pytest.raises(MissingFileError, match="wot_testdata_day0_day2"):
        ds.load("wot")
    with pytest.raises(MissingFileError, match="not found"):
        ds.get_data_dir(tmp_path / "nope")


# --------------------------------------------------------------------------- spatial


@pytest.fixture(scope="module")
def dlpfc_151673() -> AnnData:
    return ds.dlpfc("151673")


@needs_data
def test_dlpfc_151673(dlpfc_151673: AnnData) -> None:
    a = dlpfc_151673
    assert a.shape == (3639, 5000)
    _is_counts(a)
    assert a.var_names[0].startswith("ENSG")
    assert list(a.obs["layer"].cat.categories) == ["L1", "L2", "L3", "L4", "L5", "L6", "WM"]
    got = _counts(a.obs["layer"])
    want = {"L1": 273, "L2": 253, "L3": 989, "L4": 218, "L5": 673, "L6": 692, "WM": 513}
    assert {k: v for k, v in got.items() if isinstance(k, str)} == want
    assert int(a.obs["layer"].isna().sum()) == 28
    assert (a.obs["in_tissue"] == 1).all()
    lib = a.uns["spatial"]["151673"]
    assert lib["images"]["lowres"].shape == (600, 600, 3)
    sf = lib["scalefactors"]["tissue_lowres_scalef"]
    assert sf == pytest.approx(0.045004502)
    # Low-res pixel coordinates fall on the image.
    px = a.obsm["spatial"] * sf
    assert (px > 0).all() and (px < 600).all()
    np.testing.assert_allclose(np.median(a.obs["sum_umi"]), 4120, rtol=0.01)
    # The barcode-level layer map agrees with the positional annotation of the rds file.
    from chronotope.datasets._rdata import read_r

    rds = DATA / "dlpfc_151673_151674" / "banksy_counts" / "dlpfc_annotation.rds"
    ann = np.asarray(read_r(rds)).astype(str)[:3639]
    mine = a.obs["layer"].astype(object).fillna("NA").to_numpy().astype(str)
    np.testing.assert_array_equal(mine, ann)


@needs_data
def test_dlpfc_151674_and_held_out() -> None:
    a = ds.load("dlpfc", sample="151674", load_image=False)
    assert a.shape == (3673, 5000)
    assert int(a.obs["layer"].isna().sum()) == 38
    assert _counts(a.obs["layer"])["WM"] == 625
    assert a.uns["spatial"]["151674"]["images"] == {}
    with pytest.raises(MissingFileError, match="kept aside"):
        ds.dlpfc("151675")
    with pytest.raises(ChronotopeInputError, match="Unknown DLPFC sample"):
        ds.dlpfc("999")


@needs_data
def test_breast_slices() -> None:
    slices = ds.breast_slices()
    assert [s.shape for s in slices] == [(254, 7998), (251, 7713), (264, 7453), (262, 7571)]
    for k, s in enumerate(slices, start=1):
        _is_counts(s)
        assert (s.obs["slice"] == str(k)).all()
        # Coordinates equal the numbers in the spot ids "<x>x<y>".
        ids = np.array([[float(v) for v in n.split("x")] for n in s.obs_names])
        np.testing.assert_allclose(s.obsm["spatial"], ids, atol=1e-9)
    shared = set(slices[0].var_names)
    for s in slices[1:]:
        shared &= set(s.var_names)
    assert len(shared) == 6397
    assert ds.breast_slice(3).shape == (264, 7453)


@needs_data
def test_her2st() -> None:
    c1 = ds.her2st()
    assert c1.shape == (176, 15557)
    _is_counts(c1)
    assert "spatial" not in c1.uns  # no image for C1
    lab = _counts(c1.obs["label"])
    assert lab["invasive cancer"] >= 127 and lab["connective tissue"] == 37
    assert lab["undetermined"] == 9 and lab["adipose tissue"] == 3
    c2 = ds.her2st("C2", image_max_size=1000)
    assert c2.shape == (187, 15706)
    lib = c2.uns["spatial"]["C2"]
    img = lib["images"]["hires"]
    assert max(img.shape[:2]) == 1000 and img.dtype == np.uint8
    # 9274 x 9911 px original
    assert lib["scalefactors"]["tissue_hires_scalef"] == pytest.approx(img.shape[1] / 9274)
    px = c2.obsm["spatial"] * lib["scalefactors"]["tissue_hires_scalef"]
    assert (px[:, 0] < img.shape[1]).all() and (px[:, 1] < img.shape[0]).all()
    assert set(c2.obs["cluster"].dropna().astype(int)) <= set(range(7))
    assert "label" not in c2.obs
    with pytest.raises(ChronotopeInputError, match="kept aside"):
        ds.her2st("C6")


@needs_data
def test_mouse_olfactory_bulb() -> None:
    a = ds.mouse_olfactory_bulb()
    assert a.shape == (262, 15928)
    _is_counts(a)
    got = _counts(a.obs["layer"])
    assert got["1: Granular Cell Layer"] == 66 and got["2: Mitral Cell Layer"] == 38
    assert got["3: Outer Plexiform Layer"] == 59 and got["4: Glomerular Layer"] == 50
    assert got["5: Olfactory Nerve Layer"] == 47
    unl = a.obs_names[a.obs["layer"].isna()]
    assert sorted(unl) == ["GACGCAGCACGGTTATGG", "GAGCCGACGAATCTTCTA"]
    xy = a.obsm["spatial"]
    assert xy[:, 0].min() == pytest.approx(7.888, abs=0.1)
    assert xy[:, 1].max() == pytest.approx(24.0, abs=0.1)
    np.testing.assert_allclose(np.median(np.asarray(a.X.sum(1)).ravel()), 14606, rtol=0.01)


@needs_data
def test_starmap() -> None:
    sizes = {"BZ5": 1049, "BZ9": 1053, "BZ14": 1088}
    domains = {
        "BZ5": {"1": 86, "2": 167, "3": 449, "4": 347},
        "BZ9": {"1": 82, "2": 115, "3": 503, "4": 353},
        "BZ14": {"1": 34, "2": 158, "3": 435, "4": 461},
    }
    for sec, n in sizes.items():
        a = ds.starmap(sec)
        assert a.shape == (n, 166)
        _is_counts(a)
        assert _counts(a.obs["domain"]) == domains[sec]
        assert a.obs["cell_type"].nunique() == 15
    bz5 = ds.starmap("20180417_BZ5_control")
    assert _counts(bz5.obs["layer"]) == {"L1": 86, "L2/3": 167, "L5": 449, "L6": 347}
    # Mean x of the domains increases from L1 to L6.
    mx = pd.Series(bz5.obsm["spatial"][:, 0]).groupby(bz5.obs["layer"].to_numpy()).mean()
    assert list(mx.sort_values().index) == ["L1", "L2/3", "L5", "L6"]


@needs_data
def test_mouse_brain_raw() -> None:
    a = ds.mouse_brain_raw()
    assert a.shape == (4992, 100)
    _is_counts(a)
    assert a.X.nnz == 457217
    assert a.obs["in_tissue"].dtype == np.int64
    assert int(a.obs["in_tissue"].sum()) == 2702
    umi = np.asarray(a.X.sum(1)).ravel()
    inside = a.obs["in_tissue"].to_numpy() == 1
    assert np.median(umi[inside]) == pytest.approx(11211)
    assert np.median(umi[~inside]) == pytest.approx(861.5)
    lib = a.uns["spatial"]["V1_Adult_Mouse_Brain"]
    assert lib["images"]["lowres"].shape == (600, 576, 3)
    assert lib["scalefactors"]["tissue_lowres_scalef"] == pytest.approx(0.051033426)


# --------------------------------------------------------------------------- time series


def _is_time_series(a: AnnData, d: int) -> None:
    assert isinstance(a.X, np.ndarray) and a.X.dtype == np.float32 and a.n_vars == d
    assert a.obs["time"].dtype == np.float64
    assert np.isfinite(a.X).all()


def _sizes(a: AnnData) -> dict[float, int]:
    return {float(k): int(v) for k, v in a.obs["time"].value_counts().sort_index().items()}


@needs_data
def test_diffusionot_time_series() -> None:
    e = ds.emt()
    _is_time_series(e, 2)
    assert _sizes(e) == {
        1.0: 11791,
        2.0: 12367,
        3.0: 12299,
        4.0: 12812,
        5.0: 12529,
        6.0: 12805,
        7.0: 12751,
    }
    np.testing.assert_array_equal(e.obsm["X_pca"], e.X)
    assert set(e.obs["cell_type"].cat.categories) == {"E", "M", "MET", "pEMT"}
    assert len(e.uns["markers"]) == 38 and e.uns["markers"][0] == "CD45"
    w = ds.weinreb()
    _is_time_series(w, 2)
    assert _sizes(w) == {2.0: 13035, 4.0: 16830, 6.0: 14103}
    assert w.obs["cell_type"].nunique() == 11
    m = ds.misa()
    _is_time_series(m, 2)
    assert _sizes(m) == {0.0: 500, 1.0: 716, 2.0: 771, 6.0: 738}
    assert _sizes(ds.misa(times=None)) == {0.0: 500, 1.0: 716, 2.0: 771, 3.0: 738}
    np.testing.assert_array_equal(np.unique(m.obs["time_point"]), [0, 1, 2, 3])


@needs_data
def test_tigon_and_deepruot() -> None:
    lin = ds.tigon("lineage")
    _is_time_series(lin, 2)
    assert _sizes(lin) == {2.0: 1429, 4.0: 3781, 6.0: 5788}
    emt = ds.load("tigon", name="emt")
    _is_time_series(emt, 3)
    assert list(emt.obs["time_label"].cat.categories) == ["0d", "8h", "1d", "3d", "7d"]
    assert _counts(emt.obs["time_label"]) == {"0d": 577, "8h": 885, "1d": 788, "3d": 754, "7d": 129}
    assert ds.tigon("bifurcation").shape == (1896, 4)
    assert ds.tigon("simulation").shape == (2947, 3)
    hema = ds.deepruot("mouse_hematopoiesis")
    _is_time_series(hema, 2)
    # The same points as TIGON's Lineage.npy.
    np.testing.assert_allclose(hema.X, lin.X, rtol=1e-6)
    e10 = ds.deepruot("emt")
    _is_time_series(e10, 10)
    assert _sizes(e10) == {0.0: 577, 1.0: 885, 2.0: 788, 3.0: 883}
    assert ds.deepruot("gaussian_20d").shape == (1900, 20)
    assert _sizes(ds.deepruot("simulation_gene")) == {0: 400, 1: 442, 2: 530, 3: 690, 4: 969}
    with pytest.raises(ChronotopeInputError, match="Unknown TIGON"):
        ds.tigon("nope")


@needs_data
def test_wot() -> None:
    a = ds.wot()
    _is_time_series(a, 20)
    assert _sizes(a) == {0.0: 4060, 2.0: 5619}
    g = a.obs.groupby("time")["growth_score"].mean()
    assert g[0.0] == pytest.approx(0.41, abs=0.01) and g[2.0] == pytest.approx(0.50, abs=0.01)
    assert _counts(a.obs["sample"]) == {
        "day-0-c1-2i": 4060,
        "day-2-c1-2i": 2890,
        "day-2-c2-2i": 2729,
    }
    np.testing.assert_array_equal(a.obsm["X_diffmap"], a.X)


# --------------------------------------------------------------------------- demo (always)


DEMO_DIR = resources.files("chronotope.datasets").joinpath("_demo")


def test_demo_files_and_licenses() -> None:
    required = {"dlpfc_151673", "breast", "emt", "mouse_brain_raw"}
    names = ds.demo_names()
    assert required <= set(names)
    with resources.as_file(DEMO_DIR) as folder:
        total = sum(f.stat().st_size for f in Path(folder).iterdir())
    assert total <= 25e6
    lic = DEMO_DIR.joinpath("DATA_LICENSES.md").read_text()
    for n in names:
        assert f"`{n}.h5ad`" in lic
    for word in ("Citation", "Source", "Subset / transform", "Maynard", "Ståhl", "Karacosta"):
        assert word in lic
    with pytest.raises(ChronotopeInputError, match="Unknown demo"):
        ds.demo("nope")


def test_demo_dlpfc() -> None:
    a = ds.demo("dlpfc_151673")
    assert a.shape == (3639, 5000)
    _is_counts(a)
    assert int(a.obs["layer"].isna().sum()) == 28
    assert _counts(a.obs["layer"])["L3"] == 989
    assert a.uns["spatial"]["151673"]["images"]["lowres"].shape == (600, 600, 3)
    assert a.uns["chronotope_dataset"]["name"] == "dlpfc_151673"


def test_demo_breast() -> None:
    a = ds.demo("breast")
    assert a.shape == (1031, 6397)
    _is_counts(a)
    assert list(a.obs["slice"].cat.categories) == ["1", "2", "3", "4"]
    assert _counts(a.obs["slice"]) == {"1": 254, "2": 251, "3": 264, "4": 262}


def test_demo_emt_and_mouse_brain() -> None:
    e = ds.demo("emt")
    _is_time_series(e, 2)
    assert e.n_obs == 87354 and sorted(e.obs["time"].unique()) == [1, 2, 3, 4, 5, 6, 7]
    np.testing.assert_array_equal(e.obsm["X_pca"], e.X)
    e.obsm["X_pca"][0, 0] = 99.0  # a real copy, not a view of .X
    assert e.X[0, 0] != 99.0
    b = ds.demo("mouse_brain_raw")
    assert b.shape == (4992, 100)
    _is_counts(b)
    assert int(b.obs["in_tissue"].sum()) == 2702
    assert b.uns["spatial"]["V1_Adult_Mouse_Brain"]["images"]["lowres"].shape == (600, 576, 3)


def test_demo_optional_sets() -> None:
    names = set(ds.demo_names())
    if "mouse_olfactory_bulb" in names:
        m = ds.demo("mouse_olfactory_bulb")
        assert m.shape == (262, 15928) and m.obs["layer"].notna().sum() == 260
    if "starmap" in names:
        s = ds.demo("starmap")
        assert s.shape == (3190, 166)
        assert _counts(s.obs["slice"]) == {"BZ5": 1049, "BZ9": 1053, "BZ14": 1088}
    if "wot" in names:
        w = ds.demo("wot")
        assert w.shape == (9679, 20) and "growth_score" in w.obs


@needs_data
def test_demo_matches_loader(dlpfc_151673: AnnData) -> None:
    d = ds.demo("dlpfc_151673")
    assert (d.X != dlpfc_151673.X).nnz == 0
    pd.testing.assert_frame_equal(d.obs, dlpfc_151673.obs)
    np.testing.assert_array_equal(d.obsm["spatial"], dlpfc_151673.obsm["spatial"])
