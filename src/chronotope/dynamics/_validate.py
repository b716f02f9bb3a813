"""Input checks for time-series snapshots (arrays in): run before any heavy work."""

from __future__ import annotations

import numpy as np

from chronotope._errors import ChronotopeInputError

__all__ = ["check_snapshots"]

#: Fewest cells a time point may have by default.
MIN_CELLS = 10


def check_snapshots(
    x: np.ndarray,
    time: np.ndarray,
    *,
    min_cells: int = MIN_CELLS,
    name: str = "x",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate snapshot data and return ``(x, time, times)``.

    Parameters
    ----------
    x
        ``(n, d)`` cells in the representation.
    time
        ``(n,)`` numeric time of each cell.
    min_cells
        Fewest cells a time point may have.
    name
        How to call ``x`` in messages (e.g. ``"adata.obsm['X_pca']"``).

    Returns
    -------
    x
        ``float64`` copy-free view of the cells, ``(n, d)``.
    time
        ``float64`` times, ``(n,)``.
    times
        The sorted distinct time points, ``(T,)`` with ``T >= 2``.

    Raises
    ------
    ChronotopeInputError
        Non-numeric or non-finite times, fewer than two time points, a time point with
        fewer than ``min_cells`` cells, NaN or infinite coordinates, bad shapes.
    """
    arr = np.asarray(x)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ChronotopeInputError(
            f"{name} must be a non-empty 2-D array (cells x dimensions), got shape "
            f"{tuple(arr.shape)}."
        )
    if arr.dtype.kind not in "biuf":
        raise ChronotopeInputError(f"{name} must be numeric, got dtype {arr.dtype}.")
    arr = arr.astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr).all(1)).sum())
        raise ChronotopeInputError(
            f"{name} has NaN or infinite values in {bad} cell(s); remove or impute them first."
        )
    t = np.asarray(time)
    if t.ndim != 1 or t.shape[0] != arr.shape[0]:
        raise ChronotopeInputError(
            f"time must be 1-D with one value per cell ({arr.shape[0]}), got shape "
            f"{tuple(t.shape)}."
        )
    if t.dtype.kind not in "biuf":
        try:
            t = t.astype(np.float64)
        except (TypeError, ValueError):
            shown = ", ".join(map(repr, list(dict.fromkeys(t.tolist()))[:5]))
            raise ChronotopeInputError(
                f"time values must be numeric (got {shown}); map labels such as 'day2' or "
                "'8h' to numbers (e.g. days) first."
            ) from None
    t = t.astype(np.float64, copy=False)
    if not np.isfinite(t).all():
        raise ChronotopeInputError(
            f"time has {int((~np.isfinite(t)).sum())} NaN or infinite value(s)."
        )
    times, counts = np.unique(t, return_counts=True)
    if times.size < 2:
        raise ChronotopeInputError(
            f"dynamics need at least two time points, got {times.size} "
            f"({', '.join(f'{v:g}' for v in times)})."
        )
    small = counts < min_cells
    if small.any():
        shown = ", ".join(f"t={v:g}: {c}" for v, c in zip(times[small], counts[small], strict=True))
        raise ChronotopeInputError(
            f"time point(s) with fewer than {min_cells} cells ({shown}); drop them or merge "
            "them with a neighbouring time point."
        )
    return arr, t, times
