"""One scheduler option for the work that splits cleanly: in-process, a local cluster or Dask.

Every heavy function that splits into independent tasks (gene batches of the diffusion
correction, pairs of a multi-slice alignment, per-interval couplings of the dynamics model,
tiles of domain-embedding inference) takes ``scheduler=`` and hands its tasks to
:func:`parallel_map`:

- ``None`` (default): run in this process, in order, with a progress bar;
- ``"local:N"``: start a :class:`distributed.LocalCluster` of ``N`` worker processes (one
  thread each) for the duration of the call and close it afterwards;
- ``"tcp://host:port"`` (any address :class:`distributed.Client` accepts) or a
  ``"scheduler.json"`` file path: use a running Dask scheduler, multi-node;
- a :class:`distributed.Client`: use it as it is (it is not closed).

Tasks are plain module-level functions of ``(item, **shared)``; ``shared`` objects (a sparse
kernel, a count matrix) are sent to the workers once. Results come back in the order of the
items, so the output of a call does not depend on the scheduler.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

from tqdm.auto import tqdm

__all__ = [
    "Scheduler",
    "check_scheduler",
    "describe_scheduler",
    "parallel_map",
    "scheduler_client",
]

log = logging.getLogger("chronotope")

T = TypeVar("T")
R = TypeVar("R")

Scheduler = Any
"""``None``, ``"local:N"``, a scheduler address or scheduler-file path, or a ``Client``."""


def _is_client(obj: object) -> bool:
    return type(obj).__name__ == "Client" and hasattr(obj, "submit")


def _check(scheduler: Scheduler) -> None:
    if scheduler is None or _is_client(scheduler):
        return
    if not isinstance(scheduler, str) or not scheduler.strip():
        raise ValueError(
            "scheduler must be None, 'local:N', a Dask scheduler address "
            f"('tcp://host:8786'), a scheduler-file path or a distributed.Client; got {scheduler!r}"
        )
    if scheduler.startswith("local"):
        _local_workers(scheduler)


def _local_workers(spec: str) -> int:
    head, _, n = spec.partition(":")
    if head != "local":
        raise ValueError(f"scheduler {spec!r}: expected 'local:N'")
    if not n:
        return max(1, os.cpu_count() or 1)
    try:
        workers = int(n)
    except ValueError:
        raise ValueError(f"scheduler {spec!r}: N in 'local:N' must be an integer") from None
    if workers < 1:
        raise ValueError(f"scheduler {spec!r}: N in 'local:N' must be >= 1")
    return workers


def check_scheduler(scheduler: Scheduler) -> None:
    """Raise a ``ValueError`` for a malformed ``scheduler`` (call it before heavy work)."""
    _check(scheduler)


def describe_scheduler(scheduler: Scheduler) -> str:
    """A short human-readable name of the scheduler (for logs, ``uns`` and benchmark lines)."""
    if scheduler is None:
        return "in-process"
    if _is_client(scheduler):
        address = getattr(getattr(scheduler, "scheduler", None), "address", "?")
        return f"dask client {address}"
    return str(scheduler)


def _import_distributed():
    try:
        import distributed
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "scheduler= other than None needs dask.distributed: "
            "pip install 'chronotope[distributed]'"
        ) from err
    return distributed


def _init_worker() -> None:  # pragma: no cover - runs inside the workers
    import torch

    threads = int(os.environ.get("CHRONOTOPE_WORKER_THREADS", "1"))
    torch.set_num_threads(threads)


@contextlib.contextmanager
def scheduler_client(scheduler: Scheduler, *, memory_limit: str | None = "auto") -> Iterator[Any]:
    """Yield a Dask client for ``scheduler`` (``None`` for in-process) and clean up after.

    Parameters
    ----------
    scheduler
        See the module docstring.
    memory_limit
        Per-worker memory limit of a ``"local:N"`` cluster (Dask's own syntax).
    """
    _check(scheduler)
    if scheduler is None:
        yield None
        return
    if _is_client(scheduler):
        yield scheduler
        return
    distributed = _import_distributed()
    if scheduler.startswith("local"):
        n = _local_workers(scheduler)
        cluster = distributed.LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            memory_limit=memory_limit,
            dashboard_address=None,
            silence_logs=logging.WARNING,
        )
        client = distributed.Client(cluster)
        try:
            client.run(_init_worker)
            yield client
        finally:
            client.close()
            cluster.close()
        return
    if os.path.exists(scheduler):
        client = distributed.Client(scheduler_file=scheduler)
    else:
        client = distributed.Client(scheduler)
    try:
        yield client
    finally:
        client.close()


def parallel_map(
    func: Callable[..., R],
    items: Iterable[T],
    *,
    scheduler: Scheduler = None,
    shared: dict[str, Any] | None = None,
    progress: bool = True,
    desc: str | None = None,
    max_in_flight: int | None = None,
) -> list[R]:
    """Apply ``func(item, **shared)`` to every item; results in the order of ``items``.

    Parameters
    ----------
    func
        A picklable (module-level) function.
    items
        The tasks' inputs (small: indices, slices, pairs of ids).
    scheduler
        ``None`` (in-process), ``"local:N"``, a Dask scheduler address or a ``Client``.
    shared
        Keyword arguments passed to every call. With a Dask scheduler each value is scattered
        to the workers once (broadcast), not sent with every task.
    progress
        Show a progress bar over tasks.
    desc
        Progress-bar label.
    max_in_flight
        With Dask, at most this many tasks submitted at a time (bounds the memory held by
        results not yet collected); default ``4 x`` the number of workers.

    Returns
    -------
    list
        ``[func(item, **shared) for item in items]``.
    """
    shared = dict(shared or {})
    seq: Sequence[T] = list(items)
    _check(scheduler)
    if scheduler is None:
        it = tqdm(seq, desc=desc, disable=not progress or len(seq) < 2, leave=False)
        return [func(item, **shared) for item in it]
    with scheduler_client(scheduler) as client:
        distributed = _import_distributed()
        log.info("parallel_map: %d tasks on %s", len(seq), describe_scheduler(scheduler))
        futures_shared = {
            k: client.scatter(v, broadcast=True, hash=False) for k, v in shared.items()
        }
        n_workers = max(1, len(client.scheduler_info().get("workers", {})))
        limit = max_in_flight or 4 * n_workers
        results: list[Any] = [None] * len(seq)
        pending: dict[Any, int] = {}
        bar = tqdm(total=len(seq), desc=desc, disable=not progress or len(seq) < 2, leave=False)
        nxt = 0
        try:
            while nxt < len(seq) or pending:
                while nxt < len(seq) and len(pending) < limit:
                    fut = client.submit(func, seq[nxt], pure=False, **futures_shared)
                    pending[fut] = nxt
                    nxt += 1
                done = distributed.wait(list(pending), return_when="FIRST_COMPLETED").done
                for fut in done:
                    results[pending.pop(fut)] = fut.result()
                    bar.update(1)
        finally:
            bar.close()
            for fut in pending:
                fut.cancel()
        return results
