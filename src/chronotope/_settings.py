"""Shared helpers for devices, dtypes and random generators."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["as_tensor", "resolve_device", "resolve_rng"]


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """Return a :class:`torch.device`.

    Parameters
    ----------
    device
        ``None`` or ``"auto"`` picks CUDA when available, else CPU. Any string
        accepted by :class:`torch.device` is passed through.
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def as_tensor(
    x: object,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Convert array-likes (numpy, lists, tensors) to a tensor without needless copies."""
    if isinstance(x, torch.Tensor):
        return x.to(device=device if device is not None else x.device, dtype=dtype or x.dtype)
    arr = np.asarray(x)
    t = torch.from_numpy(np.ascontiguousarray(arr))
    if dtype is None and t.dtype == torch.float64:
        dtype = torch.float64
    return t.to(device=device, dtype=dtype)


def resolve_rng(seed: int | np.random.Generator | None) -> np.random.Generator:
    """Return a numpy generator from a seed, an existing generator or ``None``."""
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(seed)
