"""The optional penalty on the velocity's Jacobian (``DynamicsParams.jacobian_weight``)."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from chronotope._errors import ChronotopeInputError
from chronotope.cli import main
from chronotope.dynamics import DynamicsModel, DynamicsParams

SMALL = {"hidden": 32, "n_layers": 2, "n_steps": 250, "batch_size": 128, "n_pairs": 2000}


def _snapshots(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A cloud that drifts along x and splits in two along y, at t = 0, 1, 2."""
    rng = np.random.default_rng(seed)
    xs, ts = [], []
    for k in range(3):
        side = rng.integers(0, 2, 80) * 2 - 1
        x = rng.normal(size=(80, 2)) * 0.25
        x[:, 0] += k * 1.0
        x[:, 1] += side * 0.8 * k
        xs.append(x)
        ts.append(np.full(80, float(k)))
    return np.vstack(xs), np.concatenate(ts)


def _jacobian_sq(model: DynamicsModel, x: np.ndarray, t: float, h: float = 1e-3) -> float:
    """Mean squared Frobenius norm of dv/dx at ``x`` (central differences)."""
    total = np.zeros(x.shape[0])
    for i in range(x.shape[1]):
        e = np.zeros(x.shape[1])
        e[i] = h
        col = (model.velocity(x + e, t) - model.velocity(x - e, t)) / (2 * h)
        total += (col**2).sum(1)
    return float(total.mean())


def _snapshots_h5ad(tmp_path: Path, seed: int) -> Path:
    """``_snapshots`` written as an h5ad with ``obs["time"]`` (for the CLI)."""
    x, t = _snapshots(seed=seed)
    a = ad.AnnData(x.astype(np.float32))
    a.obs = pd.DataFrame({"time": t}, index=[f"c{i}" for i in range(t.size)])
    data = tmp_path / "data.h5ad"
    a.write_h5ad(data)
    return data


def test_jacobian_penalty_smooths_the_velocity_and_keeps_the_drift() -> None:
    x, t = _snapshots()
    assert DynamicsParams().jacobian_weight == 0.0
    free = DynamicsModel(extrapolate="landscape", **SMALL).fit(x, t)
    smooth = DynamicsModel(extrapolate="landscape", jacobian_weight=1.0, **SMALL).fit(x, t)
    mid = x[t == 1]
    rough_j = np.mean([_jacobian_sq(free, mid, s) for s in (0.5, 1.5)])
    smooth_j = np.mean([_jacobian_sq(smooth, mid, s) for s in (0.5, 1.5)])
    assert smooth_j < 0.6 * rough_j, (smooth_j, rough_j)
    # the mean transport along x (1 per unit time) survives the penalty
    for model in (free, smooth):
        np.testing.assert_allclose(model.velocity(mid, 1.5)[:, 0].mean(), 1.0, atol=0.25)
    # the penalty changes the fit, and a fit with it is reproducible
    again = DynamicsModel(extrapolate="landscape", jacobian_weight=1.0, **SMALL).fit(x, t)
    np.testing.assert_allclose(again.velocity(mid, 1.5), smooth.velocity(mid, 1.5), atol=1e-5)


@pytest.mark.parametrize("bad", [-0.1, float("inf"), float("nan")])
def test_jacobian_weight_must_be_finite_and_non_negative(bad: float) -> None:
    with pytest.raises(ChronotopeInputError, match="jacobian_weight"):
        DynamicsParams(jacobian_weight=bad)


def test_cli_fit_records_the_jacobian_weight(capsys, tmp_path) -> None:
    data = _snapshots_h5ad(tmp_path, seed=1)
    mdir = tmp_path / "model"
    args = [
        "-q", "dynamics", "fit", str(data), "--use-rep", "X", "-o", str(mdir),
        "--n-steps", "30", "--extrapolate", "landscape", "--jacobian-weight", "0.5",
    ]  # fmt: skip
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code in (0, None), capsys.readouterr().err
    model = DynamicsModel.load(mdir)
    assert model.params.jacobian_weight == 0.5
    bad = [*args[:7], str(tmp_path / "bad"), *args[8:-1], "-1"]
    with pytest.raises(SystemExit) as exc:
        main(bad)
    assert exc.value.code == 1
    assert "jacobian_weight" in capsys.readouterr().err


