"""Losses for predicting spot expression from per-spot features (torch, arrays in/out).

Notation, for one mini-batch of ``n`` spots and ``G`` genes:

- ``s[i, g]``: the model's score (a log expression level, defined up to what each loss
  leaves free);
- ``y[i, g]``: the raw count;
- ``k(i)``: the slide of spot ``i`` (``groups``; integer codes);
- ``o[i] = log l[i]``: the log size factor (``log_size``), ``l[i]`` = total counts of the
  spot over all genes divided by their median over the training spots;
- ``t[i, g] = log1p(y[i, g] / l[i])``: the log-normalised expression.

The count model behind the rank losses is Poisson with a free scale per slide and gene,

    y[i, g] ~ Poisson(l[i] * beta[k(i), g] * exp(s[i, g])),

where ``beta`` (batch effect times gene scale) is unknown. Conditioning on the total
``T[k, g] = sum_{i in k} y[i, g]`` removes ``beta``: the counts of a slide are
multinomial (``list``), and those of a pair of spots of one slide, given their sum, are
binomial (``pair``). Both are therefore invariant to ``s[i, g] + c[k(i), g]``; so is
``pcc_slide``. Pairs and lists never cross slides.

Every loss has the signature ``loss(score, counts, groups, log_size, *, ...)`` and
returns a 0-d tensor; ``reduction="sum"`` gives the plain negative log-likelihood (for
the likelihood losses) without its constant terms. Zero-count spots (``y = 0``), genes
with no count in a slide and spots with zero total counts give finite values and finite
gradients (the size factor of an empty spot is clamped before the log, see
:func:`log_size_factors`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "LOSSES",
    "PAIR_LOSSES",
    "list_loss",
    "log_size_factors",
    "margin_loss",
    "mse_loss",
    "nb_loss",
    "pair_loss",
    "pcc_loss",
    "pcc_slide_loss",
    "poisson_loss",
    "sample_pairs",
]

Reduction = Literal["mean", "sum"]
_EPS = 1e-8


def log_size_factors(
    totals: np.ndarray, *, reference: float | None = None, min_count: float = 0.5
) -> np.ndarray:
    """Log size factors ``log(max(total, min_count) / reference)``.

    Parameters
    ----------
    totals
        Total counts per spot (over all genes of the assay, not only the modelled ones).
    reference
        Divisor; the median of the positive ``totals`` when ``None``.
    min_count
        Totals below this (empty spots) are raised to it, so that the log is finite.
    """
    totals = np.asarray(totals, dtype=np.float64).ravel()
    if reference is None:
        pos = totals[totals > 0]
        reference = float(np.median(pos)) if pos.size else 1.0
    return np.log(np.maximum(totals, min_count) / reference).astype(np.float32)


def _n_groups(groups: torch.Tensor) -> int:
    return int(groups.max().item()) + 1 if groups.numel() else 0


def _group_sum(x: torch.Tensor, groups: torch.Tensor, n_groups: int) -> torch.Tensor:
    out = torch.zeros((n_groups, *x.shape[1:]), dtype=x.dtype, device=x.device)
    return out.index_add(0, groups, x)


def _group_logsumexp(x: torch.Tensor, groups: torch.Tensor, n_groups: int) -> torch.Tensor:
    """``log sum_{i in k} exp(x[i, g])`` for every group ``k`` (rows ``(n_groups, G)``)."""
    idx = groups[:, None].expand_as(x)
    mx = torch.full((n_groups, x.shape[1]), -torch.inf, dtype=x.dtype, device=x.device)
    mx = mx.scatter_reduce(0, idx, x.detach(), reduce="amax", include_self=True)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    s = _group_sum(torch.exp(x - mx[groups]), groups, n_groups)
    return mx + torch.log(s.clamp_min(torch.finfo(x.dtype).tiny))


def _lognorm(counts: torch.Tensor, log_size: torch.Tensor) -> torch.Tensor:
    return torch.log1p(counts * torch.exp(-log_size)[:, None])


def list_loss(
    score: torch.Tensor,
    counts: torch.Tensor,
    groups: torch.Tensor,
    log_size: torch.Tensor,
    *,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """ListSTrank: multinomial likelihood of each slide's counts, per gene.

    For slide ``k`` and gene ``g``, with ``T = sum_{i in k} y[i, g]``,

        p[i, g] = softmax_{i in k}(s[i, g] + o[i]),
        log P(y[., g] | T) = log T! - sum_i log y[i, g]! + sum_{i in k} y[i, g] log p[i, g].

    The loss is ``-sum_{i in k} y[i, g] log p[i, g]`` (the negative log-likelihood without
    the factorials). ``reduction="sum"`` adds it over slides and genes; ``"mean"`` divides
    each (slide, gene) term by ``T`` (the cross-entropy between the observed and the
    predicted distribution over spots) and averages over the (slide, gene) pairs with
    ``T > 0`` (those with ``T = 0`` carry no information and are left out).
    """
    k = _n_groups(groups)
    logits = score + log_size[:, None]
    lse = _group_logsumexp(logits, groups, k)
    logp = logits - lse[groups]
    ll = _group_sum(counts * logp, groups, k)  # (k, G): sum_i y log p
    if reduction == "sum":
        return -ll.sum()
    tot = _group_sum(counts, groups, k)
    ok = tot > 0
    if not bool(ok.any()):
        return score.sum() * 0.0
    return -(ll[ok] / tot[ok]).mean()


def sample_pairs(
    groups: np.ndarray | torch.Tensor, per_spot: int, *, generator: np.random.Generator
) -> np.ndarray:
    """Random pairs of distinct spots of the same slide: ``per_spot`` partners per spot.

    Returns an ``(m, 2)`` int64 array of row indices; spots alone in their slide get no
    pair. Pairs never cross slides.
    """
    g = np.asarray(groups.cpu() if isinstance(groups, torch.Tensor) else groups).astype(np.int64)
    n = g.size
    if n == 0 or per_spot < 1:
        return np.zeros((0, 2), dtype=np.int64)
    order = np.argsort(g, kind="stable")
    sg = g[order]
    starts = np.searchsorted(sg, sg, side="left")
    sizes = np.searchsorted(sg, sg, side="right") - starts
    pos = np.arange(n) - starts  # position of each sorted spot within its slide
    keep = sizes > 1
    first = np.repeat(np.arange(n)[keep], per_spot)
    size = np.repeat(sizes[keep], per_spot)
    off = 1 + (generator.random(first.size) * (size - 1)).astype(np.int64)
    off = np.minimum(off, size - 1)
    partner = starts[first] + (pos[first] + off) % size
    return np.stack([order[first], order[partner]], axis=1)


def _pair_tensor(pairs: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(pairs) if not isinstance(pairs, torch.Tensor) else pairs,
                           dtype=torch.long, device=device)


def pair_loss(
    score: torch.Tensor,
    counts: torch.Tensor,
    groups: torch.Tensor,
    log_size: torch.Tensor,
    *,
    pairs: np.ndarray | torch.Tensor,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """PairSTrank: binomial likelihood of within-slide pairs of spots, per gene.

    For a pair ``(i, j)`` of one slide and gene ``g``, with ``n = y[i, g] + y[j, g]`` and
    ``d = (s[i, g] + o[i]) - (s[j, g] + o[j])``,

        P(y[i, g] | n) = C(n, y[i, g]) sigmoid(d)^y[i, g] sigmoid(-d)^y[j, g].

    The loss is ``-(y[i, g] log sigmoid(d) + y[j, g] log sigmoid(-d))``; pairs with
    ``n = 0`` contribute zero. ``reduction="sum"`` adds over pairs and genes; ``"mean"``
    divides each gene's sum by its ``sum of n`` over the pairs and averages over genes
    with a positive total.

    ``pairs`` is an ``(m, 2)`` index array from :func:`sample_pairs`; a pair whose two
    spots are in different slides raises ``ValueError``.
    """
    pr = _pair_tensor(pairs, score.device)
    if pr.numel() == 0:
        return score.sum() * 0.0
    a, b = pr[:, 0], pr[:, 1]
    if bool((groups[a] != groups[b]).any()):
        raise ValueError("pair_loss: a pair crosses slides")
    logits = score + log_size[:, None]
    d = logits[a] - logits[b]
    ya, yb = counts[a], counts[b]
    # log sigmoid(-d) = log sigmoid(d) - d: one logsigmoid instead of two
    nll = yb * d - (ya + yb) * F.logsigmoid(d)
    if reduction == "sum":
        return nll.sum()
    tot = (ya + yb).sum(0)
    ok = tot > 0
    if not bool(ok.any()):
        return score.sum() * 0.0
    return (nll.sum(0)[ok] / tot[ok]).mean()


def margin_loss(
    score: torch.Tensor,
    counts: torch.Tensor,
    groups: torch.Tensor,
    log_size: torch.Tensor,
    *,
    pairs: np.ndarray | torch.Tensor,
    margin: float = 1.0,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Pairwise margin ranking (the seed's "Rank" baseline) on within-slide pairs.

    With the log-normalised targets ``t`` and ``sgn = sign(t[i, g] - t[j, g])``,
    ``loss = max(0, margin - sgn * (s[i, g] - s[j, g]))`` over the pairs with
    ``sgn != 0`` (ties are skipped). No likelihood: it ranks the noisy normalised counts.
    ``"mean"`` averages over the untied (pair, gene) entries.
    """
    pr = _pair_tensor(pairs, score.device)
    if pr.numel() == 0:
        return score.sum() * 0.0
    a, b = pr[:, 0], pr[:, 1]
    if bool((groups[a] != groups[b]).any()):
        raise ValueError("margin_loss: a pair crosses slides")
    t = _lognorm(counts, log_size)
    sgn = torch.sign(t[a] - t[b])
    hinge = F.relu(margin - sgn * (score[a] - score[b])) * (sgn != 0)
    if reduction == "sum":
        return hinge.sum()
    n = (sgn != 0).sum()
    return hinge.sum() / n.clamp_min(1)


