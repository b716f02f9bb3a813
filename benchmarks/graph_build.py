"""Benchmark the spatial graph builders on one million spots.

Datasets
--------
hex
    A synthetic Visium-like hexagonal lattice (spacing 100) with 5 % of the spots
    missing and Gaussian position jitter of 3 % of the spacing.
dlpfc
    The in-tissue spots of DLPFC slice 151673 (pixel coordinates), tiled side by side
    until there are ``n`` spots. Also run with one library per tile (block-diagonal).

Each (dataset, builder) runs in a fresh ``spawn`` subprocess, so the peak RSS printed
is that of the process that built the graph (interpreter + input coordinates +
builder); the RSS before the build is shown in brackets.

Usage::

    python benchmarks/graph_build.py            # n = 1,000,000
    python benchmarks/graph_build.py --n 100000
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("CHRONOTOPE_DATA", REPO.parent / "shared" / "data"))
POSITIONS = DATA_DIR / "dlpfc_151673_151674" / "humanpilot_10x" / "151673"
POSITIONS = POSITIONS / "tissue_positions_list.txt"


def _rss_gb() -> float:
    """Peak resident set size of this process so far, in GB (ru_maxrss is KiB on Linux)."""
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e9


def hex_coords(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n / 0.95)))
    r, c = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    x = (c + (r % 2) / 2) * 100.0
    y = r * 100.0 * np.sqrt(3) / 2
    xy = np.column_stack([x.ravel(), y.ravel()])
    keep = np.sort(rng.choice(len(xy), size=n, replace=False))
    return xy[keep] + rng.normal(scale=3.0, size=(n, 2))


def dlpfc_coords(n: int) -> tuple[np.ndarray, np.ndarray]:
    """DLPFC 151673 spot positions tiled to ``n`` spots, and the tile of each spot."""
    import pandas as pd

    df = pd.read_csv(POSITIONS, header=None)
    df = df[df[1] == 1]
    xy = df[[5, 4]].to_numpy(dtype=float)  # pxl_col, pxl_row
    xy -= xy.min(axis=0)
    extent = xy.max(axis=0) + 500.0  # gap between tiles, several spot spacings
    n_tiles = int(np.ceil(n / len(xy)))
    per_row = int(np.ceil(np.sqrt(n_tiles)))
    tiles = np.arange(n_tiles)
    offsets = np.column_stack([tiles % per_row, tiles // per_row]) * extent
    out = (xy[None, :, :] + offsets[:, None, :]).reshape(-1, 2)[:n]
    tile = np.repeat(tiles, len(xy))[:n]
    return out, tile


def _run_one(dataset: str, builder: str, n: int, queue: mp.Queue) -> None:
    from chronotope.graph import grid_graph, knn_graph, radius_graph

    library = None
    if dataset == "hex":
        xy = hex_coords(n)
        radius = 110.0  # just above the spacing: the 6 lattice neighbours
    else:
        xy, tile = dlpfc_coords(n)
        radius = 150.0  # DLPFC spacing is ~137 px
        if dataset == "dlpfc-lib":
            library = tile
    rss_before = _rss_gb()
    start = time.perf_counter()
    if builder == "knn":
        conn, _ = knn_graph(xy, 6, library=library)
    elif builder == "radius":
        conn, _ = radius_graph(xy, radius, library=library)
    elif builder == "grid":
        conn, _ = grid_graph(xy, 1, library=library)
    else:  # grid2
        conn, _ = grid_graph(xy, 2, library=library)
    elapsed = time.perf_counter() - start
    mean_degree = conn.nnz / conn.shape[0]
    queue.put((elapsed, _rss_gb(), rss_before, mean_degree))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="number of spots")
    parser.add_argument(
        "--device",
        default="cpu",
        help="accepted for uniformity; graph building is scipy/numpy code on the CPU",
    )
    args = parser.parse_args()
    print(f"device cpu (graph building runs on the CPU; --device {args.device} not used)")
    cases = [
        ("hex", "knn", "k=6"),
        ("hex", "radius", "r=110"),
        ("hex", "grid", "n_rings=1"),
        ("hex", "grid2", "n_rings=2"),
    ]
    if POSITIONS.is_file():
        cases += [
            ("dlpfc", "knn", "k=6"),
            ("dlpfc", "radius", "r=150"),
            ("dlpfc", "grid", "n_rings=1"),
            ("dlpfc", "grid2", "n_rings=2"),
            ("dlpfc-lib", "knn", "k=6"),
            ("dlpfc-lib", "grid", "n_rings=1"),
        ]
    else:
        print(f"DLPFC positions not found at {POSITIONS}; skipping the DLPFC cases.")
    print(f"{os.cpu_count()} CPU(s), numpy {np.__version__}")
    ctx = mp.get_context("spawn")
    for dataset, builder, label in cases:
        queue = ctx.Queue()
        proc = ctx.Process(target=_run_one, args=(dataset, builder, args.n, queue))
        proc.start()
        elapsed, rss, rss_before, degree = queue.get()
        proc.join()
        name = "grid" if builder.startswith("grid") else builder
        print(
            f"graph {name} {label} n={args.n:,} [{dataset}]: {elapsed:.1f} s, "
            f"peak RSS {rss:.2f} GB (before build {rss_before:.2f} GB), "
            f"mean degree {degree:.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
