"""Dynamics in an autoencoder latent, read out in feature space through ``NeuralGeneMap``.

A user with a VAE / autoencoder latent (scVI and the like) fits the dynamics in the latent
and reads every gene-space quantity through the decoder
(:class:`chronotope.dynamics.NeuralGeneMap`). This benchmark does that on real time
courses whose features are known, and compares it with the same model fitted on the
features themselves and with the linear map of the same dimension (PCA,
:class:`chronotope.dynamics.GeneMap`).

Data (``../shared/data``, the loaders of ``benchmarks/dynamics.py``)
-------------------------------------------------------------------
deepruot_emt
    DeepRUOT EMT-10D (A549 TGFB1, 577 / 885 / 788 / 883 cells): hold-one-out t = 1, 2
    (the setting of the published tables), 10 features.
wot
    Waddington-OT day 0 / day 2, 20 diffusion components (4,060 / 5,619 cells): fitted on
    both days, evaluated at day 2 (two time points, no hold-out).

Per dataset the latent dimension is the smallest number of principal components that
explains 85 % of the variance (``--latent-dim`` overrides it). The autoencoder (MLP,
2 x 128 SiLU each side, Adam, 4,000 steps) and the PCA are fitted on the cells of the
training time points only, seeded; neither sees the held-out time point.

Measured, per seed
------------------
- ``recon``: R^2 of the round trip ``decode(encode(x))`` on the training cells.
- ``W1``: exact EMD in feature space between the decoded predicted particles (SDE,
  4 per start cell, the seeded start and target subsamples of ``benchmarks/dynamics.py``)
  and the target cells; ``floor`` is ``W1(decode(encode(target)), target)``, what the map
  alone loses; McCann interpolation in feature space for the held-out points.
- ``GRN``: the cell-averaged feature-space Jacobian (``readouts.gene_jacobian``) of a fit on
  all time points, compared with the feature-space fit's (``readouts.mean_jacobian``):
  Pearson r of the off-diagonal entries and sign agreement on that fit's 20 largest
  off-diagonal edges. ``direct vs direct`` compares two seeds of the feature-space fit:
  the ceiling set by training noise.

Usage::

    python -W ignore benchmarks/dynamics_genemap.py --datasets deepruot_emt,wot --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dynamics as bench

N_EDGES = 20
AE_STEPS = 4000
FIT: dict[str, Any] = {}  # DynamicsParams overrides (--quick)


def latent_dim(x: np.ndarray, share: float = 0.85) -> int:
    """Smallest number of principal components explaining ``share`` of the variance."""
    ev = np.linalg.svd(x - x.mean(0), compute_uv=False) ** 2
    return int(np.searchsorted(np.cumsum(ev) / ev.sum(), share) + 1)


def train_autoencoder(x: np.ndarray, dim: int, seed: int) -> tuple[Any, Any, float]:
    """MLP autoencoder on standardised features; returns decoder, encoder, seconds.

    The returned callables take and give features in their original units.
    """
    import torch
    from torch import nn

    torch.manual_seed(seed)
    mu, sd = x.mean(0), x.std(0) + 1e-12
    xs = torch.as_tensor((x - mu) / sd, dtype=torch.float32)
    g = x.shape[1]

    def mlp(i: int, o: int) -> nn.Module:
        return nn.Sequential(
            nn.Linear(i, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(), nn.Linear(128, o)
        )

    enc, dec = mlp(g, dim), mlp(dim, g)
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, AE_STEPS)
    rng = np.random.default_rng(seed)
    tic = time.perf_counter()
    for _ in range(AE_STEPS):
        b = xs[rng.integers(0, xs.shape[0], 512)]
        loss = ((dec(enc(b)) - b) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    for p in [*enc.parameters(), *dec.parameters()]:
        p.requires_grad_(False)
    mu_t = torch.as_tensor(mu, dtype=torch.float32)
    sd_t = torch.as_tensor(sd, dtype=torch.float32)

    def decoder(z: torch.Tensor) -> torch.Tensor:
        return dec(z) * sd_t + mu_t

    def encoder(v: torch.Tensor) -> torch.Tensor:
        return enc((v - mu_t) / sd_t)

    return decoder, encoder, time.perf_counter() - tic


class Map:
    """One way to reach feature space: ``direct``, ``pca`` or ``autoencoder``."""

    def __init__(self, kind: str, x_train: np.ndarray, dim: int, seed: int) -> None:
        from chronotope.dynamics import GeneMap, NeuralGeneMap

        self.kind, self.seconds = kind, 0.0
        names = [f"f{i}" for i in range(x_train.shape[1])]
        if kind == "direct":
            self.gene_map = None
        elif kind == "pca":
            from sklearn.decomposition import PCA

            pca = PCA(dim, random_state=seed).fit(x_train)
            self.gene_map = GeneMap(pca.components_.T, pca.mean_, names)
        else:
            dec, enc, self.seconds = train_autoencoder(x_train, dim, seed)
            self.gene_map = NeuralGeneMap(dec, dim, encoder=enc, var_names=names)

    def encode(self, x: np.ndarray) -> np.ndarray:
        return x if self.gene_map is None else self.gene_map.to_rep(x)

    def decode(self, z: np.ndarray) -> np.ndarray:
        return z if self.gene_map is None else self.gene_map.to_genes(z)

    def recon(self, x: np.ndarray) -> float:
        r = self.decode(self.encode(x))
        return float(1.0 - ((r - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def feature_jacobian(model: Any, m: Map, z: np.ndarray, t: np.ndarray) -> np.ndarray:
    from chronotope.dynamics import readouts as ro

    if m.gene_map is None:
        return ro.mean_jacobian(model, z, t)
    if m.kind == "pca":
        return ro.gene_jacobian(model, ro.mean_jacobian(model, z, t))[1]
    return ro.gene_jacobian(model, None, x=z, time=t)[1]


def compare(j: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """Pearson r of off-diagonal entries; sign agreement on ``ref``'s top edges."""
    off = ~np.eye(j.shape[0], dtype=bool)
    r = float(np.corrcoef(j[off], ref[off])[0, 1])
    top = np.argsort(-np.abs(ref[off]))[:N_EDGES]
    return r, float(np.mean(np.sign(j[off][top]) == np.sign(ref[off][top])))


