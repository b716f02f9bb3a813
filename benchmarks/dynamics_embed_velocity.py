"""Velocity projected onto another view against its exact image, on real data.

Fits the default :class:`~chronotope.dynamics.DynamicsModel` to DeepRUOT EMT-10D and
projects the learned velocity onto the first two principal components of the cells with
:func:`chronotope.dynamics.readouts.embed_velocity` (scVelo's transition-kernel
projection, which never sees that the view is linear). A linear view has an exact image
of the velocity (``v @ components.T``); the median and mean cosine between the two are
printed per neighbour count, with velocities shuffled between cells as a reference.

Usage::

    python -W ignore benchmarks/dynamics_embed_velocity.py [--dataset deepruot_emt] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dynamics as bench


def _cosines(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    c = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    return float(np.median(c)), float(np.mean(c))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="deepruot_emt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch
    from sklearn.decomposition import PCA

    from chronotope.dynamics import DynamicsModel
    from chronotope.dynamics import readouts as ro

    torch.set_num_threads(args.threads)
    d = bench.load(args.dataset)
    tic = time.perf_counter()
    model = DynamicsModel(seed=args.seed).fit(d.x, d.t)
    v = ro.cell_fields(model, d.x, d.t)["velocity"]
    pca = PCA(2).fit(d.x)
    view, exact = pca.transform(d.x), v @ pca.components_.T
    print(f"{args.dataset}: fit {time.perf_counter() - tic:.0f} s, {d.x.shape[0]} cells")
    for k in (15, 30, 60):
        tic = time.perf_counter()
        med, mean = _cosines(ro.embed_velocity(d.x, v, view, n_neighbors=k), exact)
        print(
            f"  {k} neighbours: cosine to the exact image median {med:.3f} mean {mean:.3f} "
            f"({time.perf_counter() - tic:.1f} s)"
        )
    perm = np.random.default_rng(0).permutation(v.shape[0])
    med, mean = _cosines(ro.embed_velocity(d.x, v[perm], view), exact)
    print(f"  shuffled velocities, 30 neighbours: median {med:.3f} mean {mean:.3f}")


if __name__ == "__main__":
    main()
