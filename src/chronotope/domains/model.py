"""Graph self-supervised contrastive encoder for spatial domains (arrays in, arrays out).

The model that GenOT's paper describes, built so that nothing grows as N x N:

1. **Gene importance.** A gate ``g = sigmoid(theta)`` over the input genes, trained with the
   model. Features enter through their truncated PCA factorisation ``X ~ T V^T`` (``T``:
   ``N x p`` scores, ``V``: ``G x p`` loadings), so the gated first layer
   ``(X diag(g)) W1 = T (V^T diag(g) W1)`` costs ``O(N p d + G p d)`` instead of
   ``O(N G d)`` and never needs the dense ``N x G`` matrix. The gate acts on genes, and
   ``g`` is what :attr:`DomainModel.gene_importance_` reports.
2. **Hierarchical aggregation.** With ``Â`` the symmetrically normalised spatial graph
   (self loops added), the hop stack ``S_k = Â^k T`` (``k = 0..K``) is computed once, by
   sparse products; the layer is ``h = (sum_k w_k S_k) M`` with learned hop weights
   ``w = softmax(beta)``. Because the graph part has no parameters, a mini-batch only
   needs rows of the stack: training scales by mini-batches.
3. **Objective.** A local-summary contrastive loss as in DGI/GraphST: each spot's latent
   ``z = elu(h)`` is scored by a bilinear discriminator against the summary
   ``s = sigmoid(mean of z over its neighbours)``; spots whose features were shuffled
   (the corrupted graph) are the negatives, in both directions. Plus a feature
   reconstruction ``Â (h D) ~ T`` (mean squared error in PCA space, which is the gene
   space error of the projected data because ``V`` is orthonormal).

Several slices train together with shared weights when their graphs are combined block
diagonally (``library_key`` of :func:`chronotope.pp.spatial_neighbors`).

The representation returned by :meth:`DomainModel.get_embedding` is the decoded,
graph-smoothed expression ``Â (h D)`` in the PCA space (what GraphST clusters, there in
gene space); :meth:`DomainModel.get_latent` returns ``h``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from scipy.sparse.csgraph import reverse_cuthill_mckee
from torch import nn

from chronotope import _ddp
from chronotope._atomic import save_json, save_state_dict
from chronotope._errors import ChronotopeInputError
from chronotope._settings import resolve_device
from chronotope.graph import normalize_adjacency
from chronotope.parallel import Scheduler, check_scheduler, parallel_map

__all__ = ["DomainModel", "DomainModelParams"]

logger = logging.getLogger(__name__)

_WEIGHTS = "weights.pt"
_PARAMS = "params.json"
# Spots per tile of the tiled inference (get_embedding(scheduler=..., tile_size=...)).
_TILE_ROWS = 65536
# The gate starts at sigmoid(2) ~ 0.88 for every gene; with the shared learning rate it
# could move by at most ~0.3 in logit over 300 steps, so it learns 10x faster.
_GATE_LR_FACTOR = 10.0
# Optimisation steps of the default schedule (full batch or mini-batches alike).
_N_STEPS = 300
# A step over more spots than this accumulates its gradient over spatially contiguous
# parts of at most _PART_ROWS spots (the loss is a mean over spots, so the sum of the
# parts' gradients weighted by their share is the step's gradient): memory per step
# then stops growing with the batch. Up to _ONE_PASS spots (a Visium slice) a step is
# one pass, as before.
_ONE_PASS = 4096
_PART_ROWS = 2048


@dataclass(frozen=True)
class DomainModelParams:
    """Hyperparameters of :class:`DomainModel` (the same defaults for every dataset).

    Parameters
    ----------
    n_latent
        Width of the latent layer ``h``.
    n_hops
        Number of graph hops ``K`` aggregated (hops ``0..K``).
    max_epochs
        Passes over the spots. ``None``: as many as give 300 optimisation steps (300
        epochs for data that fit in one batch; 12 epochs of 25 batches at 200k spots).
    batch_size
        Spots per optimisation step; data with at most this many spots train full batch.
    learning_rate
        Adam learning rate.
    reconstruction_weight
        Weight of the reconstruction loss against the contrastive loss (GraphST uses 10).
    gate_penalty
        Weight of the mean gate value in the loss; it pushes uninformative genes to zero.
    seed
        Seed of the weight initialisation, the feature shuffles and the batches.
    """

    n_latent: int = 64
    n_hops: int = 3
    max_epochs: int | None = None
    batch_size: int = 8192
    learning_rate: float = 1e-3
    reconstruction_weight: float = 10.0
    gate_penalty: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_latent", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ChronotopeInputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_hops < 0:
            raise ChronotopeInputError(f"n_hops must be >= 0, got {self.n_hops}")
        if self.max_epochs is not None and self.max_epochs < 1:
            raise ChronotopeInputError(f"max_epochs must be >= 1, got {self.max_epochs}")
        if self.learning_rate <= 0:
            raise ChronotopeInputError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.reconstruction_weight < 0 or self.gate_penalty < 0:
            raise ChronotopeInputError("reconstruction_weight and gate_penalty must be >= 0")


class _Network(nn.Module):
    """Gate, hop weights, first layer, decoder and discriminator."""

    def __init__(self, n_genes: int, n_pcs: int, n_latent: int, n_hops: int) -> None:
        super().__init__()
        self.gate_logit = nn.Parameter(torch.full((n_genes,), 2.0))
        self.hop_logit = nn.Parameter(torch.zeros(n_hops + 1))
        self.weight = nn.Parameter(torch.empty(n_genes, n_latent))
        self.decoder = nn.Parameter(torch.empty(n_latent, n_pcs))
        self.discriminator = nn.Parameter(torch.empty(n_latent, n_latent))
        # Standard deviation of each gene in the model input (its PCA reconstruction).
        self.register_buffer("gene_scale", torch.ones(n_genes))
        for p in (self.weight, self.decoder, self.discriminator):
            nn.init.xavier_uniform_(p)

    def gate(self) -> torch.Tensor:
        return torch.sigmoid(self.gate_logit)

    def hop_weights(self) -> torch.Tensor:
        return torch.softmax(self.hop_logit, 0)

    def encode(
        self, stack: torch.Tensor, loadings: torch.Tensor, nodes: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``h = (sum_k w_k S_k) V^T diag(g) W`` for a ``(K+1, n, p)`` stack (its rows
        ``nodes`` only, if given)."""
        # tensordot: one (K+1) x (n p) product, no (K+1, n, p) temporary; rows are taken
        # from the mixed (n, p) matrix, not from the stack (a (K+1)-times larger copy
        # that autograd would keep until the backward pass)
        if nodes is None:
            mixed = torch.tensordot(self.hop_weights(), stack, dims=1)
        elif stack.shape[0] * len(nodes) < stack.shape[1]:  # a few rows: take them
            mixed = torch.tensordot(self.hop_weights(), stack[:, nodes], dims=1)
        else:
            mixed = torch.tensordot(self.hop_weights(), stack, dims=1)[nodes]
        return mixed @ (loadings.T @ (self.gate()[:, None] * self.gene_directions()))

    def gene_directions(self) -> torch.Tensor:
        """Rows of the first layer scaled to one common norm: a gene's weight is its gate."""
        n_genes, n_latent = self.weight.shape
        scale = math.sqrt(2.0 * n_latent / (n_genes + n_latent))  # xavier's row norm
        return scale * self.weight / self.weight.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def score(self, z: torch.Tensor, summary: torch.Tensor) -> torch.Tensor:
        return ((z @ self.discriminator) * summary).sum(-1)


