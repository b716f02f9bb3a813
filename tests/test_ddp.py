"""Data-parallel training (torch.distributed, gloo, 2 CPU processes) equals one process."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import queue
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData

from chronotope import _ddp
from chronotope.distributed_train import train_domains, train_dynamics

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _layered(path: Path, side: int = 18, n_genes: int = 60) -> Path:
    """Counts on a square grid with three horizontal layers of distinct profiles."""
    rng = np.random.default_rng(0)
    r, c = np.divmod(np.arange(side * side), side)
    layer = np.minimum(3 * r // side, 2)
    base = rng.gamma(2.0, 1.0, (3, n_genes))
    x = rng.poisson(base[layer] * 2.0).astype(np.float32)
    ad = AnnData(sp.csr_matrix(x), obs=pd.DataFrame(index=[f"s{i}" for i in range(side**2)]))
    ad.var_names = [f"g{i}" for i in range(n_genes)]
    ad.obsm["spatial"] = np.c_[c, r].astype(float)
    ad.write_h5ad(path)
    return path


def _snapshots(path: Path, n: int = 120, dim: int = 4) -> Path:
    rng = np.random.default_rng(1)
    t = np.repeat([0.0, 1.0, 2.0], n)
    x = rng.normal(size=(3 * n, dim)) + t[:, None] * np.r_[1.0, 0.5, np.zeros(dim - 2)]
    ad = AnnData(x.astype(np.float32), obs=pd.DataFrame({"time": t}, index=map(str, range(3 * n))))
    ad.write_h5ad(path)
    return path


def _rank(rank: int, world: int, port: int, what: str, args: tuple, kwargs: dict, q) -> None:
    import torch

    # torchrun's default for several processes on one machine: one OpenMP thread each
    # (N processes x all cores each oversubscribes the CPU and can stall a rank for minutes)
    torch.set_num_threads(1)
    os.environ.update(
        OMP_NUM_THREADS="1",
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        {"domains": train_domains, "dynamics": train_dynamics}[what](*args, **kwargs)
        q.put((rank, ""))
    except BaseException:  # reported to the parent
        q.put((rank, traceback.format_exc()))


def _two_processes(what: str, *args: object, **kwargs: object) -> None:
    """Run a trainer as 2 gloo ranks (torchrun's environment contract: RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT), started with "spawn": forking a process whose
    OpenMP / gloo state earlier tests initialised can deadlock the ranks."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, 2, port, what, args, kwargs, q)) for r in range(2)]
    for p in procs:
        p.start()
    reports: dict[int, str] = {}
    deadline = time.monotonic() + 300
    try:
        # a rank that fails leaves the other one blocked in a collective: stop at the first
        # error or dead process and show it, rather than time out on the second report
        while len(reports) < len(procs) and time.monotonic() < deadline:
            try:
                rank, err = q.get(timeout=1.0)
                reports[rank] = err
            except queue.Empty:
                pass
            if any(reports.values()):
                break
            dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if dead and not q.qsize():
                reports.update({r: f"rank {r} died (exit {procs[r].exitcode})" for r in dead})
                break
        for p in procs:
            p.join(timeout=30)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
    assert all(not err for err in reports.values()), reports
    assert len(reports) == len(procs), f"ranks timed out; reports so far: {reports}"
    assert all(p.exitcode == 0 for p in procs)


def test_world_without_group() -> None:
    assert _ddp.world() == (0, 1)
    assert _ddp.is_main()
    parts = [_ddp.shard(np.arange(7), r, 2) for r in range(2)]
    np.testing.assert_array_equal(np.concatenate(parts), np.arange(7))


@pytest.mark.parametrize("batch_size", [8192, 100])
def test_domains_two_processes_equal_one(tmp_path: Path, batch_size: int) -> None:
    data = _layered(tmp_path / "tissue.h5ad")
    opts = {"n_top_genes": 40, "n_comps": 8, "max_epochs": 6, "batch_size": batch_size}
    one = train_domains(data, tmp_path / "one", **opts)
    _two_processes("domains", data, tmp_path / "two", **opts)
    two = json.loads((tmp_path / "two" / "history.json").read_text())
    assert two["processes"] == 2 and one["processes"] == 1
    a, b = np.asarray(one["loss"]), np.asarray(two["loss"])
    assert a.shape == b.shape == (6,)
    assert a[-1] < a[0]  # it trains
    np.testing.assert_allclose(b, a, rtol=2e-4, atol=1e-5)
    assert (tmp_path / "two" / "model" / "weights.pt").is_file()


def test_dynamics_two_processes_equal_one(tmp_path: Path) -> None:
    data = _snapshots(tmp_path / "cells.h5ad")
    opts = {"use_rep": "X", "n_steps": 25, "hidden": 32, "batch_size": 96}
    one = train_dynamics(data, tmp_path / "one", **opts)
    _two_processes("dynamics", data, tmp_path / "two", **opts)
    two = json.loads((tmp_path / "two" / "history.json").read_text())
    a, b = np.asarray(one["loss"]), np.asarray(two["loss"])
    assert a.shape == b.shape == (25,)
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_torchrun_launch(tmp_path: Path) -> None:
    """The documented command: ``torchrun --nproc-per-node 2 -m chronotope.distributed_train``."""
    data = _layered(tmp_path / "tissue.h5ad")
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-port", str(_free_port()), "-m", "chronotope.distributed_train", "domains",
        str(data), "-o", str(tmp_path / "two"), "--n-top-genes=40", "--n-comps=8",
        "--max-epochs=3",
    ]  # fmt: skip
    subprocess.run(cmd, env=env, check=True, timeout=180, capture_output=True)
    two = json.loads((tmp_path / "two" / "history.json").read_text())
    one = train_domains(data, tmp_path / "one", n_top_genes=40, n_comps=8, max_epochs=3)
    assert two["processes"] == 2
    np.testing.assert_allclose(two["loss"], one["loss"], rtol=2e-4, atol=1e-5)
