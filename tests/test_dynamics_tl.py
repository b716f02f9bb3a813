"""AnnData layer and CLI of the dynamics module: tiny fits, fixed keys, h5ad round trips."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import chronotope as ct
from chronotope._errors import ChronotopeInputError
from chronotope.cli import main
from chronotope.dynamics import DynamicsModel, DynamicsParams

TINY = DynamicsParams(hidden=16, n_layers=1, n_steps=30, batch_size=64, n_pairs=500)
TIMES = (0.0, 0.5, 1.25)


def _adata(n: int = 40, seed: int = 0) -> ad.AnnData:
    """Two branches drifting apart in a 3-D PCA of 6 genes, at three float times."""
    rng = np.random.default_rng(seed)
    xs, ts, labs = [], [], []
    for t in TIMES:
        side = rng.integers(0, 2, n)
        x = rng.normal(size=(n, 3)) * 0.3
        x[:, 0] += (2 * side - 1) * 2 * t
        xs.append(x)
        ts.append(np.full(n, t))
        labs.append(np.where(side == 1, "right", "left"))
    x = np.vstack(xs)
    w = np.linalg.qr(rng.normal(size=(6, 3)))[0]
    w[5] = 0.0  # gene "g5" is not in the span of the representation
    genes = x @ w.T + 1.0
    a = ad.AnnData(genes.astype(np.float32))
    a.var_names = [f"g{i}" for i in range(6)]
    a.obs["time"] = np.concatenate(ts)
    a.obs["branch"] = pd.Categorical(np.concatenate(labs))
    a.obsm["X_pca"] = (genes - genes.mean(0)) @ w
    a.varm["PCs"] = w
    return a


@pytest.fixture(scope="module")
def fitted() -> tuple[ad.AnnData, DynamicsModel]:
    a = _adata()
    model = ct.tl.fit_dynamics(a, "time", "X_pca", params=TINY)
    return a, model


def test_fit_dynamics_writes_fixed_keys(fitted, tmp_path) -> None:
    a, model = fitted
    assert a.obsm["velocity_X_pca"].shape == (a.n_obs, 3)
    assert np.isfinite(a.obs["growth_rate"]).all() and np.isfinite(a.obs["potential"]).all()
    for tv in TIMES:
        assert a.obs["potential"][a.obs["time"] == tv].min() == 0.0
    rec = a.uns["dynamics"]
    assert rec["params"]["use_rep"] == "X_pca" and rec["params"]["n_steps"] == 30
    assert rec["velocity_key"] == "velocity_X_pca"
    np.testing.assert_allclose(rec["times"], TIMES)
    assert model.gene_map is not None and model.gene_map.var_names == list(a.var_names)
    np.testing.assert_allclose(
        a.obsm["velocity_X_pca"][:5], model.velocity(a.obsm["X_pca"][:5], 0.0), rtol=1e-5
    )
    a.write_h5ad(tmp_path / "fit.h5ad")
    back = ad.read_h5ad(tmp_path / "fit.h5ad")
    assert back.uns["dynamics"]["params"]["time_key"] == "time"


def test_holdout_and_bad_input() -> None:
    a = _adata()
    model = ct.tl.fit_dynamics(
        a, "time", "X_pca", params=TINY, holdout=0.5 + 1e-9, finetune_steps=2,
        finetune_rollouts="chained",
    )  # fmt: skip
    np.testing.assert_allclose(model.times_, [0.0, 1.25])
    assert "finetune" in model.timings_ and a.uns["dynamics"]["params"]["finetune_steps"] == 2
    assert a.uns["dynamics"]["params"]["finetune_rollouts"] == "chained"
    with pytest.raises(ChronotopeInputError, match="finetune_steps"):
        ct.tl.fit_dynamics(a, "time", "X_pca", params=TINY, finetune_steps=-1)
    with pytest.raises(ChronotopeInputError, match="finetune_rollouts"):
        ct.tl.fit_dynamics(a, "time", "X_pca", params=TINY, finetune_rollouts="all")
    np.testing.assert_allclose(a.uns["dynamics"]["params"]["holdout"], [0.5])
    assert a.obsm["velocity_X_pca"].shape[0] == a.n_obs  # written on held-out cells too
    with pytest.raises(ChronotopeInputError, match="not a time point"):
        ct.tl.fit_dynamics(a, "time", "X_pca", params=TINY, holdout=0.7)
    with pytest.raises(ChronotopeInputError, match="at least two time points"):
        ct.tl.fit_dynamics(a, "time", "X_pca", params=TINY, holdout=[0.5, 1.25])
    b = a.copy()
    b.obs["day"] = np.where(b.obs["time"] > 0, "day2", "day0")
    with pytest.raises(ChronotopeInputError, match="numeric"):
        ct.tl.fit_dynamics(b, "day", "X_pca", params=TINY)
    b.obsm["X_pca"][3, 1] = np.nan
    with pytest.raises(ChronotopeInputError, match="NaN"):
        ct.tl.fit_dynamics(b, "time", "X_pca", params=TINY)
    with pytest.raises(ChronotopeInputError, match="fewer than 10"):
        ct.tl.fit_dynamics(a[a.obs["time"] > 0.2][:45].copy(), "time", "X_pca", params=TINY)
    with pytest.raises(ChronotopeInputError, match="X_umap"):
        ct.tl.fit_dynamics(a, "time", "X_umap", params=TINY)


def test_readouts_on_adata(fitted, tmp_path) -> None:
    a, model = fitted
    a = a.copy()
    ct.tl.fate(a, model, groupby="branch", n_particles=3, n_boot=10)
    start = (a.obs["time"] == 0.0).to_numpy()
    probs = a.obsm["fate"]
    np.testing.assert_allclose(probs[start].sum(1), 1.0)
    assert np.isnan(probs[~start]).all()
    assert list(a.uns["fate"]["classes"]) == ["left", "right"]
    np.testing.assert_allclose(a.uns["fate"]["distribution"].sum(), 1.0)
    assert a.obs["fate"][start].notna().all() and a.obs["fate"][~start].isna().all()

    ct.tl.ancestry(a, model, groupby="branch", n_particles=2)
    w = a.obs["ancestry_weight"].to_numpy()
    np.testing.assert_allclose(np.nansum(w), 1.0)
    assert np.isfinite(w[start]).all() and np.isnan(w[~start]).all()
    with pytest.raises(ChronotopeInputError, match="not at end_time"):
        ct.tl.ancestry(a, model, cells=np.flatnonzero(start)[:3])

    ct.tl.perturb(a, model, "g5", groupby="branch", n_particles=2, n_boot=0)
    np.testing.assert_array_equal(a.uns["perturb"]["shift"], 0.0)  # gene not in the map's span
    assert a.uns["perturb"]["mean_displacement"] == 0.0
    ct.tl.perturb(
        a, model, "g0", groupby="branch", mode="overexpress", n_boot=0, key_added="perturb_g0"
    )
    assert a.uns["perturb_g0"]["mean_displacement"] > 0
    with pytest.raises(ChronotopeInputError, match="not in the model"):
        ct.tl.perturb(a, model, "nope", groupby="branch")

    ct.tl.landscape(a, model, n_grid=8)
    assert a.uns["landscape"]["U"].shape == (3, 8, 8)
    ct.tl.jacobian_grn(a, model, n_edges=5)
    grn = a.uns["grn"]
    assert grn["jacobian_rep"].shape == (3, 3)
    assert "g5" not in list(grn["genes"])  # zero loadings: left out of the default gene set
    assert len(grn["edges"]["weight"]) == 5
    ct.tl.jacobian_grn(a, model, genes=["g0", "g1", "g5"], key_added="grn3")
    np.testing.assert_array_equal(a.uns["grn3"]["jacobian"][2], 0.0)
    ct.tl.dynamics_genes(a, model, n_times=5)
    assert a.var["dynamics_genes_growth"]["g5"] == 0.0
    assert np.all(np.abs(a.var["dynamics_genes_time_corr"]) <= 1)
    with pytest.raises(ChronotopeInputError, match="branchx"):
        ct.tl.fate(a, model, groupby="branchx")
    with pytest.raises(ChronotopeInputError, match="target_time"):
        ct.tl.fate(a, model, groupby="branch", target_time=3.0)
    a.write_h5ad(tmp_path / "readouts.h5ad")
    back = ad.read_h5ad(tmp_path / "readouts.h5ad")
    assert back.obsm["fate"].shape == (a.n_obs, 2)
    assert list(back.uns["grn"]["edges"]["source"]) == list(grn["edges"]["source"])


def _run(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out = capsys.readouterr()
    code = exc.value.code
    return (0 if code is None else int(code)), out.out, out.err


def test_cli_fit_predict_roundtrip(capsys, tmp_path) -> None:
    a = _adata()
    data = tmp_path / "data.h5ad"
    a.write_h5ad(data)
    mdir = tmp_path / "model"
    code, out, err = _run(
        capsys,
        "-q",
        "dynamics",
        "fit",
        str(data),
        "--time-key",
        "time",
        "--use-rep",
        "X_pca",
        "-o",
        str(mdir),
        "--holdout",
        "0.5",
        "--n-steps",
        "20",
        "--seed",
        "1",
        "--path-weight",
        "mass",
    )
    assert code == 0, err
    model = DynamicsModel.load(mdir)
    np.testing.assert_allclose(model.times_, [0.0, 1.25])
    # not quiet: the summary line gives the wall time of every phase
    t0 = np.flatnonzero(a.obs["time"].to_numpy() == 0)
    uneven = tmp_path / "uneven.h5ad"  # half the first time point's cells
    a[np.setdiff1d(np.arange(a.n_obs), t0[: t0.size // 2])].copy().write_h5ad(uneven)
    code, out2, err = _run(
        capsys, "dynamics", "fit", str(uneven), "--use-rep", "X_pca", "-o",
        str(tmp_path / "timed"), "--n-steps", "5", "--masses", "equal",
    )  # fmt: skip
    assert code == 0, err
    assert "wrote" in out2 and "couplings" in out2 and "training" in out2, out2
    # --masses equal: one population size for every time point, not the cell counts
    np.testing.assert_allclose(DynamicsModel.load(tmp_path / "timed").masses_, 1.0)
    assert model.params.n_steps == 20 and model.time_key == "time"
    assert model.params.path_weight == "mass"
    pred = tmp_path / "pred.h5ad"
    code, out, err = _run(
        capsys,
        "dynamics",
        "predict",
        str(mdir),
        str(data),
        "--time",
        "0.5",
        "-o",
        str(pred),
        "--method",
        "ode",
        "--n-particles",
        "1",
    )
    assert code == 0, err
    assert "particles" in out
    p = ad.read_h5ad(pred)
    n0 = int((a.obs["time"] == 0).sum())
    assert p.obsm["X_pca"].shape == (n0, 3) and p.obs["weight"].shape == (n0,)
    assert np.isfinite(p.obsm["X_pca"]).all() and (p.obs["weight"] > 0).all()
    expect = model.simulate(a.obsm["X_pca"][a.obs["time"] == 0], 0.0, 0.5).final[0]
    np.testing.assert_allclose(p.obsm["X_pca"], expect, atol=1e-5)
    # past the last training time (1.25): --extrapolate landscape (default), rest, continue
    x0 = a.obsm["X_pca"][a.obs["time"] == 0]
    ends = {}
    for mode in ("landscape", "rest", "continue"):
        code, _, err = _run(
            capsys, "-q", "dynamics", "predict", str(mdir), str(data), "--time", "2",
            "-o", str(pred), "--method", "ode", "--n-particles", "1", "--extrapolate", mode,
        )  # fmt: skip
        assert code == 0, err
        p = ad.read_h5ad(pred)
        assert p.uns["dynamics_prediction"]["params"]["extrapolate"] == mode
        expect = model.simulate(x0, 0.0, 2.0, extrapolate=mode).final[0]
        np.testing.assert_allclose(p.obsm["X_pca"], expect, atol=1e-5)
        ends[mode] = p.obsm["X_pca"]
    assert np.abs(ends["rest"] - ends["continue"]).max() > 1e-3
    assert np.abs(ends["landscape"] - ends["rest"]).max() > 1e-3
    # damped, with its relaxation time on the command line
    code, _, err = _run(
        capsys, "-q", "dynamics", "predict", str(mdir), str(data), "--time", "2",
        "-o", str(pred), "--method", "ode", "--n-particles", "1", "--extrapolate", "damped",
        "--relaxation", "0.5",
    )  # fmt: skip
    assert code == 0, err
    p = ad.read_h5ad(pred)
    assert p.uns["dynamics_prediction"]["params"]["relaxation"] == 0.5
    expect = model.simulate(x0, 0.0, 2.0, extrapolate="damped", relaxation=0.5).final[0]
    np.testing.assert_allclose(p.obsm["X_pca"], expect, atol=1e-5)
    assert np.abs(p.obsm["X_pca"] - ends["continue"]).max() > 1e-3
    # without --extrapolate, predict uses the model's own (fit default: landscape)
    code, _, err = _run(
        capsys, "-q", "dynamics", "predict", str(mdir), str(data), "--time", "2",
        "-o", str(pred), "--method", "ode", "--n-particles", "1",
    )  # fmt: skip
    assert code == 0, err
    p = ad.read_h5ad(pred)
    assert p.uns["dynamics_prediction"]["params"]["extrapolate"] == "landscape"
    np.testing.assert_allclose(p.obsm["X_pca"], ends["landscape"], atol=1e-6)
    code, _, err = _run(
        capsys, "dynamics", "fit", str(data), "--use-rep", "X_pca", "-o",
        str(tmp_path / "bad"), "--extrapolate", "drift",
    )  # fmt: skip
    assert code == 1 and "extrapolate" in err
    # landscape, probability flow: the particles stop at the last training time
    at_end = model.simulate(x0, 0.0, 1.25).final[0]
    np.testing.assert_allclose(ends["landscape"], at_end, atol=1e-5)
    code, _, err = _run(
        capsys, "dynamics", "predict", str(mdir), str(data), "--time", "2",
        "-o", str(pred), "--extrapolate", "drift",
    )  # fmt: skip
    assert code == 1 and "--extrapolate" in err
    # SDE, several particles per cell, a time between the data's
    code, _, err = _run(
        capsys,
        "-q",
        "dynamics",
        "predict",
        str(mdir),
        str(data),
        "--time",
        "0.9",
        "-o",
        str(pred),
        "--method",
        "sde",
        "--n-particles",
        "2",
    )
    assert code == 0, err
    p = ad.read_h5ad(pred)
    assert p.n_obs == 2 * n0
    np.testing.assert_allclose(
        p.obs["weight"].sum(),
        model.simulate(np.repeat(a.obsm["X_pca"][a.obs["time"] == 0], 2, 0), 0.0, 0.9, method="sde")
        .final[1]
        .sum(),
        rtol=1e-4,
    )
    # a non-empty model folder is refused; --use-rep X on .X works (6 columns)
    code, _, err = _run(
        capsys,
        "dynamics",
        "fit",
        str(data),
        "--use-rep",
        "X_pca",
        "-o",
        str(mdir),
        "--n-steps",
        "5",
    )
    assert code == 1 and "not empty" in err
    code, _, err = _run(
        capsys,
        "-q",
        "dynamics",
        "fit",
        str(data),
        "--use-rep",
        "X",
        "-o",
        str(tmp_path / "mx"),
        "--n-steps",
        "5",
        "--extrapolate",
        "damped",
        "--relaxation",
        "0.75",
    )
    assert code == 0, err
    mx = DynamicsModel.load(tmp_path / "mx")
    assert mx.extrapolate_ == "damped" and mx.relaxation_ == 0.75
    assert mx.continuation == "damped(0.75)"
    mx.damped_growth_ = False
    assert mx.continuation == "damped(0.75, no growth)"
    code, _, err = _run(
        capsys,
        "-q",
        "dynamics",
        "predict",
        str(tmp_path / "mx"),
        str(data),
        "--time",
        "1.25",
        "-o",
        str(pred),
    )
    assert code == 0, err
    p = ad.read_h5ad(pred)
    # default: 4 SDE particles per start cell
    assert p.X.shape == (4 * n0, 6) and p.obsm["X"].shape == (4 * n0, 6)
    np.testing.assert_allclose(p.obs["weight"].sum(), 1.0, atol=0.5)


def test_cli_errors(capsys, tmp_path) -> None:
    a = _adata()
    data = tmp_path / "data.h5ad"
    a.write_h5ad(data)
    code, _, err = _run(
        capsys, "dynamics", "fit", str(data), "--time-key", "nope", "-o", str(tmp_path / "m")
    )
    assert code == 1 and "obs['nope']" in err.splitlines()[-1]
    code, _, err = _run(
        capsys, "dynamics", "fit", str(data), "--holdout", "3", "-o", str(tmp_path / "m")
    )
    assert code == 1 and "not a time point" in err
    code, _, err = _run(
        capsys, "dynamics", "fit", str(data), "--masses", "1,x", "-o", str(tmp_path / "m")
    )
    assert code == 1 and "--masses must be" in err
    code, _, err = _run(
        capsys, "dynamics", "fit", str(data), "--finetune-rollouts", "all", "-o",
        str(tmp_path / "m"),
    )  # fmt: skip
    assert code == 1 and "--finetune-rollouts must be intervals or chained" in err
    code, _, err = _run(
        capsys, "dynamics", "fit", str(data), "--masses", "1,2", "-o", str(tmp_path / "m")
    )
    assert code == 1 and "one relative population size per time point" in err
    with pytest.raises(ChronotopeInputError, match="'counts', 'equal'"):
        ct.tl.fit_dynamics(a, "time", "X_pca", masses="uniform", n_steps=1)  # type: ignore[arg-type]
    code, _, err = _run(
        capsys,
        "dynamics",
        "predict",
        str(tmp_path / "none"),
        str(data),
        "--time",
        "1",
        "-o",
        str(tmp_path / "p.h5ad"),
    )
    assert code == 1 and "not a saved DynamicsModel" in err


def test_figures(fitted) -> None:
    from matplotlib.figure import Figure

    a, model = fitted
    a = a.copy()
    with pytest.raises(ChronotopeInputError, match=r"tl\.fate"):
        ct.pl.fate(a)
    ct.tl.fate(a, model, groupby="branch", n_particles=2, n_boot=5)
    ct.tl.perturb(a, model, "g0", groupby="branch", n_particles=2, n_boot=0)
    ct.tl.landscape(a, model, n_grid=6)
    ct.tl.jacobian_grn(a, model, n_edges=4)
    figs = [
        ct.pl.velocity_streamlines(a, color="branch", n_grid=10),
        ct.pl.velocity_streamlines(a, n_grid=10, dims=(1, 2)),
        ct.pl.landscape(a),
        ct.pl.landscape(a, kind="surface", max_panels=1),
        ct.pl.fate(a, groupby="branch"),
        ct.pl.perturb(a),
        ct.pl.grn(a),
    ]
    assert all(isinstance(f, Figure) for f in figs)
    assert len(figs[2].axes) == 3 + 1  # three times and a colour bar
    # another view than the representation: the velocity is projected onto it
    fig = ct.pl.velocity_streamlines(a, "X", n_grid=10, dims=(0, 2))
    assert "projected from" in fig.axes[0].get_title()
    with pytest.raises(ChronotopeInputError, match="differ in shape"):
        ct.pl.velocity_streamlines(a, velocity_basis="X")
