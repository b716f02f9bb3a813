"""Shared benchmark plumbing: isolated child processes, peak-memory sampling, data paths.

Every measured case runs in a fresh Python process so that its peak resident
memory is its own. Inside the child, :class:`PeakRSS` samples the resident set
size every 5 ms in a background thread while the measured block runs; the
figure reported is the peak increase over the size just before the block
(inputs already loaded), plus the absolute peak.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    """The data folder: ``CHRONOTOPE_DATA`` or ``<repo>/../shared/data``."""
    env = os.environ.get("CHRONOTOPE_DATA")
    path = Path(env) if env else REPO.parent / "shared" / "data"
    if not path.is_dir():
        sys.exit(f"data folder not found: {path} (set CHRONOTOPE_DATA)")
    return path


DEVICE_ENV = "CHRONOTOPE_BENCH_DEVICE"


def add_device_argument(parser: Any) -> None:
    """``--device`` (default ``cpu``): the torch device of the chronotope runs."""
    parser.add_argument(
        "--device", default="cpu", help="torch device of the chronotope runs (default cpu)"
    )


def use_device(device: str) -> str:
    """Check ``device``, hand it to child processes, and return the line that names it.

    Every benchmark prints this line first; children read the device with
    :func:`bench_device` (an environment variable, inherited by :func:`run_child`).
    """
    import platform

    import torch

    from chronotope._settings import resolve_device

    dev = resolve_device(device)
    os.environ[DEVICE_ENV] = str(dev)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
    else:
        name = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s)"
    return f"device {dev} ({name}); torch {torch.__version__}"


def bench_device() -> str:
    """The device chosen with ``--device`` (``cpu`` when none was)."""
    return os.environ.get(DEVICE_ENV, "cpu")


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """High-water mark of this process's resident set (``VmHWM``).

    Not ``getrusage(RUSAGE_SELF).ru_maxrss``: on Linux that survives ``exec``, so a
    child started from a large parent reports the parent's peak.
    """
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")


class PeakRSS:
    """Context manager sampling the resident set size in a thread.

    Attributes after exit: ``baseline`` (bytes before), ``peak`` (max bytes
    seen), ``delta`` (peak - baseline), ``wall`` and ``cpu`` seconds.
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self._stop = threading.Event()

    def __enter__(self) -> PeakRSS:
        import gc

        gc.collect()
        self.baseline = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._t0, self._c0 = time.perf_counter(), time.process_time()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._t0
        self.cpu = time.process_time() - self._c0
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        self.delta = self.peak - self.baseline

    def as_dict(self) -> dict[str, float]:
        return {
            "wall_s": self.wall,
            "cpu_s": self.cpu,
            "peak_rss_gb": self.peak / 2**30,
            "delta_rss_gb": self.delta / 2**30,
        }


def run_child(
    script: Path, spec: dict[str, Any], timeout: float = 3600, python: str | None = None
) -> dict[str, Any]:
    """Run ``script --child JSON`` in a fresh interpreter (``python``, default this one) and
    return its RESULT dict."""
    cmd = [python or sys.executable, str(script), "--child", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": " | ".join(tail) or f"exit code {proc.returncode}"}


def emit(result: dict[str, Any]) -> None:
    """Print a child's result for :func:`run_child`."""
    print("RESULT " + json.dumps(result), flush=True)


def fmt_gb(x: float) -> str:
    return f"{x:.2f} GB"
