"""10x Genomics readers: feature-barcode matrices (HDF5 and Matrix Market) and Visium folders."""

from __future__ import annotations

import gzip
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, Literal

import h5py
import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp
from anndata import AnnData

from chronotope._errors import ChronotopeInputError
from chronotope._validate import MissingFileError, check_counts, check_file, check_unique

__all__ = [
    "image_size",
    "read_10x_h5",
    "read_10x_mtx",
    "read_image",
    "read_scalefactors",
    "read_tissue_positions",
    "read_visium",
    "spatial_uns",
]

logger = logging.getLogger("chronotope")

PathLike = str | os.PathLike[str]

_POSITION_COLUMNS = (
    "barcode",
    "in_tissue",
    "array_row",
    "array_col",
    "pxl_row_in_fullres",
    "pxl_col_in_fullres",
)
_POSITION_FILES = (
    "tissue_positions.csv",
    "tissue_positions_list.csv",
    "tissue_positions_list.txt",
)
_COUNT_CANDIDATES = (
    "filtered_feature_bc_matrix.h5",
    "raw_feature_bc_matrix.h5",
    "filtered_feature_bc_matrix",
    "raw_feature_bc_matrix",
)


def _decode(a: np.ndarray) -> np.ndarray:
    """Decode an HDF5 byte-string array to a numpy array of Python ``str``."""
    arr = np.asarray(a)
    if arr.dtype.kind == "S" or arr.dtype == object:
        return np.array([x.decode() if isinstance(x, bytes) else str(x) for x in arr], dtype=object)
    return arr.astype(str).astype(object)


def _counts_to_csr(x: sp.spmatrix | sp.sparray | np.ndarray) -> sp.csr_matrix:
    """Return ``x`` as a ``float32`` :class:`scipy.sparse.csr_matrix` with sorted indices."""
    m = sp.csr_matrix(x, dtype=np.float32)
    m.sum_duplicates()
    m.sort_indices()
    return m


def _var_frame(
    ids: np.ndarray,
    names: np.ndarray,
    feature_types: np.ndarray | None,
    genome: np.ndarray | None,
    var_names: Literal["gene_symbols", "gene_ids"],
) -> pd.DataFrame:
    if var_names not in ("gene_symbols", "gene_ids"):
        raise ChronotopeInputError(
            f"var_names must be 'gene_symbols' or 'gene_ids', got {var_names!r}."
        )
    var = pd.DataFrame({"gene_ids": ids})
    if feature_types is not None:
        var["feature_types"] = feature_types
    if genome is not None:
        var["genome"] = genome
    index = pd.Index(names if var_names == "gene_symbols" else ids, dtype=object)
    if not index.is_unique:
        n_dup = int(index.duplicated().sum())
        logger.info("Made %d duplicated gene names unique by appending '-1', '-2', ...", n_dup)
        index = pd.Index(_make_unique(index.to_numpy()), dtype=object)
    var.index = index
    return var


def _make_unique(names: np.ndarray) -> list[str]:
    """Append ``-1``, ``-2``, ... to repeated names (anndata's convention)."""
    seen: dict[str, int] = {}
    taken = set(map(str, names))
    out: list[str] = []
    for raw in map(str, names):
        if raw not in seen:
            seen[raw] = 0
            out.append(raw)
            continue
        k = seen[raw]
        while True:
            k += 1
            cand = f"{raw}-{k}"
            if cand not in taken:
                break
        seen[raw] = k
        taken.add(cand)
        out.append(cand)
    return out