def test_auto_jacobian_weight_keeps_the_fit_of_the_best_in_sample_push(tmp_path) -> None:
    from chronotope.dynamics.model import JACOBIAN_WEIGHTS

    x, t = _snapshots(seed=2)
    auto = DynamicsModel(extrapolate="landscape", jacobian_weight="auto", **SMALL).fit(x, t)
    scores = auto.jacobian_scores_
    assert list(scores) == [f"{lam:g}" for lam in JACOBIAN_WEIGHTS]
    assert all(np.isfinite(v) and v >= 0 for v in scores.values())
    assert auto.jacobian_weight_ in JACOBIAN_WEIGHTS
    assert scores[f"{auto.jacobian_weight_:g}"] == min(scores.values())
    # the networks kept are those of the chosen weight (not the last one trained)
    fixed = DynamicsModel(
        extrapolate="landscape", jacobian_weight=auto.jacobian_weight_, **SMALL
    ).fit(x, t)
    mid = x[t == 1]
    np.testing.assert_allclose(auto.velocity(mid, 1.5), fixed.velocity(mid, 1.5), atol=1e-5)
    assert fixed.jacobian_scores_ == {}
    back = DynamicsModel.load(auto.save(tmp_path / "m"))
    assert back.params.jacobian_weight == "auto"
    assert back.jacobian_weight_ == auto.jacobian_weight_
    assert back.jacobian_scores_ == scores


def test_auto_jacobian_weight_chooses_once_and_backtests_with_the_choice(monkeypatch) -> None:
    from chronotope.dynamics import extrapolation

    seen: list[object] = []
    real = extrapolation.backtest_extrapolation

    def spy(*args, **kwargs):
        seen.append(kwargs["params"].jacobian_weight)
        return real(*args, **kwargs)

    monkeypatch.setattr(extrapolation, "backtest_extrapolation", spy)
    x, t = _snapshots(seed=3)
    model = DynamicsModel(extrapolate="auto", jacobian_weight="auto", **SMALL).fit(x, t)
    assert seen == [model.jacobian_weight_]  # a number: the backtest fit does not choose again
    assert model.extrapolation_scores_


@pytest.mark.parametrize("bad", ["automatic", True, None, "0.1"])
def test_jacobian_weight_is_a_number_or_auto(bad: object) -> None:
    with pytest.raises(ChronotopeInputError, match="jacobian_weight"):
        DynamicsParams(jacobian_weight=bad)  # type: ignore[arg-type]


def test_cli_fit_chooses_the_jacobian_weight(capsys, tmp_path) -> None:
    from chronotope.dynamics.model import JACOBIAN_WEIGHTS

    data = _snapshots_h5ad(tmp_path, seed=4)
    mdir = tmp_path / "model"
    args = [
        "dynamics", "fit", str(data), "--use-rep", "X", "-o", str(mdir),
        "--n-steps", "30", "--extrapolate", "landscape", "--jacobian-weight", "auto",
    ]  # fmt: skip
    with pytest.raises(SystemExit) as exc:
        main(args)
    captured = capsys.readouterr()
    assert exc.value.code in (0, None), captured.err
    model = DynamicsModel.load(mdir)
    assert f"jacobian weight {model.jacobian_weight_:g} (auto; in-sample 0 " in captured.out
    assert model.params.jacobian_weight == "auto"
    assert model.jacobian_weight_ in JACOBIAN_WEIGHTS
    assert len(model.jacobian_scores_) == len(JACOBIAN_WEIGHTS)
    bad = [*args[:6], str(tmp_path / "bad"), *args[7:-1], "often"]
    with pytest.raises(SystemExit) as exc:
        main(bad)
    assert exc.value.code == 1
    assert "--jacobian-weight must be a number >= 0 or auto" in capsys.readouterr().err
