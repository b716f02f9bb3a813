"""Dynamics on AnnData: fit velocity / growth / landscape, then fate, ancestry, perturbation.

Every function takes ``adata`` first and writes to fixed, h5ad-writable places, with its
parameters in ``uns[key_added]["params"]``. The model is returned by
:func:`fit_dynamics` and passed to the read-outs (or a folder saved with
``model.save``).
"""

from __future__ import annotations

import logging
import os
import time as _time
from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from chronotope._errors import ChronotopeInputError
from chronotope.dynamics import readouts as ro
from chronotope.dynamics._anndata import gene_map_from_adata, read_snapshots
from chronotope.dynamics.genemaps import NeuralGeneMap
from chronotope.dynamics.model import DynamicsModel, DynamicsParams, GeneMap
from chronotope.parallel import Scheduler, check_scheduler, describe_scheduler

if TYPE_CHECKING:
    import torch
    from anndata import AnnData

__all__ = [
    "ancestry",
    "dynamics_genes",
    "fate",
    "fit_dynamics",
    "jacobian_grn",
    "landscape",
    "perturb",
    "predict_dynamics",
]

logger = logging.getLogger("chronotope")

ModelLike = DynamicsModel | str | os.PathLike


# --------------------------------------------------------------------------- helpers
def match_time(times: np.ndarray, value: float, what: str = "time") -> float:
    """The time point of ``times`` equal to ``value`` up to a relative 1e-6 tolerance."""
    times = np.asarray(times, dtype=np.float64)
    v = float(value)
    hit = np.isclose(times, v, rtol=1e-6, atol=1e-9)
    if not hit.any():
        have = ", ".join(f"{t:g}" for t in times)
        raise ChronotopeInputError(f"{what} {v:g} is not a time point of the data ({have}).")
    return float(times[np.argmax(hit)])