def read_10x_h5(
    path: PathLike,
    *,
    var_names: Literal["gene_symbols", "gene_ids"] = "gene_symbols",
) -> AnnData:
    """Read a 10x Genomics feature-barcode matrix in HDF5 format.

    Supports the Cell Ranger / Space Ranger v3+ layout
    (``matrix/{data,indices,indptr,shape,barcodes,features/{id,name,...}}``) and the
    legacy v2 layout (one group per genome with ``genes`` and ``gene_names``).

    Parameters
    ----------
    path
        ``filtered_feature_bc_matrix.h5`` or ``raw_feature_bc_matrix.h5``.
    var_names
        Use gene symbols (made unique) or Ensembl ids as ``var_names``; the ids are
        kept in ``var["gene_ids"]`` either way.

    Returns
    -------
    AnnData
        Barcodes x genes, raw counts in ``.X`` as ``float32`` CSR, ``var["gene_ids"]``
        (and ``var["feature_types"]``, ``var["genome"]`` when stored). The file attributes
        (``library_ids``, ``chemistry_description``, ``software_version``) go to
        ``uns["10x_metadata"]``.

    Raises
    ------
    ChronotopeInputError
        Missing file, not a 10x HDF5 file, inconsistent shapes, duplicated barcodes,
        NaN or negative counts.
    """
    path = check_file(path, "10x HDF5 count matrix")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise ChronotopeInputError(f"Cannot open {str(path)!r} as HDF5: {err}") from err
    with f:
        if "matrix" in f:
            g = f["matrix"]
            need = ("data", "indices", "indptr", "shape", "barcodes", "features")
            missing = [k for k in need if k not in g]
            if missing:
                raise ChronotopeInputError(
                    f"{str(path)!r} is not a 10x HDF5 matrix: 'matrix/' lacks {missing}."
                )
            feat = g["features"]
            if "id" not in feat or "name" not in feat:
                raise ChronotopeInputError(
                    f"{str(path)!r}: 'matrix/features' must hold 'id' and 'name' datasets."
                )
            ids = _decode(feat["id"][()])
            names = _decode(feat["name"][()])
            ftypes = _decode(feat["feature_type"][()]) if "feature_type" in feat else None
            genome = _decode(feat["genome"][()]) if "genome" in feat else None
        else:
            groups = [k for k in f if isinstance(f[k], h5py.Group)]
            if not groups or not all(k in f[groups[0]] for k in ("genes", "gene_names")):
                raise ChronotopeInputError(
                    f"{str(path)!r} is not a 10x HDF5 matrix (no 'matrix' group and no "
                    "legacy genome group with 'genes'/'gene_names')."
                )
            g = f[groups[0]]
            ids = _decode(g["genes"][()])
            names = _decode(g["gene_names"][()])
            ftypes = None
            genome = np.full(len(ids), groups[0], dtype=object)
        barcodes = _decode(g["barcodes"][()])
        shape = tuple(int(s) for s in g["shape"][()])
        if len(shape) != 2 or shape != (len(ids), len(barcodes)):
            raise ChronotopeInputError(
                f"{str(path)!r}: matrix shape {shape} does not match {len(ids)} features x "
                f"{len(barcodes)} barcodes."
            )
        check_unique(barcodes, f"barcodes in {path.name}")
        indptr = g["indptr"][()]
        if len(indptr) != len(barcodes) + 1:
            raise ChronotopeInputError(
                f"{str(path)!r}: 'indptr' has {len(indptr)} entries, expected "
                f"{len(barcodes) + 1} (one per barcode + 1)."
            )
        data = g["data"][()]
        indices = g["indices"][()]
        meta = {
            k: (v.decode() if isinstance(v, bytes) else v)
            for k, v in f.attrs.items()
            if k in ("chemistry_description", "software_version", "filetype", "version")
        }
        lib_ids = f.attrs.get("library_ids")
    # The matrix is genes x barcodes in CSC, i.e. barcodes x genes in CSR.
    x = sp.csr_matrix((data, indices, indptr), shape=(shape[1], shape[0]))
    check_counts(x, f"counts in {path.name}")
    adata = AnnData(
        X=_counts_to_csr(x),
        obs=pd.DataFrame(index=pd.Index(barcodes, dtype=object)),
        var=_var_frame(ids, names, ftypes, genome, var_names),
    )
    if lib_ids is not None:
        meta["library_ids"] = [x.decode() if isinstance(x, bytes) else str(x) for x in lib_ids]
    if meta:
        adata.uns["10x_metadata"] = {k: _plain(v) for k, v in meta.items()}
    return adata


