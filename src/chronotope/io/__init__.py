"""Readers that validate on read: h5ad, 10x Visium, csv/tsv counts, time series.

All readers return :class:`anndata.AnnData` with counts as ``float32`` CSR in ``.X``,
coordinates in ``obsm["spatial"]`` and times in ``obs["time"]``, and raise
:class:`chronotope._errors.ChronotopeInputError` (a ``ValueError``) on bad input.
"""

from __future__ import annotations

from chronotope._validate import MissingFileError
from chronotope.io._chunks import read_h5ad_backed, read_h5ad_chunks
from chronotope.io._visium import read_image, read_scalefactors, read_tissue_positions
from chronotope.io.readers import (
    read_10x_h5,
    read_10x_mtx,
    read_csv_counts,
    read_h5ad,
    read_time_series,
    read_visium,
)

__all__ = [
    "MissingFileError",
    "read_10x_h5",
    "read_10x_mtx",
    "read_csv_counts",
    "read_h5ad",
    "read_h5ad_backed",
    "read_h5ad_chunks",
    "read_image",
    "read_scalefactors",
    "read_time_series",
    "read_tissue_positions",
    "read_visium",
]