def _clean(d: dict[str, Any]) -> dict[str, Any]:
    """Drop ``None`` values and make tuples lists, so that ``uns`` writes to h5ad."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if v is None:
            continue
        if isinstance(v, tuple):
            v = list(v)
        out[str(k)] = v
    return out


def _model(model: ModelLike, device: str | torch.device | None = "cpu") -> DynamicsModel:
    if isinstance(model, DynamicsModel):
        return model
    if isinstance(model, (str, os.PathLike)):
        return DynamicsModel.load(model, device=device)
    raise ChronotopeInputError(
        f"model must be a DynamicsModel or the folder of a saved one, got {type(model).__name__}."
    )


def _snapshots(
    adata: AnnData, model: DynamicsModel, time_key: str | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    key = time_key or model.time_key
    if key is None:
        raise ChronotopeInputError("the model records no time_key; pass time_key=.")
    x, t = read_snapshots(adata, key, model.use_rep)
    if model.dim is not None and x.shape[1] != model.dim:
        raise ChronotopeInputError(
            f"the model was trained in {model.dim} dimensions but adata {model.use_rep!r} "
            f"has {x.shape[1]}."
        )
    try:
        t = np.asarray(t, dtype=np.float64)
    except (TypeError, ValueError):
        raise ChronotopeInputError(
            f"adata.obs[{key!r}] must be numeric (map labels such as 'day2' to numbers)."
        ) from None
    if not np.isfinite(x).all() or not np.isfinite(t).all():
        raise ChronotopeInputError(f"NaN or infinite values in {model.use_rep!r} or {key!r}.")
    return x, t, np.unique(t), key


def _labels(adata: AnnData, groupby: str, mask: np.ndarray) -> np.ndarray:
    if groupby not in adata.obs:
        have = ", ".join(map(repr, list(adata.obs.columns)[:10])) or "none"
        raise ChronotopeInputError(f"adata.obs[{groupby!r}] not found (have: {have}).")
    col = adata.obs[groupby].to_numpy()[mask]
    ok = pd.notna(col)
    if not ok.all():
        raise ChronotopeInputError(
            f"adata.obs[{groupby!r}] has {int((~ok).sum())} missing label(s) at the labelled "
            "time point."
        )
    return col.astype(str)


def _subsample(idx: np.ndarray, max_cells: int | None, seed: int | None) -> np.ndarray:
    if max_cells is None or idx.size <= max_cells:
        return idx
    if max_cells < 1:
        raise ChronotopeInputError(f"max_cells must be >= 1, got {max_cells}.")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(idx, size=int(max_cells), replace=False))


def _cells(adata: AnnData, cells: str | np.ndarray | Sequence[int] | None) -> np.ndarray | None:
    """Boolean mask from an ``obs`` boolean column, a mask or indices (``None``: all)."""
    if cells is None:
        return None
    if isinstance(cells, str):
        if cells not in adata.obs:
            raise ChronotopeInputError(f"adata.obs[{cells!r}] not found.")
        arr = adata.obs[cells].to_numpy()
        if arr.dtype != bool:
            raise ChronotopeInputError(f"adata.obs[{cells!r}] must be boolean.")
        return arr
    arr = np.asarray(cells)
    if arr.dtype == bool:
        if arr.shape != (adata.n_obs,):
            raise ChronotopeInputError(f"a cell mask must have {adata.n_obs} entries.")
        return arr
    mask = np.zeros(adata.n_obs, dtype=bool)
    mask[arr.astype(np.int64)] = True
    return mask


def _full(n: int, idx: np.ndarray, values: np.ndarray) -> np.ndarray:
    out = np.full((n, *values.shape[1:]), np.nan, dtype=np.float64)
    out[idx] = values
    return out


def _top_category(
    probs: np.ndarray, classes: np.ndarray, n: int, idx: np.ndarray
) -> pd.Categorical:
    codes = np.full(n, -1, dtype=np.int64)
    if len(classes):
        codes[idx] = np.argmax(probs, axis=1)
    return pd.Categorical.from_codes(codes, categories=[str(c) for c in classes])


# --------------------------------------------------------------------------- fit
def fit_dynamics(
    adata: AnnData,
    time_key: str = "time",
    use_rep: str = "X_pca",
    *,
    holdout: float | Sequence[float] | None = None,
    gene_map: GeneMap | NeuralGeneMap | Literal["auto"] | None = "auto",
    masses: Sequence[float] | Literal["counts", "equal"] | None = None,
    growth_prior_key: str | None = None,
    params: DynamicsParams | None = None,
    n_steps: int | None = None,
    sigma: float | None = None,
    epsilon: float | None = None,
    tau_a: float | None = None,
    path_weight: str | None = None,
    growth_neighbors: int | None = None,
    extrapolate: str | None = None,
    relaxation: float | None = None,
    damped_growth: bool | None = None,
    jacobian_weight: float | str | None = None,
    finetune_steps: int = 0,
    finetune_rollouts: str = "intervals",
    seed: int = 0,
    device: str | torch.device | None = "cpu",
    scheduler: Scheduler = None,
    progress: bool = False,
    key_added: str = "dynamics",
) -> DynamicsModel:
    """Learn velocity, growth and landscape from time snapshots (simulation-free RUOT).

    Parameters
    ----------
    adata
        Cells of all time points.
    time_key
        ``obs`` column with numeric times.
    use_rep
        ``obsm`` key of the representation (e.g. ``"X_pca"``), or ``"X"`` for a
        low-dimensional ``.X``.
    holdout
        Time point(s) left out of training (matched to the data's times up to 1e-6).
    gene_map
        Map back to genes; ``"auto"``: PCA loadings for ``"X_pca"`` (``varm["PCs"]``),
        the identity for ``"X"``, none otherwise. A user-supplied non-linear decoder
        (e.g. of a VAE latent): a :class:`~chronotope.dynamics.NeuralGeneMap`.
    masses
        Relative population size per (training) time point. ``None`` or ``"counts"``
        (default): the cell counts; ``"equal"``: the same at every time point (counts of
        cells measured rather than population sizes).
    growth_prior_key
        ``obs`` column with a prior growth rate per cell.
    params
        Hyperparameters (:class:`~chronotope.dynamics.DynamicsParams`); ``n_steps``,
        ``sigma``, ``epsilon``, ``tau_a``, ``path_weight`` and ``seed`` override single
        fields.
    n_steps, sigma, epsilon, tau_a, path_weight, seed
        See :class:`~chronotope.dynamics.DynamicsParams` (``path_weight="mass"``: train
        over the unbalanced path measure, for data with strong differential growth).
    growth_neighbors
        ``DynamicsParams.growth_neighbors`` (default 50): each interval's couplings are
        solved again around a growth prior regressed, by cell state, on the other
        intervals' growth; 0 reads each interval's growth from its own relaxed plan.
    extrapolate
        The model's continuation past its training times (``DynamicsParams.extrapolate``):
        ``"auto"`` (the default: chosen by backtesting on the last training time point,
        ``"damped"`` at several relaxation times; one more, smaller fit), or one of
        ``"landscape"``, ``"rest"``, ``"continue"``, ``"damped"`` (the last fields'
        transport decays with relaxation time ``relaxation``, growth goes on).
    relaxation
        Relaxation time of ``"damped"`` in units of the last training interval
        (``DynamicsParams.relaxation``, default 1).
    damped_growth
        Whether the end's growth rates act in ``"damped"`` (``DynamicsParams.damped_growth``,
        default ``True``; with ``"auto"`` the backtest chooses).
    jacobian_weight
        Weight of the penalty on the velocity's Jacobian (``DynamicsParams.jacobian_weight``,
        default 0: none), for long chains of intervals; ``"auto"`` chooses it among
        ``JACOBIAN_WEIGHTS`` from the training data (one training per weight; the choice
        and the scores are in ``uns[key_added]``).
    finetune_steps
        Steps of the optional rollout fine-tune of velocity and growth (velocity only
        with ``"chained"``; unbalanced Sinkhorn divergence + WFR action,
        :func:`~chronotope.dynamics.finetune.finetune_rollouts`); 0: none.
    finetune_rollouts
        Rollouts of the fine-tune: ``"intervals"`` (each interval from its own cells) or
        ``"chained"`` (from the first time point across every interval).
    device
        Torch device (``"cpu"``, ``"cuda"``; ``None``: CUDA if available).
    scheduler
        Where the per-interval couplings are solved: ``None`` (in-process), ``"local:N"``
        (a local Dask cluster of ``N`` workers), a Dask scheduler address or a
        ``distributed.Client`` (see :func:`chronotope.parallel.parallel_map`); the same
        couplings on every scheduler. Training stays in this process.
    progress
        Show a progress bar over the training steps.
    key_added
        Key of ``uns`` for the record of the fit.

    Returns
    -------
    DynamicsModel
        The fitted model. Written to ``adata`` (every cell at its own time):
        ``obsm[f"velocity_{use_rep}"]`` (probability-flow velocity),
        ``obs["growth_rate"]`` (per unit time), ``obs["potential"]`` (landscape ``U``,
        shifted to minimum 0 within each time point), and ``uns[key_added]``
        (``params``, ``sigma``, ``times``, ``masses``, ``timings``, ``velocity_key``).
    """
    tic = _time.perf_counter()
    if finetune_steps < 0:
        raise ChronotopeInputError(f"finetune_steps must be >= 0, got {finetune_steps}.")
    from chronotope.dynamics.finetune import ROLLOUTS

    if finetune_rollouts not in ROLLOUTS:  # before the fit, not after it
        raise ChronotopeInputError(
            f"finetune_rollouts must be 'intervals' or 'chained', got {finetune_rollouts!r}."
        )
    check_scheduler(scheduler)
    x, t = read_snapshots(adata, time_key, use_rep)
    # the core checks numeric, finite times and enough cells per time point
    from chronotope.dynamics._validate import check_snapshots

    base = params or DynamicsParams()
    over = {
        k: v
        for k, v in {
            "n_steps": n_steps,
            "sigma": sigma,
            "epsilon": epsilon,
            "tau_a": tau_a,
            "path_weight": path_weight,
            "growth_neighbors": growth_neighbors,
            "extrapolate": extrapolate,
            "relaxation": relaxation,
            "damped_growth": damped_growth,
            "jacobian_weight": jacobian_weight,
        }.items()
        if v is not None
    }
    over["seed"] = int(seed)
    p = DynamicsParams(**{**asdict(base), **over})
    x, t, times = check_snapshots(x, t, min_cells=p.min_cells, name=f"adata {use_rep!r}")
    train = np.ones(t.shape[0], dtype=bool)
    held: list[float] = []
    if holdout is not None:
        for h in np.atleast_1d(np.asarray(holdout, dtype=np.float64)):
            tv = match_time(times, h, "holdout")
            held.append(tv)
            train &= t != tv
    prior = None
    if growth_prior_key is not None:
        if growth_prior_key not in adata.obs:
            raise ChronotopeInputError(f"adata.obs[{growth_prior_key!r}] not found.")
        prior = np.asarray(adata.obs[growth_prior_key], dtype=np.float64)[train]
    gm = gene_map_from_adata(adata, use_rep) if gene_map == "auto" else gene_map
    model = DynamicsModel(p, use_rep=use_rep, gene_map=gm, time_key=time_key, device=device)
    x_train, t_train = x[train], t[train]
    model.fit(
        x_train,
        t_train,
        masses=masses,
        growth_prior=prior,
        progress=progress,
        scheduler=scheduler,
    )
    if finetune_steps:
        from chronotope.dynamics.finetune import finetune_rollouts as _finetune

        tic_ft = _time.perf_counter()
        _finetune(
            model,
            x_train,
            t_train,
            n_steps=finetune_steps,
            rollouts=finetune_rollouts,
            seed=seed,
            progress=progress,
        )
        model.timings_["finetune"] = _time.perf_counter() - tic_ft
    fields = ro.cell_fields(model, x, t)
    pot = fields["potential"]
    for tv in times:
        m = t == tv
        pot[m] -= pot[m].min()
    vkey = f"velocity_{use_rep}"
    adata.obsm[vkey] = fields["velocity"].astype(np.float32)
    adata.obs["growth_rate"] = fields["growth"]
    adata.obs["potential"] = pot
    adata.uns[key_added] = {
        "params": _clean(
            {
                "time_key": time_key,
                "use_rep": use_rep,
                "holdout": held or None,
                "growth_prior_key": growth_prior_key,
                "gene_map": "none" if gm is None else f"{gm.n_genes} genes",
                "device": str(model.device),
                "finetune_steps": int(finetune_steps),
                "finetune_rollouts": finetune_rollouts,
                "scheduler": describe_scheduler(scheduler),
                **asdict(p),
            }
        ),
        "sigma": float(model.sigma_ or 0.0),
        "times": np.asarray(model.times_, dtype=np.float64),
        "masses": np.asarray(model.masses_, dtype=np.float64),
        "timings": {k: float(v) for k, v in model.timings_.items()},
        "extrapolate": model.extrapolate_,
        "relaxation": float(model.relaxation_),
        "damped_growth": bool(model.damped_growth_),
        "extrapolation_scores": {k: float(v) for k, v in model.extrapolation_scores_.items()},
        "jacobian_weight": float(model.jacobian_weight_),
        "jacobian_scores": {k: float(v) for k, v in model.jacobian_scores_.items()},
        "loss": np.asarray(model.history_.get("loss", []), dtype=np.float32),
        "velocity_key": vkey,
        "seconds": float(_time.perf_counter() - tic),
    }
    logger.info(
        "fit_dynamics: %d cells, %d time points (%s held out), sigma %.3g, %.1f s",
        int(train.sum()),
        len(model.times_),
        ", ".join(f"{v:g}" for v in held) or "none",
        model.sigma_,
        adata.uns[key_added]["seconds"],
    )
    return model


# --------------------------------------------------------------------------- fate
def _sta_times(
    times: np.ndarray, start_time: float | None, target_time: float | None
) -> tuple[float, float]:
    t0 = float(times[0]) if start_time is None else match_time(times, start_time, "start_time")
    t1 = float(times[-1]) if target_time is None else match_time(times, target_time, "target_time")
    return t0, t1


def _forward_sta_inputs(
    adata: AnnData,
    model: ModelLike,
    groupby: str,
    start_time: float | None,
    target_time: float | None,
    time_key: str | None,
    max_cells: int | None,
    seed: int,
) -> tuple[DynamicsModel, np.ndarray, str, float, float, np.ndarray, np.ndarray, np.ndarray]:
    """Model, cells, time key, start / target times, target mask, labels, start cells."""
    m = _model(model)
    x, t, times, tkey = _snapshots(adata, m, time_key)
    t0, t1 = _sta_times(times, start_time, target_time)
    ref_mask = t == t1
    labels = _labels(adata, groupby, ref_mask)
    idx = _subsample(np.flatnonzero(t == t0), max_cells, seed)
    return m, x, tkey, t0, t1, ref_mask, labels, idx


def fate(
    adata: AnnData,
    model: ModelLike,
    *,
    groupby: str,
    start_time: float | None = None,
    target_time: float | None = None,
    time_key: str | None = None,
    n_particles: int = 10,
    n_neighbors: int = 15,
    method: Literal["ode", "sde"] = "sde",
    n_boot: int = 100,
    ci: float = 0.9,
    max_cells: int | None = 2000,
    seed: int = 0,
    key_added: str = "fate",
) -> None:
    """Forward stochastic trajectory analysis: fate probabilities of the start cells.

    Each start cell sends ``n_particles`` SDE paths to ``target_time``; each particle
    takes the label fractions of its ``n_neighbors`` nearest labelled cells there, and a
    cell's fate is the mass-weighted mean (bootstrap percentile intervals over particles).

    Parameters
    ----------
    adata
        Cells of all time points, in the model's representation.
    model
        A fitted :class:`~chronotope.dynamics.DynamicsModel` or the folder of a saved one.
    groupby
        ``obs`` column with the labels of the cells at ``target_time``.
    start_time, target_time
        Time points (default: first and last of the data).
    time_key
        ``obs`` time column (default: the model's).
    n_particles, n_neighbors, method, n_boot, ci
        See :func:`chronotope.dynamics.readouts.fate_probabilities`.
    max_cells
        At most this many start cells (a seeded subsample; the others get NaN).
    seed
        Seed of the subsample, the SDE noise and the bootstrap.
    key_added
        Output keys.

    Returns
    -------
    None
        Writes ``obsm[key_added]`` (``n_obs x C`` probabilities, NaN for cells not
        started), ``obsm[f"{key_added}_lower"]`` / ``obsm[f"{key_added}_upper"]``,
        ``obs[key_added]`` (most likely fate, categorical), ``obs[f"{key_added}_mass"]``,
        and ``uns[key_added]`` (``params``, ``classes``, ``distribution``).
    """
    m, x, tkey, t0, t1, ref_mask, labels, idx = _forward_sta_inputs(
        adata, model, groupby, start_time, target_time, time_key, max_cells, seed
    )
    res = ro.fate_probabilities(
        m,
        x[idx],
        t0,
        t1,
        x[ref_mask],
        labels,
        n_particles=n_particles,
        n_neighbors=n_neighbors,
        method=method,
        n_boot=n_boot,
        ci=ci,
        seed=seed,
    )
    n = adata.n_obs
    adata.obsm[key_added] = _full(n, idx, res.probabilities)
    adata.obsm[f"{key_added}_lower"] = _full(n, idx, res.lower)
    adata.obsm[f"{key_added}_upper"] = _full(n, idx, res.upper)
    adata.obs[key_added] = _top_category(res.probabilities, res.classes, n, idx)
    adata.obs[f"{key_added}_mass"] = _full(n, idx, res.mass)
    adata.uns[key_added] = {
        "params": _clean(
            {
                "groupby": groupby,
                "time_key": tkey,
                "start_time": t0,
                "target_time": t1,
                "n_particles": n_particles,
                "n_neighbors": n_neighbors,
                "method": method,
                "n_boot": n_boot,
                "ci": ci,
                "max_cells": max_cells,
                "seed": seed,
            }
        ),
        "classes": np.asarray(res.classes, dtype=str),
        "distribution": res.distribution,
        "n_cells": int(idx.size),
    }


def ancestry(
    adata: AnnData,
    model: ModelLike,
    *,
    cells: str | np.ndarray | Sequence[int] | None = None,
    groupby: str | None = None,
    end_time: float | None = None,
    source_time: float | None = None,
    time_key: str | None = None,
    n_particles: int = 10,
    n_neighbors: int = 15,
    method: Literal["ode", "sde"] = "sde",
    max_cells: int | None = 2000,
    seed: int = 0,
    key_added: str = "ancestry",
) -> None:
    """Backward stochastic trajectory analysis: ancestors of chosen cells.

    Reverse-time SDE paths run from the chosen cells at ``end_time`` back to
    ``source_time``; their mass is spread over the nearest cells of that snapshot.

    Parameters
    ----------
    adata
        Cells of all time points, in the model's representation.
    model
        A fitted model or the folder of a saved one.
    cells
        Which cells at ``end_time`` to trace: an ``obs`` boolean column, a boolean mask or
        indices (default: all cells at ``end_time``, subsampled to ``max_cells``).
    groupby
        ``obs`` column with labels at ``source_time`` (optional).
    end_time, source_time
        Time points (default: last and first of the data).
    time_key
        ``obs`` time column (default: the model's).
    n_particles, n_neighbors, method
        See :func:`chronotope.dynamics.readouts.ancestor_distribution`.
    max_cells
        At most this many end cells (a seeded subsample).
    seed
        Seed of the subsample and the noise.
    key_added
        Output keys.

    Returns
    -------
    None
        Writes ``obs[f"{key_added}_weight"]`` (share of the ancestral mass near each cell
        at ``source_time``, sums to 1 there; NaN elsewhere), with ``groupby``
        ``obsm[key_added]`` (per traced cell, its ancestors over the labels; NaN elsewhere),
        and ``uns[key_added]`` (``params``, ``classes``, ``distribution``).
    """
    m = _model(model)
    x, t, times, tkey = _snapshots(adata, m, time_key)
    t1 = float(times[-1]) if end_time is None else match_time(times, end_time, "end_time")
    t0 = float(times[0]) if source_time is None else match_time(times, source_time, "source_time")
    if not t0 < t1:
        raise ChronotopeInputError(f"source_time {t0:g} must be before end_time {t1:g}.")
    sel = t == t1
    mask = _cells(adata, cells)
    if mask is not None:
        if (mask & ~sel).any():
            raise ChronotopeInputError(
                f"{int((mask & ~sel).sum())} chosen cell(s) are not at end_time {t1:g}."
            )
        sel = mask
    idx = _subsample(np.flatnonzero(sel), max_cells, seed)
    if idx.size == 0:
        raise ChronotopeInputError("no cells chosen to trace back.")
    src_mask = t == t0
    labels = _labels(adata, groupby, src_mask) if groupby is not None else None
    res = ro.ancestor_distribution(
        m,
        x[idx],
        t1,
        t0,
        x[src_mask],
        labels,
        n_particles=n_particles,
        n_neighbors=n_neighbors,
        method=method,
        seed=seed,
    )
    n = adata.n_obs
    adata.obs[f"{key_added}_weight"] = _full(n, np.flatnonzero(src_mask), res.cell_weights)
    if labels is not None:
        adata.obsm[key_added] = _full(n, idx, res.probabilities)
    adata.uns[key_added] = {
        "params": _clean(
            {
                "groupby": groupby,
                "time_key": tkey,
                "end_time": t1,
                "source_time": t0,
                "n_particles": n_particles,
                "n_neighbors": n_neighbors,
                "method": method,
                "max_cells": max_cells,
                "seed": seed,
            }
        ),
        "classes": np.asarray(res.classes, dtype=str),
        "distribution": res.distribution if labels is not None else np.zeros(0),
        "n_cells": int(idx.size),
    }


def perturb(
    adata: AnnData,
    model: ModelLike,
    gene: str,
    *,
    groupby: str,
    mode: Literal["knockout", "overexpress"] = "knockout",
    value: float | None = None,
    start_time: float | None = None,
    target_time: float | None = None,
    time_key: str | None = None,
    n_particles: int = 10,
    n_neighbors: int = 15,
    method: Literal["ode", "sde"] = "sde",
    n_boot: int = 100,
    max_cells: int | None = 2000,
    seed: int = 0,
    key_added: str = "perturb",
) -> None:
    """In-silico knock-out or over-expression of ``gene`` and the change of fate.

    The start cells are edited in gene space through the model's gene map (the gene set
    to ``value``, default 0 for a knock-out and the highest level among the start cells
    for an over-expression), re-projected, and pushed with the same noise as the
    unedited cells (see :func:`chronotope.dynamics.readouts.perturb_fate`).

    Parameters
    ----------
    adata
        Cells of all time points, in the model's representation.
    model
        A fitted model with a gene map, or the folder of a saved one.
    gene
        Gene name.
    groupby, start_time, target_time, time_key, n_particles, n_neighbors, method, n_boot
        As in :func:`fate`.
    mode, value
        ``"knockout"`` or ``"overexpress"``, and the level to set.
    max_cells, seed, key_added
        As in :func:`fate`.

    Returns
    -------
    None
        Writes ``obsm[f"{key_added}_shift"]`` (per start cell, perturbed minus baseline
        fate probabilities; NaN elsewhere) and ``uns[key_added]`` (``params``,
        ``classes``, ``baseline``, ``perturbed``, ``shift``, ``value``, ``achieved``).
    """
    m, x, tkey, t0, t1, ref_mask, labels, idx = _forward_sta_inputs(
        adata, model, groupby, start_time, target_time, time_key, max_cells, seed
    )
    res = ro.perturb_fate(
        m,
        x[idx],
        t0,
        t1,
        x[ref_mask],
        labels,
        gene=gene,
        mode=mode,
        value=value,
        n_particles=n_particles,
        n_neighbors=n_neighbors,
        method=method,
        n_boot=n_boot,
        seed=seed,
    )
    n = adata.n_obs
    adata.obsm[f"{key_added}_shift"] = _full(
        n, idx, res.perturbed.probabilities - res.baseline.probabilities
    )
    adata.uns[key_added] = {
        "params": _clean(
            {
                "gene": res.gene,
                "mode": mode,
                "groupby": groupby,
                "time_key": tkey,
                "start_time": t0,
                "target_time": t1,
                "n_particles": n_particles,
                "n_neighbors": n_neighbors,
                "method": method,
                "n_boot": n_boot,
                "max_cells": max_cells,
                "seed": seed,
            }
        ),
        "classes": np.asarray(res.classes, dtype=str),
        "baseline": res.baseline.distribution,
        "perturbed": res.perturbed.distribution,
        "shift": res.shift,
        "value": res.value,
        "achieved": res.achieved,
        "mean_displacement": float(res.displacement.mean()),
    }


# --------------------------------------------------------------------------- landscape
def landscape(
    adata: AnnData,
    model: ModelLike,
    *,
    times: Sequence[float] | None = None,
    time_key: str | None = None,
    dims: tuple[int, int] = (0, 1),
    n_grid: int = 60,
    key_added: str = "landscape",
) -> None:
    """The learned landscape ``U(x, t)`` on cells and on a grid over two dimensions.

    Parameters
    ----------
    adata
        Cells of all time points, in the model's representation.
    model
        A fitted model or the folder of a saved one.
    times
        Times of the grids (default: the data's time points).
    time_key
        ``obs`` time column (default: the model's).
    dims
        Two dimensions of the representation spanned by the grid (the others are held at
        the mean of the cells).
    n_grid
        Grid points per axis.
    key_added
        Output keys.

    Returns
    -------
    None
        Writes ``obs[key_added]`` (``U`` of each cell at its own time, minimum 0 within a
        time point) and ``uns[key_added]`` (``grid_x``, ``grid_y``, ``U`` as
        ``(n_times, n_grid, n_grid)``, ``times``, ``params``).
    """
    m = _model(model)
    x, t, all_times, tkey = _snapshots(adata, m, time_key)
    ts = all_times if times is None else np.asarray(times, dtype=np.float64).ravel()
    pot = ro.cell_fields(m, x, t)["potential"]
    for tv in all_times:
        sel = t == tv
        pot[sel] -= pot[sel].min()
    gx, gy, u = ro.landscape_grid(m, ts, x, dims=dims, n_grid=n_grid)
    adata.obs[key_added] = pot
    adata.uns[key_added] = {
        "params": {"time_key": tkey, "dims": [int(d) for d in dims], "n_grid": int(n_grid)},
        "grid_x": gx,
        "grid_y": gy,
        "U": u.astype(np.float32),
        "times": np.asarray(ts, dtype=np.float64),
    }


# --------------------------------------------------------------------------- genes
def _gene_names(m: DynamicsModel) -> list[str]:
    gm = m.gene_map
    if gm is None:
        return [f"{m.use_rep}_{i}" for i in range(int(m.dim or 0))]
    return gm.var_names or [str(i) for i in range(gm.n_genes)]


def _time_mask(t: np.ndarray, times: np.ndarray, time: float | None) -> np.ndarray:
    if time is None:
        return np.ones(t.shape[0], dtype=bool)
    return t == match_time(times, time, "time")


def jacobian_grn(
    adata: AnnData,
    model: ModelLike,
    *,
    time: float | None = None,
    time_key: str | None = None,
    genes: Sequence[str] | None = None,
    n_genes: int = 100,
    n_edges: int = 50,
    max_cells: int | None = 5000,
    seed: int = 0,
    key_added: str = "grn",
) -> None:
    """Gene regulatory network from the cell-averaged Jacobian of the velocity.

    ``J = dv/dx`` is averaged over cells (each at its own time, by autograd) in the
    representation (``d x d``) and mapped to genes as ``L J P`` (``L J L^T`` for PCA
    loadings); ``J_gene[a, b] = d v_a / d gene_b`` is the signed edge ``b -> a``.

    Parameters
    ----------
    adata
        Cells of all time points, in the model's representation.
    model
        A fitted model or the folder of a saved one. Without a gene map the network is
        over the dimensions of the representation.
    time
        Average over the cells of this time point only (default: all cells).
    time_key
        ``obs`` time column (default: the model's).
    genes
        Genes of the network (default: the ``n_genes`` with the largest loadings norm).
    n_genes
        Size of the default gene set.
    n_edges
        Strongest edges (by ``|J_gene|``, self-loops excluded) listed.
    max_cells
        At most this many cells in the average (a seeded subsample).
    seed
        Seed of the subsample.
    key_added
        Output keys.

    Returns
    -------
    None
        Writes ``uns[key_added]``: ``jacobian_rep`` (``d x d``), ``genes``, ``jacobian``
        (genes x genes), ``edges`` (``source``, ``target``, ``weight``), ``params``.
    """
    m = _model(model)
    x, t, times, tkey = _snapshots(adata, m, time_key)
    idx = _subsample(np.flatnonzero(_time_mask(t, times, time)), max_cells, seed)
    j = ro.mean_jacobian(m, x[idx], t[idx])
    names = np.asarray(_gene_names(m))
    neural = isinstance(m.gene_map, NeuralGeneMap)
    cells = {"x": x[idx], "time": t[idx]} if neural else {}
    if m.gene_map is None:
        if genes is not None:
            raise ChronotopeInputError("the model has no gene map; genes= cannot be used.")
        gidx, jg = np.arange(j.shape[0]), j
    else:
        if genes is None:
            if neural:
                norm = m.gene_map.gene_scale(x[idx])
            else:
                norm = np.linalg.norm(m.gene_map.loadings, axis=1)
            keep = min(int(n_genes), int((norm > 0).sum()))
            sel = np.sort(np.argsort(-norm, kind="stable")[:keep])
            gidx, jg = ro.gene_jacobian(m, j, genes=sel.tolist(), **cells)
        else:
            gidx, jg = ro.gene_jacobian(m, j, genes=list(genes), **cells)
    sub = names[gidx]
    edges = ro.grn_edges(jg, sub, n_edges=n_edges)
    adata.uns[key_added] = {
        "params": _clean(
            {
                "time": None if time is None else float(time),
                "time_key": tkey,
                "n_genes": len(gidx),
                "n_edges": int(n_edges),
                "max_cells": max_cells,
                "seed": seed,
            }
        ),
        "jacobian_rep": j,
        "genes": sub.astype(str),
        "jacobian": jg,
        "edges": {
            "source": edges.source.astype(str),
            "target": edges.target.astype(str),
            "weight": edges.weight,
        },
    }


def dynamics_genes(
    adata: AnnData,
    model: ModelLike,
    *,
    time_key: str | None = None,
    start_time: float | None = None,
    end_time: float | None = None,
    n_times: int = 20,
    max_cells: int | None = 2000,
    seed: int = 0,
    key_added: str = "dynamics_genes",
) -> None:
    """Growth-related genes (``d g / d gene``) and genes correlated with time along paths.

    Parameters
    ----------
    adata
        Cells of all time points, in the model's representation.
    model
        A fitted model with a gene map, or the folder of a saved one.
    time_key
        ``obs`` time column (default: the model's).
    start_time, end_time
        Trajectories (ODE) run from the cells of ``start_time`` to ``end_time`` (default:
        first and last time points).
    n_times
        Recorded times along the trajectories.
    max_cells
        At most this many cells in the growth average and as trajectory starts.
    seed
        Seed of the subsamples.
    key_added
        Output keys.

    Returns
    -------
    None
        Writes ``var[f"{key_added}_growth"]`` (mean ``dg/dgene`` over all cells, per unit
        time per unit of expression), ``var[f"{key_added}_time_corr"]`` (Pearson
        correlation with time along the trajectories), genes outside the model's gene map
        NaN, and ``uns[key_added]["params"]``.
    """
    m = _model(model)
    if m.gene_map is None:
        raise ChronotopeInputError(
            f"the model has no gene map (representation {m.use_rep!r}); growth and time genes "
            "need one (e.g. PCA loadings)."
        )
    x, t, times, tkey = _snapshots(adata, m, time_key)
    t0, t1 = _sta_times(times, start_time, end_time)
    idx = _subsample(np.arange(x.shape[0]), max_cells, seed)
    _, grad_genes = ro.growth_genes(m, x[idx], t[idx])
    start = _subsample(np.flatnonzero(t == t0), max_cells, seed)
    corr = ro.time_correlated_genes(m, x[start], t0, t1, n_times=n_times)
    names = _gene_names(m)
    pos = pd.Index(names).get_indexer(adata.var_names)
    ok = pos >= 0
    for suffix, vals in (("growth", grad_genes), ("time_corr", corr)):
        col = np.full(adata.n_vars, np.nan)
        col[ok] = vals[pos[ok]]
        adata.var[f"{key_added}_{suffix}"] = col
    adata.uns[key_added] = {
        "params": {
            "time_key": tkey,
            "start_time": t0,
            "end_time": t1,
            "n_times": int(n_times),
            "seed": int(seed),
        }
    }


# --------------------------------------------------------------------------- prediction
def predict_dynamics(
    adata: AnnData,
    model: ModelLike,
    time: float,
    *,
    start_time: float | None = None,
    time_key: str | None = None,
    method: Literal["ode", "sde"] = "sde",
    n_particles: int = 4,
    step_size: float | None = None,
    seed: int = 0,
    device: str | torch.device | None = "cpu",
    extrapolate: Literal["landscape", "rest", "continue", "damped"] | None = None,
    relaxation: float | None = None,
) -> AnnData:
    """Push the cells of the first time point to ``time``: weighted particles, a new AnnData.

    Parameters
    ----------
    adata
        Cells with the model's time column and representation.
    model
        A fitted model or the folder of a saved one.
    time
        Target time; any value (past the last training time the model extrapolates, see
        ``extrapolate``).
    start_time
        Start time point (default: the first of the data).
    time_key
        ``obs`` time column (default: the model's).
    method
        ``"sde"`` (default: samples of the modelled process, drift ``v + D * score``) or
        ``"ode"`` (probability flow: one deterministic path per start cell; the default
        before, ``n_particles=1``).
    n_particles
        Particles per start cell (default 4; SDE draws sample the predicted distribution
        beyond one point per start cell, see ``docs/dynamics.md``).
    step_size
        Integration step (default: the model's).
    seed
        Seed of the SDE noise.
    device
        Device for a model loaded from a folder.
    extrapolate
        Outside the training times: ``None`` (default), the model's own continuation
        (``model.extrapolate_``, set at fit time); ``"landscape"`` (no transport and no
        growth, cells diffuse in the landscape frozen at the training end, so its
        marginal stays), ``"rest"`` (zero drift and growth: diffusion only, the cloud
        spreads), ``"continue"`` (the fields at the last training time keep acting) or
        ``"damped"`` (they act with a decaying transport; growth goes on).
        See :meth:`chronotope.dynamics.DynamicsModel.simulate`.
    relaxation
        Relaxation time of ``"damped"`` (units of the end interval); default the model's
        own (``model.relaxation_``).

    Returns
    -------
    AnnData
        One observation per particle: ``obsm[use_rep]`` (and ``.X`` when ``use_rep`` is
        ``"X"``) the positions in the representation, ``obs["weight"]`` the masses
        (start mass ``1 / n`` per cell, so ``sum`` estimates the population at ``time``
        relative to the start), ``obs[time_key]``, ``obs["start_cell"]``, and
        ``uns["dynamics_prediction"]["params"]``.
    """
    from anndata import AnnData

    m = _model(model, device)
    extrapolate = extrapolate or m.extrapolate_  # type: ignore[assignment]
    relax = float(m.relaxation_ if relaxation is None else relaxation)
    x, t, times, tkey = _snapshots(adata, m, time_key)
    t0 = float(times[0]) if start_time is None else match_time(times, start_time, "start_time")
    tv = float(time)
    if not np.isfinite(tv):
        raise ChronotopeInputError(f"time must be finite, got {time}.")
    if n_particles < 1:
        raise ChronotopeInputError(f"n_particles must be >= 1, got {n_particles}.")
    lo, hi = float(np.min(m.times_)), float(np.max(m.times_))
    if not lo - 1e-9 <= tv <= hi + 1e-9:
        logger.warning(
            "predict_dynamics: time %g is outside the training times [%g, %g]; "
            "extrapolating (%s).",
            tv,
            lo,
            hi,
            extrapolate,
        )
    idx = np.flatnonzero(t == t0)
    x0 = np.repeat(x[idx], n_particles, axis=0)
    res = m.simulate(
        x0,
        t0,
        tv,
        method=method,
        weights=np.full(x0.shape[0], 1.0 / x0.shape[0]),
        step_size=step_size,
        seed=seed,
        extrapolate=extrapolate,
        relaxation=relax,
    )
    xp, wp = res.final
    names = np.repeat(np.asarray(adata.obs_names)[idx], n_particles)
    obs = pd.DataFrame(
        {"weight": wp, tkey: np.full(xp.shape[0], tv), "start_cell": names},
        index=pd.Index([f"p{i}" for i in range(xp.shape[0])]),
    )
    rep = xp.astype(np.float32)
    if m.use_rep == "X":
        out = AnnData(X=rep, obs=obs)
        out.var_names = list(adata.var_names)
    else:
        out = AnnData(obs=obs)
    out.obsm[m.use_rep] = rep
    out.uns["dynamics_prediction"] = {
        "params": {
            "start_time": t0,
            "time": tv,
            "time_key": tkey,
            "use_rep": m.use_rep,
            "method": method,
            "n_particles": int(n_particles),
            "seed": int(seed),
            "extrapolate": extrapolate,
            "relaxation": relax,
        },
        "total_mass": float(wp.sum()),
    }
    return out