def _plain(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return [x.decode() if isinstance(x, bytes) else x for x in v.tolist()]
    if isinstance(v, np.generic):
        return v.item()
    return v


def _open_text(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return gzip.open(path, "rt")
    return open(path)


def _find_one(folder: Path, stems: tuple[str, ...]) -> Path | None:
    for stem in stems:
        for cand in (folder / stem, folder / f"{stem}.gz"):
            if cand.is_file():
                return cand
    return None


def read_10x_mtx(
    path: PathLike,
    *,
    var_names: Literal["gene_symbols", "gene_ids"] = "gene_symbols",
) -> AnnData:
    """Read a 10x Genomics feature-barcode matrix folder in Matrix Market format.

    Parameters
    ----------
    path
        Folder holding ``matrix.mtx(.gz)``, ``barcodes.tsv(.gz)`` and ``features.tsv(.gz)``
        (Cell Ranger v3+) or ``genes.tsv`` (v2).
    var_names
        Use gene symbols (made unique) or gene ids as ``var_names``.

    Returns
    -------
    AnnData
        Barcodes x genes, raw counts in ``.X`` as ``float32`` CSR, ``var["gene_ids"]``
        (and ``var["feature_types"]`` when stored).

    Raises
    ------
    ChronotopeInputError
        Missing files (named), shape mismatch between the matrix and the barcode or
        feature lists, duplicated barcodes, NaN or negative counts.
    """
    folder = check_file(path, "10x Matrix Market folder", is_dir=True)
    mtx = _find_one(folder, ("matrix.mtx",))
    bc = _find_one(folder, ("barcodes.tsv",))
    ft = _find_one(folder, ("features.tsv", "genes.tsv"))
    missing = [
        name
        for name, p in (
            ("matrix.mtx[.gz]", mtx),
            ("barcodes.tsv[.gz]", bc),
            ("features.tsv[.gz] or genes.tsv", ft),
        )
        if p is None
    ]
    if missing:
        raise MissingFileError(f"10x Matrix Market folder {str(folder)!r} lacks {missing}.")
    assert mtx is not None and bc is not None and ft is not None
    barcodes = pd.read_csv(bc, sep="\t", header=None, dtype=str).iloc[:, 0].to_numpy(object)
    feats = pd.read_csv(ft, sep="\t", header=None, dtype=str)
    ids = feats.iloc[:, 0].to_numpy(object)
    names = feats.iloc[:, 1].to_numpy(object) if feats.shape[1] > 1 else ids
    ftypes = feats.iloc[:, 2].to_numpy(object) if feats.shape[1] > 2 else None
    # Read the header line to check the shape before parsing the entries.
    with _open_text(mtx) as fh:
        line = fh.readline()
        while line.startswith("%"):
            line = fh.readline()
    try:
        n_rows, n_cols, _ = (int(v) for v in line.split()[:3])
    except ValueError as err:
        raise ChronotopeInputError(f"{str(mtx)!r} is not a Matrix Market coordinate file.") from err
    if (n_rows, n_cols) != (len(ids), len(barcodes)):
        raise ChronotopeInputError(
            f"{mtx.name} has shape ({n_rows}, {n_cols}) but {ft.name} lists {len(ids)} features "
            f"and {bc.name} lists {len(barcodes)} barcodes (expected features x barcodes)."
        )
    check_unique(barcodes, f"barcodes in {bc.name}")
    with gzip.open(mtx, "rb") if mtx.suffix == ".gz" else open(mtx, "rb") as fh:
        m = scipy.io.mmread(fh)
    x = sp.csr_matrix(sp.coo_matrix(m).T)
    check_counts(x, f"counts in {mtx.name}")
    return AnnData(
        X=_counts_to_csr(x),
        obs=pd.DataFrame(index=pd.Index(barcodes, dtype=object)),
        var=_var_frame(ids, names, ftypes, None, var_names),
    )


def read_tissue_positions(path: PathLike) -> pd.DataFrame:
    """Read a Space Ranger tissue-position file, with or without a header row.

    Parameters
    ----------
    path
        ``tissue_positions.csv`` (Space Ranger >= 2.0, with header) or
        ``tissue_positions_list.csv`` (v1, no header).

    Returns
    -------
    pandas.DataFrame
        Indexed by barcode, columns ``in_tissue``, ``array_row``, ``array_col`` (int) and
        ``pxl_row_in_fullres``, ``pxl_col_in_fullres`` (float, full-resolution pixels).
    """
    path = check_file(path, "Visium tissue positions")
    with open(path) as fh:
        first = fh.readline().strip().split(",")
    has_header = len(first) > 1 and not first[1].strip().lstrip("-").isdigit()
    pos = pd.read_csv(path, header=0 if has_header else None, dtype={0: str})
    if pos.shape[1] != 6:
        raise ChronotopeInputError(
            f"{path.name} must have 6 columns {list(_POSITION_COLUMNS)}, got {pos.shape[1]}."
        )
    pos.columns = list(_POSITION_COLUMNS)
    pos = pos.set_index("barcode")
    pos.index = pos.index.astype(str).astype(object)
    pos.index.name = None
    check_unique(pos.index, f"barcodes in {path.name}")
    bad = pos.isna().any(axis=1)
    if bad.any():
        raise ChronotopeInputError(
            f"{path.name}: {int(bad.sum())} row(s) have missing values "
            f"(first: {pos.index[bad][0]!r})."
        )
    for c in ("in_tissue", "array_row", "array_col"):
        pos[c] = pos[c].astype(np.int64)
    for c in ("pxl_row_in_fullres", "pxl_col_in_fullres"):
        pos[c] = pos[c].astype(np.float64)
    return pos


def read_scalefactors(path: PathLike) -> dict[str, float]:
    """Read ``scalefactors_json.json`` into a dict of floats."""
    path = check_file(path, "Visium scale factors")
    try:
        sf = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ChronotopeInputError(f"{path.name} is not valid JSON: {err}") from err
    if "tissue_lowres_scalef" not in sf and "tissue_hires_scalef" not in sf:
        raise ChronotopeInputError(
            f"{path.name} lacks 'tissue_lowres_scalef' and 'tissue_hires_scalef'."
        )
    return {k: float(v) for k, v in sf.items() if isinstance(v, int | float)}


def read_image(path: PathLike, *, max_size: int | None = None) -> np.ndarray:
    """Read an image into an ``(height, width, 3)`` ``uint8`` RGB array.

    Parameters
    ----------
    path
        PNG, JPEG or TIFF file.
    max_size
        If given, downscale (keeping the aspect ratio) so that the longer side is at most
        this many pixels. Large JPEGs are decoded at reduced size directly (fast).

    Returns
    -------
    numpy.ndarray
        ``uint8`` array of shape ``(height, width, 3)``.
    """
    from PIL import Image

    path = check_file(path, "image")
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(path) as im:
            if max_size is not None and max(im.size) > max_size:
                scale = max_size / max(im.size)
                target = (max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale)))
                im.draft("RGB", target)
                im = im.convert("RGB")
                if max(im.size) > max_size:
                    im = im.resize(target, Image.Resampling.LANCZOS)
            else:
                im = im.convert("RGB")
            return np.asarray(im, dtype=np.uint8).copy()
    finally:
        Image.MAX_IMAGE_PIXELS = old


