"""Read-outs of DynamicsModel: Jacobians, growth genes, fate / ancestry / perturbation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from chronotope._errors import ChronotopeInputError
from chronotope.dynamics import DynamicsModel, GeneMap
from chronotope.dynamics import readouts as ro
from chronotope.dynamics.model import _Frame, _Networks

A = np.array([[-1.0, 2.0, 0.0], [0.5, -0.3, 0.0], [0.0, 1.0, -2.0]])
B = np.array([0.3, -0.7, 1.1])  # growth g = B . z
SCALE, T_SPAN = 2.0, 4.0


def _linear_model(gene_map: GeneMap | None = None) -> DynamicsModel:
    """A model whose networks are linear: v_net(z) = A z, g_net(z) = B . z, U = |z|^2 / 2."""
    d = A.shape[0]
    model = DynamicsModel(use_rep="X_pca", gene_map=gene_map)
    nets = _Networks(d, 8, 1)
    lin_v = nn.Linear(d + 1, d)
    lin_g = nn.Linear(d + 1, 1)
    with torch.no_grad():
        lin_v.weight.zero_()
        lin_v.bias.zero_()
        lin_v.weight[:, :d] = torch.as_tensor(A, dtype=torch.float32)
        lin_g.weight.zero_()
        lin_g.bias.zero_()
        lin_g.weight[0, :d] = torch.as_tensor(B, dtype=torch.float32)
    nets.velocity = lin_v
    nets.growth = lin_g
    model.networks = nets.eval()
    model.dim = d
    model.sigma_ = 0.1
    model.times_ = np.array([0.0, 4.0])
    model.masses_ = np.array([1.0, 1.0])
    model._frame = _Frame(np.zeros(d), SCALE, 0.0, T_SPAN)
    return model


def _gene_map(n_genes: int = 6, unused: int = 5) -> GeneMap:
    rng = np.random.default_rng(0)
    w = np.linalg.qr(rng.normal(size=(n_genes, 3)))[0]
    w[unused] = 0.0  # a gene the representation does not use
    return GeneMap(w, center=np.linspace(1, 2, n_genes), var_names=[f"g{i}" for i in range(6)])


def test_jacobian_of_linear_drift_in_rep_and_gene_space() -> None:
    gm = _gene_map()
    model = _linear_model(gm)
    x = np.random.default_rng(1).normal(size=(300, 3))
    j = ro.mean_jacobian(model, x, np.linspace(0, 4, 300))
    # v_rep(x) = A (x / SCALE) * SCALE / T_SPAN: J = A / T_SPAN
    np.testing.assert_allclose(j, A / T_SPAN, atol=1e-5)
    np.testing.assert_allclose(model.velocity(x, 1.0), x @ A.T / T_SPAN, atol=1e-5)
    idx, jg = ro.gene_jacobian(model, j)
    np.testing.assert_array_equal(idx, np.arange(6))
    p = np.linalg.pinv(gm.loadings)
    np.testing.assert_allclose(jg, gm.loadings @ (A / T_SPAN) @ p, atol=1e-6)
    # gene-space velocity of a point equals J_gene applied to its gene-space displacement
    dx = np.array([0.2, -0.1, 0.3])
    dgenes = gm.vectors_to_genes(dx[None])[0]
    np.testing.assert_allclose(
        jg @ dgenes, gm.vectors_to_genes((A / T_SPAN @ dx)[None])[0], atol=1e-6
    )
    assert np.all(jg[5] == 0) and np.all(jg[:, 5] == 0)  # the unused gene has no edges
    sub_idx, sub = ro.gene_jacobian(model, j, genes=["g2", "g0"])
    np.testing.assert_array_equal(sub_idx, [2, 0])
    np.testing.assert_allclose(sub, jg[np.ix_([2, 0], [2, 0])])
    edges = ro.grn_edges(jg, gm.var_names, n_edges=5)
    assert len(edges.weight) == 5
    assert np.all(np.diff(np.abs(edges.weight)) <= 1e-12)
    assert not np.any(edges.source == edges.target)
    a, b = int(edges.target[0][1]), int(edges.source[0][1])
    assert edges.weight[0] == jg[a, b]


def test_growth_genes_of_linear_growth() -> None:
    gm = _gene_map()
    model = _linear_model(gm)
    x = np.random.default_rng(2).normal(size=(100, 3))
    grad, genes = ro.growth_genes(model, x, 2.0)
    # g_rep = B . (x / SCALE) / T_SPAN
    np.testing.assert_allclose(grad, B / (SCALE * T_SPAN), atol=1e-6)
    np.testing.assert_allclose(genes, grad @ np.linalg.pinv(gm.loadings), atol=1e-8)
    assert genes[5] == 0.0


def test_time_correlated_genes_sign() -> None:
    # a constant velocity along the first axis: gene = x0 rises with time, its negative falls
    model = _linear_model(
        GeneMap(np.array([[1.0, 0, 0], [-1.0, 0, 0], [0, 0, 0]]), var_names=["up", "down", "z"])
    )
    with torch.no_grad():
        model.networks.velocity.weight.zero_()
        model.networks.velocity.bias[:] = torch.tensor([1.0, 0.0, 0.0])
        model.networks.growth.weight.zero_()
    x0 = np.random.default_rng(3).normal(size=(50, 3)) * 0.1
    r = ro.time_correlated_genes(model, x0, 0.0, 4.0, n_times=10)
    assert r[0] > 0.95 and r[1] < -0.95 and r[2] == 0.0


@pytest.fixture(scope="module")
def two_fates() -> tuple[DynamicsModel, np.ndarray, np.ndarray, np.ndarray]:
    """Cells on the left move left, cells on the right move right: v(x) = x (1-D in 2-D)."""
    model = _linear_model()
    d = 3
    with torch.no_grad():
        w = torch.zeros(d, d + 1)
        w[0, 0] = 1.0
        model.networks.velocity.weight.copy_(w)
        model.networks.growth.weight.zero_()
    rng = np.random.default_rng(4)
    x0 = np.column_stack([np.linspace(-1, 1, 21), np.zeros(21), np.zeros(21)])
    ref = np.vstack([rng.normal([-5, 0, 0], 0.5, (100, 3)), rng.normal([5, 0, 0], 0.5, (100, 3))])
    labels = np.repeat(["left", "right"], 100)
    return model, x0, ref, labels


def test_fate_probabilities(two_fates) -> None:
    model, x0, ref, labels = two_fates
    res = ro.fate_probabilities(model, x0, 0.0, 4.0, ref, labels, n_particles=8, n_boot=50)
    np.testing.assert_array_equal(res.classes, ["left", "right"])
    np.testing.assert_allclose(res.probabilities.sum(1), 1.0, atol=1e-12)
    assert res.probabilities[0, 0] > 0.95 and res.probabilities[-1, 1] > 0.95
    assert np.all(res.lower <= res.probabilities + 1e-12)
    assert np.all(res.upper >= res.probabilities - 1e-12)
    np.testing.assert_allclose(res.mass, 1.0, atol=1e-6)  # no growth
    np.testing.assert_allclose(res.distribution.sum(), 1.0)
    np.testing.assert_allclose(res.distribution, [0.5, 0.5], atol=0.06)


def test_ancestry(two_fates) -> None:
    model, _, _, _ = two_fates
    rng = np.random.default_rng(5)
    x_end = rng.normal([4, 0, 0], 0.2, (20, 3))
    src = np.column_stack([np.linspace(-1, 1, 40), np.zeros(40), np.zeros(40)])
    lab = np.where(src[:, 0] < 0, "neg", "pos")
    res = ro.ancestor_distribution(model, x_end, 4.0, 0.0, src, lab, n_particles=4)
    np.testing.assert_allclose(res.probabilities.sum(1), 1.0)
    assert res.distribution[1] > 0.9
    np.testing.assert_allclose(res.cell_weights.sum(), 1.0)
    assert res.cell_weights[src[:, 0] > 0].sum() > 0.9
    with pytest.raises(ChronotopeInputError, match="before"):
        ro.ancestor_distribution(model, x_end, 0.0, 4.0, src, lab)


def test_perturbation_unused_gene_changes_nothing(two_fates) -> None:
    model, x0, ref, labels = two_fates
    w = np.zeros((3, 3))
    w[0, 0] = 1.0  # gene "a" is the first axis
    w[1, 1] = 1.0
    model.gene_map = GeneMap(w, var_names=["a", "b", "unused"])
    kw = {"n_particles": 4, "n_boot": 0, "seed": 0}
    none = ro.perturb_fate(model, x0, 0.0, 4.0, ref, labels, gene="unused", **kw)
    np.testing.assert_array_equal(none.displacement, 0.0)
    np.testing.assert_array_equal(none.shift, 0.0)
    np.testing.assert_array_equal(none.perturbed.probabilities, none.baseline.probabilities)
    # over-expressing "a" pushes every start cell to the right fate
    up = ro.perturb_fate(
        model, x0, 0.0, 4.0, ref, labels, gene="a", mode="overexpress", value=1.0, **kw
    )
    assert up.achieved == pytest.approx(1.0)
    assert up.shift[1] > 0.4 and up.perturbed.distribution[1] > 0.95
    ko = ro.perturb_fate(model, x0 + np.array([0.5, 0.0, 0.0]), 0.0, 4.0, ref, labels, gene=0, **kw)
    assert ko.value == 0.0 and ko.shift[1] < -0.2
    with pytest.raises(ChronotopeInputError, match="not in the model"):
        ro.perturb_fate(model, x0, 0.0, 4.0, ref, labels, gene="nope")
    with pytest.raises(ChronotopeInputError, match="mode"):
        ro.perturb_fate(model, x0, 0.0, 4.0, ref, labels, gene="a", mode="up")  # type: ignore
    model.gene_map = None
    with pytest.raises(ChronotopeInputError, match="no gene map"):
        ro.perturb_fate(model, x0, 0.0, 4.0, ref, labels, gene="a")


def test_landscape_grid_and_fields() -> None:
    model = _linear_model()
    with torch.no_grad():  # U(z) = z_0 (a slope): minimum at the left edge
        lin = nn.Linear(4, 1)
        lin.weight.zero_()
        lin.bias.zero_()
        lin.weight[0, 0] = 1.0
        model.networks.potential = lin
    ref = np.random.default_rng(6).normal(size=(50, 3))
    gx, gy, u = ro.landscape_grid(model, [0.0, 2.0], ref, n_grid=7)
    assert u.shape == (2, 7, 7) and gx.shape == gy.shape == (7,)
    np.testing.assert_allclose(u.min(axis=(1, 2)), 0.0)
    assert np.all(np.diff(u[0], axis=1) > 0)  # increases along dims[0]
    f = ro.cell_fields(model, ref, np.repeat([0.0, 4.0], 25))
    assert f["velocity"].shape == (50, 3) and f["growth"].shape == (50,)
    np.testing.assert_allclose(f["potential"], ref[:, 0] / SCALE, atol=1e-5)
    with pytest.raises(ChronotopeInputError, match="dims"):
        ro.landscape_grid(model, 0.0, ref, dims=(0, 0))


def test_bad_inputs(two_fates) -> None:
    model, x0, ref, labels = two_fates
    with pytest.raises(ChronotopeInputError, match="labels"):
        ro.fate_probabilities(model, x0, 0.0, 4.0, ref, labels[:5])
    with pytest.raises(ChronotopeInputError, match="shape"):
        ro.fate_probabilities(model, x0[:, :2], 0.0, 4.0, ref, labels)
    bad = labels.astype(object)
    bad[3] = None
    with pytest.raises(ChronotopeInputError, match="no label"):
        ro.fate_probabilities(model, x0, 0.0, 4.0, ref, bad)
    with pytest.raises(ChronotopeInputError, match="n_particles"):
        ro.fate_probabilities(model, x0, 0.0, 4.0, ref, labels, n_particles=0)
    with pytest.raises(ChronotopeInputError, match="no gene map"):
        ro.growth_genes(model, x0, 0.0)


def test_embed_velocity_follows_a_linear_view_and_a_nonlinear_one() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1500, 6))
    # a rotation field in the first two coordinates, noise in the others
    v = np.column_stack([-x[:, 1], x[:, 0], 0.05 * rng.normal(size=(1500, 4))])
    view = x[:, :2].copy()  # a linear view: the exact image of v is v[:, :2]
    out = ro.embed_velocity(x, v, view, n_neighbors=30)
    cos = (out * v[:, :2]).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(v[:, :2], axis=1))
    assert np.median(cos) > 0.8, np.median(cos)
    # velocities shuffled between cells carry no direction of the field
    out_s = ro.embed_velocity(x, v[rng.permutation(1500)], view)
    cos_s = (out_s * v[:, :2]).sum(1) / (
        np.linalg.norm(out_s, axis=1) * np.linalg.norm(v[:, :2], axis=1)
    )
    assert abs(np.median(cos_s)) < 0.2, np.median(cos_s)
    # a warped (non-linear) view: the projection follows the exact push-forward J v
    warped = np.column_stack([np.sinh(view[:, 0]), view[:, 1] + 0.3 * view[:, 0] ** 2])
    out_w = ro.embed_velocity(x, v, warped)
    exact = np.column_stack(
        [np.cosh(view[:, 0]) * v[:, 0], v[:, 1] + 0.6 * view[:, 0] * v[:, 0]]
    )
    cos_w = (out_w * exact).sum(1) / (
        np.linalg.norm(out_w, axis=1) * np.linalg.norm(exact, axis=1) + 1e-12
    )
    assert np.median(cos_w) > 0.7, np.median(cos_w)
    # a velocity of zero has no preferred neighbour: nothing is drawn
    np.testing.assert_allclose(ro.embed_velocity(x, 0 * v, view), 0.0, atol=1e-12)
    with pytest.raises(ChronotopeInputError, match="one row per cell"):
        ro.embed_velocity(x, v, view[:10])
    with pytest.raises(ChronotopeInputError, match="same shape"):
        ro.embed_velocity(x, v[:, :2], view)
