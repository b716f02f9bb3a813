"""``device=`` on the heavy functions: CPU works, bad devices fail clearly, CUDA equals CPU.

The CUDA tests run only where ``torch.cuda.is_available()``; they compare the same small
problem on both devices within float tolerance. For the trained models (domain encoder,
dynamics, rank) the weights are trained once on the CPU and the inference compared on both
devices (training itself draws from device-specific random streams); training on CUDA is
checked to run and give finite losses.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from chronotope import ot as cot
from chronotope import tl
from chronotope._settings import resolve_device

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA is not available")


def _undiffuse_data():
    from test_undiffuse import _adata

    return _adata()[0]


def _domain_data():
    from chronotope import pp
    from test_domains_model import banded_tissue

    ad = banded_tissue(n_side=14, n_genes=60)
    pp.spatial_neighbors(ad, n_neighbors=6)
    x = np.log1p(ad.X.toarray())
    x = x - x.mean(0)
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    scores, loadings = (u[:, :8] * s[:8]).astype(np.float32), vt[:8].T.astype(np.float32)
    return scores, loadings, sp.csr_matrix(ad.obsp["spatial_connectivities"])


def _snapshots():
    rng = np.random.default_rng(0)
    x = np.vstack([rng.normal(size=(60, 2)) * 0.5 + k for k in range(3)])
    return x, np.repeat([0.0, 1.0, 2.0], 60)


def _points(seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(40, 3)), rng.normal(size=(50, 3)) + 0.5


# ------------------------------------------------------------------ CPU, any machine
def test_resolve_device_clear_errors():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")).type == "cpu"
    assert resolve_device(None).type == ("cuda" if CUDA else "cpu")
    with pytest.raises(ValueError, match="not a torch device"):
        resolve_device("gpu")
    if not CUDA:
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    else:
        with pytest.raises(ValueError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_heavy_functions_run_on_cpu():
    from chronotope.domains import DomainModel
    from chronotope.dynamics import DynamicsModel
    from chronotope.rank import fit as rank_fit
    from chronotope.rank import simulate

    x, y = _points()
    out = cot.sinkhorn(x, y, epsilon=0.5, device="cpu")
    assert out.f.device.type == "cpu" and bool(torch.isfinite(out.f).all())
    fgw = cot.fused_gromov_wasserstein(x, y, features_x=x, features_y=y, device="cpu", epsilon=1.0)
    assert np.isfinite(fgw.fgw_cost)
    scores, loadings, conn = _domain_data()
    dm = DomainModel(device="cpu", max_epochs=2).fit(scores, loadings, conn)
    assert np.isfinite(dm.get_embedding()).all()
    xs, ts = _snapshots()
    dyn = DynamicsModel(device="cpu", n_steps=3, hidden=16, n_layers=1).fit(xs, ts)
    assert np.isfinite(dyn.velocity(xs[:5], 0.0)).all()
    sim = simulate(2, 40, 6, n_features=4, seed=0)
    rk = rank_fit(sim, "features", "slide", max_epochs=1, device="cpu")
    assert rk.device.type == "cpu"
    ad = _undiffuse_data()
    tl.undiffuse(ad, sigma=1.5, bleed=0.5, background=0.2, n_iter=3, diagnostics=False)
    assert np.isfinite(ad.layers["undiffused"].data).all()


@pytest.mark.parametrize("bad", ["gpu", "cuda:99"])
def test_invalid_device_fails_before_work(bad):
    from chronotope.domains import DomainModel
    from chronotope.dynamics import DynamicsModel
    from chronotope.rank import RankModel

    x, y = _points()
    with pytest.raises(ValueError, match="device"):
        cot.PointCloud(x, y, device=bad)
    with pytest.raises(ValueError, match="device"):
        DomainModel(device=bad)
    with pytest.raises(ValueError, match="device"):
        DynamicsModel(device=bad)
    with pytest.raises(ValueError, match="device"):
        RankModel(device=bad)
    with pytest.raises(ValueError, match="device"):
        tl.undiffuse(_undiffuse_data(), sigma=1.5, bleed=0.5, background=0.2, device=bad)


# ------------------------------------------------------------------ CUDA vs CPU
@needs_cuda
@pytest.mark.parametrize("lse_mode", [True, "auto"])
def test_sinkhorn_cuda_equals_cpu(lse_mode):
    x, y = _points(1)
    kw = {"epsilon": 0.2, "tol": 1e-10, "max_iter": 20000, "lse_mode": lse_mode}
    cpu = cot.sinkhorn(x, y, device="cpu", dtype=torch.float64, **kw)
    gpu = cot.sinkhorn(x, y, device="cuda", dtype=torch.float64, **kw)
    assert gpu.f.device.type == "cuda"
    np.testing.assert_allclose(gpu.f.cpu().numpy(), cpu.f.numpy(), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(gpu.g.cpu().numpy(), cpu.g.numpy(), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(float(gpu.reg_ot_cost), float(cpu.reg_ot_cost), rtol=1e-6)


@needs_cuda
def test_fgw_cuda_equals_cpu():
    x, y = _points(2)
    kw = {"features_x": x, "features_y": y, "epsilon": 1.0, "dtype": torch.float64}
    cpu = cot.fused_gromov_wasserstein(x, y, device="cpu", **kw)
    gpu = cot.fused_gromov_wasserstein(x, y, device="cuda", **kw)
    np.testing.assert_allclose(float(gpu.fgw_cost), float(cpu.fgw_cost), rtol=1e-5)


@needs_cuda
@pytest.mark.parametrize("method", ["pergene", "lowrank"])
def test_undiffuse_cuda_equals_cpu(method):
    ad = _undiffuse_data()
    kw = {"sigma": 1.5, "bleed": 0.5, "background": 0.2, "diagnostics": False, "method": method}
    kw["n_iter"] = 30
    cpu = tl.undiffuse(ad, copy=True, device="cpu", **kw).layers["undiffused"].toarray()
    gpu = tl.undiffuse(ad, copy=True, device="cuda", **kw).layers["undiffused"].toarray()
    assert np.abs(gpu - cpu).max() / np.abs(cpu).max() < 1e-4


@needs_cuda
def test_domain_encoder_cuda(tmp_path):
    from chronotope.domains import DomainModel

    scores, loadings, conn = _domain_data()
    cpu = DomainModel(device="cpu", max_epochs=5, seed=0).fit(scores, loadings, conn)
    cpu.save(tmp_path / "m")
    gpu = DomainModel.load(tmp_path / "m", device="cuda")
    a = cpu.get_embedding(scores, loadings, conn)
    b = gpu.get_embedding(scores, loadings, conn)
    assert np.abs(a - b).max() / np.abs(a).max() < 1e-4
    trained = DomainModel(device="cuda", max_epochs=5, seed=0).fit(scores, loadings, conn)
    assert all(np.isfinite(list(h.values())).all() for h in trained.history_)
    assert np.isfinite(trained.get_embedding()).all()


@needs_cuda
def test_dynamics_model_cuda(tmp_path):
    from chronotope.dynamics import DynamicsModel

    xs, ts = _snapshots()
    cpu = DynamicsModel(device="cpu", n_steps=20, hidden=16, n_layers=1).fit(xs, ts)
    cpu.save(tmp_path / "d")
    gpu = DynamicsModel.load(tmp_path / "d", device="cuda")
    for f in ("velocity", "growth", "potential"):
        a, b = getattr(cpu, f)(xs, 0.5), getattr(gpu, f)(xs, 0.5)
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * max(1.0, np.abs(a).max()))
    trained = DynamicsModel(device="cuda", n_steps=20, hidden=16, n_layers=1).fit(xs, ts)
    assert np.isfinite(trained.velocity(xs, 0.5)).all()
    # the couplings are solved on the model's device, with the CPU's result
    np.testing.assert_allclose(trained.couplings_.growth, cpu.couplings_.growth, atol=1e-4)


@needs_cuda
def test_rank_model_cuda(tmp_path):
    from chronotope.rank import RankModel, simulate
    from chronotope.rank import fit as rank_fit

    sim = simulate(2, 60, 8, n_features=6, seed=0)
    cpu = rank_fit(sim, "features", "slide", max_epochs=3, device="cpu")
    cpu.save(tmp_path / "r")
    gpu = RankModel.load(tmp_path / "r", var_names=cpu.var_names, device="cuda")
    feats = np.asarray(sim.obsm["features"], dtype=np.float32)
    a, b = cpu.predict(feats), gpu.predict(feats)
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * max(1.0, np.abs(a).max()))
    trained = rank_fit(sim, "features", "slide", max_epochs=3, device="cuda")
    assert np.isfinite(trained.predict(feats)).all()
