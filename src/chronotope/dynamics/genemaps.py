"""A user-supplied non-linear map between the representation and genes.

:class:`NeuralGeneMap` wraps a decoder (representation -> genes, e.g. the decoder of a
VAE such as scVI's, or any torch module) and optionally its encoder (genes ->
representation). The dynamics read-outs that need genes use it as they use the linear
:class:`~chronotope.dynamics.GeneMap`, with the chain rule applied per cell instead of
one constant matrix:

- gene-space Jacobian: ``J_gene = mean_c (d u / d x)_c E_c``, with ``u = D v`` the
  gene-space velocity (``D = d genes / d x``, the decoder's Jacobian), so that
  ``d u / d x = D J + (d D / d x) v`` (``J = d v / d x``; the second term is the decoder's
  curvature along the flow, zero for a linear map), and ``E_c = d x / d genes`` (the
  encoder's Jacobian at the decoded cell, or the pseudo-inverse of ``D_c`` without an
  encoder);
- growth genes: ``mean_c grad g(x_c) E_c``;
- knock-out / over-expression: decode, set the gene, encode (without an encoder, a few
  Gauss-Newton steps that move ``x`` until the decoded gene has the asked level);
- genes along trajectories: the decoded particles, in chunks.

For a linear decoder ``genes = x L^T + c`` (and encoder ``pinv(L)``) every quantity equals
the one of ``GeneMap(L, c)``; ``tests/test_dynamics_genemaps.py`` checks it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from chronotope._errors import ChronotopeInputError

__all__ = ["NeuralGeneMap"]

_CHUNK = 512

TensorFn = Callable[[torch.Tensor], torch.Tensor]


def _device_dtype(fn: TensorFn) -> tuple[torch.device, torch.dtype]:
    if isinstance(fn, torch.nn.Module):
        for p in fn.parameters():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


class NeuralGeneMap:
    """Non-linear map from the representation to genes, with an optional encoder.

    Parameters
    ----------
    decoder
        Torch callable ``(n, d) -> (n, G)``: expression of the genes at representation
        points (in the units the read-outs should report, e.g. log-normalised
        expression). It must be differentiable (autograd and ``torch.func.jvp``).
    dim
        Dimension ``d`` of the representation.
    encoder
        Optional torch callable ``(n, G) -> (n, d)`` back to the representation. Used to
        re-project edited cells and for ``d x / d genes``; without it, the pseudo-inverse
        of the decoder's Jacobian is used.
    var_names
        Gene names, ``G`` of them (default: ``"0"``, ``"1"``, ...).
    """

    def __init__(
        self,
        decoder: TensorFn,
        dim: int,
        *,
        encoder: TensorFn | None = None,
        var_names: Sequence[str] | None = None,
    ) -> None:
        if not callable(decoder) or (encoder is not None and not callable(encoder)):
            raise ChronotopeInputError("decoder and encoder must be callables on torch tensors.")
        if int(dim) < 1:
            raise ChronotopeInputError(f"dim must be >= 1, got {dim}.")
        self.decoder, self.encoder, self._dim = decoder, encoder, int(dim)
        self._dev, self._dt = _device_dtype(decoder)
        with torch.no_grad():
            probe = self.decoder(torch.zeros(2, self._dim, dtype=self._dt, device=self._dev))
        if probe.ndim != 2 or probe.shape[0] != 2:
            raise ChronotopeInputError(
                f"decoder must map (n, {self._dim}) to (n, G); got shape {tuple(probe.shape)}."
            )
        self._n_genes = int(probe.shape[1])
        if encoder is not None:
            with torch.no_grad():
                back = encoder(probe)
            if tuple(back.shape) != (2, self._dim):
                raise ChronotopeInputError(
                    f"encoder must map (n, {self._n_genes}) to (n, {self._dim}); got "
                    f"shape {tuple(back.shape)}."
                )
        names = None if var_names is None else [str(v) for v in var_names]
        if names is not None and len(names) != self._n_genes:
            raise ChronotopeInputError(
                f"{len(names)} var_names for a decoder with {self._n_genes} genes."
            )
        self.var_names = names

    # ------------------------------------------------------------------ shape
    @property
    def n_genes(self) -> int:
        """Number of genes."""
        return self._n_genes

    @property
    def dim(self) -> int:
        """Dimension of the representation."""
        return self._dim

    def _t(self, a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(a), dtype=self._dt, device=self._dev)

    @staticmethod
    def _np(t: torch.Tensor) -> np.ndarray:
        return t.detach().cpu().numpy().astype(np.float64)

    # ------------------------------------------------------------------ maps
    def _apply(self, fn: TensorFn, a: np.ndarray, width: int) -> np.ndarray:
        """``fn`` on the rows of ``a`` in chunks, without gradients; ``(n, width)`` float64."""
        a = np.asarray(a, dtype=np.float64)
        with torch.no_grad():
            out = [self._np(fn(self._t(a[s : s + _CHUNK]))) for s in range(0, a.shape[0], _CHUNK)]
        return np.concatenate(out) if out else np.zeros((0, width))

    def to_genes(self, x: np.ndarray) -> np.ndarray:
        """Decode ``(n, d)`` points to ``(n, G)`` expression."""
        return self._apply(self.decoder, x, self.n_genes)

    def to_rep(self, genes: np.ndarray) -> np.ndarray:
        """Encode ``(n, G)`` expression (requires an encoder)."""
        if self.encoder is None:
            raise ChronotopeInputError("this NeuralGeneMap has no encoder; to_rep needs one.")
        return self._apply(self.encoder, genes, self.dim)

    # ------------------------------------------------------------------ Jacobians
    def decoder_jacobian(self, x: torch.Tensor) -> torch.Tensor:
        """``(c, G, d)``: ``d genes / d x`` at each of ``c`` points (forward mode)."""
        x = x.to(self._dev, self._dt)
        cols = []
        for k in range(self.dim):
            tangent = torch.zeros_like(x)
            tangent[:, k] = 1.0
            _, jv = torch.func.jvp(self.decoder, (x,), (tangent,))
            cols.append(jv.detach())
        return torch.stack(cols, dim=2)

    def encoder_jacobian(self, x: torch.Tensor, jd: torch.Tensor | None = None) -> torch.Tensor:
        """``(c, d, G)``: ``d x / d genes`` at the decoded points.

        The encoder's Jacobian at ``decoder(x)``, or without an encoder the
        pseudo-inverse of the decoder's Jacobian ``jd`` (computed when not given).
        """
        x = x.to(self._dev, self._dt)
        if self.encoder is None:
            if jd is None:
                jd = self.decoder_jacobian(x)
            return torch.linalg.pinv(jd).detach()
        with torch.enable_grad():
            g = self.decoder(x).detach().requires_grad_(True)
            z = self.encoder(g)
            rows = [
                torch.autograd.grad(z[:, k].sum(), g, retain_graph=k < self.dim - 1)[0]
                for k in range(self.dim)
            ]
        return torch.stack(rows, dim=1).detach()

    def gene_scale(self, x: np.ndarray) -> np.ndarray:
        """``(G,)`` mean over points of ``|d gene / d x|`` (how much a gene moves with ``x``)."""
        x = np.asarray(x, dtype=np.float64)
        acc = np.zeros(self.n_genes)
        for s in range(0, x.shape[0], _CHUNK):
            with torch.no_grad():
                jd = self.decoder_jacobian(self._t(x[s : s + _CHUNK]))
            acc += self._np(torch.linalg.vector_norm(jd, dim=2).sum(0))
        return acc / max(x.shape[0], 1)

    # ------------------------------------------------------------------ editing
    def gene_level(self, x: np.ndarray, gene: int) -> np.ndarray:
        """``(n,)`` decoded level of one gene."""
        return self.to_genes(x)[:, gene]

    def edit_gene(self, x: np.ndarray, gene: int, value: float) -> np.ndarray:
        """Points whose decoded ``gene`` is ``value``, the other genes as decoded.

        With an encoder: ``encoder(genes with the gene set)``. Without: Gauss-Newton on
        ``|decoder(x') - genes_edited|^2`` from ``x`` (8 steps).
        """
        x = np.asarray(x, dtype=np.float64)
        genes = self.to_genes(x)
        genes[:, gene] = float(value)
        if self.encoder is not None:
            return self.to_rep(genes)
        out = []
        for s in range(0, x.shape[0], _CHUNK):
            z = self._t(x[s : s + _CHUNK])
            target = self._t(genes[s : s + _CHUNK])
            for _ in range(8):
                with torch.no_grad():
                    res = target - self.decoder(z)
                    jd = self.decoder_jacobian(z)
                    step = torch.linalg.lstsq(jd, res.unsqueeze(2)).solution[:, :, 0]
                z = z + step
            out.append(self._np(z))
        return np.concatenate(out)
