"""Readers for the files users have: h5ad, 10x Visium, csv/tsv counts, time series.

Every reader checks its inputs before heavy work and raises
:class:`chronotope._errors.ChronotopeInputError` (a ``ValueError``) with a message a
person can act on: missing files are named, shapes and barcodes must agree, counts must
be finite and non-negative, barcodes unique, times numeric.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from chronotope._errors import ChronotopeInputError
from chronotope._validate import (
    check_coordinates,
    check_counts,
    check_file,
    check_finite,
    check_unique,
)
from chronotope.io._visium import (
    _counts_to_csr,
    _make_unique,
    read_10x_h5,
    read_10x_mtx,
    read_visium,
)

__all__ = [
    "read_10x_h5",
    "read_10x_mtx",
    "read_csv_counts",
    "read_h5ad",
    "read_time_series",
    "read_visium",
]

logger = logging.getLogger("chronotope")

PathLike = str | os.PathLike[str]


# --------------------------------------------------------------------------- h5ad


def read_h5ad(
    path: PathLike,
    *,
    counts_layer: str | None = None,
    check_nonnegative: bool = True,
    spatial_key: str = "spatial",
) -> AnnData:
    """Read an ``.h5ad`` file and validate it.

    Parameters
    ----------
    path
        The ``.h5ad`` file.
    counts_layer
        Layer that holds the counts; ``None`` checks ``.X``.
    check_nonnegative
        Raise when the checked matrix has negative values (set ``False`` for scaled data).
    spatial_key
        If ``obsm[spatial_key]`` exists it must be finite with one row per observation.

    Returns
    -------
    AnnData
        The object as stored (no conversion).

    Raises
    ------
    ChronotopeInputError
        Missing file, unreadable file, duplicated ``obs_names``, NaN/infinite values or
        (with ``check_nonnegative``) negative values in the counts, bad coordinates.
    """
    path = check_file(path, "h5ad file")
    try:
        adata = anndata.read_h5ad(path)
    except (OSError, KeyError) as err:
        raise ChronotopeInputError(f"Cannot read {str(path)!r} as h5ad: {err}") from err
    check_unique(adata.obs_names, f"obs_names (barcodes) in {path.name}")
    if counts_layer is not None:
        if counts_layer not in adata.layers:
            have = ", ".join(map(repr, adata.layers.keys())) or "none"
            raise ChronotopeInputError(
                f"{path.name}: layer {counts_layer!r} not found (have: {have})."
            )
        x, name = adata.layers[counts_layer], f"layers[{counts_layer!r}] in {path.name}"
    else:
        x, name = adata.X, f"X in {path.name}"
    if x is not None and np.dtype(x.dtype).kind in "fiuc":
        if check_nonnegative:
            check_counts(x, name)
        else:
            check_finite(x, name)
    if spatial_key in adata.obsm:
        check_coordinates(
            np.asarray(adata.obsm[spatial_key]), adata.n_obs, f"obsm[{spatial_key!r}]"
        )
    return adata


# --------------------------------------------------------------------------- csv counts


def _infer_sep(path: Path, sep: str | None) -> str:
    if sep is not None:
        return sep
    name = path.name.lower().removesuffix(".gz").removesuffix(".bz2").removesuffix(".zip")
    if name.endswith((".tsv", ".tab")):
        return "\t"
    if name.endswith(".csv"):
        return ","
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as fh:
        line = fh.readline()
    return "\t" if line.count("\t") >= line.count(",") else ","


def _is_number(s: object) -> bool:
    try:
        float(str(s))
    except ValueError:
        return False
    return True


def _read_coords_table(path: Path, sep: str) -> pd.DataFrame:
    """Read a coordinate table, guessing whether it has a header and an index column."""
    raw = pd.read_csv(path, sep=sep, header=None, dtype=str, keep_default_na=False)
    if raw.empty:
        raise ChronotopeInputError(f"Coordinate file {path.name} is empty.")
    first = raw.iloc[0].tolist()
    has_header = sum(not _is_number(v) for v in first[1:]) > 0 or (
        len(first) == 1 and not _is_number(first[0])
    )
    if has_header:
        header = [str(v) for v in first]
        body = raw.iloc[1:].reset_index(drop=True)
        if header[0] == "" or header[0].lower().startswith("unnamed"):
            header[0] = "__index__"
        body.columns = header
    else:
        body = raw
        body.columns = [f"col{i}" for i in range(raw.shape[1])]
    # A first column that is not numeric (or an unnamed one) holds the barcodes.
    first_col = body.columns[0]
    if first_col == "__index__" or not all(_is_number(v) for v in body[first_col].head(50)):
        body = body.set_index(first_col)
        body.index.name = None
    out = pd.DataFrame(index=body.index)
    for c in body.columns:
        num = pd.to_numeric(body[c], errors="coerce")
        out[c] = num if num.notna().all() else body[c]
    return out


def _pick_coord_columns(
    table: pd.DataFrame, coord_columns: Sequence[str | int] | None, path: Path
) -> list[str]:
    cols = list(table.columns)
    if coord_columns is not None:
        picked: list[str] = []
        for c in coord_columns:
            if isinstance(c, int) and not isinstance(c, bool):
                if c >= len(cols):
                    raise ChronotopeInputError(
                        f"coord_columns: {path.name} has only {len(cols)} data column(s)."
                    )
                picked.append(cols[c])
            elif c in cols:
                picked.append(str(c))
            else:
                raise ChronotopeInputError(
                    f"coord_columns: column {c!r} not in {path.name} (have: {cols})."
                )
        return picked
    lower = {str(c).lower(): c for c in cols}
    for names in (("x", "y", "z"), ("x", "y"), ("pxl_col_in_fullres", "pxl_row_in_fullres")):
        if all(n in lower for n in names):
            return [lower[n] for n in names]
    numeric = [c for c in cols if pd.api.types.is_numeric_dtype(table[c])]
    if len(numeric) < 2:
        raise ChronotopeInputError(
            f"{path.name} must hold at least 2 numeric coordinate columns "
            f"(found {len(numeric)}: {numeric}); pass coord_columns=..."
        )
    return numeric[:2]


def _read_counts_table(path: Path, sep: str) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, sep=sep, index_col=0)
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise ChronotopeInputError(f"Cannot parse {path.name} as a table: {err}") from err
    if df.shape[0] == 0 or df.shape[1] == 0:
        raise ChronotopeInputError(f"Count file {path.name} is empty (shape {df.shape}).")
    bad = [c for c, t in df.dtypes.items() if not pd.api.types.is_numeric_dtype(t)]
    if bad:
        col = bad[0]
        vals = pd.to_numeric(df[col], errors="coerce")
        row = df.index[vals.isna() & df[col].notna()]
        where = f" (row {row[0]!r}: {df.loc[row[0], col]!r})" if len(row) else ""
        raise ChronotopeInputError(
            f"{path.name}: {len(bad)} column(s) hold non-numeric values, e.g. {col!r}{where}. "
            "Counts must be numbers; the first column must hold the barcodes or genes."
        )
    df.index = df.index.astype(str)
    df.columns = df.columns.astype(str)
    return df


def read_csv_counts(
    counts: PathLike,
    coords: PathLike | None = None,
    *,
    sep: str | None = None,
    coords_sep: str | None = None,
    transpose: bool | Literal["auto"] = "auto",
    coord_columns: Sequence[str | int] | None = None,
    spatial_key: str = "spatial",
) -> AnnData:
    """Read a csv/tsv count matrix and an optional coordinate file.

    Parameters
    ----------
    counts
        Delimited text file (``.csv``, ``.tsv``, ``.txt``, optionally ``.gz``) with a header
        row and the observation (or gene) names in the first column.
    coords
        Coordinate table with one row per observation: with or without a header, with or
        without a first column of barcodes. With barcodes, rows are matched to the counts
        by barcode (order may differ); without, by position. Extra non-coordinate columns
        (e.g. ``in_tissue``) go to ``obs``.
    sep, coords_sep
        Delimiters; ``None`` infers them from the extension (``.tsv`` → tab, ``.csv`` →
        comma) or the first line.
    transpose
        ``False``: rows are observations; ``True``: rows are genes; ``"auto"``: decide from
        the barcodes of ``coords`` or, failing that, from its number of rows.
    coord_columns
        Names or positions of the coordinate columns in ``coords``. Default: ``x``, ``y``
        (and ``z``) if present, else the first two numeric columns.
    spatial_key
        Where the coordinates go in ``obsm``.

    Returns
    -------
    AnnData
        Observations x genes, counts as ``float32`` CSR in ``.X``, coordinates
        (float64) in ``obsm[spatial_key]``.

    Raises
    ------
    ChronotopeInputError
        Missing files (named), non-numeric values, NaN or negative counts, duplicated
        barcodes, count/coordinate row-number or barcode mismatch.
    """
    counts_path = check_file(counts, "count matrix")
    coords_path = check_file(coords, "coordinate file") if coords is not None else None
    if transpose not in (True, False, "auto"):
        raise ChronotopeInputError(f"transpose must be True, False or 'auto', got {transpose!r}.")

    table = None
    if coords_path is not None:
        table = _read_coords_table(coords_path, _infer_sep(coords_path, coords_sep))
    df = _read_counts_table(counts_path, _infer_sep(counts_path, sep))

    has_barcodes = table is not None and not isinstance(table.index, pd.RangeIndex)
    if transpose == "auto":
        if table is None:
            transpose = False
        elif has_barcodes:
            in_rows = len(table.index.intersection(df.index))
            in_cols = len(table.index.intersection(df.columns))
            transpose = in_cols > in_rows
        else:
            transpose = df.shape[0] != len(table) and df.shape[1] == len(table)
    if transpose:
        df = df.T
    check_unique(df.index, f"barcodes (rows) in {counts_path.name}")

    values = df.to_numpy(dtype=np.float64)
    check_counts(values, f"counts in {counts_path.name}")
    var_names = df.columns.to_numpy(dtype=object)
    if not pd.Index(var_names).is_unique:
        n = int(pd.Index(var_names).duplicated().sum())
        logger.info("%s: made %d duplicated gene names unique.", counts_path.name, n)
        var_names = np.asarray(_make_unique(var_names), dtype=object)
    obs = pd.DataFrame(index=pd.Index(df.index.to_numpy(dtype=object)))

    xy = None
    if table is not None and coords_path is not None:
        cols = _pick_coord_columns(table, coord_columns, coords_path)
        if has_barcodes:
            check_unique(table.index, f"barcodes in {coords_path.name}")
            missing = obs.index.difference(table.index)
            if len(missing):
                raise ChronotopeInputError(
                    f"{len(missing)} of {len(obs)} barcodes of {counts_path.name} are not in "
                    f"{coords_path.name} (e.g. {missing[0]!r}). Barcodes must match."
                )
            extra = len(table) - len(obs)
            if extra:
                logger.info(
                    "%s has %d rows not in %s; they are ignored.",
                    coords_path.name,
                    extra,
                    counts_path.name,
                )
            table = table.loc[obs.index]
        elif len(table) != len(obs):
            raise ChronotopeInputError(
                f"{counts_path.name} has {len(obs)} observations but {coords_path.name} has "
                f"{len(table)} coordinate rows (no barcodes to match them by)."
                + (" Try transpose=True." if len(table) == df.shape[1] else "")
            )
        else:
            table.index = obs.index
        xy = check_coordinates(table[cols].to_numpy(), len(obs), f"coordinates in {coords_path}")
        for c in table.columns:
            if c not in cols:
                obs[str(c)] = table[c].to_numpy()

    adata = AnnData(
        X=_counts_to_csr(sp.csr_matrix(values)),
        obs=obs,
        var=pd.DataFrame(index=pd.Index(var_names)),
    )
    if xy is not None:
        adata.obsm[spatial_key] = xy
    return adata


# --------------------------------------------------------------------------- time series


def _numeric_time(
    values: np.ndarray,
    time_map: Mapping[object, float] | None,
    what: str,
) -> np.ndarray:
    vals = np.asarray(values)
    if time_map is not None:
        keys = pd.Series(vals, dtype=object)
        lookup = {str(k): float(v) for k, v in time_map.items()}
        mapped = keys.map(lambda v: lookup.get(str(v), np.nan)).to_numpy(dtype=np.float64)
        if np.isnan(mapped).any():
            unknown = sorted(set(map(str, keys[np.isnan(mapped)])))
            raise ChronotopeInputError(
                f"{what}: time_map has no entry for {unknown[:5]} (have {sorted(lookup)})."
            )
        return mapped
    num = pd.to_numeric(pd.Series(vals, dtype=object), errors="coerce").to_numpy(np.float64)
    bad = np.isnan(num) & pd.notna(pd.Series(vals, dtype=object)).to_numpy()
    if bad.any():
        examples = sorted(set(map(str, vals[bad])))[:5]
        raise ChronotopeInputError(
            f"{what} holds non-numeric time values {examples}; pass time_map="
            "{label: number, ...} to convert them."
        )
    if np.isnan(num).any():
        raise ChronotopeInputError(f"{what} has {int(np.isnan(num).sum())} missing time value(s).")
    return num


def _time_series_adata(
    x: np.ndarray,
    time: np.ndarray,
    labels: np.ndarray | None,
    obs: pd.DataFrame,
    *,
    key_added: str,
    obsm_key: str | None,
    var_names: Sequence[str] | None,
    what: str,
) -> AnnData:
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ChronotopeInputError(f"{what}: data must be a non-empty 2-D array, got {x.shape}.")
    if not np.issubdtype(x.dtype, np.number):
        raise ChronotopeInputError(f"{what}: data must be numeric, got dtype {x.dtype}.")
    if len(time) != x.shape[0]:
        raise ChronotopeInputError(
            f"{what}: {len(time)} time values for {x.shape[0]} observations."
        )
    x = x.astype(np.float32)
    check_finite(x, what)
    obs = obs.copy()
    obs[key_added] = time.astype(np.float64)
    if labels is not None:
        order = pd.unique(pd.Series(labels[np.argsort(time, kind="stable")], dtype=object))
        obs[f"{key_added}_label"] = pd.Categorical(
            pd.Series(labels, dtype=object).astype(str),
            categories=[str(v) for v in order],
            ordered=True,
        )
    if var_names is None:
        var_names = [f"dim{i}" for i in range(x.shape[1])]
    adata = AnnData(X=x, obs=obs, var=pd.DataFrame(index=pd.Index(list(map(str, var_names)))))
    if obsm_key is not None:
        adata.obsm[obsm_key] = x.copy()
    return adata


def read_time_series(
    path: PathLike,
    *,
    time_key: str = "time",
    data_key: str | None = None,
    feature_columns: Sequence[str] | None = None,
    time_map: Mapping[object, float] | None = None,
    times: Sequence[float] | None = None,
    key_added: str = "time",
    obsm_key: str | None = None,
) -> AnnData:
    """Read time-series snapshots (cells with a time label) into an AnnData.

    Parameters
    ----------
    path
        One of

        - ``.csv`` / ``.tsv`` (optionally ``.gz``): a header row, a time column
          ``time_key`` and numeric feature columns; other non-numeric columns go to ``obs``;
        - ``.npz``: an array ``time_key`` (one value per cell), a 2-D array ``data_key``
          (default: the only 2-D numeric array) and optional 1-D per-cell arrays (to ``obs``);
        - ``.npy``: an object array of per-time-point ``(n_t, d)`` arrays (TIGON,
          DiffusionOT ``MISA``); times are ``times`` or ``0, 1, ...``.
    time_key
        Column or array holding the time of each cell.
    data_key
        ``.npz`` only: the array of features.
    feature_columns
        ``.csv`` only: feature columns (default: all numeric columns but the time).
    time_map
        Map from time labels (e.g. ``"0d"``, ``"8h"``) to numbers. Without it, times
        must be numeric. The original labels are kept in ``obs[key_added + "_label"]``.
    times
        ``.npy`` only: the time of each stored time point.
    key_added
        ``obs`` key of the numeric time (float64).
    obsm_key
        If given, also store the features in ``obsm[obsm_key]``.

    Returns
    -------
    AnnData
        Cells x features, ``.X`` dense ``float32``, ``obs[key_added]`` numeric time.

    Raises
    ------
    ChronotopeInputError
        Missing file or time column, non-numeric or missing times, NaN features, shape
        mismatch between the time labels and the data.
    """
    path = check_file(path, "time-series file")
    name = path.name.lower()
    what = path.name
    if name.endswith(".npz"):
        z = np.load(path, allow_pickle=True)
        arrays = {k: z[k] for k in z.files}
        if time_key not in arrays:
            raise ChronotopeInputError(
                f"{what}: no array {time_key!r} with the times (have: {sorted(arrays)}); "
                "pass time_key=..."
            )
        if data_key is None:
            cands = [
                k
                for k, a in arrays.items()
                if a.ndim == 2 and np.issubdtype(a.dtype, np.number) and k != time_key
            ]
            if len(cands) != 1:
                raise ChronotopeInputError(
                    f"{what}: cannot tell which array holds the data (2-D numeric arrays: "
                    f"{cands}); pass data_key=..."
                )
            data_key = cands[0]
        if data_key not in arrays:
            raise ChronotopeInputError(f"{what}: no array {data_key!r} (have: {sorted(arrays)}).")
        x = arrays[data_key]
        t_raw = np.asarray(arrays[time_key]).ravel()
        if len(t_raw) != len(x):
            raise ChronotopeInputError(
                f"{what}: {time_key!r} has {len(t_raw)} entries but {data_key!r} has {len(x)} rows."
            )
        obs = pd.DataFrame(index=pd.Index([str(i) for i in range(len(x))]))
        for k, a in arrays.items():
            if k not in (time_key, data_key) and a.ndim == 1 and len(a) == len(x):
                obs[k] = pd.Categorical(a.astype(str)) if a.dtype.kind in "OSU" else a
        time = _numeric_time(t_raw, time_map, f"{what}[{time_key!r}]")
        labels = t_raw.astype(str) if time_map is not None or t_raw.dtype.kind in "OSU" else None
        return _time_series_adata(
            x,
            time,
            labels,
            obs,
            key_added=key_added,
            obsm_key=obsm_key,
            var_names=None,
            what=what,
        )
    if name.endswith(".npy"):
        arr = np.load(path, allow_pickle=True)
        parts = list(arr.ravel()) if arr.dtype == object else None
        if parts is None or not all(isinstance(p, np.ndarray) and p.ndim == 2 for p in parts):
            raise ChronotopeInputError(
                f"{what}: expected an object array of per-time-point 2-D arrays, got "
                f"dtype {arr.dtype} shape {arr.shape}. Save a table with a time column instead."
            )
        dims = {p.shape[1] for p in parts}
        if len(dims) != 1:
            raise ChronotopeInputError(f"{what}: time points have different widths {dims}.")
        if times is None:
            times = list(range(len(parts)))
        if len(times) != len(parts):
            raise ChronotopeInputError(
                f"{what}: {len(times)} times given for {len(parts)} time points."
            )
        t = np.concatenate([np.full(len(p), float(ti)) for p, ti in zip(parts, times, strict=True)])
        x = np.concatenate(parts, axis=0)
        obs = pd.DataFrame(index=pd.Index([str(i) for i in range(len(x))]))
        obs["time_point"] = np.concatenate(
            [np.full(len(p), i, dtype=np.int64) for i, p in enumerate(parts)]
        )
        return _time_series_adata(
            x,
            t,
            None,
            obs,
            key_added=key_added,
            obsm_key=obsm_key,
            var_names=None,
            what=what,
        )
    sep = _infer_sep(path, None)
    try:
        df = pd.read_csv(path, sep=sep)
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise ChronotopeInputError(f"Cannot parse {what} as a table: {err}") from err
    if time_key not in df.columns:
        raise ChronotopeInputError(
            f"{what}: no time column {time_key!r} (columns: {list(df.columns)[:10]}); "
            "pass time_key=..."
        )
    first = df.columns[0]
    if (str(first) == "" or str(first).startswith("Unnamed")) and first != time_key:
        df = df.set_index(first)
        df.index.name = None
    if feature_columns is None:
        feature_columns = [
            c for c in df.columns if c != time_key and pd.api.types.is_numeric_dtype(df[c])
        ]
    else:
        missing = [c for c in feature_columns if c not in df.columns]
        if missing:
            raise ChronotopeInputError(f"{what}: feature columns {missing} not found.")
        bad = [c for c in feature_columns if not pd.api.types.is_numeric_dtype(df[c])]
        if bad:
            raise ChronotopeInputError(f"{what}: feature columns {bad} are not numeric.")
    if not feature_columns:
        raise ChronotopeInputError(f"{what}: no numeric feature columns besides {time_key!r}.")
    t_raw = df[time_key].to_numpy()
    time = _numeric_time(t_raw, time_map, f"{what} column {time_key!r}")
    obs = pd.DataFrame(index=pd.Index(df.index.astype(str)))
    check_unique(obs.index, f"row names in {what}")
    for c in df.columns:
        if c != time_key and c not in feature_columns:
            obs[str(c)] = df[c].to_numpy()
    labels = t_raw.astype(str) if time_map is not None else None
    return _time_series_adata(
        df[list(feature_columns)].to_numpy(),
        time,
        labels,
        obs,
        key_added=key_added,
        obsm_key=obsm_key,
        var_names=[str(c) for c in feature_columns],
        what=what,
    )
