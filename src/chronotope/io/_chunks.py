"""Out-of-core reading of ``.h5ad`` files: backed objects and row chunks of the counts.

A million-spot slice never has to be dense, nor even loaded whole: :func:`read_h5ad_backed`
opens the file with :mod:`anndata`'s backed mode (``obs``, ``var``, ``obsm`` in memory,
``X`` left on disk) and :func:`read_h5ad_chunks` reads the counts as consecutive row
chunks (CSR, optionally restricted to some genes), straight from the HDF5 arrays of a CSR
``X`` (or a layer), so that gene- and tile-batched work holds one chunk at a time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from chronotope._errors import ChronotopeInputError
from chronotope._validate import MissingFileError

__all__ = ["read_h5ad_backed", "read_h5ad_chunks"]

if TYPE_CHECKING:
    from anndata import AnnData

PathLike = str | os.PathLike[str]


def _path(path: PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path} not found")
    return path


def read_h5ad_backed(path: PathLike, *, spatial_key: str = "spatial") -> AnnData:
    """Open an ``.h5ad`` file in backed (read-only) mode, checking the coordinates.

    Parameters
    ----------
    path
        The ``.h5ad`` file.
    spatial_key
        If ``obsm[spatial_key]`` exists it must be finite with one row per observation.

    Returns
    -------
    AnnData
        Backed object: ``obs``, ``var`` and ``obsm`` in memory, ``X`` on disk (slicing
        ``adata.X[a:b]`` reads rows ``a:b``). Close it with ``adata.file.close()``.
    """
    import anndata

    path = _path(path)
    try:
        adata = anndata.read_h5ad(path, backed="r")
    except Exception as exc:
        raise ChronotopeInputError(f"cannot read {path} as h5ad: {exc}") from exc
    if spatial_key in adata.obsm:
        xy = np.asarray(adata.obsm[spatial_key])
        if xy.shape[0] != adata.n_obs or not np.isfinite(xy).all():
            adata.file.close()
            raise ChronotopeInputError(
                f"obsm[{spatial_key!r}] of {path} must be finite with {adata.n_obs} rows"
            )
    return adata


def _gene_index(var_names: np.ndarray, genes: Sequence[str] | np.ndarray | None) -> np.ndarray:
    if genes is None:
        return np.arange(len(var_names))
    genes = np.asarray(genes)
    if genes.dtype == bool:
        if genes.shape != (len(var_names),):
            raise ChronotopeInputError(f"a gene mask needs {len(var_names)} entries")
        return np.flatnonzero(genes)
    if np.issubdtype(genes.dtype, np.integer):
        if genes.size and (genes.min() < 0 or genes.max() >= len(var_names)):
            raise ChronotopeInputError("gene positions out of range")
        return genes.astype(np.int64)
    where = {str(g): i for i, g in enumerate(var_names)}
    missing = [str(g) for g in genes if str(g) not in where]
    if missing:
        raise ChronotopeInputError(f"{len(missing)} genes not in the file, e.g. {missing[:5]}")
    return np.array([where[str(g)] for g in genes], dtype=np.int64)


def read_h5ad_chunks(
    path: PathLike,
    *,
    chunk_size: int = 65536,
    layer: str | None = None,
    genes: Sequence[str] | np.ndarray | None = None,
    progress: bool = False,
) -> Iterator[tuple[slice, sp.csr_matrix]]:
    """Iterate over the counts of an ``.h5ad`` file in row chunks.

    Parameters
    ----------
    path
        The ``.h5ad`` file.
    chunk_size
        Rows per chunk.
    layer
        Layer to read (``None``: ``X``).
    genes
        Genes to keep, in this order: names, positions or a boolean mask over ``var``.
    progress
        Show a progress bar over the chunks.

    Yields
    ------
    rows, chunk
        The ``slice`` of rows and their ``float32`` CSR counts (``rows`` x genes).
        ``sp.vstack`` of the chunks is the (gene-selected) matrix.

    Notes
    -----
    A CSR matrix is read directly from its ``data`` / ``indices`` / ``indptr`` arrays
    (one contiguous read per chunk); CSC or dense storage is read through anndata's
    backed mode, one chunk of rows at a time.
    """
    import h5py

    path = _path(path)
    if int(chunk_size) < 1:
        raise ChronotopeInputError(f"chunk_size must be >= 1, got {chunk_size}")
    chunk_size = int(chunk_size)
    with h5py.File(path, "r") as f:
        key = "X" if layer is None else f"layers/{layer}"
        if key not in f:
            raise ChronotopeInputError(f"{path} has no {key!r}")
        var = f["var"]
        index_key = var.attrs.get("_index", "_index")
        raw_names = var[index_key][...]
        var_names = np.array(
            [v.decode() if isinstance(v, bytes) else str(v) for v in raw_names], dtype=object
        )
        cols = _gene_index(var_names, genes)
        node = f[key]
        encoding = node.attrs.get("encoding-type", "array")
        if isinstance(encoding, bytes):
            encoding = encoding.decode()
        if isinstance(node, h5py.Group):
            n_obs = int(node.attrs["shape"][0])
        else:
            n_obs = int(node.shape[0])
        starts = range(0, n_obs, chunk_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=f"reading {path.name}", unit="chunk")
        if encoding == "csr_matrix":
            indptr = node["indptr"][...].astype(np.int64)
            n_vars = int(node.attrs["shape"][1])
            for lo in starts:
                hi = min(lo + chunk_size, n_obs)
                a, b = indptr[lo], indptr[hi]
                m = sp.csr_matrix(
                    (
                        node["data"][a:b].astype(np.float32, copy=False),
                        node["indices"][a:b],
                        indptr[lo : hi + 1] - a,
                    ),
                    shape=(hi - lo, n_vars),
                )
                yield slice(lo, hi), (m if genes is None else m[:, cols])
            return
    import anndata

    adata = anndata.read_h5ad(path, backed="r")
    try:
        x = adata.X if layer is None else adata.layers[layer]
        for lo in starts:
            hi = min(lo + chunk_size, n_obs)
            block = x[lo:hi]
            block = sp.csr_matrix(block, dtype=np.float32)
            yield slice(lo, hi), (block if genes is None else block[:, cols])
    finally:
        adata.file.close()
