"""Data-parallel training over ``torch.distributed`` processes (``torchrun``).

When a process group with more than one process is initialised (``torchrun
--nproc-per-node N ...``, see :mod:`chronotope.distributed_train`), the trainers of
:class:`chronotope.domains.DomainModel` and :class:`chronotope.dynamics.DynamicsModel`
shard every global mini-batch: all processes draw the same global batch from the same
seeded generator, each one takes its own disjoint, contiguous share of it, computes the
loss of its share weighted by the share's fraction of the batch, and the gradients are
summed over the processes (one flat all-reduce per step, the arithmetic of
:class:`torch.nn.parallel.DistributedDataParallel`) before the identical optimiser step.
The two-process run therefore follows the one-process loss curve up to float rounding.

Nothing here imports ``torch.distributed`` unless the caller already did: a process
without a process group pays nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

import numpy as np
import torch

__all__ = ["all_reduce_grads", "all_reduce_sum", "broadcast_module", "is_main", "shard", "world"]


def _dist():  # the torch.distributed module, or None
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    return dist


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised process group; ``(0, 1)`` without one."""
    dist = _dist()
    if dist is None:
        return 0, 1
    return int(dist.get_rank()), int(dist.get_world_size())


def is_main() -> bool:
    """Whether this process writes files and logs (rank 0, or no process group)."""
    return world()[0] == 0


def shard(items: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """The ``rank``-th of ``world_size`` contiguous, disjoint, near-equal parts of ``items``."""
    return np.array_split(np.asarray(items), world_size)[rank]


def broadcast_module(module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every process (as DDP does at wrap time)."""
    dist = _dist()
    if dist is None:
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0)


def all_reduce_grads(params: Iterable[torch.Tensor]) -> None:
    """Sum the gradients of ``params`` over the processes, in one flat buffer.

    A parameter without a gradient on this process (its share was empty) contributes
    zeros; afterwards every process holds the same summed gradient.
    """
    dist = _dist()
    params = list(params)
    if dist is None or not params:
        return
    flat = torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
    )
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p in params:
        n = p.numel()
        part = flat[offset : offset + n].view_as(p)
        if p.grad is None:
            p.grad = part.clone()
        else:
            p.grad.copy_(part)
        offset += n


def all_reduce_sum(values: np.ndarray, device: torch.device | str = "cpu") -> np.ndarray:
    """Sum a small float array over the processes (loss records)."""
    dist = _dist()
    values = np.asarray(values, dtype=np.float64)
    if dist is None:
        return values
    t = torch.as_tensor(values, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().numpy()
