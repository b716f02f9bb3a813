"""Data directory resolution and the registry of dataset loaders."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anndata import AnnData

from chronotope._errors import ChronotopeInputError
from chronotope._validate import MissingFileError

__all__ = ["available", "get_data_dir", "load"]

ENV_VAR = "CHRONOTOPE_DATA"


def _candidate_dirs() -> list[Path]:
    """``../shared/data`` next to the repository (from the package location) and the cwd."""
    here = Path(__file__).resolve()
    cands: list[Path] = []
    # src/chronotope/datasets/_registry.py -> parents: datasets, chronotope, src, <repo root>
    for anc in here.parents[1:5]:
        cands.append(anc.parent / "shared" / "data")
    cwd = Path.cwd()
    cands += [cwd.parent / "shared" / "data", cwd / "shared" / "data"]
    seen: set[Path] = set()
    out = []
    for c in cands:
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out


def get_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the folder that holds the public datasets.

    Parameters
    ----------
    data_dir
        Explicit folder. If ``None``: the environment variable ``CHRONOTOPE_DATA`` if set,
        else ``<repository root>/../shared/data`` (found from the installed package
        location), else ``../shared/data`` relative to the current working directory.

    Returns
    -------
    pathlib.Path
        An existing folder.

    Raises
    ------
    MissingFileError
        The folder does not exist, or none was found.
    """
    if data_dir is not None:
        p = Path(data_dir).expanduser()
        if not p.is_dir():
            raise MissingFileError(f"Data folder not found: {str(p)!r}.")
        return p
    env = os.environ.get(ENV_VAR)
    if env:
        p = Path(env).expanduser()
        if not p.is_dir():
            raise MissingFileError(
                f"{ENV_VAR}={env!r} does not point to an existing folder. Set it to the folder "
                "that holds the dataset sub-folders (dlpfc_151673_151674/, ...)."
            )
        return p
    for cand in _candidate_dirs():
        if cand.is_dir():
            return cand
    raise MissingFileError(
        "No data folder found. Set the environment variable "
        f"{ENV_VAR} to the folder that holds the datasets (dlpfc_151673_151674/, "
        "paste_breast_slices/, ...), or pass data_dir=... . Without data, "
        "chronotope.datasets.demo(...) loads the small embedded demo sets."
    )


def dataset_path(folder: str, *parts: str, data_dir: str | os.PathLike[str] | None) -> Path:
    """Path of a file or folder of one dataset; raise naming it if it does not exist."""
    root = get_data_dir(data_dir)
    base = root / folder
    if not base.is_dir():
        raise MissingFileError(
            f"Dataset folder {folder!r} not found in the data folder {str(root)!r}."
        )
    p = base.joinpath(*parts)
    if not p.exists():
        raise MissingFileError(f"Dataset file not found: {str(p)!r}.")
    return p


@dataclass(frozen=True)
class _Entry:
    loader: Callable[..., AnnData]
    description: str


_REGISTRY: dict[str, _Entry] = {}


def register(name: str, description: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a loader under ``name`` with a one-line description."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        _REGISTRY[name] = _Entry(fn, description)
        return fn

    return deco


def available() -> dict[str, str]:
    """Names of the dataset loaders with one-line descriptions.

    Returns
    -------
    dict
        ``{name: description}``; pass a name to :func:`load`.
    """
    return {k: v.description for k, v in _REGISTRY.items()}


def load(name: str, /, **kwargs: Any) -> AnnData:
    """Load a dataset by name.

    Parameters
    ----------
    name
        One of :func:`available` (e.g. ``"dlpfc"``, ``"emt"``).
    **kwargs
        Passed to the loader (e.g. ``sample="151674"``, ``data_dir=...``).

    Returns
    -------
    AnnData
        What the loader returns.
    """
    if name not in _REGISTRY:
        raise ChronotopeInputError(
            f"Unknown dataset {name!r}. Available: {', '.join(sorted(_REGISTRY))}."
        )
    return _REGISTRY[name].loader(**kwargs)
