"""In-process vs a local Dask cluster: the diffusion correction of a real slice, same output.

Run::

    OMP_NUM_THREADS=1 python benchmarks/scheduler_equivalence.py --genes 2000 --workers 2

The held-in DLPFC slice 151673 (its 3,639 in-tissue spots on the Visium hexagonal array,
real counts of the ``--genes`` genes of highest total) is corrected by ``tl.undiffuse`` with
given parameters (``--sigma``, ``--bleed``, ``--background``; every spot is tissue, since
the data set holds no out-of-tissue counts to estimate them from) and ``--method``
(``pergene``: every gene batch is a task; ``lowrank``: the joint fit stays in-process and
the per-gene refinement batches are the tasks). ``--memory-gb`` sets the gene-batch size, the
same for both runs. The workers import chronotope during the cluster start. Each
scheduler runs in a fresh child process; the line gives the wall
time of the ``tl.undiffuse`` call (the cluster start is printed apart), the peak resident
memory of the calling process (it holds the scheduler and the nannies of a local cluster)
plus that of the workers (sum of each worker's own peak, ``VmHWM``), and the largest
relative difference between the two outputs (``max |a - b| / max |a|`` over the layer).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, peak_rss_bytes, run_child


def _warm() -> None:  # runs in each worker: the imports a first task would pay for
    import chronotope.undiffuse.model  # noqa: F401


def _worker_peak() -> int:  # runs in each worker process
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _load(genes: int):
    import scipy.sparse as sp

    import chronotope as ct

    ad = ct.datasets.dlpfc("151673", load_image=False)
    x = sp.csr_matrix(ad.X)
    top = np.sort(np.argsort(-np.asarray(x.sum(axis=0)).ravel())[:genes])
    ad = ad[:, top].copy()
    ad.X = sp.csr_matrix(ad.X, dtype=np.float32)
    return ad


def child(spec: dict) -> None:
    import torch

    import chronotope as ct
    from chronotope.parallel import describe_scheduler, scheduler_client

    torch.set_num_threads(1)
    logging.getLogger("chronotope").setLevel(logging.WARNING)
    ad = _load(spec["genes"])
    kw = {
        "tissue_key": None,
        "sigma": spec["sigma"],
        "bleed": spec["bleed"],
        "background": spec["background"],
        "method": spec["method"],
        "n_iter": spec["n_iter"],
        "memory_gb": spec["memory_gb"],
        "diagnostics": False,
        "device": spec["device"],
    }
    sched = None if spec["scheduler"] == "none" else spec["scheduler"]
    t0 = time.perf_counter()
    with scheduler_client(sched) as client:
        if client is not None:
            client.run(_warm)
        t_start = time.perf_counter() - t0
        t1 = time.perf_counter()
        ct.tl.undiffuse(ad, scheduler=client, **kw)
        wall = time.perf_counter() - t1
        workers = 0
        if client is not None:  # (the nannies of a LocalCluster live in this process)
            workers = sum(client.run(_worker_peak).values())
    u = ad.uns["undiffused"]
    np.save(spec["out"], ad.layers["undiffused"].toarray())
    driver = peak_rss_bytes()
    emit(
        {
            "scheduler": describe_scheduler(sched),
            "wall_s": wall,
            "cluster_start_s": t_start if client is not None else 0.0,
            "driver_peak_gb": driver / 2**30,
            "workers_peak_gb": workers / 2**30,
            "total_peak_gb": (driver + workers) / 2**30,
            "n_spots": int(ad.n_obs),
            "n_genes": int(ad.n_vars),
            "n_batches": int(u.get("n_batches", 0)),
            "refined": bool(u.get("refined", False)),
        }
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=2, help="N of the local:N cluster")
    ap.add_argument("--scheduler", default=None, help="instead of local:N (an address)")
    ap.add_argument("--method", choices=["pergene", "lowrank"], default="pergene")
    ap.add_argument("--n-iter", default="30", help="EM iterations or 'auto'")
    ap.add_argument("--memory-gb", type=float, default=0.25, help="gene-batch memory budget")
    ap.add_argument("--sigma", type=float, default=1.5)
    ap.add_argument("--bleed", type=float, default=0.3)
    ap.add_argument("--background", type=float, default=0.1)
    ap.add_argument("--device", default="cpu", help="torch device (default cpu)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    n_iter = args.n_iter if args.n_iter == "auto" else int(args.n_iter)
    other = args.scheduler or f"local:{args.workers}"
    print(
        f"device {args.device}; schedulers none vs {other}; DLPFC 151673, {args.genes} genes, "
        f"method {args.method}, n_iter {n_iter}, memory_gb {args.memory_gb} "
        "(shared, loaded 2-core machine)",
        flush=True,
    )
    outs = {}
    script = Path(__file__).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        for sched in ("none", other):
            spec = {
                "genes": args.genes,
                "method": args.method,
                "n_iter": n_iter,
                "memory_gb": args.memory_gb,
                "sigma": args.sigma,
                "bleed": args.bleed,
                "background": args.background,
                "device": args.device,
                "scheduler": sched,
                "out": str(Path(tmp) / f"{len(outs)}.npy"),
            }
            r = run_child(script, spec, timeout=3600)
            if "error" in r:
                print(f"scheduler {sched}: failed: {r['error']}", flush=True)
                return
            outs[sched] = np.load(spec["out"])
            print(
                f"undiffuse scheduler {r['scheduler']:<10} {r['n_spots']} spots x "
                f"{r['n_genes']} genes, {r['n_batches'] or 'refine'} batches: time_s "
                f"{r['wall_s']:.1f} (cluster start {r['cluster_start_s']:.1f}), peak_rss_gb "
                f"total {r['total_peak_gb']:.2f} (caller {r['driver_peak_gb']:.2f}, workers "
                f"{r['workers_peak_gb']:.2f})",
                flush=True,
            )
    a, b = outs["none"], outs[other]
    rel = float(np.abs(a - b).max() / max(float(np.abs(a).max()), 1e-300))
    print(f"max relative difference none vs {other}: {rel:.3g} (max |a - b| / max |a|)")


if __name__ == "__main__":
    main()