class _Adam:
    """Adam (Kingma & Ba) with torch's defaults, the arithmetic of ``torch.optim.Adam``.

    The same updates as ``torch.optim.Adam(groups)`` (betas 0.9 / 0.999, eps 1e-8, no
    weight decay; its single-tensor path, the one used on CPU), written out because
    ``torch.optim`` imports ``torch._dynamo`` (sympy, torch.distributed, ...) on first
    use: about 70 MB of resident memory for a model whose data take a few MB.
    """

    def __init__(
        self,
        groups: list[tuple[list[torch.Tensor], float]],
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self.groups = [(list(params), float(lr)) for params, lr in groups]
        self.beta1, self.beta2 = betas
        self.eps = eps
        # per group: first and second moments of each parameter; steps taken
        self.moments: list[list[tuple[torch.Tensor, torch.Tensor] | None]] = [
            [None] * len(params) for params, _ in self.groups
        ]
        self.steps = [[0] * len(params) for params, _ in self.groups]

    def zero_grad(self) -> None:
        for params, _ in self.groups:
            for prm in params:
                prm.grad = None

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = self.beta1, self.beta2
        for g, (params, lr) in enumerate(self.groups):
            for i, prm in enumerate(params):
                grad = prm.grad
                if grad is None:
                    continue
                moments = self.moments[g][i]
                if moments is None:
                    moments = self.moments[g][i] = (torch.zeros_like(prm), torch.zeros_like(prm))
                exp_avg, exp_avg_sq = moments
                self.steps[g][i] += 1
                step = float(self.steps[g][i])
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step_size = lr / (1 - beta1**step)
                denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(self.eps)
                prm.addcdiv_(exp_avg, denom, value=-step_size)


def _csr_tensor(m: sp.csr_matrix, device: torch.device) -> torch.Tensor:
    m = sp.csr_matrix(m, dtype=np.float32)
    return torch.sparse_csr_tensor(
        torch.from_numpy(m.indptr.astype(np.int64)),
        torch.from_numpy(m.indices.astype(np.int64)),
        torch.from_numpy(m.data),
        size=m.shape,
        device=device,
    )


def _hop_stack(adjacency: sp.csr_matrix, scores: np.ndarray, n_hops: int) -> np.ndarray:
    out = np.empty((n_hops + 1, *scores.shape), dtype=np.float32)
    out[0] = scores
    for k in range(n_hops):
        out[k + 1] = adjacency @ out[k]
    return out


def _encode_tile(
    stack_rows: np.ndarray,
    *,
    hop_weights: np.ndarray,
    proj: np.ndarray,
    decoder: np.ndarray | None,
    device: str,
) -> np.ndarray:
    """``h`` (or ``h D``) of one tile of rows of the hop stack (a ``parallel_map`` task)."""
    dev = torch.device(device)
    with torch.no_grad():
        rows = torch.from_numpy(np.ascontiguousarray(stack_rows)).to(dev)
        w = torch.from_numpy(hop_weights).to(dev)
        h = torch.tensordot(w, rows, dims=1) @ torch.from_numpy(proj).to(dev)
        if decoder is not None:
            h = h @ torch.from_numpy(decoder).to(dev)
        return h.cpu().numpy()


def _check_inputs(
    scores: np.ndarray, loadings: np.ndarray, connectivities: sp.spmatrix
) -> tuple[np.ndarray, np.ndarray, sp.csr_matrix]:
    scores = np.asarray(scores, dtype=np.float32)
    loadings = np.asarray(loadings, dtype=np.float32)
    if scores.ndim != 2 or loadings.ndim != 2:
        raise ChronotopeInputError("scores and loadings must be 2-D arrays")
    if scores.shape[1] != loadings.shape[1]:
        raise ChronotopeInputError(
            f"scores have {scores.shape[1]} components but loadings {loadings.shape[1]}"
        )
    if not (np.isfinite(scores).all() and np.isfinite(loadings).all()):
        raise ChronotopeInputError("scores or loadings contain NaN or infinite values")
    if not sp.issparse(connectivities):
        raise ChronotopeInputError("connectivities must be a scipy sparse matrix")
    conn = sp.csr_matrix(connectivities)
    if conn.shape != (scores.shape[0], scores.shape[0]):
        raise ChronotopeInputError(
            f"connectivities have shape {conn.shape}, expected {(scores.shape[0],) * 2}"
        )
    return scores, loadings, conn


class DomainModel:
    """Self-supervised graph contrastive encoder for spatial domains.

    Parameters
    ----------
    params
        Hyperparameters; keyword arguments override single fields
        (``DomainModel(n_hops=2)``).
    device
        ``"cpu"``, ``"cuda"``, a :class:`torch.device`, or ``None`` for CUDA when available.
    progress
        Show a progress bar over epochs.
    **overrides
        Fields of :class:`DomainModelParams`.

    Examples
    --------
    >>> model = DomainModel(seed=0).fit(scores, loadings, connectivities)  # doctest: +SKIP
    >>> emb = model.get_embedding()  # doctest: +SKIP
    """

    def __init__(
        self,
        params: DomainModelParams | None = None,
        *,
        device: str | torch.device | None = "cpu",
        progress: bool = False,
        **overrides: Any,
    ) -> None:
        base = asdict(params or DomainModelParams())
        unknown = set(overrides) - set(base)
        if unknown:
            raise TypeError(f"unknown DomainModel parameters: {sorted(unknown)}")
        base.update(overrides)
        self.params = DomainModelParams(**base)
        self.device = resolve_device(device)
        self.progress = progress
        self.var_names: list[str] | None = None
        self.network: _Network | None = None
        self.history_: list[dict[str, float]] = []
        self._cache: dict[str, Any] = {}

    # ------------------------------------------------------------------ training
    def _n_epochs(self, n_obs: int) -> int:
        if self.params.max_epochs is not None:
            return int(self.params.max_epochs)
        steps = math.ceil(n_obs / self.params.batch_size)
        return math.ceil(_N_STEPS / steps)

    def fit(
        self,
        scores: np.ndarray,
        loadings: np.ndarray,
        connectivities: sp.spmatrix,
        *,
        var_names: list[str] | np.ndarray | None = None,
    ) -> DomainModel:
        """Train on one slice or several (a block-diagonal graph).

        Parameters
        ----------
        scores
            ``(n_obs, p)`` PCA scores of the (scaled, log-normalised) expression.
        loadings
            ``(n_genes, p)`` PCA loadings over the genes the gate acts on.
        connectivities
            ``(n_obs, n_obs)`` sparse spatial graph (e.g.
            ``obsp["spatial_connectivities"]``); weights are used as given.
        var_names
            Names of the ``n_genes`` genes (checked again by :meth:`load`).

        Returns
        -------
        DomainModel
            ``self``, trained.
        """
        scores, loadings, conn = _check_inputs(scores, loadings, connectivities)
        n_obs = scores.shape[0]
        if var_names is not None and len(var_names) != loadings.shape[0]:
            raise ChronotopeInputError(
                f"{len(var_names)} var_names for {loadings.shape[0]} loading rows"
            )
        self.var_names = None if var_names is None else [str(v) for v in var_names]
        p = self.params
        gen = torch.Generator().manual_seed(p.seed)
        rng = np.random.default_rng(p.seed)
        sym = normalize_adjacency(conn, mode="sym")
        mean = normalize_adjacency(conn, mode="row", self_loops=False)
        perm = rng.permutation(n_obs)
        stack = torch.from_numpy(_hop_stack(sym, scores, p.n_hops)).to(self.device)
        corrupt = torch.from_numpy(_hop_stack(sym, scores[perm], p.n_hops)).to(self.device)
        target = stack[0]
        load_t = torch.from_numpy(loadings).to(self.device)

        net = _Network(loadings.shape[0], loadings.shape[1], p.n_latent, p.n_hops)
        with torch.no_grad():  # seeded initialisation without touching the global RNG
            for prm in (net.weight, net.decoder, net.discriminator):
                bound = math.sqrt(6.0 / sum(prm.shape))
                prm.copy_(torch.rand(prm.shape, generator=gen) * 2 * bound - bound)
            var = torch.from_numpy(scores.var(axis=0).astype(np.float32))
            net.gene_scale.copy_(torch.sqrt((torch.from_numpy(loadings) ** 2 * var).sum(1)))
        net.to(self.device)
        # torch.distributed (torchrun): every process draws the same batches and takes its
        # share of each (see chronotope._ddp); gradients are summed before the step
        rank, world = _ddp.world()
        if world > 1:
            if n_obs < world:
                raise ChronotopeInputError(f"{n_obs} spots for {world} processes")
            _ddp.broadcast_module(net)
        gate_params = [net.gate_logit]
        other = [prm for name, prm in net.named_parameters() if name != "gate_logit"]
        opt = _Adam([(other, p.learning_rate), (gate_params, p.learning_rate * _GATE_LR_FACTOR)])

        n_epochs = self._n_epochs(n_obs)
        full = n_obs <= p.batch_size
        # position of each spot in a bandwidth-reducing order of the graph: parts cut
        # from it are spatially contiguous and need few neighbours from outside
        position = np.empty(n_obs, dtype=np.int64)
        position[reverse_cuthill_mckee(sym, symmetric_mode=True)] = np.arange(n_obs)
        if full:
            parts_fixed = self._parts(np.arange(n_obs), sym, mean, position, rank, world)
        epochs = range(n_epochs)
        if self.progress and rank == 0:
            from tqdm.auto import tqdm

            epochs = tqdm(epochs, desc="domains", unit="epoch")
        self.history_ = []
        for _ in epochs:
            order = rng.permutation(n_obs)
            totals = np.zeros(3)
            n_steps = 0
            chunks = [None] if full else np.array_split(order, math.ceil(n_obs / p.batch_size))
            for idx in chunks:
                step_parts = (
                    parts_fixed if full else self._parts(idx, sym, mean, position, rank, world)
                )
                opt.zero_grad()
                for batch, share in step_parts:
                    loss, parts = self._loss(net, batch, stack, corrupt, target, load_t)
                    (loss if share == 1.0 else loss * share).backward()
                    totals += share * parts
                    del loss
                if world > 1:
                    _ddp.all_reduce_grads(net.parameters())
                opt.step()
                n_steps += 1
            if world > 1:
                totals = _ddp.all_reduce_sum(totals, self.device)
            rec = dict(
                zip(("contrastive", "reconstruction", "gate"), totals / n_steps, strict=True)
            )
            self.history_.append(rec)
        self.network = net.eval()
        self._cache = {"stack": stack, "sym": sym, "loadings": load_t}
        (logger.info if rank == 0 else logger.debug)(
            "domain model: %d spots, %d epochs, final losses %s",
            n_obs,
            n_epochs,
            {k: round(v, 4) for k, v in self.history_[-1].items()},
        )
        return self

    def _parts(
        self,
        idx: np.ndarray,
        sym: sp.csr_matrix,
        mean: sp.csr_matrix,
        position: np.ndarray,
        rank: int = 0,
        world: int = 1,
    ) -> list[tuple[_Batch, float]]:
        """The spots ``idx`` of one step as ``(batch, share of the spots)`` parts.

        With ``world > 1`` processes: the parts of this ``rank``'s contiguous share of the
        step (in graph order), their shares relative to the whole step.
        """
        if world > 1:
            ordered = idx[np.argsort(position[idx], kind="stable")]
            mine = _ddp.shard(ordered, rank, world)
            if len(mine) == 0:
                return []
            frac = len(mine) / len(idx)
            return [(b, s * frac) for b, s in self._parts(mine, sym, mean, position)]
        n_obs = sym.shape[0]
        if len(idx) <= _ONE_PASS:
            if len(idx) == n_obs:
                return [(_Batch.full(sym, mean, n_obs, self.device), 1.0)]
            return [(_Batch.rows(sym, mean, idx, self.device), 1.0)]
        ordered = idx[np.argsort(position[idx], kind="stable")]
        pieces = np.array_split(ordered, math.ceil(len(idx) / _PART_ROWS))
        return [
            (_Batch.rows(sym, mean, piece, self.device), len(piece) / len(idx)) for piece in pieces
        ]

    def _loss(
        self,
        net: _Network,
        batch: _Batch,
        stack: torch.Tensor,
        corrupt: torch.Tensor,
        target: torch.Tensor,
        loadings: torch.Tensor,
    ) -> tuple[torch.Tensor, np.ndarray]:
        p = self.params
        if batch.is_full:
            h, hc = net.encode(stack, loadings), net.encode(corrupt, loadings)
        else:
            h = net.encode(stack, loadings, batch.nodes)
            hc = net.encode(corrupt, loadings, batch.nodes)
        z, zc = F.elu(h), F.elu(hc)
        s = torch.sigmoid(torch.sparse.mm(batch.mean, z))
        sc = torch.sigmoid(torch.sparse.mm(batch.mean, zc))
        # full batch: every spot is a batch spot (no copies of rows)
        zb, zcb = (z, zc) if batch.is_full else (z[batch.local], zc[batch.local])
        # each latent through the discriminator once, scored against both summaries
        zd, zcd = zb @ net.discriminator, zcb @ net.discriminator
        logits = torch.cat(
            [(zd * s).sum(-1), (zcd * s).sum(-1), (zcd * sc).sum(-1), (zd * sc).sum(-1)]
        )
        n = zb.shape[0]
        labels = torch.cat([torch.ones(n), torch.zeros(n), torch.ones(n), torch.zeros(n)]).to(
            logits.device
        )
        contrastive = 2 * F.binary_cross_entropy_with_logits(logits, labels)
        recon = torch.sparse.mm(batch.sym, h @ net.decoder)
        reconstruction = F.mse_loss(recon, target if batch.is_full else target[batch.targets])
        gate = net.gate().mean()
        loss = contrastive + p.reconstruction_weight * reconstruction + p.gate_penalty * gate
        parts = np.array([contrastive.item(), reconstruction.item(), gate.item()])
        return loss, parts

    # ------------------------------------------------------------------ outputs
    def _require_fit(self) -> _Network:
        if self.network is None:
            raise RuntimeError("the model is not trained: call fit() or load() first")
        return self.network

    @torch.no_grad()
    def _forward(
        self,
        scores: np.ndarray | None,
        loadings: np.ndarray | None,
        connectivities: sp.spmatrix | None,
    ) -> tuple[torch.Tensor, sp.csr_matrix]:
        net = self._require_fit()
        if scores is None:
            if "stack" not in self._cache:
                raise ChronotopeInputError(
                    "a loaded model needs scores, loadings and connectivities"
                )
            stack, sym = self._cache["stack"], self._cache["sym"]
            load_t = self._cache.get("loadings")
        else:
            if loadings is None or connectivities is None:
                raise ChronotopeInputError("pass scores, loadings and connectivities together")
            scores, loadings, conn = _check_inputs(scores, loadings, connectivities)
            if loadings.shape[0] != net.weight.shape[0]:
                raise ChronotopeInputError(
                    f"the model was trained on {net.weight.shape[0]} genes, "
                    f"got loadings for {loadings.shape[0]}"
                )
            sym = normalize_adjacency(conn, mode="sym")
            stack = torch.from_numpy(_hop_stack(sym, scores, self.params.n_hops))
            stack = stack.to(self.device)
            load_t = torch.from_numpy(loadings).to(self.device)
        if load_t is None:
            raise ChronotopeInputError("pass loadings with the scores")
        h = net.encode(stack, load_t)
        return h, sym

    @torch.no_grad()
    def _forward_tiles(
        self,
        scores: np.ndarray | None,
        loadings: np.ndarray | None,
        connectivities: sp.spmatrix | None,
        *,
        decode: bool,
        scheduler: Scheduler,
        tile_size: int | None,
        progress: bool,
    ) -> tuple[np.ndarray, sp.csr_matrix]:
        """``h`` (or ``h D`` with ``decode``) over row tiles of the hop stack.

        The encoder is linear in the rows of the parameter-free hop stack, so a tile of
        rows gives exactly those rows of ``h``: no halo is needed once the stack is built
        (``K`` sparse products over the whole graph, done here).
        """
        net = self._require_fit()
        if tile_size is not None and int(tile_size) < 1:
            raise ChronotopeInputError(f"tile_size must be >= 1, got {tile_size}")
        check_scheduler(scheduler)
        if scores is None:
            if "stack" not in self._cache:
                raise ChronotopeInputError(
                    "a loaded model needs scores, loadings and connectivities"
                )
            stack, sym = self._cache["stack"].cpu().numpy(), self._cache["sym"]
            load_t = self._cache.get("loadings")
        else:
            if loadings is None or connectivities is None:
                raise ChronotopeInputError("pass scores, loadings and connectivities together")
            scores, loadings, conn = _check_inputs(scores, loadings, connectivities)
            if loadings.shape[0] != net.weight.shape[0]:
                raise ChronotopeInputError(
                    f"the model was trained on {net.weight.shape[0]} genes, "
                    f"got loadings for {loadings.shape[0]}"
                )
            sym = normalize_adjacency(conn, mode="sym")
            stack = _hop_stack(sym, scores, self.params.n_hops)
            load_t = torch.from_numpy(loadings).to(self.device)
        if load_t is None:
            raise ChronotopeInputError("pass loadings with the scores")
        n = stack.shape[1]
        size = int(tile_size) if tile_size is not None else _TILE_ROWS
        # the same product as _Network.encode: (sum_k w_k S_k) (V^T diag(g) W)
        proj = load_t.T @ (net.gate()[:, None] * net.gene_directions())
        shared = {
            "hop_weights": net.hop_weights().cpu().numpy(),
            "proj": proj.cpu().numpy(),
            "decoder": net.decoder.detach().cpu().numpy() if decode else None,
            "device": str(self.device),
        }
        tiles = [stack[:, lo : min(lo + size, n)] for lo in range(0, n, size)]
        parts = parallel_map(
            _encode_tile,
            tiles,
            scheduler=scheduler,
            shared=shared,
            progress=progress,
            desc="domain embedding",
        )
        return np.concatenate(parts, axis=0), sym

    def get_latent(
        self,
        scores: np.ndarray | None = None,
        loadings: np.ndarray | None = None,
        connectivities: sp.spmatrix | None = None,
        *,
        scheduler: Scheduler = None,
        tile_size: int | None = None,
    ) -> np.ndarray:
        """Latent layer ``h`` (``n_obs x n_latent``) of the training data or of new data.

        ``scheduler`` and ``tile_size`` as in :meth:`get_embedding`.
        """
        if scheduler is not None or tile_size is not None:
            h, _ = self._forward_tiles(
                scores,
                loadings,
                connectivities,
                decode=False,
                scheduler=scheduler,
                tile_size=tile_size,
                progress=self.progress,
            )
            return h
        h, _ = self._forward(scores, loadings, connectivities)
        return h.cpu().numpy()

    def release_training_data(self) -> None:
        """Drop the hop stack kept from :meth:`fit` (the model itself stays usable).

        After this, :meth:`get_embedding` and :meth:`get_latent` need ``scores``,
        ``loadings`` and ``connectivities`` again, as for a loaded model.
        """
        self._cache = {}

    def get_embedding(
        self,
        scores: np.ndarray | None = None,
        loadings: np.ndarray | None = None,
        connectivities: sp.spmatrix | None = None,
        *,
        scheduler: Scheduler = None,
        tile_size: int | None = None,
    ) -> np.ndarray:
        """Decoded, graph-smoothed expression ``Â (h D)`` in PCA space (``n_obs x p``).

        Without arguments: the training data. With ``scores``, ``loadings`` (over the same
        genes, in the same order) and ``connectivities``: new data.

        Parameters
        ----------
        scores, loadings, connectivities
            New data (see above), or ``None`` for the training data.
        scheduler
            Where the tiles run (:func:`chronotope.parallel.parallel_map`): ``None``
            (in-process), ``"local:N"``, a Dask scheduler address or a
            ``distributed.Client``. The hop stack is built here (sparse products, no
            parameters); tiles of its rows are encoded independently, then ``Â`` is
            applied here. The result equals the one-pass embedding up to float rounding.
        tile_size
            Spots per tile (default 65,536 when tiling). With both ``None``: one pass.

        Returns
        -------
        numpy.ndarray
            ``(n_obs, p)`` float32.
        """
        net = self._require_fit()
        if scheduler is not None or tile_size is not None:
            decoded, sym = self._forward_tiles(
                scores,
                loadings,
                connectivities,
                decode=True,
                scheduler=scheduler,
                tile_size=tile_size,
                progress=self.progress,
            )
            return np.asarray(sym @ decoded, dtype=np.float32)
        h, sym = self._forward(scores, loadings, connectivities)
        with torch.no_grad():
            decoded = (h @ net.decoder).cpu().numpy()
        return np.asarray(sym @ decoded, dtype=np.float32)

    @property
    def gene_gate_(self) -> np.ndarray:
        """Learned gate value ``g`` of each input gene, in ``[0, 1]``."""
        return self._require_fit().gate().detach().cpu().numpy()

    @property
    def gene_importance_(self) -> np.ndarray:
        """Weight of each gene in the representation, scaled to a maximum of 1.

        The gate value times the gene's standard deviation in the model input (its PCA
        reconstruction ``T V^T``): the size of the gene's contribution to ``h``, since the
        first-layer rows all have one norm. The raw gate alone is not an importance: the
        model damps genes whose input scale is large (the strongest markers load heavily
        on the leading components), so ranking by ``g`` alone puts them last.
        """
        net = self._require_fit()
        eff = (net.gate() * net.gene_scale).detach().cpu().numpy()
        top = float(eff.max())
        return eff / top if top > 0 else eff

    @property
    def hop_weights_(self) -> np.ndarray:
        """Learned weight of each hop ``0..K`` (sums to 1)."""
        return self._require_fit().hop_weights().detach().cpu().numpy()

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Save weights, hyperparameters and gene names to the folder ``path``."""
        net = self._require_fit()
        path = Path(path)
        if path.exists() and any(path.iterdir()) and not overwrite:
            raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True")
        path.mkdir(parents=True, exist_ok=True)
        meta = {
            "params": asdict(self.params),
            "var_names": self.var_names,
            "n_genes": int(net.weight.shape[0]),
            "n_pcs": int(net.decoder.shape[1]),
            "format": 1,
        }
        save_state_dict(net, path / _WEIGHTS)
        save_json(meta, path / _PARAMS)
        return path

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        var_names: list[str] | np.ndarray | None = None,
        device: str | torch.device | None = "cpu",
    ) -> DomainModel:
        """Load a model saved by :meth:`save`.

        Parameters
        ----------
        path
            Folder written by :meth:`save`.
        var_names
            Genes of the data the model will embed; they must equal the training genes,
            in order.
        device
            Device for the weights.
        """
        path = Path(path)
        for name in (_WEIGHTS, _PARAMS):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path / name} not found: not a saved DomainModel")
        meta = json.loads((path / _PARAMS).read_text())
        model = cls(DomainModelParams(**meta["params"]), device=device)
        if var_names is not None and meta["var_names"] is not None:
            got = [str(v) for v in var_names]
            if got != meta["var_names"]:
                missing = sorted(set(meta["var_names"]) - set(got))[:5]
                raise ChronotopeInputError(
                    f"the data's genes differ from the {len(meta['var_names'])} training genes "
                    f"(e.g. missing {missing}); select the training genes in the same order"
                )
        net = _Network(meta["n_genes"], meta["n_pcs"], model.params.n_latent, model.params.n_hops)
        state = torch.load(path / _WEIGHTS, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
        model.network = net.to(model.device).eval()
        model.var_names = meta["var_names"]
        return model


def _on_columns(rows: sp.csr_matrix, nodes: np.ndarray) -> sp.csr_matrix:
    """``rows`` restricted to the sorted column ids ``nodes`` (which hold all its columns)."""
    cols = np.searchsorted(nodes, rows.indices)
    return sp.csr_matrix((rows.data, cols, rows.indptr), shape=(rows.shape[0], len(nodes)))


@dataclass
class _Batch:
    """Rows of a mini-batch and the sub-graphs they need (local column indices)."""

    nodes: torch.Tensor  # spots whose latent is computed (batch and neighbours)
    local: torch.Tensor  # positions of the batch spots inside ``nodes``
    targets: torch.Tensor  # global ids of the batch spots
    mean: torch.Tensor  # (batch, nodes) neighbour-mean operator
    sym: torch.Tensor  # (batch, nodes) normalised adjacency
    is_full: bool = False

    @classmethod
    def full(cls, sym: sp.csr_matrix, mean: sp.csr_matrix, n: int, device: torch.device) -> _Batch:
        ids = torch.arange(n, device=device)
        return cls(ids, ids, ids, _csr_tensor(mean, device), _csr_tensor(sym, device), True)

    @classmethod
    def rows(
        cls, sym: sp.csr_matrix, mean: sp.csr_matrix, idx: np.ndarray, device: torch.device
    ) -> _Batch:
        idx = np.sort(idx)
        s_rows, m_rows = sym[idx], mean[idx]
        nodes = np.union1d(idx, np.union1d(s_rows.indices, m_rows.indices))
        s_rows, m_rows = (_on_columns(rows, nodes) for rows in (s_rows, m_rows))
        t = torch.from_numpy
        return cls(
            t(nodes).to(device),
            t(np.searchsorted(nodes, idx)).to(device),
            t(idx).to(device),
            _csr_tensor(m_rows, device),
            _csr_tensor(s_rows, device),
        )
