"""The ``chronotope demo`` pipeline: run every capability on the embedded demo data.

The demo is a list of *sections*. Each section is a function ``(report, ctx) -> None``
that adds one section to a :class:`chronotope.report.Report`, using the shared
:class:`DemoContext` (output folder, device, seed, cached datasets, timers, progress).
Sections are kept in the registry :data:`SECTIONS`, in order. A capability adds its
own section with :func:`register_section`, either here or from its own module given
as a lazy ``"module:function"`` target::

    register_section(
        "domains",
        "Spatial domains",
        "chronotope.tl._domains_demo:demo_section",
        requires=("chronotope.tl:domains",),
    )

A section whose ``requires`` cannot be imported is shown as *not available* in the
report (the capability has not landed); a section that raises is shown as *failed*
with its traceback, and the other sections still run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import itertools
import logging
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import scipy.sparse as sp

from chronotope.report import Report

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = [
    "SECTIONS",
    "DemoContext",
    "DemoResult",
    "DemoSection",
    "register_section",
    "run_demo",
]

logger = logging.getLogger("chronotope")

T = TypeVar("T")
SectionFunc = Callable[[Report, "DemoContext"], None]


# --------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class DemoSection:
    """A registered demo section.

    Attributes
    ----------
    name
        Short identifier (used by ``chronotope demo --only NAME``).
    title
        Heading in the report.
    func
        The section function ``(report, ctx) -> None``, or a lazy ``"module:attr"``.
    requires
        ``"module"`` or ``"module:attr"`` strings that must import for the section to run.
    """

    name: str
    title: str
    func: SectionFunc | str
    requires: tuple[str, ...] = ()

    def missing(self) -> list[str]:
        """Return the requirements that cannot be imported (empty when all are there)."""
        return [req for req in self.requires if not _importable(req)]

    def resolve(self) -> SectionFunc:
        """Return the section function, importing it if given as ``"module:attr"``."""
        if callable(self.func):
            return self.func
        return _import_target(self.func)


SECTIONS: list[DemoSection] = []


def register_section(
    name: str,
    title: str,
    func: SectionFunc | str | None = None,
    *,
    requires: Sequence[str] = (),
) -> Any:
    """Add a section to the demo (usable as a decorator when ``func`` is omitted).

    Parameters
    ----------
    name
        Unique short name; registering an existing name replaces that section in place.
    title
        Heading shown in the report.
    func
        ``(report, ctx) -> None`` or a lazy ``"module:function"`` string.
    requires
        Importable names the section needs (``"chronotope.ot:sinkhorn"``); when one is
        missing the section is reported as not available instead of run.
    """

    def _add(f: SectionFunc | str) -> SectionFunc | str:
        sec = DemoSection(name=name, title=title, func=f, requires=tuple(requires))
        for i, old in enumerate(SECTIONS):
            if old.name == name:
                SECTIONS[i] = sec
                break
        else:
            SECTIONS.append(sec)
        return f

    if func is None:
        return _add
    return _add(func)


def _import_target(target: str) -> Any:
    module, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module)
    for part in filter(None, attr.split(".")):
        obj = getattr(obj, part)
    return obj


def _importable(target: str) -> bool:
    try:
        _import_target(target)
    except (ImportError, AttributeError):
        return False
    return True


# --------------------------------------------------------------------------- context
@dataclass
class DemoContext:
    """Shared state handed to every demo section.

    Attributes
    ----------
    out
        Output folder of the report.
    device
        Torch device string for the OT solvers (``"cpu"``, ``"cuda"``).
    seed
        Seed for every random step (subsampling, initialisation).
    progress
        Show tqdm progress bars.
    """

    out: Path
    device: str = "cpu"
    seed: int = 0
    progress: bool = True
    _data: dict[str, AnnData] = field(default_factory=dict, repr=False)

    def dataset(self, name: str) -> AnnData:
        """Load an embedded demo dataset once and cache it (sections must not modify it)."""
        if name not in self._data:
            from chronotope.datasets import demo

            with self.timer() as t:
                self._data[name] = demo(name)
            logger.debug("loaded demo dataset %r in %.2f s", name, t.seconds)
        return self._data[name]

    def rng(self, offset: int = 0) -> np.random.Generator:
        """Return a fresh generator seeded from ``seed + offset``."""
        return np.random.default_rng(self.seed + offset)

    @contextlib.contextmanager
    def timer(self) -> Iterator[_Timer]:
        """Context manager measuring wall time; read ``.seconds`` after the block."""
        t = _Timer()
        start = time.perf_counter()
        try:
            yield t
        finally:
            t.seconds = time.perf_counter() - start

    @property
    def bars(self) -> bool:
        """Whether to ask library solvers for their own progress bars (on a terminal only)."""
        import sys

        return self.progress and sys.stderr.isatty()

    def track(self, iterable: Iterable[T], desc: str, total: int | None = None) -> Iterable[T]:
        """Wrap ``iterable`` in a tqdm progress bar (silent when ``progress`` is off)."""
        from tqdm.auto import tqdm

        return tqdm(
            iterable,
            desc=desc,
            total=total,
            disable=True if not self.progress else None,
            leave=False,
        )


@dataclass
class _Timer:
    seconds: float = float("nan")


@dataclass
class DemoResult:
    """What :func:`run_demo` produced.

    Attributes
    ----------
    report_path
        Path of ``report.html``.
    status
        Section name -> ``"ok"``, ``"not available"`` or ``"failed"``.
    errors
        Section name -> one-line reason, for sections that failed or were unavailable.
    seconds
        Total wall time.
    """

    report_path: Path
    status: dict[str, str]
    errors: dict[str, str]
    seconds: float

    @property
    def failed(self) -> list[str]:
        """Names of the sections that raised."""
        return [k for k, v in self.status.items() if v == "failed"]


# --------------------------------------------------------------------------- runner
def run_demo(
    out: str | Path,
    *,
    device: str = "cpu",
    seed: int = 0,
    only: Sequence[str] | None = None,
    progress: bool = True,
) -> DemoResult:
    """Run the demo sections and write ``out/report.html``.

    Parameters
    ----------
    out
        Output folder; created if missing.
    device
        Torch device for the solvers: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"auto"``.
    seed
        Seed for all random steps.
    only
        Names of the sections to run (default: all registered). See :data:`SECTIONS`.
    progress
        Show progress bars.

    Returns
    -------
    A :class:`DemoResult` with the report path and the status of each section.

    Raises
    ------
    ValueError
        Unknown section names, or a CUDA device requested where none is available.
    """
    import torch

    from chronotope import __version__
    from chronotope._settings import resolve_device

    dev = resolve_device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use 'cpu'.")
    names = [s.name for s in SECTIONS]
    if only:
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise ValueError(
                f"unknown demo section(s) {', '.join(unknown)}; choose from {', '.join(names)}."
            )
    selected = [s for s in SECTIONS if not only or s.name in only]

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a folder.")
    out.mkdir(parents=True, exist_ok=True)
    ctx = DemoContext(out=out, device=str(dev), seed=seed, progress=progress)
    report = Report(
        "chronotope demo",
        subtitle=f"chronotope {__version__} · torch {torch.__version__} · device {dev} · "
        f"seed {seed}",
    )
    status: dict[str, str] = {}
    errors: dict[str, str] = {}
    start = time.perf_counter()
    for sec in selected:
        missing = sec.missing()
        if missing:
            reason = f"needs {', '.join(missing)}, which is not available yet"
            logger.info("demo: %s: not available (%s)", sec.name, reason)
            report.add_section(sec.title, text=f"Not available: {reason}.", status="not available")
            status[sec.name], errors[sec.name] = "not available", reason
            continue
        logger.info("demo: %s ...", sec.title)
        n_before = len(report.sections)
        t0 = time.perf_counter()
        try:
            sec.resolve()(report, ctx)
        except Exception as exc:  # one section failing must not hide the others
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
            logger.error("demo: section %r failed: %s", sec.name, reason)
            logger.debug("traceback:", exc_info=True)
            del report.sections[n_before:]
            report.add_section(
                sec.title,
                text=f"Failed: {reason}",
                status="failed",
                detail=traceback.format_exc(),
            )
            status[sec.name], errors[sec.name] = "failed", reason
            continue
        elapsed = time.perf_counter() - t0
        if len(report.sections) == n_before:  # a section that added nothing still shows up
            report.add_section(sec.title)
        report.sections[n_before].add_metrics({"section time (s)": round(elapsed, 2)})
        status[sec.name] = "ok"
        logger.info("demo: %s done in %.1f s", sec.title, elapsed)
    total = time.perf_counter() - start
    report.subtitle += f" · total {total:.1f} s"
    path = report.write(out)
    return DemoResult(report_path=path, status=status, errors=errors, seconds=total)


# --------------------------------------------------------------------------- helpers
def _figure(nrows: int = 1, ncols: int = 1, *, size: tuple[float, float] = (4.6, 4.0)) -> Any:
    """A matplotlib Figure not attached to pyplot (no GUI backend involved)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _total_counts(x: Any) -> np.ndarray | None:
    """Per-observation totals of a count matrix, or ``None`` if ``x`` is not counts."""
    vals = x.data if sp.issparse(x) else np.asarray(x)
    if vals.size and (vals.min() < 0 or not np.allclose(vals[:10_000], np.round(vals[:10_000]))):
        return None
    return np.asarray(x.sum(axis=1)).ravel()


