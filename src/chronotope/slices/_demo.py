"""``chronotope demo`` section: align and interpolate the embedded breast sections."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from chronotope.demo import DemoContext
    from chronotope.report import Report


def _pearson_by_gene(x: np.ndarray, y: np.ndarray) -> float:
    x = x - x.mean(0)
    y = y - y.mean(0)
    den = np.sqrt((x * x).sum(0) * (y * y).sum(0))
    ok = den > 0
    return float(np.median((x * y).sum(0)[ok] / den[ok]))


def demo_section(report: Report, ctx: DemoContext) -> None:
    """Align section 2 onto 1 (with a known rotation), generate 2 from 1 and 3."""
    from scipy.spatial import cKDTree

    from chronotope import pl, tl
    from chronotope.tl._slices import _log_normalised

    data = ctx.dataset("breast")
    ids = [str(s) for s in data.obs["slice"].astype(str).unique()][:3]
    s1, s2, s3 = (data[(data.obs["slice"].astype(str) == s).to_numpy()].copy() for s in ids)
    sec = report.add_section(
        "Slices: alignment and interpolation",
        text=f"Breast cancer sections {ids[0]}-{ids[2]}. Alignment "
        "(tl.align_slices): fused Gromov-Wasserstein between spatial patches on a joint PCA "
        "of the shared genes, a rigid transform, then a sparse spot-level plan; section "
        f"{ids[1]} is also rotated by 30° and aligned again (the rotation found must change "
        f"by 30°). Interpolation (tl.interpolate_slices): section {ids[1]} is generated "
        f"from {ids[0]} and {ids[2]} at t = 0.5 on its own spots and compared with the real "
        f"one, against copying section {ids[0]}.",
    )
    with ctx.timer() as t_align:
        (plan,) = tl.align_slices([s1, s2], seed=ctx.seed, device=ctx.device)
    angle = _angle(s2.uns["alignment"]["transform"]["rotation"])
    moved = s2.copy()
    xy = np.asarray(moved.obsm["spatial"], float)
    th = np.radians(30.0)
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    moved.obsm["spatial"] = (xy - xy.mean(0)) @ rot.T + xy.mean(0) + np.array([8.0, -5.0])
    tl.align_slices([s1.copy(), moved], seed=ctx.seed, device=ctx.device)
    undone = (angle - _angle(moved.uns["alignment"]["transform"]["rotation"]) + 180) % 360 - 180
    with ctx.timer() as t_interp:
        gen = tl.interpolate_slices(s1, s3, t=0.5, seed=ctx.seed, device=ctx.device)
    real_xy = s2.obsm["spatial_aligned"]
    genes = gen.var_names[gen.var_names.isin(s2.var_names) & gen.var_names.isin(s1.var_names)]
    truth = _log_normalised(s2[:, genes].X).toarray()
    top = np.sort(np.argsort(-truth.mean(0))[:500])
    nn_gen = cKDTree(gen.obsm["spatial"]).query(real_xy)[1]
    nn_copy = cKDTree(np.asarray(s1.obsm["spatial"], float)).query(real_xy)[1]
    r_gen = _pearson_by_gene(truth[:, top], np.asarray(gen[:, genes].X)[nn_gen][:, top])
    copy = _log_normalised(s1[:, genes].X).toarray()[nn_copy]
    r_copy = _pearson_by_gene(truth[:, top], copy[:, top])
    sec.add_metrics(
        {
            "alignment time (s)": round(t_align.seconds, 2),
            "rotation found (deg)": round(angle, 2),
            "check: rotation undone (deg, applied 30)": round(undone, 2),
            "plan mass kept": round(float(plan.sum()), 3),
            "interpolation time (s)": round(t_interp.seconds, 2),
            "generated spots (real section)": f"{gen.n_obs} ({s2.n_obs})",
            "median gene Pearson, generated vs real": round(r_gen, 3),
            f"median gene Pearson, copy of section {ids[0]} vs real": round(r_copy, 3),
        }
    )
    sec.add_figure(pl.alignment(s1, s2, plan), f"Section {ids[1]} onto {ids[0]}")
    s3c = s3.copy()
    tl.align_slices([s1.copy(), s3c], seed=ctx.seed, device=ctx.device)
    sec.add_figure(
        pl.interpolation(s1, gen, s3c, truth=s2),
        f"Section {ids[1]} generated from {ids[0]} and {ids[2]}, beside the real one",
    )


def _angle(rot: np.ndarray) -> float:
    rot = np.asarray(rot)
    return float(np.degrees(np.arctan2(rot[1, 0], rot[0, 0])))
