"""``chronotope demo`` section: dynamics of the EMT time course (embedded demo data)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from chronotope.demo import DemoContext
    from chronotope.report import Report

#: Time points (the TGF-beta induction phase, E -> pEMT -> M), cells per time point and
#: training steps: the section runs in well under a minute.
TIMES = (1.0, 2.0, 3.0, 4.0)
N_PER_TIME = 400
N_STEPS = 800


def demo_section(report: Report, ctx: DemoContext) -> None:
    """Fit velocity / growth / landscape on EMT, then fate, ancestry, perturbation, GRN."""
    from chronotope import pl, tl
    from chronotope.dynamics import DynamicsParams

    full = ctx.dataset("emt")
    rng = ctx.rng(5)
    t_all = full.obs["time"].to_numpy()
    times = np.asarray(TIMES)
    idx = np.concatenate(
        [rng.choice(np.flatnonzero(t_all == tv), N_PER_TIME, replace=False) for tv in times]
    )
    adata = full[np.sort(idx)].copy()
    sec = report.add_section(
        "Dynamics: velocity, growth, landscape, fate",
        text=f"EMT mass-cytometry time course (Karacosta 2019; DiffusionOT's 2-D embedding), "
        f"{N_PER_TIME} cells at each of the time points 1-4 (the induction phase; the file's "
        "labels are used as times). Unbalanced entropic couplings between consecutive "
        "snapshots, then simulation-free training of the velocity, growth and potential networks "
        f"({N_STEPS} steps, small networks for the demo). Fate: 8 SDE particles per start "
        "cell from t=1 to t=4, kNN vote on the t=4 cell types, weighted by particle mass; a "
        "consistent model sends the start population onto the observed t=4 composition (TV: "
        "total variation distance between the two). Ancestry: reverse-time SDE from the t=4 "
        "cells back to t=1. Perturbation: "
        "knock-out of the first embedding coordinate (PC1; the embedding is the only "
        "'gene' space of this file). GRN: the cell-averaged Jacobian of the velocity.",
    )
    params = DynamicsParams(hidden=64, n_layers=2, n_steps=N_STEPS, batch_size=256, seed=ctx.seed)
    with ctx.timer() as t_fit:
        model = tl.fit_dynamics(adata, "time", "X", params=params, device=ctx.device)
    sta = {"n_particles": 8, "max_cells": 200, "seed": ctx.seed}
    with ctx.timer() as t_sta:
        tl.fate(adata, model, groupby="cell_type", n_boot=50, **sta)
        tl.ancestry(adata, model, groupby="cell_type", **sta)
        tl.perturb(adata, model, "PC1", groupby="cell_type", n_boot=0, **sta)
    tl.landscape(adata, model, n_grid=50)
    tl.jacobian_grn(adata, model, n_edges=2)
    classes = [str(c) for c in adata.uns["fate"]["classes"]]
    start = adata.obs["time"].to_numpy() == times[0]
    end = adata.obs["time"].to_numpy() == times[-1]
    observed = adata.obs["cell_type"][end].value_counts(normalize=True)
    sec.add_metrics(
        {
            "cells": adata.n_obs,
            "fit time (s)": round(t_fit.seconds, 2),
            "STA + perturbation time (s)": round(t_sta.seconds, 2),
            "sigma": round(float(adata.uns["dynamics"]["sigma"]), 4),
            "predicted fate of t=1 cells": ", ".join(
                f"{c} {p:.2f}"
                for c, p in zip(classes, adata.uns["fate"]["distribution"], strict=True)
            ),
            "observed types at t=4": ", ".join(f"{c} {observed.get(c, 0):.2f}" for c in classes),
            "TV(predicted fate, observed)": round(
                0.5
                * float(
                    np.abs(
                        np.asarray(adata.uns["fate"]["distribution"])
                        - np.array([observed.get(c, 0.0) for c in classes])
                    ).sum()
                ),
                3,
            ),
            "ancestors of t=4 cells": ", ".join(
                f"{c} {p:.2f}"
                for c, p in zip(
                    adata.uns["ancestry"]["classes"],
                    adata.uns["ancestry"]["distribution"],
                    strict=True,
                )
            ),
            "PC1 knock-out: fate shift": ", ".join(
                f"{c} {s:+.2f}" for c, s in zip(classes, adata.uns["perturb"]["shift"], strict=True)
            ),
            "Jacobian dv/dx (rows v1, v2)": "; ".join(
                " ".join(f"{v:+.3f}" for v in row) for row in adata.uns["grn"]["jacobian_rep"]
            ),
            "mean growth rate at t=1 / t=4": f"{adata.obs['growth_rate'][start].mean():+.3f} / "
            f"{adata.obs['growth_rate'][end].mean():+.3f}",
        }
    )
    sec.add_figure(
        pl.velocity_streamlines(adata, color="cell_type"),
        "Learned velocity over the embedding, cells by type",
    )
    sec.add_figure(pl.landscape(adata), "Learned landscape U(x, t) with the cells of each time")
    sec.add_figure(
        pl.fate(adata, groupby="cell_type"),
        "Fate at t=4 of the t=1 cells: population (left), by start type (right)",
    )
    sec.add_figure(pl.perturb(adata), "PC1 knock-out: fate before / after and the shift")
