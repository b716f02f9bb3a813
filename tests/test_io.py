"""Readers: round trips on small files in every format, and every error path."""

from __future__ import annotations

import gzip
import json
import warnings
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp
from PIL import Image

from chronotope._errors import ChronotopeInputError
from chronotope.io import (
    MissingFileError,
    read_10x_h5,
    read_10x_mtx,
    read_csv_counts,
    read_h5ad,
    read_image,
    read_time_series,
    read_tissue_positions,
    read_visium,
)

N_SPOTS, N_GENES = 12, 7


# --------------------------------------------------------------------------- fixtures


def _counts(seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    dense = rng.poisson(1.0, size=(N_SPOTS, N_GENES)).astype(np.float64)
    dense[0, 0] = 5.0
    return sp.csr_matrix(dense)


BARCODES = [f"AAAC{i:04d}-1" for i in range(N_SPOTS)]
GENE_IDS = [f"ENSG{i:05d}" for i in range(N_GENES)]
GENE_NAMES = ["Gapdh", "Actb", "Mbp", "Plp1", "Snap25", "Ttr", "Gapdh"]  # one duplicate


def _write_h5(path: Path, x: sp.csr_matrix, barcodes: list[str], *, shape=None) -> None:
    csc_t = sp.csr_matrix(x)  # barcodes x genes CSR == genes x barcodes CSC
    with h5py.File(path, "w") as f:
        f.attrs["library_ids"] = np.array([b"lib_A"])
        f.attrs["chemistry_description"] = "Spatial 3' v1"
        g = f.create_group("matrix")
        g["data"] = csc_t.data.astype(np.int32)
        g["indices"] = csc_t.indices.astype(np.int64)
        g["indptr"] = csc_t.indptr.astype(np.int64)
        g["shape"] = np.array(shape if shape is not None else (x.shape[1], x.shape[0]))
        g["barcodes"] = np.array([b.encode() for b in barcodes])
        ft = g.create_group("features")
        ft["id"] = np.array([s.encode() for s in GENE_IDS])
        ft["name"] = np.array([s.encode() for s in GENE_NAMES])
        ft["feature_type"] = np.array([b"Gene Expression"] * N_GENES)
        ft["genome"] = np.array([b"mm10"] * N_GENES)


def _write_mtx(folder: Path, x: sp.csr_matrix, barcodes: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(folder / "matrix.mtx.gz", "wb") as fh:
        scipy.io.mmwrite(fh, sp.coo_matrix(x.T.astype(np.int64)), field="integer")
    with gzip.open(folder / "barcodes.tsv.gz", "wt") as fh:
        fh.write("\n".join(barcodes) + "\n")
    with gzip.open(folder / "features.tsv.gz", "wt") as fh:
        for i, n in zip(GENE_IDS, GENE_NAMES, strict=True):
            fh.write(f"{i}\t{n}\tGene Expression\n")


def _positions(n_extra: int = 3) -> pd.DataFrame:
    bcs = BARCODES + [f"TTTT{i:04d}-1" for i in range(n_extra)]
    n = len(bcs)
    return pd.DataFrame(
        {
            "barcode": bcs,
            "in_tissue": [1] * N_SPOTS + [0] * n_extra,
            "array_row": np.arange(n) // 4,
            "array_col": np.arange(n) % 4 * 2,
            "pxl_row_in_fullres": 1000 + 100 * (np.arange(n) // 4),
            "pxl_col_in_fullres": 2000 + 50 * (np.arange(n) % 4),
        }
    )


def _write_spatial(root: Path, *, header: bool, positions: pd.DataFrame | None = None) -> None:
    sp_dir = root / "spatial"
    sp_dir.mkdir(parents=True, exist_ok=True)
    pos = _positions() if positions is None else positions
    name = "tissue_positions.csv" if header else "tissue_positions_list.csv"
    pos.iloc[::-1].to_csv(sp_dir / name, header=header, index=False)  # order must not matter
    (sp_dir / "scalefactors_json.json").write_text(
        json.dumps(
            {
                "tissue_lowres_scalef": 0.05,
                "tissue_hires_scalef": 0.2,
                "spot_diameter_fullres": 89.4,
                "fiducial_diameter_fullres": 144.5,
            }
        )
    )
    img = np.zeros((30, 40, 3), dtype=np.uint8)
    img[..., 0] = 200
    Image.fromarray(img).save(sp_dir / "tissue_lowres_image.png")


@pytest.fixture
def visium_h5(tmp_path: Path) -> Path:
    root = tmp_path / "outs_h5"
    root.mkdir()
    _write_h5(root / "filtered_feature_bc_matrix.h5", _counts(), BARCODES)
    _write_spatial(root, header=False)
    return root


@pytest.fixture
def visium_mtx(tmp_path: Path) -> Path:
    root = tmp_path / "outs_mtx"
    _write_mtx(root / "filtered_feature_bc_matrix", _counts(), BARCODES)
    _write_spatial(root, header=True)
    return root


# --------------------------------------------------------------------------- Visium


def _check_visium(adata: anndata.AnnData, library_id: str) -> None:
    x = _counts()
    assert adata.shape == (N_SPOTS, N_GENES)
    assert isinstance(adata.X, sp.csr_matrix)
    assert adata.X.dtype == np.float32
    np.testing.assert_array_equal(adata.X.toarray(), x.toarray())
    assert list(adata.obs_names) == BARCODES
    assert list(adata.var["gene_ids"]) == GENE_IDS
    assert adata.var_names.is_unique
    assert adata.var_names[0] == "Gapdh" and adata.var_names[-1] == "Gapdh-1"
    pos = _positions().set_index("barcode").loc[BARCODES]
    np.testing.assert_array_equal(
        adata.obsm["spatial"], pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy()
    )
    np.testing.assert_array_equal(adata.obs["in_tissue"], 1)
    np.testing.assert_array_equal(adata.obs["array_row"], pos["array_row"])
    lib = adata.uns["spatial"][library_id]
    assert lib["images"]["lowres"].shape == (30, 40, 3)
    assert lib["images"]["lowres"].dtype == np.uint8
    assert lib["scalefactors"]["tissue_lowres_scalef"] == pytest.approx(0.05)
    assert "hires" not in lib["images"]


def test_read_visium_h5(visium_h5: Path, tmp_path: Path) -> None:
    adata = read_visium(visium_h5)
    _check_visium(adata, "lib_A")  # library id from the h5 attributes
    assert adata.uns["spatial"]["lib_A"]["metadata"]["chemistry_description"] == "Spatial 3' v1"
    # Survives a write/read round trip.
    path = tmp_path / "v.h5ad"
    adata.write_h5ad(path)
    back = read_h5ad(path)
    np.testing.assert_array_equal(back.obsm["spatial"], adata.obsm["spatial"])
    np.testing.assert_array_equal(
        back.uns["spatial"]["lib_A"]["images"]["lowres"],
        adata.uns["spatial"]["lib_A"]["images"]["lowres"],
    )


def test_read_visium_mtx(visium_mtx: Path) -> None:
    adata = read_visium(visium_mtx, library_id="my_lib")
    _check_visium(adata, "my_lib")


def test_read_visium_gene_ids_and_no_images(visium_h5: Path) -> None:
    adata = read_visium(visium_h5, load_images=False, var_names="gene_ids")
    assert list(adata.var_names) == GENE_IDS
    assert adata.uns["spatial"]["lib_A"]["images"] == {}


def test_read_visium_raw_matrix_with_out_of_tissue(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    root.mkdir()
    bcs = [*BARCODES, "TTTT0000-1"]
    x = sp.vstack([_counts(), sp.csr_matrix(np.ones((1, N_GENES)))]).tocsr()
    _write_h5(root / "raw_feature_bc_matrix.h5", x, bcs)
    _write_spatial(root, header=True)
    adata = read_visium(root, count_file="raw_feature_bc_matrix.h5")
    assert adata.n_obs == N_SPOTS + 1
    assert adata.obs["in_tissue"].tolist() == [1] * N_SPOTS + [0]
    assert adata.obs["in_tissue"].dtype.kind == "i"


def test_read_10x_h5_and_mtx_agree(visium_h5: Path, visium_mtx: Path) -> None:
    a = read_10x_h5(visium_h5 / "filtered_feature_bc_matrix.h5")
    b = read_10x_mtx(visium_mtx / "filtered_feature_bc_matrix")
    np.testing.assert_array_equal(a.X.toarray(), b.X.toarray())
    assert list(a.var_names) == list(b.var_names)
    assert list(a.obs_names) == list(b.obs_names)


def test_read_tissue_positions_with_and_without_header(tmp_path: Path) -> None:
    pos = _positions()
    pos.to_csv(tmp_path / "a.csv", header=True, index=False)
    pos.to_csv(tmp_path / "b.csv", header=False, index=False)
    a = read_tissue_positions(tmp_path / "a.csv")
    b = read_tissue_positions(tmp_path / "b.csv")
    pd.testing.assert_frame_equal(a, b)
    assert list(a.columns) == [
        "in_tissue",
        "array_row",
        "array_col",
        "pxl_row_in_fullres",
        "pxl_col_in_fullres",
    ]


def test_visium_missing_files(tmp_path: Path, visium_h5: Path) -> None:
    with pytest.raises(MissingFileError, match="not found"):
        read_visium(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MissingFileError, match="spatial"):
        read_visium(empty)
    _write_spatial(empty, header=False)
    with pytest.raises(MissingFileError, match="No count matrix"):
        read_visium(empty)
    with pytest.raises(MissingFileError, match="count_file"):
        read_visium(visium_h5, count_file="other.h5")
    (visium_h5 / "spatial" / "scalefactors_json.json").unlink()
    with pytest.raises(MissingFileError, match=r"scalefactors_json\.json"):
        read_visium(visium_h5)
    # FileNotFoundError and ValueError both catch it.
    with pytest.raises(FileNotFoundError):
        read_visium(visium_h5)
    with pytest.raises(ValueError):
        read_visium(visium_h5)


def test_visium_missing_positions_file(tmp_path: Path) -> None:
    root = tmp_path / "o"
    root.mkdir()
    _write_h5(root / "filtered_feature_bc_matrix.h5", _counts(), BARCODES)
    _write_spatial(root, header=False)
    (root / "spatial" / "tissue_positions_list.csv").unlink()
    with pytest.raises(MissingFileError, match="tissue_positions"):
        read_visium(root)


def test_visium_barcode_mismatch(tmp_path: Path) -> None:
    root = tmp_path / "o"
    root.mkdir()
    _write_h5(root / "filtered_feature_bc_matrix.h5", _counts(), BARCODES)
    _write_spatial(root, header=False, positions=_positions().iloc[2:])
    with pytest.raises(ChronotopeInputError, match=r"not in tissue_positions_list\.csv"):
        read_visium(root)


def test_10x_h5_duplicated_barcodes(tmp_path: Path) -> None:
    bcs = list(BARCODES)
    bcs[3] = bcs[1]
    _write_h5(tmp_path / "m.h5", _counts(), bcs)
    with pytest.raises(ChronotopeInputError, match=r"duplicated barcodes.*AAAC0001-1"):
        read_10x_h5(tmp_path / "m.h5")


def test_10x_h5_shape_mismatch_and_bad_file(tmp_path: Path) -> None:
    _write_h5(tmp_path / "m.h5", _counts(), BARCODES, shape=(N_GENES, N_SPOTS + 1))
    with pytest.raises(ChronotopeInputError, match="does not match"):
        read_10x_h5(tmp_path / "m.h5")
    (tmp_path / "bad.h5").write_text("not hdf5")
    with pytest.raises(ChronotopeInputError, match="HDF5"):
        read_10x_h5(tmp_path / "bad.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(ChronotopeInputError, match="not a 10x HDF5"):
        read_10x_h5(tmp_path / "other.h5")


def test_10x_h5_nan_and_negative_counts(tmp_path: Path) -> None:
    x = _counts()
    for bad, msg in ((np.nan, "NaN"), (-1.0, "negative")):
        path = tmp_path / f"m{msg}.h5"
        _write_h5(path, x, BARCODES)
        with h5py.File(path, "a") as f:
            data = f["matrix/data"][()].astype(np.float64)
            data[0] = bad
            del f["matrix/data"]
            f["matrix/data"] = data
        with pytest.raises(ChronotopeInputError, match=msg):
            read_10x_h5(path)


def test_10x_mtx_errors(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    _write_mtx(folder, _counts(), BARCODES)
    (folder / "barcodes.tsv.gz").unlink()
    with pytest.raises(MissingFileError, match=r"barcodes\.tsv"):
        read_10x_mtx(folder)
    with gzip.open(folder / "barcodes.tsv.gz", "wt") as fh:
        fh.write("\n".join(BARCODES[:-1]) + "\n")
    with pytest.raises(ChronotopeInputError, match="lists 11 barcodes"):
        read_10x_mtx(folder)


def test_read_image_downscale(tmp_path: Path) -> None:
    img = np.random.default_rng(0).integers(0, 255, (300, 500, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "i.jpg")
    small = read_image(tmp_path / "i.jpg", max_size=100)
    assert max(small.shape[:2]) <= 100 and small.shape[2] == 3
    assert read_image(tmp_path / "i.jpg").shape == (300, 500, 3)


# --------------------------------------------------------------------------- csv counts


def _count_frame() -> pd.DataFrame:
    return pd.DataFrame(
        _counts().toarray().astype(int),
        index=[f"{i}x{i + 1}" for i in range(N_SPOTS)],
        columns=[f"G{i}" for i in range(N_GENES)],
    )


def _coords() -> np.ndarray:
    return np.column_stack([np.arange(N_SPOTS) * 1.5, np.arange(N_SPOTS) % 3 + 0.25])


def test_read_csv_counts_positional_coords(tmp_path: Path) -> None:
    df = _count_frame()
    df.to_csv(tmp_path / "c.csv")
    np.savetxt(tmp_path / "xy.csv", _coords(), delimiter=",")  # PASTE style: no header
    adata = read_csv_counts(tmp_path / "c.csv", tmp_path / "xy.csv")
    assert isinstance(adata.X, sp.csr_matrix) and adata.X.dtype == np.float32
    np.testing.assert_array_equal(adata.X.toarray(), df.to_numpy())
    assert list(adata.obs_names) == list(df.index)
    assert list(adata.var_names) == list(df.columns)
    np.testing.assert_allclose(adata.obsm["spatial"], _coords())


def test_read_csv_counts_tsv_barcoded_header_transposed(tmp_path: Path) -> None:
    df = _count_frame()
    df.T.to_csv(tmp_path / "c.tsv.gz", sep="\t")  # genes x spots, gzip
    coords = pd.DataFrame(_coords(), index=df.index, columns=["x", "y"])
    coords["in_tissue"] = 1
    coords.iloc[::-1].to_csv(tmp_path / "pos.tsv", sep="\t")  # shuffled order, barcodes
    adata = read_csv_counts(tmp_path / "c.tsv.gz", tmp_path / "pos.tsv")
    np.testing.assert_array_equal(adata.X.toarray(), df.to_numpy())
    np.testing.assert_allclose(adata.obsm["spatial"], _coords())
    assert adata.obs["in_tissue"].tolist() == [1] * N_SPOTS
    # Explicit transpose gives the same result; no coordinates works too.
    b = read_csv_counts(tmp_path / "c.tsv.gz", tmp_path / "pos.tsv", transpose=True)
    np.testing.assert_array_equal(b.X.toarray(), adata.X.toarray())
    c = read_csv_counts(tmp_path / "c.tsv.gz", transpose=True)
    assert "spatial" not in c.obsm and c.shape == adata.shape


def test_read_csv_counts_coord_columns(tmp_path: Path) -> None:
    df = _count_frame()
    df.to_csv(tmp_path / "c.csv")
    coords = pd.DataFrame({"row": _coords()[:, 1], "col": _coords()[:, 0]}, index=df.index)
    coords.to_csv(tmp_path / "pos.csv")
    adata = read_csv_counts(tmp_path / "c.csv", tmp_path / "pos.csv", coord_columns=["col", "row"])
    np.testing.assert_allclose(adata.obsm["spatial"], _coords())


def test_read_csv_counts_errors(tmp_path: Path) -> None:
    df = _count_frame()
    df.to_csv(tmp_path / "c.csv")
    with pytest.raises(MissingFileError, match="coordinate file"):
        read_csv_counts(tmp_path / "c.csv", tmp_path / "missing.csv")
    with pytest.raises(MissingFileError, match="count matrix"):
        read_csv_counts(tmp_path / "missing.csv")
    # Row-number mismatch (no barcodes to match by).
    np.savetxt(tmp_path / "xy.csv", _coords()[:-2], delimiter=",")
    with pytest.raises(ChronotopeInputError, match=r"12 observations but xy\.csv has 10"):
        read_csv_counts(tmp_path / "c.csv", tmp_path / "xy.csv")
    # Barcode mismatch.
    coords = pd.DataFrame(_coords(), index=[f"other{i}" for i in range(N_SPOTS)])
    coords.index = [*df.index[:-1], "stranger"]
    coords.to_csv(tmp_path / "pos.csv", header=False)
    with pytest.raises(ChronotopeInputError, match=r"not in pos.csv \(e.g. '11x12'\)"):
        read_csv_counts(tmp_path / "c.csv", tmp_path / "pos.csv")
    # NaN, negative, non-numeric counts; duplicated barcodes.
    bad = df.astype(float)
    bad.iloc[2, 3] = np.nan
    bad.to_csv(tmp_path / "nan.csv")
    with pytest.raises(ChronotopeInputError, match="NaN"):
        read_csv_counts(tmp_path / "nan.csv")
    bad = df.copy()
    bad.iloc[2, 3] = -4
    bad.to_csv(tmp_path / "neg.csv")
    with pytest.raises(ChronotopeInputError, match="negative"):
        read_csv_counts(tmp_path / "neg.csv")
    bad = df.astype(object)
    bad.iloc[2, 3] = "abc"
    bad.to_csv(tmp_path / "str.csv")
    with pytest.raises(ChronotopeInputError, match="non-numeric"):
        read_csv_counts(tmp_path / "str.csv")
    bad = df.copy()
    bad.index = [df.index[0], *df.index[:-1]]
    bad.to_csv(tmp_path / "dup.csv")
    with pytest.raises(ChronotopeInputError, match="duplicated barcodes"):
        read_csv_counts(tmp_path / "dup.csv")


# --------------------------------------------------------------------------- time series


def test_read_time_series_csv(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    df = pd.DataFrame(rng.normal(size=(9, 3)), columns=["a", "b", "c"])
    df.insert(0, "day", [0, 0, 0, 2, 2, 2, 4, 4, 4])
    df["batch"] = list("xyzxyzxyz")
    df.to_csv(tmp_path / "ts.csv", index=False)
    adata = read_time_series(tmp_path / "ts.csv", time_key="day")
    assert adata.X.dtype == np.float32 and adata.shape == (9, 3)
    assert adata.obs["time"].dtype == np.float64
    np.testing.assert_array_equal(adata.obs["time"], df["day"].astype(float))
    np.testing.assert_allclose(adata.X, df[["a", "b", "c"]].to_numpy(), rtol=1e-6)
    assert list(adata.var_names) == ["a", "b", "c"]
    assert adata.obs["batch"].tolist() == df["batch"].tolist()


def test_read_time_series_labels_with_time_map(tmp_path: Path) -> None:
    df = pd.DataFrame(
        {"time": ["0d", "8h", "1d", "8h"], "x1": [1.0, 2, 3, 4], "x2": [0.0, 1, 0, 1]}
    )
    df.to_csv(tmp_path / "ts.tsv", sep="\t", index=False)
    with pytest.raises(ChronotopeInputError, match=r"non-numeric time values \['0d', '1d', '8h'\]"):
        read_time_series(tmp_path / "ts.tsv")
    adata = read_time_series(
        tmp_path / "ts.tsv", time_map={"0d": 0.0, "8h": 1 / 3, "1d": 1.0}, obsm_key="X_emb"
    )
    np.testing.assert_allclose(adata.obs["time"], [0, 1 / 3, 1, 1 / 3])
    assert list(adata.obs["time_label"].cat.categories) == ["0d", "8h", "1d"]
    np.testing.assert_array_equal(adata.obsm["X_emb"], adata.X)
    with pytest.raises(ChronotopeInputError, match="no entry"):
        read_time_series(tmp_path / "ts.tsv", time_map={"0d": 0.0})


def test_read_time_series_npz_and_npy(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 2)).astype(np.float32)
    t = np.array([1, 1, 2, 2, 3, 3], dtype=object)
    np.savez(tmp_path / "d.npz", emb=x, time_label=t, type_label=np.array(list("EEMMEM")))
    adata = read_time_series(tmp_path / "d.npz", time_key="time_label")
    np.testing.assert_array_equal(adata.X, x)
    np.testing.assert_array_equal(adata.obs["time"], [1, 1, 2, 2, 3, 3])
    assert adata.obs["type_label"].tolist() == list("EEMMEM")
    with pytest.raises(ChronotopeInputError, match="no array 'time'"):
        read_time_series(tmp_path / "d.npz")

    parts = np.empty((1, 3), dtype=object)
    for i, n in enumerate((2, 3, 4)):
        parts[0, i] = rng.normal(size=(n, 2))
    np.save(tmp_path / "p.npy", parts, allow_pickle=True)
    b = read_time_series(tmp_path / "p.npy", times=[0.0, 0.5, 2.0])
    assert b.shape == (9, 2)
    np.testing.assert_array_equal(b.obs["time"], [0, 0, 0.5, 0.5, 0.5, 2, 2, 2, 2])
    with pytest.raises(ChronotopeInputError, match="2 times given for 3"):
        read_time_series(tmp_path / "p.npy", times=[0, 1])


def test_read_time_series_errors(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError, match="time-series file"):
        read_time_series(tmp_path / "missing.csv")
    df = pd.DataFrame({"t": [0, 1], "x": [1.0, np.nan]})
    df.to_csv(tmp_path / "a.csv", index=False)
    with pytest.raises(ChronotopeInputError, match="no time column 'time'"):
        read_time_series(tmp_path / "a.csv")
    with pytest.raises(ChronotopeInputError, match="NaN"):
        read_time_series(tmp_path / "a.csv", time_key="t")
    df = pd.DataFrame({"t": [0, None], "x": [1.0, 2.0]})
    df.to_csv(tmp_path / "b.csv", index=False)
    with pytest.raises(ChronotopeInputError, match="missing time"):
        read_time_series(tmp_path / "b.csv", time_key="t")


# --------------------------------------------------------------------------- h5ad


@pytest.mark.filterwarnings("ignore:Observation names are not unique")
def test_read_h5ad_round_trip_and_errors(tmp_path: Path) -> None:
    a = anndata.AnnData(X=_counts().astype(np.float32), obs=pd.DataFrame(index=BARCODES))
    a.obsm["spatial"] = _coords()
    a.write_h5ad(tmp_path / "ok.h5ad")
    b = read_h5ad(tmp_path / "ok.h5ad")
    np.testing.assert_array_equal(b.X.toarray(), a.X.toarray())
    np.testing.assert_array_equal(b.obsm["spatial"], a.obsm["spatial"])

    with pytest.raises(MissingFileError, match="h5ad file"):
        read_h5ad(tmp_path / "missing.h5ad")
    neg = a.copy()
    neg.X = neg.X.toarray()
    neg.X[1, 1] = -1
    neg.write_h5ad(tmp_path / "neg.h5ad")
    with pytest.raises(ChronotopeInputError, match="negative"):
        read_h5ad(tmp_path / "neg.h5ad")
    assert read_h5ad(tmp_path / "neg.h5ad", check_nonnegative=False).n_obs == N_SPOTS
    nan = a.copy()
    nan.obsm["spatial"][0, 0] = np.nan
    nan.write_h5ad(tmp_path / "nan.h5ad")
    with pytest.raises(ChronotopeInputError, match="NaN"):
        read_h5ad(tmp_path / "nan.h5ad")
    with pytest.raises(ChronotopeInputError, match="layer 'counts' not found"):
        read_h5ad(tmp_path / "ok.h5ad", counts_layer="counts")
    dup = a.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata warns about non-unique names
        dup.obs_names = [BARCODES[0], *BARCODES[:-1]]
        dup.write_h5ad(tmp_path / "dup.h5ad")
    with pytest.raises(ChronotopeInputError, match="duplicated obs_names"):
        read_h5ad(tmp_path / "dup.h5ad")
    (tmp_path / "bad.h5ad").write_text("nope")
    with pytest.raises(ChronotopeInputError, match="Cannot read"):
        read_h5ad(tmp_path / "bad.h5ad")
