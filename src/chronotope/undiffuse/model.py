"""Forward model of lateral diffusion and its maximum-likelihood inversion (EM).

Model (per gene ``g``, spots ``i`` of the whole array, sources ``j`` in the tissue)::

    X[:, g] ~ Poisson(A Z[:, g]),
    A = (1 - bleed) I + bleed * [(1 - background) K + background * (1/N) 1 1^T]

``K`` is a column-stochastic local kernel (:mod:`chronotope.undiffuse.kernels`), so every
column of ``A`` sums to 1 (``A^T 1 = 1``): the model moves molecules, it neither makes nor
loses them, and EM keeps each gene's total exactly.

Maximising the Poisson likelihood over ``Z >= 0`` is the semi-relaxed optimal transport
problem whose one marginal is the observed ``X`` and whose other marginal (the sources
``Z``) is free; its EM iteration is Richardson-Lucy::

    Z <- Z * A^T (X / (A Z))            (A^T 1 = 1, so no denominator)

The E-step ``P_ij = A_ij Z_j X_i / (A Z)_i`` is the transport plan (where each observed
molecule came from); the M-step reads the source marginal ``Z_j = sum_i P_ij`` off it.
All genes go at once as an ``N x B`` block (one kernel application per iteration serves
every gene); the uniform term is a rank-one update and never materialised.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch

from chronotope._errors import ChronotopeInputError
from chronotope.parallel import Scheduler, parallel_map
from chronotope.undiffuse.kernels import Kernel
from chronotope.undiffuse.prior import GammaImagePrior

__all__ = [
    "DiffusionOperator",
    "EMResult",
    "LowRankResult",
    "em_deconvolve",
    "lowrank_deconvolve",
    "poisson_loglik",
    "refine_pergene",
    "round_keep_totals",
]

logger = logging.getLogger("chronotope")

_TINY = 1e-12


class DiffusionOperator:
    """``A`` restricted to tissue sources: ``forward`` (tissue -> all spots) and ``adjoint``.

    Parameters
    ----------
    kernel
        Column-stochastic kernel on all ``N`` spots.
    tissue
        Boolean mask of the ``N`` spots that may hold sources.
    bleed, background
        Fraction of molecules that move, and the fraction of those spread uniformly.
    """

    def __init__(self, kernel: Kernel, tissue: np.ndarray, bleed: float, background: float):
        if not 0.0 <= bleed <= 1.0 or not 0.0 <= background <= 1.0:
            raise ChronotopeInputError(
                f"bleed and background must lie in [0, 1], got {bleed}, {background}"
            )
        self.kernel = kernel
        self.n = kernel.n
        self.tissue = torch.as_tensor(np.flatnonzero(tissue), device=kernel.device)
        self.bleed, self.background = float(bleed), float(background)
        self.w_self = 1.0 - self.bleed
        self.w_kernel = self.bleed * (1.0 - self.background)
        self.w_unif = self.bleed * self.background

    @property
    def n_tissue(self) -> int:
        return int(self.tissue.numel())

    def embed(self, zt: torch.Tensor) -> torch.Tensor:
        full = torch.zeros(self.n, zt.shape[1], dtype=zt.dtype, device=zt.device)
        full[self.tissue] = zt
        return full

    def forward(self, zt: torch.Tensor) -> torch.Tensor:
        """Expected counts on all spots, ``A P zt`` (``zt``: tissue x B)."""
        full = self.embed(zt)
        out = self.w_self * full
        if self.w_kernel > 0:
            out += self.w_kernel * self.kernel.apply(full).to(full.dtype)
        if self.w_unif > 0:
            out += (self.w_unif / self.n) * zt.sum(dim=0, keepdim=True)
        return out

    def adjoint(self, r: torch.Tensor) -> torch.Tensor:
        """``P^T A^T r`` (tissue x B) for ``r``: N x B."""
        out = self.w_self * r
        if self.w_kernel > 0:
            out += self.w_kernel * self.kernel.apply_t(r).to(r.dtype)
        if self.w_unif > 0:
            out += (self.w_unif / self.n) * r.sum(dim=0, keepdim=True)
        return out[self.tissue]

    def self_weight(self) -> torch.Tensor:
        """``A_jj`` for the tissue spots (the chance that a molecule stays at its spot)."""
        kd = torch.as_tensor(self.kernel.self_weight, device=self.kernel.device)
        return (self.w_self + self.w_kernel * kd + self.w_unif / self.n)[self.tissue]


def _ratio(x: torch.Tensor, rate: torch.Tensor) -> torch.Tensor:
    """``x / rate``, 0 where the model puts (numerically) no mass.

    Counts where the model's rate is 0 (e.g. beyond a truncated kernel without a
    uniform background) cannot be explained by any source; they are left out of the
    EM step instead of blowing it up.
    """
    eps = (
        1e-7 * rate.abs().amax(dim=0, keepdim=True).clamp_min(_TINY)
        if rate.dim() == 2
        else (1e-7 * rate.abs().max().clamp_min(_TINY))
    )
    return torch.where(rate > eps, x / rate.clamp_min(_TINY), torch.zeros_like(rate))


def poisson_loglik(x: torch.Tensor, rate: torch.Tensor) -> torch.Tensor:
    """Per-column Poisson log-likelihood without the ``log x!`` term (float64 sums)."""
    x, rate = x.double(), rate.double()
    return (torch.xlogy(x, rate.clamp_min(_TINY)) - rate).sum(dim=0)


@dataclass
class EMResult:
    """Output of :func:`em_deconvolve`.

    Attributes
    ----------
    z
        Sources on tissue spots, ``(n_tissue, G)`` float32 numpy.
    n_iter
        Iterations used per gene (``(G,)``; with cross-validated stopping, the mean of
        the two halves).
    heldout_trace
        Held-out log-likelihood per iteration summed over genes (cross-validated
        stopping), else the training log-likelihood per iteration.
    diffusion_fraction
        Per spot, the share of observed molecules that came from another spot.
    """

    z: np.ndarray
    n_iter: np.ndarray
    heldout_trace: np.ndarray
    diffusion_fraction: np.ndarray
    extra: dict = field(default_factory=dict)


def _dense_block(x: np.ndarray | sp.spmatrix, cols: slice, device, dtype) -> torch.Tensor:
    blk = x[:, cols]
    blk = blk.toarray() if sp.issparse(blk) else np.asarray(blk)
    return torch.as_tensor(np.ascontiguousarray(blk), dtype=dtype, device=device)


def _init_sources(op: DiffusionOperator, x: torch.Tensor, mix: float = 0.1) -> torch.Tensor:
    """Mask-and-rescale of ``x`` mixed with a uniform field, each gene at its total."""
    xt = x[op.tissue]
    tot = x.sum(dim=0, keepdim=True)
    st = xt.sum(dim=0, keepdim=True).clamp_min(_TINY)
    return tot * ((1.0 - mix) * xt / st + mix / op.n_tissue) + _TINY


def _em_block(
    op: DiffusionOperator,
    x: torch.Tensor,
    n_iter: int,
    *,
    heldout: torch.Tensor | None,
    patience: int,
    signatures: torch.Tensor | None = None,
    abundances: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Richardson-Lucy on one gene block; returns (z, iterations used, trace).

    With ``heldout`` (counts independent of ``x`` with the same expectation), each gene
    keeps the iterate of highest held-out likelihood and the block stops once no gene
    improved for ``patience`` iterations. With ``signatures`` (types x B) the sources
    are ``abundances @ signatures`` and only the abundances (tissue x types) are updated
    (Poisson NMF with fixed signatures, the same EM).
    """
    g = x.shape[1]
    ref = signatures is not None
    if ref:
        h = abundances.clone()
        z = h @ signatures
        sig_rows = signatures.sum(dim=1).clamp_min(_TINY)
    else:
        z = _init_sources(op, x)
    best = z.clone()
    best_ll = torch.full((g,), -math.inf, dtype=torch.float64, device=x.device)
    best_it = torch.zeros(g, dtype=torch.long, device=x.device)
    trace = torch.zeros(n_iter, dtype=torch.float64)
    for it in range(n_iter):
        rate = op.forward(z)
        back = op.adjoint(_ratio(x, rate))
        if ref:
            h = h * (back @ signatures.T) / sig_rows
            z = h @ signatures
        else:
            z = z * back
        if heldout is not None:
            ll = poisson_loglik(heldout, op.forward(z))
            better = ll > best_ll
            best_ll = torch.where(better, ll, best_ll)
            best_it = torch.where(better, torch.full_like(best_it, it + 1), best_it)
            best[:, better] = z[:, better]
            trace[it] = float(ll.sum())
            if it + 1 - int(best_it.max()) >= patience:
                trace = trace[: it + 1]
                break
        else:
            trace[it] = float(poisson_loglik(x, rate).sum())
    if heldout is None:
        return z, torch.full((g,), n_iter, dtype=torch.long), trace
    return best, best_it.cpu(), trace