def mse_loss(
    score: torch.Tensor,
    counts: torch.Tensor,
    groups: torch.Tensor,
    log_size: torch.Tensor,
    *,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Mean squared error to the log-normalised counts: ``(s[i, g] - t[i, g])^2``.

    The Gaussian likelihood ``t ~ N(s, sigma^2)`` up to constants; slides are ignored.
    """
    r = (score - _lognorm(counts, log_size)) ** 2
    return r.sum() if reduction == "sum" else r.mean()


def poisson_loss(
    score: torch.Tensor,
    counts: torch.Tensor,
    groups: torch.Tensor,
    log_size: torch.Tensor,
    *,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Poisson negative log-likelihood with rate ``mu = l[i] exp(s[i, g])``.

    ``-log P(y) = mu - y log mu + log y!``; the constant ``log y!`` is dropped. One
    scale for all slides: the batch effect is not modelled.
    """
    log_mu = score + log_size[:, None]
    nll = torch.exp(log_mu) - counts * log_mu
    return nll.sum() if reduction == "sum" else nll.mean()


def nb_loss(
    score: torch.Tensor,
    counts: torch.Tensor,
    groups: torch.Tensor,
    log_size: torch.Tensor,
    *,
    log_theta: torch.Tensor,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Negative binomial negative log-likelihood, mean ``mu = l[i] exp(s[i, g])``.

    With a learned per-gene inverse dispersion ``theta[g] = exp(log_theta[g])``
    (variance ``mu + mu^2 / theta``),

        log P(y) = lgamma(y + theta) - lgamma(theta) - lgamma(y + 1)
                   + theta log(theta / (theta + mu)) + y log(mu / (theta + mu)).

    The constant ``lgamma(y + 1)`` is dropped.
    """
    log_mu = score + log_size[:, None]
    theta = torch.exp(log_theta)[None, :]
    lt = log_theta[None, :]
    log_tm = torch.logaddexp(lt.expand_as(log_mu), log_mu)
    ll = (
        torch.lgamma(counts + theta)
        - torch.lgamma(theta)
        + theta * (lt - log_tm)
        + counts * (log_mu - log_tm)
    )
    return -ll.sum() if reduction == "sum" else -ll.mean()


def _pearson_columns(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xc = x - x.mean(0, keepdim=True)
    yc = y - y.mean(0, keepdim=True)
    sx = torch.sqrt((xc**2).sum(0) + _EPS)
    sy = torch.sqrt((yc**2).sum(0))
    ok = sy > 1e-6
    r = (xc * yc).sum(0) / (sx * sy.clamp_min(1e-6))
    return r, ok


def pcc_loss(
    score: torch.Tensor,
    counts: torch.Tensor,
    groups: torch.Tensor,
    log_size: torch.Tensor,
    *,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """``1 - Pearson(s[., g], t[., g])`` over the whole mini-batch (slides pooled).

    Genes whose targets are constant in the batch are left out. ``"sum"`` adds over
    genes.
    """
    r, ok = _pearson_columns(score, _lognorm(counts, log_size))
    if not bool(ok.any()):
        return score.sum() * 0.0
    v = 1.0 - r[ok]
    return v.sum() if reduction == "sum" else v.mean()


def pcc_slide_loss(
    score: torch.Tensor,
    counts: torch.Tensor,
    groups: torch.Tensor,
    log_size: torch.Tensor,
    *,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """``1 - Pearson(s, t)`` within each slide and gene, averaged (the seed omits it).

    Centring within the slide makes it invariant to ``s[i, g] + c[k(i), g]``. (slide, gene)
    pairs with a constant target or fewer than two spots are left out.
    """
    k = _n_groups(groups)
    t = _lognorm(counts, log_size)
    n = _group_sum(torch.ones_like(score[:, :1]), groups, k)  # (k, 1)
    ms = _group_sum(score, groups, k) / n.clamp_min(1)
    mt = _group_sum(t, groups, k) / n.clamp_min(1)
    sc = score - ms[groups]
    tc = t - mt[groups]
    sxy = _group_sum(sc * tc, groups, k)
    sxx = _group_sum(sc * sc, groups, k)
    syy = _group_sum(tc * tc, groups, k)
    ok = (syy > 1e-6) & (n >= 2)
    if not bool(ok.any()):
        return score.sum() * 0.0
    r = sxy / (torch.sqrt(sxx + _EPS) * torch.sqrt(syy.clamp_min(1e-6)))
    v = 1.0 - r[ok]
    return v.sum() if reduction == "sum" else v.mean()


LossFn = Callable[..., torch.Tensor]

LOSSES: dict[str, LossFn] = {
    "list": list_loss,
    "pair": pair_loss,
    "mse": mse_loss,
    "poisson": poisson_loss,
    "nb": nb_loss,
    "margin": margin_loss,
    "pcc": pcc_loss,
    "pcc_slide": pcc_slide_loss,
}
"""Loss name -> function (the names ``fit(loss=...)`` and the CLI accept)."""

PAIR_LOSSES = frozenset({"pair", "margin"})
"""Losses that need within-slide ``pairs``."""