def _log_normalize_gene(adata: AnnData, gene: str) -> np.ndarray:
    """log1p(CP10k) of one gene (only that column is densified)."""
    totals = np.asarray(adata.X.sum(axis=1)).ravel()
    col = adata[:, gene].X
    col = col.toarray().ravel() if sp.issparse(col) else np.asarray(col).ravel()
    return np.log1p(col / np.maximum(totals, 1.0) * 1e4)


def _eta_squared(values: np.ndarray, labels: Any) -> float:
    """Fraction of variance of ``values`` explained by the groups in ``labels``."""
    import pandas as pd

    lab = pd.Series(np.asarray(labels, dtype=object))
    ok = lab.notna().to_numpy() & np.isfinite(values)
    v, g = values[ok], lab[ok].to_numpy()
    total = float(((v - v.mean()) ** 2).sum())
    if total == 0:
        return float("nan")
    between = sum(
        float((g == k).sum()) * (float(v[g == k].mean()) - float(v.mean())) ** 2
        for k in np.unique(g)
    )
    return between / total


def _pca_basis(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and first two principal axes of ``x`` (rows are observations)."""
    mean = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    return mean, vt[:2].T


# --------------------------------------------------------------------------- sections
@register_section("data", "Embedded demo data", requires=("chronotope.datasets:demo",))
def _section_data(report: Report, ctx: DemoContext) -> None:
    import pandas as pd

    from chronotope import pl
    from chronotope.datasets import demo_names

    sec = report.add_section(
        "Embedded demo data",
        text="Every dataset shipped inside the package, as loaded by "
        "chronotope.datasets.demo(name).",
    )
    rows = []
    for name in ctx.track(demo_names(), desc="datasets"):
        with ctx.timer() as t:
            adata = ctx.dataset(name)
        totals = _total_counts(adata.X)
        label_cols = [c for c in ("layer", "slice", "time", "in_tissue") if c in adata.obs.columns]
        labels = "; ".join(f"{c}: {adata.obs[c].nunique()} values" for c in label_cols)
        rows.append(
            {
                "dataset": name,
                "n_obs": adata.n_obs,
                "n_vars": adata.n_vars,
                "X": f"{'sparse' if sp.issparse(adata.X) else 'dense'} {adata.X.dtype}",
                "median counts/obs": float(np.median(totals)) if totals is not None else "",
                "spatial": "spatial" in adata.obsm,
                "labels": labels,
                "load (s)": round(t.seconds, 3),
            }
        )
        sec.add_metrics({f"{name}: n_obs": adata.n_obs})

        if "spatial" in adata.obsm and "slice" in adata.obs.columns:
            slices = list(pd.Categorical(adata.obs["slice"]).categories)
            fig, axes = _figure(1, len(slices), size=(3.4, 3.2))
            vmax = float(np.quantile(totals, 0.99)) if totals is not None else None
            for i, (ax, s) in enumerate(zip(axes[0], slices, strict=True)):
                sub = adata[(adata.obs["slice"] == s).to_numpy()]
                pl.spatial(
                    sub,
                    color=_total_counts(sub.X),
                    ax=ax,
                    title=f"slice {s}",
                    vmin=0.0,
                    vmax=vmax,
                    colorbar=i == len(slices) - 1,
                )
            sec.add_figure(fig, f"{name}: spots of each slice, coloured by total counts")
        elif "spatial" in adata.obsm:
            color: Any
            if "layer" in adata.obs.columns:
                color, what = "layer", "layer"
            elif "in_tissue" in adata.obs.columns:
                color, what = adata.obs["in_tissue"].astype(str).to_numpy(), "in_tissue"
            else:
                color, what = totals, "total counts"
            fig, axes = _figure()
            pl.spatial(adata, color=color, ax=axes[0, 0], title=name)
            sec.add_figure(fig, f"{name}: spots coloured by {what}")
        elif "time" in adata.obs.columns:
            pick = ctx.rng().permutation(adata.n_obs)[:20_000]
            xd = adata.X[pick]
            xd = np.asarray(xd.toarray() if sp.issparse(xd) else xd, dtype=float)
            mean, basis = _pca_basis(xd)
            emb = (xd - mean) @ basis
            fig, axes = _figure()
            ax = axes[0, 0]
            sc = ax.scatter(
                emb[:, 0],
                emb[:, 1],
                c=adata.obs["time"].astype(float).to_numpy()[pick],
                s=4,
                cmap="viridis",
                linewidths=0,
                rasterized=True,
            )
            fig.colorbar(sc, ax=ax, label="time")
            ax.set_xlabel("PC1")
            ax.set_ylabel("PC2")
            ax.set_title(name)
            sec.add_figure(fig, f"{name}: first two principal components, coloured by time")
    sec.add_rows(rows)


#: Cortical layer markers: symbol -> Ensembl id (the DLPFC demo is indexed by Ensembl id).
_MARKERS = {
    "MOBP": "ENSG00000168314",
    "PCP4": "ENSG00000183036",
    "SNAP25": "ENSG00000132639",
    "MBP": "ENSG00000197971",
}


def _find_marker(adata: AnnData) -> tuple[str, str]:
    """Return ``(var_name, label)`` of the first layer marker present, else the most variable."""
    for symbol, ensembl in _MARKERS.items():
        for key in (symbol, ensembl):
            if key in adata.var_names:
                return key, symbol if key == symbol else f"{symbol} ({ensembl})"
    x = adata.X
    mean = np.asarray(x.mean(axis=0)).ravel()
    sq = np.asarray(x.multiply(x).mean(axis=0)).ravel() if sp.issparse(x) else (x**2).mean(0)
    gene = str(adata.var_names[int(np.argmax(sq - mean**2))])
    return gene, gene


@register_section(
    "graph",
    "Spatial graph",
    requires=(
        "chronotope.datasets:demo",
        "chronotope.graph:grid_graph",
        "chronotope.graph:knn_graph",
        "chronotope.graph:propagate",
        "chronotope.pp:spatial_neighbors",
    ),
)
def _section_graph(report: Report, ctx: DemoContext) -> None:
    from chronotope import graph, pl, pp

    name = "dlpfc_151673"
    adata = ctx.dataset(name)
    coords = np.asarray(adata.obsm["spatial"], dtype=float)
    sec = report.add_section(
        "Spatial graph",
        text=f"Neighbour graphs on {name} ({adata.n_obs:,} Visium spots): the hexagonal "
        "lattice (grid, 6 neighbours) and 6 nearest neighbours, both sparse CSR. "
        "A marker gene is then smoothed by multi-hop propagation over the grid graph "
        "(symmetrically normalised adjacency with self loops).",
    )
    graphs = {}
    steps = [
        ("grid", lambda: graph.grid_graph(coords, n_rings=1)),
        ("knn", lambda: graph.knn_graph(coords, n_neighbors=6)),
    ]
    for method, build in ctx.track(steps, desc="graphs"):
        with ctx.timer() as t:
            conn, _dist = build()
        graphs[method] = conn
        deg = np.diff(conn.indptr)
        sec.add_metrics(
            {
                f"{method}: build time (s)": round(t.seconds, 4),
                f"{method}: edges": int(conn.nnz),
                f"{method}: mean degree": float(deg.mean()),
            }
        )
    with ctx.timer() as t:
        pp.spatial_neighbors(adata.copy(), method="grid")
    sec.add_metrics({"pp.spatial_neighbors (grid, AnnData) time (s)": round(t.seconds, 4)})

    fig, axes = _figure(size=(5.0, 3.4))
    ax = axes[0, 0]
    max_deg = max(int(np.diff(g.indptr).max()) for g in graphs.values())
    bins = np.arange(max_deg + 2) - 0.5
    for method, conn in graphs.items():
        ax.hist(np.diff(conn.indptr), bins=bins, alpha=0.6, label=method)
    ax.set_xlabel("degree")
    ax.set_ylabel("spots")
    ax.legend(frameon=False)
    sec.add_figure(fig, f"Degree histogram of the grid and kNN graphs on {name}")

    gene, label = _find_marker(adata)
    values = _log_normalize_gene(adata, gene)
    n_hops = 3
    with ctx.timer() as t:
        hops = graph.propagate(graphs["grid"], values, n_hops)
    smoothed = np.asarray(hops[-1], dtype=float).ravel()
    sec.add_metrics({f"propagate {n_hops} hops time (s)": round(t.seconds, 4), "marker": label})
    if "layer" in adata.obs.columns:
        sec.add_metrics(
            {
                f"{label}: variance explained by layer, raw": round(
                    _eta_squared(values, adata.obs["layer"]), 4
                ),
                f"{label}: variance explained by layer, {n_hops} hops": round(
                    _eta_squared(smoothed, adata.obs["layer"]), 4
                ),
            }
        )
    fig, axes = _figure(1, 2, size=(4.4, 4.0))
    vmax = float(np.quantile(values, 0.99))
    pl.spatial(
        adata, color=values, ax=axes[0, 0], title=f"{label.split()[0]}, log1p CP10k", vmax=vmax
    )
    pl.spatial(
        adata, color=smoothed, ax=axes[0, 1], title=f"{label.split()[0]}, after {n_hops} hops"
    )
    sec.add_figure(fig, f"{label} before and after {n_hops}-hop propagation on the grid graph")


@register_section(
    "ot_time",
    "OT between time points (Sinkhorn)",
    requires=("chronotope.datasets:demo", "chronotope.ot:sinkhorn"),
)
def _section_ot_time(report: Report, ctx: DemoContext) -> None:
    import pandas as pd

    from chronotope import ot

    name, epsilon, n_per_time = "emt", 0.01, 1000
    adata = ctx.dataset(name)
    x_all = np.asarray(adata.X.toarray() if sp.issparse(adata.X) else adata.X, dtype=np.float32)
    time_all = pd.to_numeric(adata.obs["time"], errors="coerce").to_numpy()
    times = np.unique(time_all[np.isfinite(time_all)])
    rng = ctx.rng()
    keep = np.concatenate(
        [
            rng.choice(idx, size=min(n_per_time, len(idx)), replace=False)
            for idx in (np.flatnonzero(time_all == t) for t in times)
        ]
    )
    x_all, time_values = x_all[keep], time_all[keep]
    sec = report.add_section(
        "OT between time points (Sinkhorn)",
        text=f"Balanced entropic OT between consecutive time points of {name} "
        f"({adata.n_obs:,} cells, {adata.n_vars} dimensions; {n_per_time:,} cells drawn at "
        f"random per time point), squared Euclidean cost scaled by its mean, epsilon = "
        f"{epsilon}. Arrows join cells to their barycentric projection at the next time "
        "point (a random subset, on the first two principal components).",
    )
    mean, basis = _pca_basis(x_all)
    emb = (x_all - mean) @ basis
    fig, axes = _figure(size=(5.6, 4.6))
    ax = axes[0, 0]
    sc = ax.scatter(
        emb[:, 0],
        emb[:, 1],
        c=time_values,
        s=3,
        cmap="viridis",
        alpha=0.35,
        linewidths=0,
        rasterized=True,
    )
    fig.colorbar(sc, ax=ax, label="time")
    rows = []
    pairs = list(itertools.pairwise(times))
    for t0, t1 in ctx.track(pairs, desc="sinkhorn pairs"):
        x = x_all[time_values == t0]
        y = x_all[time_values == t1]
        with ctx.timer() as t:
            out = ot.sinkhorn(
                x,
                y,
                epsilon=epsilon,
                scale_cost="mean",
                max_iter=2000,
                tol=1e-4,
                device=ctx.device,
            )
            bary = out.barycentric_projection(y)
        bary = bary.detach().cpu().numpy() if hasattr(bary, "detach") else np.asarray(bary)
        rows.append(
            {
                "pair": f"{t0:g} → {t1:g}",
                "cells": f"{len(x)} → {len(y)}",
                "transport cost": float(out.primal_cost),
                "converged": bool(out.converged),
                "iterations": int(out.n_iter),
                "final error": float(np.asarray(out.errors.cpu())[-1].max()),
                "time (s)": round(t.seconds, 3),
            }
        )
        pick = rng.choice(len(x), size=min(25, len(x)), replace=False)
        start, end = (x[pick] - mean) @ basis, (bary[pick] - mean) @ basis
        ax.quiver(
            start[:, 0],
            start[:, 1],
            end[:, 0] - start[:, 0],
            end[:, 1] - start[:, 1],
            angles="xy",
            scale_units="xy",
            scale=1,
            width=0.003,
            color="#333333",
            alpha=0.7,
        )
    ax.set_xlabel("PC1")
    ax.set_ylabel("PC2")
    sec.add_rows(rows)
    sec.add_metrics(
        {
            "pairs solved": len(rows),
            "all converged": all(r["converged"] for r in rows),
            "total solve time (s)": round(sum(r["time (s)"] for r in rows), 3),
        }
    )
    sec.add_figure(fig, f"{name}: barycentric projection arrows between consecutive time points")


@register_section(
    "ot_batched",
    "Batched Sinkhorn on one spatial geometry",
    requires=(
        "chronotope.datasets:demo",
        "chronotope.ot:PointCloud",
        "chronotope.ot:LinearProblem",
        "chronotope.ot:Sinkhorn",
    ),
)
def _section_ot_batched(report: Report, ctx: DemoContext) -> None:
    import torch

    from chronotope import ot, pl

    name = "dlpfc_151673"
    adata = ctx.dataset(name)
    n_genes, n_loop, epsilon = 32, 4, 0.05
    coords = np.asarray(adata.obsm["spatial"], dtype=np.float32)
    x = adata.X
    totals = np.asarray(x.sum(axis=0)).ravel()
    genes = np.argsort(-totals, kind="stable")[:n_genes]
    cols = x[:, genes]
    hist = np.asarray(cols.toarray() if sp.issparse(cols) else cols, dtype=np.float64)
    hist = hist + 1e-3 * hist.sum(axis=0, keepdims=True) / len(hist)  # every spot > 0
    hist = (hist / hist.sum(axis=0, keepdims=True)).astype(np.float32)
    sec = report.add_section(
        "Batched Sinkhorn on one spatial geometry",
        text=f"OT distance from the spatial distribution of each of the {n_genes} most "
        f"expressed genes of {name} to the uniform distribution over its {adata.n_obs:,} "
        "spots: a spatial localisation score (large = concentrated in a region). All "
        "genes share one geometry (squared Euclidean cost on spot coordinates, scaled by "
        f"its maximum, epsilon = {epsilon}), so they are solved in one batched call; for "
        f"comparison the first {n_loop} genes are also solved one at a time.",
    )
    geom = ot.PointCloud(coords, scale_cost="max", device=ctx.device)
    solver = ot.Sinkhorn(epsilon=epsilon, max_iter=2000, tol=1e-5)
    with ctx.timer() as t_batch:
        out = dataclasses.replace(solver, progress=ctx.bars)(ot.LinearProblem(geom, b=hist))
        batched = np.asarray(out.primal_cost.detach().cpu(), dtype=float).ravel()
    looped = []
    with ctx.timer() as t_loop:
        for j in ctx.track(range(n_loop), desc="one gene at a time"):
            single = solver(ot.LinearProblem(geom, b=hist[:, j]))
            looped.append(float(single.primal_cost))
    looped_arr = np.asarray(looped)
    rel = np.abs(batched[:n_loop] - looped_arr) / np.maximum(np.abs(looped_arr), 1e-12)
    per_gene_batch = t_batch.seconds / n_genes
    per_gene_loop = t_loop.seconds / n_loop
    sec.add_metrics(
        {
            "spots": adata.n_obs,
            "genes (batched)": n_genes,
            "batched time (s)": round(t_batch.seconds, 3),
            f"loop time for {n_loop} genes (s)": round(t_loop.seconds, 3),
            "time per gene, batched (s)": round(per_gene_batch, 4),
            "time per gene, loop (s)": round(per_gene_loop, 4),
            "speed-up per gene": round(per_gene_loop / max(per_gene_batch, 1e-9), 2),
            "batched converged": bool(out.converged),
            "iterations (batched)": int(out.n_iter),
            "max relative difference batched vs loop": float(rel.max()),
            "torch threads": torch.get_num_threads(),
        }
    )
    order = np.argsort(-batched)
    names = adata.var_names[genes]
    sec.add_rows(
        {"rank": r + 1, "gene": str(names[i]), "OT cost to uniform": float(batched[i])}
        for r, i in enumerate(order[:5])
    )
    fig, axes = _figure(1, 2, size=(4.4, 4.0))
    for ax, i, label in ((axes[0, 0], order[0], "most"), (axes[0, 1], order[-1], "least")):
        pl.spatial(
            adata,
            color=np.log1p(hist[:, i] * len(hist)),
            ax=ax,
            title=f"{names[i]} ({label} localised)",
        )
    sec.add_figure(fig, "Relative expression of the most and least spatially localised genes")


def _expression_pcs(slices: Sequence[AnnData], n_comps: int, seed: int) -> list[np.ndarray]:
    """Joint PCA of log1p(CP10k) expression on the genes shared by all slices."""
    from sklearn.decomposition import TruncatedSVD

    genes = slices[0].var_names
    for s in slices[1:]:
        genes = genes.intersection(s.var_names, sort=False)
    blocks = []
    for s in slices:
        x = sp.csr_matrix(s[:, genes].X, dtype=np.float64)
        totals = np.asarray(x.sum(axis=1)).ravel()
        x = sp.diags(1e4 / np.maximum(totals, 1.0)) @ x
        x.data = np.log1p(x.data)
        blocks.append(x)
    stacked = sp.vstack(blocks).tocsr()
    mean = np.asarray(stacked.mean(axis=0)).ravel()
    svd = TruncatedSVD(n_components=n_comps, random_state=seed)
    pcs = svd.fit_transform(stacked) - mean @ svd.components_.T
    bounds = np.cumsum([0, *(b.shape[0] for b in blocks)])
    return [pcs[i:j] for i, j in itertools.pairwise(bounds)]


def _rigid_from_plan(
    plan: np.ndarray, x: np.ndarray, y: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rotation and translation that map ``y`` onto ``x`` best under the coupling ``plan``.

    Weighted Procrustes (Kabsch): minimises ``sum_ij P_ij |x_i - (R y_j + t)|^2``.
    Returns ``(R, t, y_aligned)``.
    """
    w = plan.sum()
    mx = plan.sum(axis=1) @ x / w
    my = plan.sum(axis=0) @ y / w
    h = (y - my).T @ plan.T @ (x - mx)
    u, _, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(vt.T @ u.T))
    rot = vt.T @ np.diag([1.0] * (h.shape[0] - 1) + [d]) @ u.T
    t = mx - my @ rot.T
    return rot, t, y @ rot.T + t