def _host_block(x: np.ndarray | sp.spmatrix, cols: slice) -> np.ndarray | sp.csr_matrix:
    """Columns ``cols`` of ``x`` on the host: CSR with sorted indices, or a dense array."""
    if sp.issparse(x):
        blk = sp.csr_matrix(x[:, cols])
        blk.sort_indices()
        return blk
    return np.ascontiguousarray(np.asarray(x)[:, cols])


def _thin_block(blk: np.ndarray | sp.csr_matrix, rng: np.random.Generator):
    """Binomial half (``p = 1/2``) of a count block, the same draws for dense and CSR."""
    if sp.issparse(blk):
        out = blk.copy()
        trials = np.asarray(out.data, dtype=np.float32).astype(np.int64)
        out.data = rng.binomial(trials, 0.5).astype(np.float64)
        return out
    return rng.binomial(np.asarray(blk, dtype=np.float32).astype(np.int64), 0.5)


def _em_batch_task(
    item: tuple,
    *,
    op: DiffusionOperator,
    a_self: torch.Tensor,
    iters: int,
    cv: bool,
    patience: int,
    dtype: torch.dtype,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """EM of one gene batch (a :func:`chronotope.parallel.parallel_map` task).

    ``item`` is ``(cols, counts, thinned half or None, signatures or None)`` as numpy /
    scipy; returns ``(z, iterations, trace, stay, observed)`` as numpy.
    """
    _cols, xb_np, x1_np, sig_np = item
    dev = op.kernel.device
    full = slice(None)
    xb = _dense_block(xb_np, full, dev, dtype)
    sig_t = None if sig_np is None else torch.as_tensor(sig_np, dtype=dtype, device=dev)
    h0 = None
    if sig_t is not None:
        k = sig_t.shape[0]
        # abundances start at the spot's share of the total, spread over types
        xt = xb[op.tissue].sum(dim=1, keepdim=True)
        h0 = (xt / k).expand(-1, k) / sig_t.sum(dim=1).mean().clamp_min(_TINY) + _TINY
    if cv:
        x1 = _dense_block(x1_np, full, dev, dtype)
        x2 = xb - x1
        both = torch.cat([x1, x2], dim=1)
        held = torch.cat([x2, x1], dim=1)
        sig2 = None if sig_t is None else torch.cat([sig_t, sig_t], dim=1)
        h02 = None if h0 is None else h0 * 0.5
        zb, it_b, tr = _em_block(
            op,
            both,
            iters,
            heldout=held,
            patience=patience,
            signatures=sig2,
            abundances=h02,
        )
        g = xb.shape[1]
        z = zb[:, :g] + zb[:, g:]
        used = 0.5 * (it_b[:g].numpy() + it_b[g:].numpy())
    else:
        z, it_b, tr = _em_block(
            op,
            xb,
            iters,
            heldout=None,
            patience=patience,
            signatures=sig_t,
            abundances=h0,
        )
        used = it_b.numpy().astype(np.float64)
    # share of each spot's molecules that stayed at their own spot (E-step)
    rate = op.forward(z).clamp_min(_TINY)
    own = torch.zeros_like(rate)
    own[op.tissue] = a_self.to(dev)[:, None] * z
    stay = (xb * own / rate).sum(dim=1).double().cpu().numpy()
    observed = xb.sum(dim=1).double().cpu().numpy()
    return z.cpu().numpy(), used, tr.numpy(), stay, observed


def em_deconvolve(
    x: np.ndarray | sp.spmatrix,
    op: DiffusionOperator,
    *,
    n_iter: int | str = "auto",
    max_iter: int = 200,
    patience: int = 10,
    batch_size: int | None = None,
    memory_gb: float = 2.0,
    signatures: np.ndarray | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    callback: Callable[[int, int], None] | None = None,
    scheduler: Scheduler = None,
) -> EMResult:
    """Maximum-likelihood sources of all genes by Richardson-Lucy / EM, in gene batches.

    Parameters
    ----------
    x
        Observed counts, ``N x G`` (all spots of the array), dense or sparse.
    op
        The forward model.
    n_iter
        ``"auto"``: two-fold cross-validated early stopping on binomially thinned counts
        (``x = x1 + x2``, ``x1 ~ Binomial(x, 1/2)``): the EM on each half keeps, per gene,
        the iterate that best predicts the other half, and the result is the sum of the
        two halves' sources (each gene's total is kept). An integer: plain EM for that
        many iterations.
    max_iter, patience
        Cap on the iterations, and how long to continue without held-out improvement.
    batch_size
        Genes per block; default from ``memory_gb``.
    signatures
        Optional ``(types, G)`` non-negative reference signatures: the sources are
        written as per-spot abundances times signatures (see :mod:`.reference`).
    seed
        Seed of the thinning.
    dtype
        Float dtype of the iteration.
    progress
        tqdm bar over gene batches.
    callback
        Called as ``callback(done_genes, total_genes)`` after each batch.
    scheduler
        Where the gene batches run (:func:`chronotope.parallel.parallel_map`): ``None``
        (in-process), ``"local:N"``, a Dask scheduler address or a ``distributed.Client``.
        The operator is sent to every worker once; the thinning is drawn here, so the
        result is the same on every scheduler.
    """
    n, n_genes = x.shape
    if n != op.n:
        raise ChronotopeInputError(f"x has {n} spots but the operator {op.n}")
    cv = n_iter == "auto"
    if not cv and (not isinstance(n_iter, (int, np.integer)) or n_iter < 1):
        raise ChronotopeInputError(f"n_iter must be 'auto' or a positive integer, got {n_iter!r}")
    iters = max_iter if cv else int(n_iter)
    if batch_size is None:
        cells = getattr(op.kernel, "hp", 0) * getattr(op.kernel, "wp", 0) or n
        # per gene column: ~12 N-length float buffers (x, rate, ratio, back, z, best,
        # held-out) plus ~4 grid buffers of the FFT; x2 for the two halves
        per_gene = 4 * (12 * n + 4 * cells) * (2 if cv else 1)
        batch_size = int(max(1, min(n_genes, memory_gb * 2**30 // per_gene)))
    rng = np.random.default_rng(seed)
    z_out = np.zeros((op.n_tissue, n_genes), dtype=np.float32)
    used = np.zeros(n_genes, dtype=np.float64)
    trace_total = np.zeros(iters, dtype=np.float64)
    stay = torch.zeros(n, dtype=torch.float64)
    observed = torch.zeros(n, dtype=torch.float64)
    if signatures is not None:
        sig_all = np.asarray(signatures, dtype=np.float64)
    batches = list(range(0, n_genes, batch_size))
    a_self = op.self_weight().to(dtype)
    # the thinning is drawn here, batch after batch, so the result does not depend on
    # where the batches run (binomial draws of the non-zeros in row order are those of
    # the dense block: a draw from 0 trials consumes no randomness)
    items = []
    for lo in batches:
        cols = slice(lo, min(lo + batch_size, n_genes))
        xb_np = _host_block(x, cols)
        x1_np = None
        if cv:
            x1_np = _thin_block(xb_np, rng)
        sig_np = None if signatures is None else sig_all[:, cols]
        items.append((cols, xb_np, x1_np, sig_np))
    results = parallel_map(
        _em_batch_task,
        items,
        scheduler=scheduler,
        shared={
            "op": op,
            "a_self": a_self,
            "iters": iters,
            "cv": cv,
            "patience": patience,
            "dtype": dtype,
        },
        progress=progress,
        desc="undiffuse",
    )
    # z_out is zero-filled lazily by the OS: copying one batch and dropping it keeps the
    # peak near one copy of the sources
    for i, (cols, *_) in enumerate(items):
        z, used_b, tr, stay_b, observed_b = results[i]
        results[i] = None
        used[cols] = used_b
        trace_total[: tr.size] += tr
        if tr.size < iters:  # stopped early: carry the last value forward
            trace_total[tr.size :] += float(tr[-1])
        stay += torch.as_tensor(stay_b)
        observed += torch.as_tensor(observed_b)
        z_out[:, cols] = z
        if callback is not None:
            callback(cols.stop, n_genes)
    frac = np.where(
        observed.numpy() > 0, 1.0 - stay.numpy() / np.maximum(observed.numpy(), 1e-300), 0.0
    )
    return EMResult(
        z=z_out,
        n_iter=used,
        heldout_trace=trace_total,
        diffusion_fraction=np.clip(frac, 0.0, 1.0),
        extra={"batch_size": batch_size, "n_batches": len(batches)},
    )


def round_keep_totals(z: np.ndarray, totals: np.ndarray) -> np.ndarray:
    """Round each column to integers whose sum is ``totals`` (largest remainders).

    Parameters
    ----------
    z
        Non-negative ``(n, G)`` array.
    totals
        Integer target per column (usually the observed gene totals).
    """
    out = np.floor(z)
    frac = z - out
    short = np.rint(totals).astype(np.int64) - out.sum(axis=0).astype(np.int64)
    for g in np.flatnonzero(short != 0):
        k = int(short[g])
        if k > 0:
            idx = np.argpartition(-frac[:, g], min(k, z.shape[0] - 1))[:k]
            out[idx, g] += 1
        else:  # floor overshoot cannot happen for non-negative z; guard anyway
            pos = np.flatnonzero(out[:, g] > 0)
            idx = pos[np.argsort(frac[pos, g])[:-k]]
            out[idx, g] -= 1
    return out.astype(np.float32)


# --------------------------------------------------------------------------- low rank
@dataclass
class LowRankResult:
    """Output of :func:`lowrank_deconvolve`: sources ``Z = H @ W`` on the tissue.

    Attributes
    ----------
    h
        Per-spot abundances, ``(n_tissue, r)``; the first ``m`` columns belong to the
        fixed reference signatures when given.
    w
        Component profiles, ``(r, G)``; the first ``m`` rows are the reference (fixed).
    n_iter
        Iterations of the final fit.
    trace
        Log-likelihood per iteration of the final fit.
    heldout_trace
        Held-out log-likelihood per iteration of the thinned fit (empty without).
    """

    h: np.ndarray
    w: np.ndarray
    n_iter: int
    trace: np.ndarray
    heldout_trace: np.ndarray
    n_fixed: int = 0
    half: dict | None = None
    diffusion_fraction: np.ndarray | None = None
    gene_scale: np.ndarray | None = None
    prior_factor: np.ndarray | None = None
    prior_coef: np.ndarray | None = None

    def sources(self, rows: slice | None = None) -> np.ndarray:
        """Dense sources ``H @ W`` (tissue x G), optionally for a slice of tissue rows.

        Each gene is rescaled by ``gene_scale`` (within a fraction of a percent of 1) so
        that its total equals the observed total exactly.
        """
        h = self.h if rows is None else self.h[rows]
        z = h @ self.w
        if self.gene_scale is not None:
            z = z * self.gene_scale[None, :]
        return z.astype(np.float32)


class _SparseCounts:
    """Counts with a fixed sparsity pattern: CSR of ``X`` and of ``X^T`` for new values.

    Every iteration of the low-rank EM needs a few arrays of one value per stored count
    (the model's rate there, ``X / rate``, the same values in column order). At atlas
    size these are tens of MB each; allocating them afresh every iteration costs more
    system time (page faults of fresh mappings) than the arithmetic, so they are kept
    here and written in place: :meth:`rate_at` returns a view of its buffer, valid until
    its next call. Indices are 32-bit where they fit (half the memory of the pattern).
    """

    _CHUNK = 1 << 20  # entries per float64 chunk of the log-likelihood sum

    def __init__(self, x: sp.csr_matrix, device, dtype) -> None:
        import warnings

        x = sp.csr_matrix(x)
        x.sort_indices()
        self.shape = x.shape
        self.device, self.dtype = device, dtype
        nnz = int(x.nnz)
        idx = np.int32 if max(nnz, *x.shape) < 2**31 - 1 else np.int64
        coo_rows = np.repeat(np.arange(x.shape[0], dtype=idx), np.diff(x.indptr))
        self.cols = torch.as_tensor(x.indices.astype(idx), device=device)
        self.vals = torch.as_tensor(x.data, dtype=dtype, device=device)
        self.crow = torch.as_tensor(x.indptr.astype(idx), device=device)
        # transpose pattern: entries ordered by column, then row
        order = np.lexsort((coo_rows, x.indices)).astype(idx)
        self.perm = torch.as_tensor(order, device=device)
        self.t_crow = torch.as_tensor(
            np.concatenate([[0], np.cumsum(np.bincount(x.indices, minlength=x.shape[1]))]).astype(
                idx
            ),
            device=device,
        )
        self.t_col = torch.as_tensor(coo_rows[order], device=device)
        del coo_rows, order
        self._warnings = warnings
        # the sampling pattern of rate_at, built once: its values are the counts themselves
        # (finite; beta=0 ignores them); products go into the "rate" buffer
        self._pattern = self._csr(self.crow, self.cols, self.vals, self.shape)
        self._buffers: dict[str, torch.Tensor] = {}
        self._rows: torch.Tensor | None = None

    def _buffer(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """An nnz-sized work array, allocated on first use and reused after."""
        if name not in self._buffers:
            self._buffers[name] = torch.empty(
                self.vals.numel(), dtype=dtype or self.dtype, device=self.device
            )
        return self._buffers[name]

    @property
    def rows(self) -> torch.Tensor:
        """Row of each stored entry (built on first use, not kept for every fit)."""
        if self._rows is None:
            counts = (self.crow[1:] - self.crow[:-1]).long()
            self._rows = torch.repeat_interleave(
                torch.arange(self.shape[0], device=self.device), counts
            )
        return self._rows

    def _csr(self, crow, col, vals, shape) -> torch.Tensor:
        with self._warnings.catch_warnings():
            self._warnings.filterwarnings("ignore", category=UserWarning)
            return torch.sparse_csr_tensor(crow, col, vals, size=shape, check_invariants=False)

    def rate_at(self, ah: torch.Tensor, w: torch.Tensor, *, fresh: bool = False) -> torch.Tensor:
        """``(ah @ w)`` at the stored entries, at least ``_TINY`` (no N x G array).

        Written into this object's buffer (overwritten by the next call) unless ``fresh``.
        """
        if fresh:
            out = torch.sparse.sampled_addmm(self._pattern, ah, w, beta=0.0).values()
        else:
            out = self._buffer("rate")
            target = self._csr(self.crow, self.cols, out, self.shape)
            torch.sparse.sampled_addmm(self._pattern, ah, w, beta=0.0, out=target)
        return out.clamp_min_(_TINY)

    def ratio(self, rate: torch.Tensor) -> torch.Tensor:
        """:func:`_ratio` of the counts and ``rate`` (a buffer, overwritten by the next call)."""
        eps = 1e-7 * rate.abs().max().clamp_min(_TINY)
        out, mask = self._buffer("ratio"), self._buffer("mask", torch.bool)
        torch.div(self.vals, rate, out=out)
        torch.le(rate, eps, out=mask)
        return out.masked_fill_(mask, 0.0)

    def xlogy_sum(self, rate: torch.Tensor) -> float:
        """``sum x log(rate)`` over the stored entries, in float64, chunk by chunk."""
        total = 0.0
        for lo in range(0, self.vals.numel(), self._CHUNK):
            v = self.vals[lo : lo + self._CHUNK].double()
            total += float(torch.xlogy(v, rate[lo : lo + self._CHUNK].double()).sum())
        return total

    def matmul(self, values: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """``S @ dense`` where ``S`` has this pattern and ``values``."""
        return self._csr(self.crow, self.cols, values, self.shape) @ dense

    def t_matmul(self, values: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """``S^T @ dense``."""
        vt = torch.index_select(values, 0, self.perm, out=self._buffer("transposed"))
        return self._csr(self.t_crow, self.t_col, vt, self.shape[::-1]) @ dense


def lowrank_deconvolve(
    x: sp.spmatrix | np.ndarray,
    op: DiffusionOperator,
    *,
    rank: int = 20,
    signatures: np.ndarray | None = None,
    n_iter: int | str = "auto",
    max_iter: int = 200,
    patience: int = 20,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    prior: GammaImagePrior | None = None,
) -> LowRankResult:
    """Poisson NMF through the diffusion model: ``X ~ Poisson(A H W)``, all genes at once.

    ``A (H W) = (A H) W``: each iteration applies the kernel to the ``r`` columns of
    ``H`` only, and touches the counts only at their non-zeros (``X / rate`` is as sparse
    as ``X``), so the cost is ``O(r * kernel + nnz(X) * r)`` whatever the number of
    genes. Multiplicative (EM) updates, alternating ``W`` (free rows only) and ``H``;
    sources stay on the tissue, totals are kept.

    Parameters
    ----------
    x
        Counts ``N x G`` (all spots of the array).
    op
        Forward model.
    rank
        Free components (genes co-vary through them: the model is not per gene).
    signatures
        Optional fixed ``(m, G)`` reference profiles, added to the free components. A
        mismatched reference is harmless: its abundances shrink and the free
        components take over.
    n_iter
        ``"auto"``: the iteration count that maximises the held-out likelihood of a
        binomial half of the counts fitted on the other half (then a full fit of that
        length); or a fixed integer.
    max_iter, patience
        Cap and patience of the held-out search.
    seed
        Seed of the initialisation and the thinning.
    dtype
        Float dtype.
    progress
        tqdm bar over iterations.
    prior
        Optional Gamma prior on the per-spot total sources from the H&E image
        (:mod:`chronotope.undiffuse.prior`): the rows of ``W`` are kept on the simplex
        (``sum_k H_jk`` is then the spot's total) and every ``H`` step is the MAP
        M-step (Richardson-Lucy times one factor per spot); its ``theta`` is refitted
        after each step. The result's ``prior_factor`` (and ``half["prior_factor"]``) is
        the one-step-late factor for :func:`refine_pergene`.
    """
    xs = sp.csr_matrix(x, dtype=np.float64)
    n, g = xs.shape
    m = 0 if signatures is None else int(np.asarray(signatures).shape[0])
    if rank < 0 or rank + m < 1:
        raise ChronotopeInputError(f"rank must be >= 1 (or give signatures), got {rank}")
    rng = np.random.default_rng(seed)
    dev = op.kernel.device
    sig = None
    if m:
        s = np.asarray(signatures, dtype=np.float64)
        if s.shape[1] != g or (s < 0).any() or not np.isfinite(s).all():
            raise ChronotopeInputError(
                f"signatures must be non-negative and finite with {g} genes, got {s.shape}"
            )
        s = s / np.maximum(s.sum(axis=1, keepdims=True), 1e-300)
        sig = torch.as_tensor(s, dtype=dtype, device=dev)

    def init(total: float) -> tuple[torch.Tensor, torch.Tensor]:
        r = rank + m
        h = torch.as_tensor(rng.uniform(0.5, 1.5, (op.n_tissue, r)), dtype=dtype, device=dev)
        wf = rng.uniform(0.5, 1.5, (rank, g)) * (np.asarray(xs.sum(axis=0)).ravel() + 1.0)
        wf = wf / wf.sum(axis=1, keepdims=True)
        w = torch.as_tensor(wf, dtype=dtype, device=dev)
        if sig is not None:
            w = torch.cat([sig, w], dim=0)
        h = h * (total / float(h.sum(dim=0) @ w.sum(dim=1)))
        return h, w

    def fit(
        c: _SparseCounts, total: float, iters: int, hc: _SparseCounts | None
    ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray, int, GammaImagePrior | None]:
        h, w = init(total)
        pr = None
        if prior is not None:  # own copy: theta is refitted along this fit
            pr = GammaImagePrior(prior.alpha, prior.design, np.zeros_like(prior.coef))
            pr.refit(h.sum(dim=1).double().cpu().numpy())
        trace, htrace = [], []
        best, best_it, best_state = -math.inf, 0, (h, w, None if pr is None else pr.coef)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=iters, desc="undiffuse (low rank)", unit="it", leave=False)
        for it in range(iters):
            ah = op.forward(h)
            rate = c.rate_at(ah, w)
            if hc is None:  # training trace of the final fit only (the held-out one has its own)
                tot_rate = float(ah.sum(dim=0) @ w.sum(dim=1))
                trace.append(c.xlogy_sum(rate) - tot_rate)
            if rank > 0:
                num = c.t_matmul(c.ratio(rate), ah).T  # r x G
                upd = num / ah.sum(dim=0).clamp_min(_TINY)[:, None]
                wf = w[m:] * upd[m:]
                if pr is not None:  # W rows on the simplex: sum_k H_jk is the spot total
                    wf = wf / wf.sum(dim=1, keepdim=True).clamp_min(_TINY)
                w = torch.cat([w[:m], wf], dim=0)
                rate = c.rate_at(ah, w)
            b = c.matmul(c.ratio(rate), w.T.contiguous())  # N x r
            if pr is None:
                h = h * op.adjoint(b) / w.sum(dim=1).clamp_min(_TINY)[None, :]
            else:  # MAP M-step: C_jk times (C_j + alpha - 1) / ((1 + alpha / mu_j) C_j)
                cjk = h * op.adjoint(b)
                h = cjk * pr.em_factor(cjk.sum(dim=1))[:, None]
                pr.refit(h.sum(dim=1).double().cpu().numpy(), n_newton=2)
            if hc is not None:
                ah = op.forward(h)
                hr = hc.rate_at(ah, w)
                ll = hc.xlogy_sum(hr) - float(ah.sum(dim=0) @ w.sum(dim=1))
                htrace.append(ll)
                if ll > best:
                    best, best_it = ll, it + 1
                    best_state = (h, w, None if pr is None else pr.coef.copy())
                elif it + 1 - best_it >= patience:
                    break
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        if hc is not None:
            h, w, coef = best_state
            if pr is not None:
                pr.coef = coef
        return h, w, np.array(trace), np.array(htrace), best_it, pr

    held_trace = np.zeros(0)
    half = None
    if n_iter == "auto":
        x1 = xs.copy()
        x1.data = rng.binomial(xs.data.astype(np.int64), 0.5).astype(np.float64)
        x2 = xs - x1
        x1.eliminate_zeros()
        x2 = sp.csr_matrix(x2)
        x2.eliminate_zeros()
        h1, w1, _, held_trace, best_it, pr1 = fit(
            _SparseCounts(x1, dev, dtype), float(x1.sum()), max_iter, _SparseCounts(x2, dev, dtype)
        )
        half = {"h": h1.cpu().numpy(), "w": w1.cpu().numpy(), "x1": x1, "x2": x2}
        if pr1 is not None:
            half["prior_factor"] = pr1.osl_factor(half["h"].sum(axis=1))
        iters = max(1, best_it)
        logger.info("undiffuse: low-rank held-out optimum at %d iterations", iters)
    elif isinstance(n_iter, (int, np.integer)) and n_iter >= 1:
        iters = int(n_iter)
    else:
        raise ChronotopeInputError(f"n_iter must be 'auto' or a positive integer, got {n_iter!r}")
    c = _SparseCounts(xs, dev, dtype)
    h, w, trace, _, _, pr_full = fit(c, float(xs.sum()), iters, None)
    # E-step share of each spot's molecules that stayed at their own spot
    ah = op.forward(h)
    rate = c.rate_at(ah, w, fresh=True)
    a_self = torch.zeros(n, dtype=dtype, device=dev)
    a_self[op.tissue] = op.self_weight().to(dtype)
    hz = op.embed(h)
    own = c.rate_at(hz, w) * a_self[c.rows]  # the buffer; ``rate`` is fresh
    stay = torch.zeros(n, dtype=torch.float64, device=dev)
    stay.index_add_(0, c.rows, (c.vals * own / rate).double())
    observed = torch.as_tensor(np.asarray(xs.sum(axis=1)).ravel(), device=dev)
    frac = torch.where(observed > 0, 1.0 - stay / observed.clamp_min(_TINY), 0.0)
    fitted = (h.sum(dim=0, keepdim=True).double() @ w.double()).cpu().numpy().ravel()
    gtot = np.asarray(xs.sum(axis=0)).ravel()
    gene_scale = np.where(fitted > 0, gtot / np.maximum(fitted, _TINY), 1.0)
    return LowRankResult(
        h=h.cpu().numpy(),
        w=w.cpu().numpy(),
        n_iter=iters,
        trace=trace,
        heldout_trace=held_trace,
        n_fixed=m,
        diffusion_fraction=frac.clamp(0.0, 1.0).cpu().numpy(),
        gene_scale=gene_scale,
        half=half,
        prior_factor=None
        if pr_full is None
        else pr_full.osl_factor(h.sum(dim=1).double().cpu().numpy()),
        prior_coef=None if pr_full is None else pr_full.coef,
    )


def _refine_batch_task(
    item: tuple,
    *,
    op: DiffusionOperator,
    h: np.ndarray | None,
    max_iter: int,
    patience: int,
    dtype: torch.dtype,
    factor: np.ndarray | None = None,
    factor_half: np.ndarray | None = None,
) -> tuple[np.ndarray | None, np.ndarray]:
    """Per-gene RL of one gene batch for :func:`refine_pergene` (a ``parallel_map`` task).

    ``item`` is ``(cols, counts, start sources, (x1, x2) halves or None, half-fit profiles
    of the columns or None, steps or None)``; returns ``(z or None when no step, steps)``.
    ``factor`` / ``factor_half``: per-tissue-spot one-step-late factors of the image
    prior for the full and the half fit (``None``: plain RL).
    """
    _cols, xb_np, z0_cols, held, w_cols, k = item
    dev = op.kernel.device
    full = slice(None)
    f_full = None if factor is None else torch.as_tensor(factor, dtype=dtype, device=dev)[:, None]
    f_half = None if factor_half is None else torch.as_tensor(factor_half, dtype=dtype, device=dev)
    if f_half is not None:
        f_half = f_half[:, None]
    if k is None:
        x1 = _dense_block(held[0], full, dev, dtype)
        x2 = _dense_block(held[1], full, dev, dtype)
        z = torch.as_tensor(h @ w_cols, dtype=dtype, device=dev)
        z = z.clamp_min(_TINY)
        best = poisson_loglik(x2, op.forward(z))
        best_it = torch.zeros(z.shape[1], dtype=torch.long, device=dev)
        for it in range(max_iter):
            z = z * op.adjoint(_ratio(x1, op.forward(z)))
            if f_half is not None:
                z = z * f_half
            ll = poisson_loglik(x2, op.forward(z))
            better = ll > best
            best = torch.where(better, ll, best)
            best_it = torch.where(better, torch.full_like(best_it, it + 1), best_it)
            if it + 1 - int(best_it.max()) >= patience:
                break
        k = best_it.cpu().numpy()
    if k.max() == 0:
        return None, k
    xb = _dense_block(xb_np, full, dev, dtype)
    z = torch.as_tensor(z0_cols, device=dev, dtype=dtype).clamp_min(_TINY)
    kt = torch.as_tensor(k, device=dev)
    for it in range(int(k.max())):
        step = z * op.adjoint(_ratio(xb, op.forward(z)))
        if f_full is not None:
            step = step * f_full
        z = torch.where((kt > it)[None, :], step, z)
    return z.cpu().numpy(), k


def refine_pergene(
    x: sp.spmatrix | np.ndarray,
    op: DiffusionOperator,
    z0: np.ndarray,
    *,
    half: dict | None = None,
    n_iter: int | np.ndarray | None = None,
    max_iter: int = 50,
    patience: int = 5,
    memory_gb: float = 2.0,
    dtype: torch.dtype = torch.float32,
    scheduler: Scheduler = None,
    progress: bool = False,
    prior_factor: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene Richardson-Lucy steps started from low-rank sources ``z0`` (tissue x G).

    The low-rank model shares structure across genes but cannot hold a gene's own
    detail; a few free EM steps per gene add it. How many, per gene: with ``half`` (the
    low-rank fit of a binomial half ``x1`` and the other half ``x2``, from
    :func:`lowrank_deconvolve`), RL on ``x1`` from the half fit is scored on ``x2`` and
    each gene keeps its best count (0 allowed); then RL on ``x`` from ``z0`` runs that
    many steps per gene. Or give ``n_iter`` (per gene or one number).

    Gene batches (of ``memory_gb``) are independent: ``scheduler`` (``None``,
    ``"local:N"``, a Dask address or a ``distributed.Client``, see
    :func:`chronotope.parallel.parallel_map`) says where they run, with the same result;
    ``progress`` shows a bar over batches.

    With the image prior (:mod:`chronotope.undiffuse.prior`), ``prior_factor`` (full
    fit) and ``half["prior_factor"]`` (half fit) are per-spot one-step-late factors
    applied after every step: the prior on a spot's total with the other genes' totals
    held at the low-rank fit (``LowRankResult.prior_factor``).

    Returns ``(z, n_iter_per_gene)``.
    """
    n, g = x.shape
    if n_iter is None and half is None:
        raise ChronotopeInputError("refine_pergene needs half (held-out) or n_iter")
    cells = getattr(op.kernel, "hp", 0) * getattr(op.kernel, "wp", 0) or n
    bs = int(max(1, min(g, memory_gb * 2**30 // (4 * (10 * n + 4 * cells)))))
    steps = np.zeros(g, dtype=np.int64)
    z_out = np.array(z0, dtype=np.float32, copy=True)
    items = []
    for lo in range(0, g, bs):
        cols = slice(lo, min(lo + bs, g))
        if n_iter is None:
            held = (_host_block(half["x1"], cols), _host_block(half["x2"], cols))
            w_cols = np.ascontiguousarray(half["w"][:, cols])
            k = None
        else:
            held, w_cols = None, None
            k = np.broadcast_to(np.asarray(n_iter, dtype=np.int64), (g,))[cols].copy()
        items.append((cols, _host_block(x, cols), z_out[:, cols].copy(), held, w_cols, k))
    results = parallel_map(
        _refine_batch_task,
        items,
        scheduler=scheduler,
        shared={
            "op": op,
            "h": None if half is None else half["h"],
            "max_iter": max_iter,
            "patience": patience,
            "dtype": dtype,
            "factor": prior_factor,
            "factor_half": None if half is None else half.get("prior_factor"),
        },
        progress=progress,
        desc="undiffuse (refine)",
    )
    for i, (cols, *_) in enumerate(items):
        z, k = results[i]
        results[i] = None
        steps[cols] = k
        if z is not None:
            z_out[:, cols] = z
    return z_out, steps