def fit(m: Map, x: np.ndarray, t: np.ndarray, seed: int) -> tuple[Any, float]:
    from chronotope.dynamics import DynamicsModel

    tic = time.perf_counter()
    model = DynamicsModel(seed=seed, gene_map=m.gene_map, extrapolate="landscape", **FIT)
    model.fit(m.encode(x), t)
    return model, time.perf_counter() - tic


def run(name: str, seed: int, dim_arg: int | None) -> dict[str, Any]:
    d = bench.load(name)
    x, t = d.x, d.t
    times = np.unique(t)
    dim = dim_arg or latent_dim(x)
    helds = list(times[1:-1]) if times.size > 2 else [None]
    x0 = bench.subsample(x[t == times[0]], bench.N_SUB, seed=1000)
    out: dict[str, Any] = {"dim": dim, "w1": {}, "jac": {}, "recon": {}, "fit_s": {}}
    for held in helds:
        keep = t != held if held is not None else np.ones(t.size, bool)
        targets = [held] if held is not None else list(times[1:])
        for kind in ("direct", "pca", "autoencoder"):
            m = Map(kind, x[keep], dim, seed)
            out["recon"].setdefault(kind, []).append(m.recon(x[keep]))
            model, fit_s = fit(m, x[keep], t[keep], seed)
            out["fit_s"].setdefault(kind, []).append(fit_s + m.seconds)
            res = model.simulate(
                np.repeat(m.encode(x0), 4, axis=0),
                times[0],
                max(targets),
                method="sde",
                t_eval=targets,
                seed=seed,
            )
            for tk, zp, wp in zip(res.times, res.x, res.weights, strict=True):
                k = int(np.searchsorted(times, tk))
                target = bench.subsample(x[t == tk], bench.N_SUB, seed=2000 + k)
                key = (held is not None, float(tk))
                row = out["w1"].setdefault(key, {})
                row[kind] = bench.w1(m.decode(zp), wp, target)
                if kind != "direct":
                    row[f"{kind} floor"] = bench.w1(m.decode(m.encode(target)), None, target)
                if held is not None and "mccann" not in row:
                    tr = np.unique(t[keep])
                    a = bench.subsample(x[t == tr[tr < tk].max()], bench.N_SUB, seed=3000 + k)
                    b = bench.subsample(x[t == tr[tr > tk].min()], bench.N_SUB, seed=4000 + k)
                    s = (tk - tr[tr < tk].max()) / (tr[tr > tk].min() - tr[tr < tk].max())
                    row["mccann"] = bench.w1(*bench.mccann(a, b, s), target)
            if held is None:
                out["jac"][kind] = feature_jacobian(model, m, m.encode(x), t)
    if helds != [None]:  # the GRN from fits on all time points
        for kind in ("direct", "pca", "autoencoder"):
            m = Map(kind, x, dim, seed)
            model, _ = fit(m, x, t, seed)
            out["jac"][kind] = feature_jacobian(model, m, m.encode(x), t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="deepruot_emt,wot")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--latent-dim", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="smoke test (not a measurement)")
    args = ap.parse_args()
    import torch

    global AE_STEPS
    if args.quick:
        AE_STEPS = 200
        FIT["n_steps"] = 100

    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    for name in args.datasets.split(","):
        runs = []
        for seed in seeds:
            tic = time.perf_counter()
            r = run(name, seed, args.latent_dim)
            runs.append(r)
            print(
                f"{name} seed={seed} latent {r['dim']}-D: "
                + " | ".join(
                    f"t={tk:g} " + " ".join(f"{k} {v:.4f}" for k, v in row.items())
                    for (_, tk), row in r["w1"].items()
                )
                + " | fit_s "
                + " ".join(f"{k} {np.mean(v):.1f}" for k, v in r["fit_s"].items())
                + f" | {time.perf_counter() - tic:.0f} s",
                flush=True,
            )
        print(f"\n{name}: latent {runs[0]['dim']}-D, {len(seeds)} seeds (mean ± sd)")
        for kind in ("pca", "autoencoder"):
            rec = [np.mean(r["recon"][kind]) for r in runs]
            print(f"  recon R^2 {kind:11s} {np.mean(rec):.3f} ± {np.std(rec):.3f}")
        for key in runs[0]["w1"]:
            label = f"{'held-out' if key[0] else 'fitted'} t={key[1]:g}"
            cols = runs[0]["w1"][key].keys()
            print(
                f"  W1 {label}: "
                + " | ".join(
                    f"{c} {np.mean([r['w1'][key][c] for r in runs]):.4f}"
                    f" ± {np.std([r['w1'][key][c] for r in runs]):.4f}"
                    for c in cols
                )
            )
        ref = [r["jac"]["direct"] for r in runs]
        for kind in ("pca", "autoencoder"):
            cmp = [compare(r["jac"][kind], r["jac"]["direct"]) for r in runs]
            print(
                f"  GRN {kind:11s} vs direct (same seed): r {np.mean([c[0] for c in cmp]):.3f}"
                f" | sign agreement top {N_EDGES} {np.mean([c[1] for c in cmp]):.2f}"
            )
        if len(ref) > 1:
            cmp = [compare(ref[i], ref[i - 1]) for i in range(1, len(ref))]
            print(
                f"  GRN direct      vs direct (next seed): r {np.mean([c[0] for c in cmp]):.3f}"
                f" | sign agreement top {N_EDGES} {np.mean([c[1] for c in cmp]):.2f}"
            )


if __name__ == "__main__":
    main()