@register_section(
    "align",
    "Slice alignment (fused Gromov-Wasserstein)",
    requires=("chronotope.datasets:demo", "chronotope.ot:fused_gromov_wasserstein"),
)
def _section_align(report: Report, ctx: DemoContext) -> None:
    from chronotope import ot

    name, alpha, angle_deg = "breast", 0.5, 30.0
    adata = ctx.dataset(name)
    slice_ids = [str(s) for s in adata.obs["slice"].astype(str).unique()][:2]
    parts = [adata[(adata.obs["slice"].astype(str) == s).to_numpy()] for s in slice_ids]
    with ctx.timer() as t_pca:
        feats = _expression_pcs(parts, n_comps=20, seed=ctx.seed)
    x = np.asarray(parts[0].obsm["spatial"], dtype=np.float64)
    y = np.asarray(parts[1].obsm["spatial"], dtype=np.float64)

    sec = report.add_section(
        "Slice alignment (fused Gromov-Wasserstein)",
        text=f"Breast cancer sections {slice_ids[0]} and {slice_ids[1]} ({len(x)} and "
        f"{len(y)} spots) matched by entropic fused Gromov-Wasserstein OT (alpha = {alpha}: "
        "expression distance on a joint 20-component PCA of log-normalised shared genes, "
        "plus spot-to-spot distances within each slice). A rigid motion fitted to the plan "
        f"(weighted Procrustes) aligns section {slice_ids[1]} onto section {slice_ids[0]}. "
        f"Known-answer check: section {slice_ids[1]} is also rotated by {angle_deg:g}° and "
        "shifted, and aligned again; the rotation found must change by the same angle.",
    )

    def align(yy: np.ndarray) -> tuple[Any, np.ndarray, np.ndarray, float, float]:
        with ctx.timer() as t:
            out = ot.fused_gromov_wasserstein(
                x, yy, features_x=feats[0], features_y=feats[1], alpha=alpha, device=ctx.device
            )
        plan = out.dense_plan().detach().cpu().numpy().astype(np.float64)
        rot, _, y_aligned = _rigid_from_plan(plan, x, yy)
        angle = float(np.rad2deg(np.arctan2(rot[1, 0], rot[0, 0])))
        return out, plan, y_aligned, angle, t.seconds

    theta = np.deg2rad(angle_deg)
    rot_known = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    y_moved = (y - y.mean(axis=0)) @ rot_known.T + y.mean(axis=0) + np.array([8.0, -5.0])
    out, plan, y_aligned, angle, seconds = align(y)
    angle_moved = align(y_moved)[3]
    best = plan.argmax(axis=1)
    row_mass = plan.sum(axis=1)
    undone = (angle - angle_moved + 180.0) % 360.0 - 180.0
    sec.add_metrics(
        {
            "FGW time (s)": round(seconds, 3),
            "PCA time (s)": round(t_pca.seconds, 3),
            "converged": bool(out.converged),
            "outer iterations": int(out.n_outer),
            "FGW cost": float(out.fgw_cost),
            "transported mass": float(plan.sum()),
            "row-marginal max relative error": float(np.abs(row_mass * len(x) - 1.0).max()),
            "mass on each spot's best match (mean)": float(
                (plan[np.arange(len(x)), best] / np.maximum(row_mass, 1e-300)).mean()
            ),
            "rotation found (deg)": round(angle, 2),
            "mean distance to best match, before (spot units)": float(
                np.linalg.norm(x - y[best], axis=1).mean()
            ),
            "mean distance to best match, after (spot units)": float(
                np.linalg.norm(x - y_aligned[best], axis=1).mean()
            ),
            "check: rotation applied (deg)": angle_deg,
            "check: rotation undone (deg)": round(undone, 2),
        }
    )
    fig, axes = _figure(1, 2, size=(4.4, 4.2))
    for ax, yy, title in ((axes[0, 0], y, "as given"), (axes[0, 1], y_aligned, "aligned")):
        ax.scatter(x[:, 0], x[:, 1], s=18, c="#0072B2", alpha=0.6, label=f"slice {slice_ids[0]}")
        ax.scatter(yy[:, 0], yy[:, 1], s=18, c="#D55E00", alpha=0.6, label=f"slice {slice_ids[1]}")
        ax.set_aspect("equal")
        ax.invert_yaxis()
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].legend(frameon=False, fontsize="small", loc="upper left")
    sec.add_figure(
        fig,
        f"Sections {slice_ids[0]} and {slice_ids[1]} overlaid before and after alignment",
    )


register_section(
    "slices",
    "Slices: alignment and interpolation",
    "chronotope.slices._demo:demo_section",
    requires=("chronotope.datasets:demo", "chronotope.tl:interpolate_slices"),
)

register_section(
    "domains",
    "Spatial domains (graph contrastive encoder)",
    "chronotope.domains._demo:demo_section",
    requires=("chronotope.datasets:demo", "chronotope.tl:spatial_domains"),
)

register_section(
    "dynamics",
    "Dynamics: velocity, growth, landscape, fate",
    "chronotope.dynamics._demo:demo_section",
    requires=("chronotope.datasets:demo", "chronotope.tl:fit_dynamics"),
)

register_section(
    "rank",
    "Relative expression (STRank losses)",
    "chronotope.rank._demo:demo_section",
    requires=("chronotope.rank:simulate", "chronotope.tl:rank_fit"),
)

register_section(
    "undiffuse",
    "Diffusion correction (Richardson-Lucy / EM, semi-relaxed OT)",
    "chronotope.undiffuse._demo:demo_section",
    requires=("chronotope.datasets:demo", "chronotope.tl:undiffuse"),
)
