"""Tests of the STRank losses: likelihoods against scipy, invariances, gradients, edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import expit, softmax
from scipy.stats import binom, multinomial

from chronotope.rank import losses as L


def _batch(seed=0, n=30, g=5, k=3, dtype=torch.float64):
    rng = np.random.default_rng(seed)
    groups = np.sort(rng.integers(0, k, size=n))
    groups[:k] = np.arange(k)
    groups = np.sort(groups)
    score = rng.normal(size=(n, g))
    counts = rng.poisson(3.0, size=(n, g)).astype(float)
    log_size = rng.normal(0, 0.3, size=n)
    t = lambda a: torch.tensor(a, dtype=dtype)  # noqa: E731
    return t(score), t(counts), torch.tensor(groups), t(log_size)


def test_list_equals_multinomial_logpmf_up_to_constants():
    s, y, gr, ls = _batch()
    got = float(L.list_loss(s, y, gr, ls, reduction="sum"))
    ref = 0.0
    const = 0.0
    for k in gr.unique():
        m = (gr == k).numpy()
        for g in range(y.shape[1]):
            yk = y.numpy()[m, g]
            p = softmax(s.numpy()[m, g] + ls.numpy()[m])
            ref += multinomial.logpmf(yk, n=yk.sum(), p=p)
            # constant: log T! - sum log y! (does not depend on the scores)
            from scipy.special import gammaln

            const += gammaln(yk.sum() + 1) - gammaln(yk + 1).sum()
    assert got == pytest.approx(-(ref - const), rel=1e-9)


def test_pair_equals_binomial_logpmf_up_to_constants():
    s, y, gr, ls = _batch(1)
    pairs = L.sample_pairs(gr.numpy(), 4, generator=np.random.default_rng(0))
    assert (gr.numpy()[pairs[:, 0]] == gr.numpy()[pairs[:, 1]]).all()
    assert (pairs[:, 0] != pairs[:, 1]).all()
    got = float(L.pair_loss(s, y, gr, ls, pairs=pairs, reduction="sum"))
    logit = s.numpy() + ls.numpy()[:, None]
    a, b = pairs[:, 0], pairs[:, 1]
    ya, yb = y.numpy()[a], y.numpy()[b]
    p = expit(logit[a] - logit[b])
    ref = binom.logpmf(ya, ya + yb, p).sum()
    from scipy.special import comb

    const = np.log(comb(ya + yb, ya)).sum()
    assert got == pytest.approx(-(ref - const), rel=1e-9)


@pytest.mark.parametrize("name", ["list", "pair", "pcc_slide", "margin"])
def test_invariant_to_per_slide_gene_shift(name):
    s, y, gr, ls = _batch(2)
    shift = torch.tensor(np.random.default_rng(5).normal(0, 3, size=(3, y.shape[1])))
    kw = {}
    if name in L.PAIR_LOSSES:
        kw["pairs"] = L.sample_pairs(gr.numpy(), 3, generator=np.random.default_rng(1))
    f = L.LOSSES[name]
    a = float(f(s, y, gr, ls, **kw))
    b = float(f(s + shift[gr], y, gr, ls, **kw))
    assert a == pytest.approx(b, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("name", ["mse", "poisson", "nb", "pcc"])
def test_pointwise_losses_see_the_shift(name):
    s, y, gr, ls = _batch(2)
    shift = torch.tensor(np.random.default_rng(5).normal(0, 3, size=(3, y.shape[1])))
    kw = {"log_theta": torch.zeros(y.shape[1], dtype=s.dtype)} if name == "nb" else {}
    f = L.LOSSES[name]
    assert float(f(s, y, gr, ls, **kw)) != pytest.approx(float(f(s + shift[gr], y, gr, ls, **kw)))


def test_nb_matches_scipy_nbinom():
    from scipy.special import gammaln
    from scipy.stats import nbinom

    s, y, gr, ls = _batch(3)
    lt = torch.tensor(np.linspace(-1, 2, y.shape[1]))
    got = float(L.nb_loss(s, y, gr, ls, log_theta=lt, reduction="sum"))
    mu = np.exp(s.numpy() + ls.numpy()[:, None])
    th = np.exp(lt.numpy())[None, :]
    ref = nbinom.logpmf(y.numpy(), th, th / (th + mu)).sum() + gammaln(y.numpy() + 1).sum()
    assert got == pytest.approx(-ref, rel=1e-9)


def test_pcc_slide_is_one_minus_within_slide_pearson():
    s, y, gr, ls = _batch(4)
    t = np.log1p(y.numpy() * np.exp(-ls.numpy())[:, None])
    rs = []
    for k in range(3):
        m = gr.numpy() == k
        for g in range(y.shape[1]):
            rs.append(np.corrcoef(s.numpy()[m, g], t[m, g])[0, 1])
    got = float(L.pcc_slide_loss(s, y, gr, ls))
    assert got == pytest.approx(1 - np.mean(rs), abs=1e-6)


@pytest.mark.parametrize("name", sorted(L.LOSSES))
def test_gradcheck(name):
    s, y, gr, ls = _batch(6, n=12, g=3, k=2)
    s = s.clone().requires_grad_(True)
    kw = {}
    if name in L.PAIR_LOSSES:
        kw["pairs"] = L.sample_pairs(gr.numpy(), 2, generator=np.random.default_rng(2))
    if name == "margin":  # the hinge has kinks: keep the check away from them
        kw["margin"] = 0.37
    args = (s,)
    if name == "nb":
        lt = torch.zeros(y.shape[1], dtype=torch.float64, requires_grad=True)
        args = (s, lt)

        def fn(sc, th):
            return L.nb_loss(sc, y, gr, ls, log_theta=th)
    else:

        def fn(sc):
            return L.LOSSES[name](sc, y, gr, ls, **kw)

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("name", sorted(L.LOSSES))
def test_zero_counts_and_empty_spots_are_finite(name):
    s, y, gr, ls = _batch(7, n=20, g=4, k=2)
    y = y.clone()
    y[:, 0] = 0  # an all-zero gene
    y[gr == 1, 1] = 0  # a gene with no count in one slide
    y[0] = 0  # an empty spot
    totals = y.sum(1).numpy()
    ls = torch.tensor(L.log_size_factors(totals), dtype=torch.float64)
    assert torch.isfinite(ls).all()
    s = s.clone().requires_grad_(True)
    kw = {}
    if name in L.PAIR_LOSSES:
        kw["pairs"] = L.sample_pairs(gr.numpy(), 3, generator=np.random.default_rng(2))
    if name == "nb":
        kw["log_theta"] = torch.zeros(4, dtype=torch.float64)
    out = L.LOSSES[name](s, y, gr, ls, **kw)
    out.backward()
    assert torch.isfinite(out)
    assert torch.isfinite(s.grad).all()
    # all counts zero: still finite
    z = L.LOSSES[name](s, torch.zeros_like(y), gr, ls, **kw)
    assert torch.isfinite(z)


def test_pairs_crossing_slides_raise():
    s, y, gr, ls = _batch()
    a = int(np.flatnonzero(gr.numpy() == 0)[0])
    b = int(np.flatnonzero(gr.numpy() == 1)[0])
    with pytest.raises(ValueError, match="crosses slides"):
        L.pair_loss(s, y, gr, ls, pairs=np.array([[a, b]]))


def test_sample_pairs_singleton_slide_gets_none():
    pairs = L.sample_pairs(np.array([0, 1, 1, 1]), 5, generator=np.random.default_rng(0))
    assert 0 not in pairs
    assert len(pairs) == 15


def test_list_prefers_the_true_order():
    # counts generated from a known score: the loss is lower at the truth than reversed
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(200, 3))
    gr = torch.zeros(200, dtype=torch.long)
    y = torch.tensor(rng.poisson(np.exp(truth + 1.0)), dtype=torch.float64)
    ls = torch.zeros(200, dtype=torch.float64)
    good = L.list_loss(torch.tensor(truth), y, gr, ls)
    bad = L.list_loss(torch.tensor(-truth), y, gr, ls)
    assert float(good) < float(bad)
