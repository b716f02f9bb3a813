"""Reading R data files (``.rda``, ``.RData``, ``.rds``) with the optional ``rdata`` package."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["read_r"]


def _factor_with_names(obj: np.ndarray, attrs: dict[str, Any]) -> pd.Series | pd.Categorical:
    """Convert an R factor, keeping its ``names`` (rdata's default drops them)."""
    import rdata

    cat = rdata.conversion.factor_constructor(obj, attrs)
    names = attrs.get("names")
    if names is None:
        return cat
    return pd.Series(cat, index=pd.Index([str(n) for n in names], dtype=object))


def read_r(path: Path) -> dict[str, Any]:
    """Read an R data file into Python objects.

    Factors with names come back as categorical :class:`pandas.Series` indexed by the
    names; ``dgCMatrix`` objects as namespaces with ``i``, ``p``, ``x``, ``Dim``,
    ``Dimnames``.
    """
    try:
        import rdata
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Reading this dataset needs the optional package 'rdata': "
            "pip install 'chronotope[data]' (or pip install rdata)."
        ) from err
    constructors = {**rdata.conversion.DEFAULT_CLASS_MAP, "factor": _factor_with_names}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Missing constructor for R class")
        return rdata.conversion.convert(rdata.parser.parse_file(path), constructors)
