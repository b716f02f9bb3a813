"""Shared helpers for devices, dtypes and random generators."""

from __future__ import annotations

import numpy as np
import torch

from chronotope._errors import ChronotopeInputError

__all__ = ["as_tensor", "resolve_device", "resolve_rng"]


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """Return a :class:`torch.device`, with a clear error for one that cannot be used.

    Parameters
    ----------
    device
        ``None`` or ``"auto"`` picks CUDA when available, else CPU. Any string
        accepted by :class:`torch.device` is passed through.

    Raises
    ------
    ChronotopeInputError
        (a ``ValueError``) for a string that names no torch device, or a CUDA device
        when CUDA is not available or the index is beyond the visible GPUs.
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, torch.device):
        dev = device
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError, ValueError):
            raise ChronotopeInputError(
                f"device {device!r} is not a torch device: use 'cpu', 'cuda', 'cuda:N' or 'auto'"
            ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ChronotopeInputError(
                f"device {str(dev)!r} was asked for but CUDA is not available here "
                "(torch.cuda.is_available() is False); use device='cpu'"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ChronotopeInputError(
                f"device {str(dev)!r}: only {torch.cuda.device_count()} CUDA device(s) visible"
            )
    return dev


def as_tensor(
    x: object,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Convert array-likes (numpy, lists, tensors) to a tensor without needless copies."""
    if device is not None:
        device = resolve_device(device)
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
