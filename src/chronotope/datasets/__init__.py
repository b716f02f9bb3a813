"""Public datasets (from a data folder) and small demo datasets embedded in the package.

Loaders read the data folder given by ``data_dir=``, else the environment variable
``CHRONOTOPE_DATA``, else ``<repository>/../shared/data``. Each returns an
:class:`anndata.AnnData`: counts in ``.X`` (``float32`` CSR), coordinates in
``obsm["spatial"]``, labels in ``obs``, times in ``obs["time"]``, images in
``uns["spatial"]``, provenance in ``uns["chronotope_dataset"]``.

:func:`demo` needs no data folder.
"""

from __future__ import annotations

from chronotope.datasets._demodata import DEMO_DESCRIPTIONS, demo, demo_names
from chronotope.datasets._registry import available, get_data_dir, load
from chronotope.datasets._spatial import (
    breast_slice,
    breast_slices,
    dlpfc,
    her2st,
    mouse_brain_raw,
    mouse_olfactory_bulb,
    starmap,
)
from chronotope.datasets._timeseries import (
    deepruot,
    emt,
    misa,
    misa_velocity,
    tigon,
    weinreb,
    wot,
)

__all__ = [
    "DEMO_DESCRIPTIONS",
    "available",
    "breast_slice",
    "breast_slices",
    "deepruot",
    "demo",
    "demo_names",
    "dlpfc",
    "emt",
    "get_data_dir",
    "her2st",
    "load",
    "misa",
    "misa_velocity",
    "mouse_brain_raw",
    "mouse_olfactory_bulb",
    "starmap",
    "tigon",
    "weinreb",
    "wot",
]
