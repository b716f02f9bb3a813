"""Benchmark of the STRank losses: simulator (3 regimes x 3 seeds) and HER2+ H&E sections.

    python benchmarks/rank.py sim      # simulator table
    python benchmarks/rank.py her2st   # real data: built-in image features, HER2+ sections
    python benchmarks/rank.py all

Simulator (:func:`chronotope.rank.simulate`): 6 slides x 300 spots x 100 genes, 32
features; slides s0-s3 train, s4 validates (model selection by within-slide Pearson), s5
is the test slide; the figure is the mean over genes of the Spearman correlation, within
the test slide, between the prediction and the *true* log-rate. Regimes: ``none`` (no
batch effect), ``gene`` (per-(slide, gene) log factor sd 1, slide depth sd 0.5),
``strong_sparse`` (sd 2, slide depth sd 1, depth 150: mostly zeros).

HER2+ (``chronotope.datasets.her2st``): sections C2, C3 (patient C) and B4 (patient B)
train, C4 validates, C5 is the test section (3 seeds; linear head, and an MLP for four
losses); two rotated splits (test C3, test C4; seed 0) follow. Features: the built-in
handcrafted H&E extractor on 224 px patches of the full-resolution images. Genes: the 50
most variable (within-slide variance of log-normalised counts) on the training sections
among the genes of every section. Figure: mean within-section Pearson / Spearman on the test
section against the log-normalised counts. No STRank package is on PyPI; the baselines are
the peers.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np
import torch

torch.set_num_threads(1)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import add_device_argument, bench_device, use_device  # noqa: E402

LOSSES = ("list", "pair", "pcc_slide", "mse", "poisson", "nb", "pcc", "margin")
REGIMES = {
    "none": {"batch_effect": 0.0, "slide_depth_sd": 0.0, "depth": 2000.0},
    "gene": {"batch_effect": 1.0, "slide_depth_sd": 0.5, "depth": 2000.0},
    "strong_sparse": {"batch_effect": 2.0, "slide_depth_sd": 1.0, "depth": 150.0},
}
FIT = {"max_epochs": 60, "eval_every": 5, "pairs_per_spot": 4}


def bench_sim(seeds: tuple[int, ...] = (0, 1, 2)) -> None:
    from chronotope.rank import evaluate, fit, simulate, summarize

    t0 = time.perf_counter()
    res: dict[str, dict[str, list[float]]] = {r: {loss: [] for loss in LOSSES} for r in REGIMES}
    for regime, kw in REGIMES.items():
        for seed in seeds:
            ad = simulate(6, 300, 100, composition_shift=2.0, seed=seed, **kw)
            sl = ad.obs["slide"].astype(str).to_numpy()
            tr = ad[np.isin(sl, ["s0", "s1", "s2", "s3"])].copy()
            va, te = ad[sl == "s4"].copy(), ad[sl == "s5"].copy()
            zero = float((te.X.toarray() == 0).mean())
            for loss in LOSSES:
                m = fit(tr, "features", "slide", loss=loss, validation=va, seed=seed,
                        device=bench_device(), **FIT)
                s = summarize(evaluate(m, te, batch_key="slide", truth_layer="log_rate"))
                res[regime][loss].append(s["spearman"])
            print(f"# sim {regime} seed {seed}: zero fraction {zero:.2f}, "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
    print("\nsimulator: mean per-gene Spearman to the true log-rate on the held-out slide "
          f"(mean +- sd over seeds {list(seeds)})")
    print(f"{'loss':<10}" + "".join(f"{r:>20}" for r in REGIMES))
    for loss in LOSSES:
        cells = [f"{np.mean(res[r][loss]):.3f} +- {np.std(res[r][loss]):.3f}" for r in REGIMES]
        print(f"{loss:<10}" + "".join(f"{c:>20}" for c in cells))
    for r in REGIMES:
        rank = np.mean([np.mean(res[r][x]) for x in ("list", "pair", "pcc_slide")])
        point = np.mean([np.mean(res[r][x]) for x in ("mse", "poisson", "nb", "pcc", "margin")])
        ratio = np.mean(res[r]["list"]) / np.mean(res[r]["mse"])
        print(f"sim {r}: mean(list, pair, pcc_slide) {rank:.3f} vs mean(mse, poisson, nb, pcc, "
              f"margin) {point:.3f}; list / mse = {ratio:.3f}")
    print(f"sim total {time.perf_counter() - t0:.0f} s (shared, loaded 2-core machine, 1 thread)")


def _her2_features(section: str) -> tuple[object, np.ndarray]:
    import chronotope as ct
    from chronotope.datasets._registry import dataset_path
    from chronotope.datasets._spatial import _HER2_IMAGES
    from chronotope.io._visium import read_image
    from chronotope.rank.image import image_features

    ad = ct.datasets.her2st(section, load_image=False)
    path = dataset_path("her2st_subset", "ST-imgs", _HER2_IMAGES[section], data_dir=None)
    img = read_image(path)  # full resolution, ~9.3k x 9.9k px
    feats = image_features(img, ad.obsm["spatial"], patch_size=224, progress=False)
    del img
    return ad, feats


SPLITS = (
    (("C2", "C3", "B4"), "C4", "C5"),  # the main split, 3 seeds
    (("C2", "C4", "B4"), "C5", "C3"),  # rotations, seed 0
    (("C3", "C5", "B4"), "C2", "C4"),
)


def _her2_split(parts, common, train, val, test, seeds, variants):
    import anndata as ad_mod

    from chronotope.rank import evaluate, fit, highly_variable_genes, summarize

    tr = ad_mod.concat([parts[s] for s in train], join="inner", index_unique="-")
    tr.obs["section"] = tr.obs["section"].astype(str)
    sub = tr[:, common]
    hvg = highly_variable_genes(sub.X, tr.obs["section"].to_numpy(), 50,
                                totals=tr.obs["total_counts"].to_numpy())
    genes = [common[i] for i in hvg]
    print(f"\nher2st: train {'+'.join(train)}, validate {val}, test {test}; built-in image "
          f"features; within-section correlation on {test}, 50 HVGs of the training sections "
          f"({', '.join(genes[:5])}, ...); mean +- sd over seeds {list(seeds)}")
    print(f"{'loss':<16}{'pearson':>18}{'spearman':>18}{'best epochs':>16}{'fit s':>8}")
    out = {}
    for loss, head in variants:
        t = time.perf_counter()
        pr, sr, ep = [], [], []
        for seed in seeds:
            m = fit(tr, "X_histology", "section", genes=genes, loss=loss, validation=parts[val],
                    head=head, hidden=64, max_epochs=200, eval_every=5, weight_decay=1e-3,
                    pairs_per_spot=8, seed=seed, device=bench_device())
            s = summarize(evaluate(m, parts[test], batch_key="section"))
            pr.append(s["pearson"])
            sr.append(s["spearman"])
            ep.append(m.best_epoch_)
        name = loss if head == "linear" else f"{loss} ({head})"
        out[name] = (float(np.mean(pr)), float(np.mean(sr)))
        fit_s = (time.perf_counter() - t) / len(seeds)
        print(f"{name:<16}{np.mean(pr):>10.3f} +- {np.std(pr):.3f}{np.mean(sr):>10.3f} +- "
              f"{np.std(sr):.3f}{'/'.join(map(str, ep)):>16}{fit_s:>8.1f}", flush=True)
    return out


def bench_her2st() -> None:
    t0 = time.perf_counter()
    parts = {}
    for sec in ("C2", "C3", "C4", "C5", "B4"):
        a, f = _her2_features(sec)
        a.obsm["X_histology"] = f
        a.obs["total_counts"] = np.asarray(a.X.sum(1)).ravel()
        parts[sec] = a
        print(f"# her2st {sec}: {a.n_obs} spots, features {f.shape[1]}, "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    common = sorted(set.intersection(*(set(a.var_names) for a in parts.values())))
    print(f"# her2st: {len(common)} genes shared by the 5 sections")
    linear = [(loss, "linear") for loss in LOSSES]
    mlp = [(loss, "mlp") for loss in ("list", "pair", "pcc_slide", "mse")]
    results = []
    for i, (train, val, test) in enumerate(SPLITS):
        seeds = (0, 1, 2) if i == 0 else (0,)
        results.append(_her2_split(parts, common, train, val, test, seeds,
                                   linear + mlp if i == 0 else linear))
    main_res = results[0]
    print(f"her2st main split: list / mse pearson = "
          f"{main_res['list'][0] / main_res['mse'][0]:.3f}, "
          f"pair / mse = {main_res['pair'][0] / main_res['mse'][0]:.3f}")
    print(f"\nher2st, mean over the {len(SPLITS)} splits (test C5, C3, C4), linear head:")
    print(f"{'loss':<16}{'pearson':>10}{'spearman':>10}")
    for loss in LOSSES:
        print(f"{loss:<16}{np.mean([r[loss][0] for r in results]):>10.3f}"
              f"{np.mean([r[loss][1] for r in results]):>10.3f}")
    print(f"her2st total {time.perf_counter() - t0:.0f} s (shared, loaded 2-core machine, "
          "1 thread)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("sim", "her2st", "all"), nargs="?", default="all")
    add_device_argument(p)
    args = p.parse_args(argv)
    print(use_device(args.device), flush=True)
    if args.what in ("sim", "all"):
        bench_sim()
    if args.what in ("her2st", "all"):
        bench_her2st()


if __name__ == "__main__":
    main(sys.argv[1:])