def image_size(path: PathLike) -> tuple[int, int]:
    """Return ``(width, height)`` of an image without decoding it."""
    from PIL import Image

    path = check_file(path, "image")
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(path) as im:
            return int(im.size[0]), int(im.size[1])
    finally:
        Image.MAX_IMAGE_PIXELS = old


def spatial_uns(
    images: Mapping[str, np.ndarray],
    scalefactors: Mapping[str, float],
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Build one library entry of ``uns["spatial"]`` in scanpy/squidpy's layout."""
    entry: dict[str, Any] = {"images": dict(images), "scalefactors": dict(scalefactors)}
    if metadata:
        entry["metadata"] = dict(metadata)
    return entry


def _spatial_dir_files(spatial: Path) -> dict[str, Path | None]:
    return {
        "positions": next(
            (spatial / n for n in _POSITION_FILES if (spatial / n).is_file()),
            None,
        ),
        "scalefactors": spatial / "scalefactors_json.json"
        if (spatial / "scalefactors_json.json").is_file()
        else None,
        "hires": spatial / "tissue_hires_image.png"
        if (spatial / "tissue_hires_image.png").is_file()
        else None,
        "lowres": spatial / "tissue_lowres_image.png"
        if (spatial / "tissue_lowres_image.png").is_file()
        else None,
    }


def read_visium(
    path: PathLike,
    *,
    count_file: PathLike | None = None,
    library_id: str | None = None,
    load_images: bool = True,
    var_names: Literal["gene_symbols", "gene_ids"] = "gene_symbols",
) -> AnnData:
    """Read a 10x Visium Space Ranger output folder.

    Parameters
    ----------
    path
        The Space Ranger ``outs/`` folder: a count matrix plus a ``spatial/`` folder with
        ``tissue_positions.csv`` (or ``tissue_positions_list.csv``, with or without header),
        ``scalefactors_json.json`` and ``tissue_lowres_image.png`` /
        ``tissue_hires_image.png``.
    count_file
        Count matrix, relative to ``path`` or absolute: an ``.h5`` file or a Matrix Market
        folder (``matrix.mtx.gz``, ``barcodes.tsv.gz``, ``features.tsv.gz``). By default the
        first of ``filtered_feature_bc_matrix.h5``, ``raw_feature_bc_matrix.h5``,
        ``filtered_feature_bc_matrix/``, ``raw_feature_bc_matrix/`` that exists.
    library_id
        Key under ``uns["spatial"]``. Default: the library id stored in the ``.h5`` file,
        else the folder name.
    load_images
        Load the low- and high-resolution H&E images (when present).
    var_names
        Use gene symbols (made unique) or gene ids as ``var_names``.

    Returns
    -------
    AnnData
        Barcodes x genes with raw counts in ``.X`` (``float32`` CSR);
        ``obs["in_tissue"]`` (0/1 int), ``obs["array_row"]``, ``obs["array_col"]``;
        ``obsm["spatial"]``: full-resolution pixel coordinates as ``(x, y)`` =
        (``pxl_col_in_fullres``, ``pxl_row_in_fullres``), like scanpy;
        ``uns["spatial"][library_id]`` with ``"images"`` (``"lowres"``/``"hires"``,
        ``uint8`` RGB arrays) and ``"scalefactors"``. Image pixel = ``obsm["spatial"] *
        scalefactors["tissue_lowres_scalef"]`` (or ``tissue_hires_scalef``).

    Raises
    ------
    ChronotopeInputError
        Missing files (named), barcodes of the matrix absent from the position file,
        duplicated barcodes, NaN or negative counts.
    """
    root = check_file(path, "Visium folder", is_dir=True)
    spatial = root / "spatial"
    if not spatial.is_dir():
        raise MissingFileError(f"Visium folder {str(root)!r} has no 'spatial/' sub-folder.")
    files = _spatial_dir_files(spatial)
    if files["positions"] is None:
        raise MissingFileError(
            f"{str(spatial)!r} holds none of {list(_POSITION_FILES)} (spot positions)."
        )
    if files["scalefactors"] is None:
        raise MissingFileError(f"{str(spatial)!r} lacks 'scalefactors_json.json'.")
    if count_file is None:
        cand = next((root / c for c in _COUNT_CANDIDATES if (root / c).exists()), None)
        if cand is None:
            raise MissingFileError(
                f"No count matrix in {str(root)!r}: looked for {list(_COUNT_CANDIDATES)}. "
                "Pass count_file=..."
            )
        counts_path = cand
    else:
        counts_path = Path(count_file)
        if not counts_path.is_absolute():
            counts_path = root / counts_path
        if not counts_path.exists():
            raise MissingFileError(f"count_file not found: {str(counts_path)!r}.")

    positions = read_tissue_positions(files["positions"])
    scalefactors = read_scalefactors(files["scalefactors"])
    if counts_path.is_dir():
        adata = read_10x_mtx(counts_path, var_names=var_names)
    else:
        adata = read_10x_h5(counts_path, var_names=var_names)

    missing = adata.obs_names.difference(positions.index)
    if len(missing):
        raise ChronotopeInputError(
            f"{len(missing)} of {adata.n_obs} barcodes of {counts_path.name} are not in "
            f"{files['positions'].name} (e.g. {missing[0]!r}); the matrix and the spatial "
            "folder do not belong together."
        )
    pos = positions.loc[adata.obs_names]
    adata.obs["in_tissue"] = pos["in_tissue"].to_numpy()
    adata.obs["array_row"] = pos["array_row"].to_numpy()
    adata.obs["array_col"] = pos["array_col"].to_numpy()
    adata.obsm["spatial"] = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(
        dtype=np.float64
    )

    meta10x = adata.uns.pop("10x_metadata", {})
    if library_id is None:
        libs = meta10x.get("library_ids") or []
        library_id = str(libs[0]) if len(libs) else root.name
    images: dict[str, np.ndarray] = {}
    if load_images:
        for res in ("hires", "lowres"):
            if files[res] is not None:
                images[res] = read_image(files[res])
        if not images:
            logger.info("No tissue image in %s; uns['spatial'] has no images.", spatial)
    metadata = {
        k: str(meta10x[k]) for k in ("chemistry_description", "software_version") if k in meta10x
    }
    adata.uns["spatial"] = {library_id: spatial_uns(images, scalefactors, metadata)}
    logger.info(
        "Read Visium %s: %d barcodes (%d in tissue) x %d genes",
        library_id,
        adata.n_obs,
        int(adata.obs["in_tissue"].sum()),
        adata.n_vars,
    )
    return adata
