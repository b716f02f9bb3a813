"""NeuralGeneMap: user-supplied decoder / encoder in the dynamics read-outs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from chronotope._errors import ChronotopeInputError
from chronotope.dynamics import DynamicsModel, GeneMap, NeuralGeneMap
from chronotope.dynamics import readouts as ro
from chronotope.dynamics.model import _Frame, _Networks

D, G = 3, 6


def _model(gene_map, nonlinear: bool = False) -> DynamicsModel:
    torch.manual_seed(0)
    model = DynamicsModel(use_rep="X_lat", gene_map=gene_map, hidden=16, n_layers=2)
    nets = _Networks(D, 16, 2)
    if not nonlinear:  # v_net(z) = A z, g_net(z) = B . z
        lin_v, lin_g = nn.Linear(D + 1, D), nn.Linear(D + 1, 1)
        with torch.no_grad():
            lin_v.weight.copy_(torch.tensor([[-1.0, 2, 0, 0], [0.5, -0.3, 0, 0], [0, 1, -2, 0]]))
            lin_v.bias.zero_()
            lin_g.weight.copy_(torch.tensor([[0.3, -0.7, 1.1, 0.0]]))
            lin_g.bias.zero_()
        nets.velocity, nets.growth = lin_v, lin_g
    model.networks = nets.eval()
    model.dim = D
    model.sigma_ = 0.1
    model.times_ = np.array([0.0, 4.0])
    model.masses_ = np.array([1.0, 1.0])
    model._frame = _Frame(np.array([0.1, -0.2, 0.0]), 2.0, 0.0, 4.0)
    return model


def _loadings() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(G, D)), np.linspace(1.0, 2.0, G)


class _Affine(nn.Module):
    def __init__(self, w: np.ndarray, b: np.ndarray) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.as_tensor(w, dtype=torch.float32))
        self.b = nn.Parameter(torch.as_tensor(b, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w.T + self.b


class _ExpDecoder(nn.Module):
    """genes = exp(x L^T) + c: non-linear, with an exact left inverse on its image."""

    def __init__(self, w: np.ndarray, c: np.ndarray) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.as_tensor(w, dtype=torch.float32) * 0.3)
        self.c = torch.as_tensor(c, dtype=torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(x @ self.w.T) + self.c


class _LogEncoder(nn.Module):
    def __init__(self, dec: _ExpDecoder) -> None:
        super().__init__()
        self.p = torch.linalg.pinv(dec.w.detach())
        self.c = dec.c

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        return torch.log((g - self.c).clamp_min(1e-6)) @ self.p.T


def _linear_pair() -> tuple[GeneMap, NeuralGeneMap, NeuralGeneMap]:
    w, c = _loadings()
    names = [f"g{i}" for i in range(G)]
    lin = GeneMap(w, center=c, var_names=names)
    dec = _Affine(w, c)
    p = np.linalg.pinv(w)
    enc = _Affine(p, -p @ c)
    with_enc = NeuralGeneMap(dec, D, encoder=enc, var_names=names)
    without = NeuralGeneMap(dec, D, var_names=names)
    return lin, with_enc, without


def test_linear_decoder_equals_gene_map() -> None:
    lin, with_enc, without = _linear_pair()
    x = np.random.default_rng(1).normal(size=(40, D))
    t = np.linspace(0, 4, 40)
    ml = _model(lin)
    j = ro.mean_jacobian(ml, x, t)
    idx, jl = ro.gene_jacobian(ml, j, genes=["g3", "g0", "g5"])
    gl = ro.growth_genes(ml, x, t)[1]
    rl = ro.time_correlated_genes(ml, x[:10], 0.0, 4.0, n_times=5)
    for gm in (with_enc, without):
        mn = _model(gm)
        np.testing.assert_allclose(gm.to_genes(x), lin.to_genes(x), rtol=1e-5, atol=1e-5)
        idx_n, jn = ro.gene_jacobian(mn, None, genes=["g3", "g0", "g5"], x=x, time=t)
        np.testing.assert_array_equal(idx_n, idx)
        np.testing.assert_allclose(jn, jl, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(ro.growth_genes(mn, x, t)[1], gl, rtol=1e-4, atol=1e-6)
        r = ro.time_correlated_genes(mn, x[:10], 0.0, 4.0, n_times=5)
        np.testing.assert_allclose(r, rl, atol=1e-4)
        # a knock-out moves the cells as the linear re-projection does
        edited = gm.edit_gene(x, 2, 0.0)
        level = lin.to_genes(x)[:, 2]
        moved = x + (0.0 - level)[:, None] * np.linalg.pinv(lin.loadings)[:, 2][None]
        np.testing.assert_allclose(edited, moved, rtol=1e-3, atol=1e-4)
    with pytest.raises(ChronotopeInputError, match="x= and time="):
        ro.gene_jacobian(_model(with_enc), None, genes=["g0"])


def _gene_velocity(model: DynamicsModel, gm: NeuralGeneMap, g: np.ndarray, t: float):
    """u(g) = D(E(g)) v(E(g)): the velocity of the decoded genes at expression g."""
    x = gm.to_rep(g[None])
    xt = torch.as_tensor(x, dtype=torch.float32)
    v = torch.as_tensor(model.velocity(x, t), dtype=torch.float32)
    return torch.func.jvp(gm.decoder, (xt,), (v,))[1][0].detach().double().numpy()


def test_nonlinear_gene_jacobian_matches_finite_differences() -> None:
    w, c = _loadings()
    dec = _ExpDecoder(w, c)
    gm = NeuralGeneMap(dec, D, encoder=_LogEncoder(dec), var_names=[f"g{i}" for i in range(G)])
    model = _model(gm, nonlinear=True)
    x = np.random.default_rng(2).normal(size=(1, D)) * 0.5
    _, jg = ro.gene_jacobian(model, None, x=x, time=1.0)
    g0 = gm.to_genes(x)[0]
    h = 1e-2
    fd = np.zeros((G, G))
    for b in range(G):
        e = np.zeros(G)
        e[b] = h
        up = _gene_velocity(model, gm, g0 + e, 1.0)
        down = _gene_velocity(model, gm, g0 - e, 1.0)
        fd[:, b] = (up - down) / (2 * h)
    np.testing.assert_allclose(jg, fd, atol=2e-3 * np.abs(fd).max())
    # leaving out the decoder's curvature term (D J E only) is measurably different
    jd = gm.decoder_jacobian(torch.as_tensor(x, dtype=torch.float32))[0].double().numpy()
    e_c = gm.encoder_jacobian(torch.as_tensor(x, dtype=torch.float32))[0].double().numpy()
    first_order = jd @ ro.mean_jacobian(model, x, 1.0) @ e_c
    assert np.abs(first_order - fd).max() > 10 * np.abs(jg - fd).max()


def test_nonlinear_edit_gene_and_perturbation() -> None:
    w, c = _loadings()
    dec = _ExpDecoder(w, c)
    names = [f"g{i}" for i in range(G)]
    x = np.random.default_rng(3).normal(size=(30, D)) * 0.5
    for gm in (
        NeuralGeneMap(dec, D, encoder=_LogEncoder(dec), var_names=names),
        NeuralGeneMap(dec, D, var_names=names),  # Gauss-Newton without an encoder
    ):
        level = gm.gene_level(x, 1)
        target = float(level.max())
        x_new = gm.edit_gene(x, 1, target)
        got = gm.gene_level(x_new, 1)
        # closer to the asked level than before (a least-squares fit over all genes)
        assert np.abs(got - target).mean() < 0.6 * np.abs(level - target).mean()
        model = _model(gm, nonlinear=True)
        ref = np.random.default_rng(4).normal(size=(60, D))
        labels = np.where(ref[:, 0] > 0, "a", "b")
        res = ro.perturb_fate(
            model, x, 0.0, 2.0, ref, labels, gene="g1", mode="overexpress",
            n_particles=2, n_boot=0, method="ode",
        )  # fmt: skip
        assert 0.0 < res.achieved <= 1.5 and res.displacement.shape == (30,)


def test_growth_genes_nonlinear_chain_rule() -> None:
    w, c = _loadings()
    dec = _ExpDecoder(w, c)
    gm = NeuralGeneMap(dec, D, encoder=_LogEncoder(dec))
    model = _model(gm, nonlinear=True)
    x = np.random.default_rng(5).normal(size=(1, D)) * 0.5
    _, grad_genes = ro.growth_genes(model, x, 1.0)
    g0 = gm.to_genes(x)[0]
    h = 1e-2
    fd = np.array(
        [
            (
                model.growth(gm.to_rep((g0 + h * np.eye(G)[b])[None]), 1.0)[0]
                - model.growth(gm.to_rep((g0 - h * np.eye(G)[b])[None]), 1.0)[0]
            )
            / (2 * h)
            for b in range(G)
        ]
    )
    np.testing.assert_allclose(grad_genes, fd, atol=2e-3 * np.abs(fd).max())


def test_validation_and_save_load(tmp_path, caplog) -> None:
    with pytest.raises(ChronotopeInputError, match="callables"):
        NeuralGeneMap("not a function", D)  # type: ignore[arg-type]
    with pytest.raises(ChronotopeInputError, match="var_names"):
        NeuralGeneMap(_Affine(*_loadings()), D, var_names=["a"])
    with pytest.raises(ChronotopeInputError, match="encoder must map"):
        NeuralGeneMap(_Affine(*_loadings()), D, encoder=_Affine(np.ones((2, G)), np.zeros(2)))
    with pytest.raises(ChronotopeInputError, match="no encoder"):
        NeuralGeneMap(_Affine(*_loadings()), D).to_rep(np.zeros((1, G)))
    _, with_enc, _ = _linear_pair()
    model = _model(with_enc, nonlinear=True)
    with caplog.at_level("WARNING", logger="chronotope"):
        out = model.save(tmp_path / "m")
    assert "not saved" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="chronotope"):
        bare = DynamicsModel.load(out)
    assert bare.gene_map is None and "gene_map=" in caplog.text
    again = DynamicsModel.load(out, gene_map=with_enc)
    assert again.gene_map is with_enc
    with pytest.raises(ChronotopeInputError, match="components"):
        DynamicsModel.load(out, gene_map=NeuralGeneMap(_Affine(np.ones((G, 2)), np.zeros(G)), 2))


def test_tl_readouts_with_a_neural_gene_map() -> None:
    """tl.fit_dynamics(gene_map=NeuralGeneMap) then the gene read-outs, equal to GeneMap's."""
    import chronotope as ct
    from test_dynamics_tl import _adata

    a = _adata()
    w = np.asarray(a.varm["PCs"], dtype=np.float64)
    center = np.asarray(a.X, dtype=np.float64).mean(0)
    names = list(a.var_names)
    lin = GeneMap(w, center=center, var_names=names)
    neural = NeuralGeneMap(_Affine(w, center), 3, var_names=names)
    out = {}
    for kind, gm in (("linear", lin), ("neural", neural)):
        b = a.copy()
        m = ct.tl.fit_dynamics(b, "time", "X_pca", gene_map=gm, n_steps=30, seed=0)
        ct.tl.jacobian_grn(b, m, genes=["g0", "g1", "g2"], n_edges=3)
        ct.tl.dynamics_genes(b, m, n_times=4, max_cells=30)
        ct.tl.perturb(b, m, "g1", groupby="branch", n_particles=1, n_boot=0)
        out[kind] = b
    la, ne = out["linear"], out["neural"]
    np.testing.assert_allclose(
        ne.uns["grn"]["jacobian"], la.uns["grn"]["jacobian"], rtol=1e-3, atol=1e-5
    )
    assert ne.uns["perturb"]["params"] == la.uns["perturb"]["params"]
    for col in ("dynamics_genes_growth", "dynamics_genes_time_corr"):
        ok = np.isfinite(la.var[col].to_numpy())
        np.testing.assert_allclose(
            ne.var[col].to_numpy()[ok], la.var[col].to_numpy()[ok], rtol=1e-3, atol=1e-4
        )
