"""Geometries: where the ground cost lives, and the kernel operations on it.

A geometry answers two questions for the solvers without ever exposing an
``n x m`` matrix unless it is small or asked for:

* ``lse(h, axis, epsilon)``: the log-sum-exp reduction
  ``log sum_j exp(h_j - C_ij / epsilon)`` (``axis=1``, over columns) or
  ``log sum_i exp(h_i - C_ij / epsilon)`` (``axis=0``, over rows), for
  ``G`` right-hand sides at once (``h`` of shape ``(m, G)`` or ``(n, G)``);
* ``kernel_apply(v, axis, epsilon, f, g)``: the product with the stabilised
  kernel ``K_ij = exp((f_i + g_j - C_ij) / epsilon)``, i.e. ``K @ v`` or
  ``K.T @ v``, one matrix product serving all ``G`` columns. With ``f`` and
  ``g`` the Sinkhorn potentials, ``K`` is the transport plan, so the same
  call applies a plan without forming it.

Three geometries are provided:

:class:`DenseGeometry`
    An explicit ``(n, m)`` cost matrix (small problems).
:class:`PointCloud`
    Costs between two point clouds, squared Euclidean or Euclidean, computed
    block by block (``batch_size`` rows at a time) so the full matrix is never
    held when ``batch_size`` is set.
:class:`SparseGeometry`
    A cost restricted to the edges of a sparse (CSR) graph, such as spatial
    neighbours; every pair outside the graph has infinite cost (zero kernel).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Literal

import numpy as np
import scipy.sparse as sp
import torch

from chronotope._settings import as_tensor, resolve_device

__all__ = ["DenseGeometry", "Geometry", "PointCloud", "SparseGeometry"]

ScaleCost = float | Literal["mean", "max", "median"]

#: Bytes one block of an ``(r, m, G)`` temporary may take in the log-domain path.
_BLOCK_BYTES = 256 * 2**20


class Geometry:
    """Base class: a ground cost between ``n`` source and ``m`` target points.

    Subclasses implement :meth:`_blocks`, an iterator over row blocks of the
    (scaled) cost matrix. Dense-row geometries share the reductions below;
    :class:`SparseGeometry` overrides them with sparse kernels.
    """

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device

    def __init__(self, scale_cost: ScaleCost = 1.0) -> None:
        self._scale_spec = scale_cost
        self._scale: float | None = None
        # transpose flag -> (f, g, epsilon, kernel); f and g compared by identity.
        self._kernel_cache: dict[bool, tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]] = {}

    # ------------------------------------------------------------------ costs
    def _raw_blocks(self, block_rows: int) -> Iterator[tuple[slice, torch.Tensor]]:
        raise NotImplementedError

    def _raw_summary(self) -> tuple[float, float, float]:
        """Return (mean, max, median) of the unscaled cost (median may be estimated)."""
        total, count, cmax = 0.0, 0, -math.inf
        samples = []
        for _, blk in self._raw_blocks(self._default_block_rows(1)):
            total += float(blk.sum())
            count += blk.numel()
            cmax = max(cmax, float(blk.max()))
            flat = blk.reshape(-1)
            step = max(1, flat.numel() // 2000)
            samples.append(flat[::step])
        median = float(torch.cat(samples).median())
        return total / max(count, 1), cmax, median

    @property
    def scale(self) -> float:
        """Divisor applied to the raw cost (from ``scale_cost``)."""
        if self._scale is None:
            spec = self._scale_spec
            if isinstance(spec, str):
                mean, cmax, median = self._raw_summary()
                value = {"mean": mean, "max": cmax, "median": median}[spec]
                self._scale = float(value) if value > 0 else 1.0
            else:
                self._scale = float(spec)
        return self._scale

    def cost_blocks(self, block_rows: int | None = None) -> Iterator[tuple[slice, torch.Tensor]]:
        """Yield ``(rows, C[rows])`` blocks of the scaled cost matrix."""
        scale = self.scale
        for rows, blk in self._raw_blocks(block_rows or self._default_block_rows(1)):
            yield rows, blk if scale == 1.0 else blk / scale

    def cost_matrix(self) -> torch.Tensor:
        """Return the full scaled cost matrix. Only for small problems."""
        n, m = self.shape
        out = torch.empty((n, m), dtype=self.dtype, device=self.device)
        for rows, blk in self.cost_blocks():
            out[rows] = blk
        return out

    @property
    def mean_cost(self) -> float:
        """Mean of the scaled cost over all pairs."""
        return self._raw_summary()[0] / self.scale

    def _default_block_rows(self, n_cols: int) -> int:
        n, m = self.shape
        per_row = max(1, m * max(1, n_cols) * torch.finfo(self.dtype).bits // 8)
        return int(max(1, min(n, _BLOCK_BYTES // per_row)))

    # ------------------------------------------------------------ reductions
    def lse(self, h: torch.Tensor, *, axis: int, epsilon: float) -> torch.Tensor:
        """Log-sum-exp reduction against the cost.

        Parameters
        ----------
        h
            ``(m, G)`` when ``axis=1`` (reduce over columns), ``(n, G)`` when
            ``axis=0`` (reduce over rows).
        axis
            1 returns ``log sum_j exp(h_j - C_ij / epsilon)`` of shape ``(n, G)``;
            0 returns ``log sum_i exp(h_i - C_ij / epsilon)`` of shape ``(m, G)``.
        epsilon
            Entropic regularisation (in scaled-cost units).
        """
        n, m = self.shape
        n_cols = h.shape[1]
        rows_per_block = self._default_block_rows(n_cols)
        if axis == 1:
            out = torch.empty((n, n_cols), dtype=h.dtype, device=h.device)
            for rows, blk in self.cost_blocks(rows_per_block):
                z = h.unsqueeze(0) - (blk / epsilon).unsqueeze(-1)
                out[rows] = torch.logsumexp(z, dim=1)
            return out
        acc = torch.full((m, n_cols), -math.inf, dtype=h.dtype, device=h.device)
        for rows, blk in self.cost_blocks(rows_per_block):
            z = h[rows].unsqueeze(1) - (blk / epsilon).unsqueeze(-1)
            acc = torch.logaddexp(acc, torch.logsumexp(z, dim=0))
        return acc

    def _kernel_block(
        self, blk: torch.Tensor, rows: slice, f: torch.Tensor, g: torch.Tensor, epsilon: float
    ) -> torch.Tensor:
        out = f[rows].unsqueeze(1) + g.unsqueeze(0)  # one block-sized temporary, then in place
        return out.sub_(blk).div_(epsilon).exp_()

    def kernel_apply(
        self,
        v: torch.Tensor,
        *,
        axis: int,
        epsilon: float,
        f: torch.Tensor,
        g: torch.Tensor,
        cache: bool = False,
    ) -> torch.Tensor:
        """Multiply by the stabilised kernel ``K_ij = exp((f_i + g_j - C_ij) / epsilon)``.

        Parameters
        ----------
        v
            ``(m, G)`` for ``axis=1`` (returns ``K @ v``, shape ``(n, G)``) or
            ``(n, G)`` for ``axis=0`` (returns ``K.T @ v``, shape ``(m, G)``).
        f, g
            Reference potentials of shapes ``(n,)`` and ``(m,)``.
        cache
            Keep the dense kernel between calls while ``f``, ``g`` and
            ``epsilon`` are unchanged (only when it fits the block budget).
        """
        n, m = self.shape
        if cache and self._kernel_fits():
            kmat = self._cached(f, g, epsilon, False)
            if kmat is None:
                kmat = torch.empty((n, m), dtype=self.dtype, device=self.device)
                for rows, blk in self.cost_blocks():
                    kmat[rows] = self._kernel_block(blk, rows, f, g, epsilon)
                self._kernel_cache[False] = (f, g, float(epsilon), kmat)
            return kmat @ v if axis == 1 else kmat.T @ v
        if axis == 1:
            out = torch.empty((n, v.shape[1]), dtype=v.dtype, device=v.device)
            for rows, blk in self.cost_blocks():
                out[rows] = self._kernel_block(blk, rows, f, g, epsilon) @ v
            return out
        out = torch.zeros((m, v.shape[1]), dtype=v.dtype, device=v.device)
        for rows, blk in self.cost_blocks():
            out += self._kernel_block(blk, rows, f, g, epsilon).T @ v[rows]
        return out

    def _cached(
        self, f: torch.Tensor, g: torch.Tensor, epsilon: float, transpose: bool
    ) -> torch.Tensor | None:
        c = self._kernel_cache.get(transpose)
        if c is not None and c[0] is f and c[1] is g and c[2] == epsilon:
            return c[3]
        return None

    def _kernel_fits(self) -> bool:
        n, m = self.shape
        return n * m * torch.finfo(self.dtype).bits // 8 <= 4 * _BLOCK_BYTES

    def clear_cache(self) -> None:
        """Drop cached kernel matrices."""
        self._kernel_cache = {}

    def c_transform_init(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference potentials from a double c-transform.

        ``f_i = min_j C_ij`` and ``g_j = min_i (C_ij - f_i)``: then
        ``f_i + g_j <= C_ij`` everywhere with equality at least once in every
        row and every column, so the stabilised kernel
        ``exp((f_i + g_j - C_ij) / epsilon)`` has entries in ``(0, 1]`` and no
        row or column underflows, whatever ``epsilon``.
        """
        n, m = self.shape
        f = torch.empty(n, dtype=self.dtype, device=self.device)
        for rows, blk in self.cost_blocks():
            f[rows] = blk.amin(1)
        g = torch.full((m,), math.inf, dtype=self.dtype, device=self.device)
        for rows, blk in self.cost_blocks():
            g = torch.minimum(g, (blk - f[rows].unsqueeze(1)).amin(0))
        return f, g

    def plan_cost(self, f: torch.Tensor, g: torch.Tensor, epsilon: float) -> torch.Tensor:
        """Return ``<P, C>`` for the plan ``P_ij = exp((f_i + g_j - C_ij) / epsilon)``.

        ``f`` and ``g`` are ``(n, G)`` and ``(m, G)``; the result has shape ``(G,)``.
        Several columns share one kernel product: with ``f_ref``, ``g_ref`` the
        per-point maxima over columns, ``<P_k, C> = u_k^T (K o C) v_k`` where
        ``K = exp((f_ref + g_ref - C) / eps)`` and ``u, v <= 1`` (exact per-column
        sums for a block whose shared kernel would overflow).
        """
        n_cols = f.shape[1]
        total = torch.zeros(n_cols, dtype=f.dtype, device=f.device)
        if n_cols == 1:
            for rows, blk in self.cost_blocks():
                total += _exact_plan_cost(f[rows], g, blk, epsilon)
            return total
        f_ref, g_ref = _column_max(f), _column_max(g)
        u = torch.exp((f - f_ref[:, None]) / epsilon)
        v = torch.exp((g - g_ref[:, None]) / epsilon)
        limit = 0.5 * math.log(torch.finfo(f.dtype).max)
        for rows, blk in self.cost_blocks():
            expo = (f_ref[rows].unsqueeze(1) + g_ref.unsqueeze(0) - blk) / epsilon
            if float(expo.max()) > limit:
                for start in range(rows.start, rows.stop, 64):
                    sub = slice(start, min(rows.stop, start + 64))
                    total += _exact_plan_cost(
                        f[sub], g, blk[sub.start - rows.start : sub.stop - rows.start], epsilon
                    )
                continue
            kc = expo.exp_().mul_(blk).nan_to_num_(nan=0.0)
            total += (u[rows] * (kc @ v)).sum(0)
        return total

    def plan_mass(self, f: torch.Tensor, g: torch.Tensor, epsilon: float) -> torch.Tensor:
        """Return the total mass ``sum_ij P_ij`` per column, shape ``(G,)``."""
        lse = self.lse(g / epsilon, axis=1, epsilon=epsilon)
        return torch.exp(torch.logsumexp(f / epsilon + lse, dim=0))

    def plan_topk(
        self, f: torch.Tensor, g: torch.Tensor, epsilon: float, k: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return (rows, cols, values) of the ``k`` largest plan entries of each row."""
        k = min(k, self.shape[1])
        rows_out, cols_out, vals_out = [], [], []
        for rows, blk in self.cost_blocks():
            logp = (f[rows].unsqueeze(1) + g.unsqueeze(0) - blk) / epsilon
            vals, idx = torch.topk(logp, k, dim=1)
            r = torch.arange(rows.start, rows.stop, device=idx.device).repeat_interleave(k)
            rows_out.append(r)
            cols_out.append(idx.reshape(-1))
            vals_out.append(torch.exp(vals).reshape(-1))
        return (
            torch.cat(rows_out).cpu().numpy(),
            torch.cat(cols_out).cpu().numpy(),
            torch.cat(vals_out).detach().cpu().numpy(),
        )


class DenseGeometry(Geometry):
    """An explicit cost matrix.

    Parameters
    ----------
    cost
        ``(n, m)`` array or tensor.
    scale_cost
        Divide the cost by this number, or by its ``"mean"``, ``"max"`` or ``"median"``.
    device, dtype
        Where and in which precision to compute (default: those of ``cost``).
    """

    def __init__(
        self,
        cost: torch.Tensor | np.ndarray,
        *,
        scale_cost: ScaleCost = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(scale_cost)
        c = as_tensor(cost, device=device, dtype=dtype)
        if c.ndim != 2:
            raise ValueError(f"cost must be a 2-D matrix, got shape {tuple(c.shape)}.")
        if not torch.is_floating_point(c):
            c = c.to(torch.get_default_dtype())
        self.cost = c
        self.shape = (c.shape[0], c.shape[1])
        self.dtype = c.dtype
        self.device = c.device

    def _raw_blocks(self, block_rows: int) -> Iterator[tuple[slice, torch.Tensor]]:
        n = self.shape[0]
        for start in range(0, n, block_rows):
            rows = slice(start, min(n, start + block_rows))
            yield rows, self.cost[rows]

    def _raw_summary(self) -> tuple[float, float, float]:
        c = self.cost
        return float(c.mean()), float(c.max()), float(c.reshape(-1).median())

    def cost_matrix(self) -> torch.Tensor:
        return self.cost / self.scale if self.scale != 1.0 else self.cost


class PointCloud(Geometry):
    """Costs between two point clouds, computed on the fly.

    Parameters
    ----------
    x
        ``(n, d)`` source points.
    y
        ``(m, d)`` target points (default: ``x``).
    cost
        ``"sqeuclidean"`` (``|x - y|^2``) or ``"euclidean"`` (``|x - y|``).
    batch_size
        Rows of the cost computed at a time. ``None`` computes the whole matrix
        when it is needed (and caches the kernel when it fits memory); an
        integer never holds more than ``batch_size x m`` costs at once.
    scale_cost
        Divide the cost by this number, or by its ``"mean"``, ``"max"`` or
        ``"median"`` (``"mean"`` is exact and cheap for squared Euclidean).
    device, dtype
        Where and in which precision to compute (default: those of ``x``).
    """

    def __init__(
        self,
        x: torch.Tensor | np.ndarray,
        y: torch.Tensor | np.ndarray | None = None,
        *,
        cost: Literal["sqeuclidean", "euclidean"] = "sqeuclidean",
        batch_size: int | None = None,
        scale_cost: ScaleCost = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(scale_cost)
        xt = as_tensor(x, device=device, dtype=dtype)
        if not torch.is_floating_point(xt):
            xt = xt.to(torch.get_default_dtype())
        yt = xt if y is None else as_tensor(y, device=xt.device, dtype=xt.dtype)
        if xt.ndim != 2 or yt.ndim != 2 or xt.shape[1] != yt.shape[1]:
            raise ValueError(
                f"x and y must be 2-D with the same number of columns, got {tuple(xt.shape)} "
                f"and {tuple(yt.shape)}."
            )
        if cost not in ("sqeuclidean", "euclidean"):
            raise ValueError(f"cost must be 'sqeuclidean' or 'euclidean', got {cost!r}.")
        if batch_size is not None and batch_size < 1:
            raise ValueError("batch_size must be a positive integer or None.")
        self.x, self.y = xt, yt
        self.cost_fn = cost
        self.batch_size = batch_size
        self.shape = (xt.shape[0], yt.shape[0])
        self.dtype = xt.dtype
        self.device = xt.device
        self._xx = (xt * xt).sum(1)
        self._yy = (yt * yt).sum(1)

    def _block(self, rows: slice) -> torch.Tensor:
        xb = self.x[rows]
        c = self._xx[rows].unsqueeze(1) + self._yy.unsqueeze(0) - 2.0 * (xb @ self.y.T)
        c = c.clamp_min(0.0)
        if self.cost_fn == "euclidean":
            c = c.sqrt()
        return c

    def _raw_blocks(self, block_rows: int) -> Iterator[tuple[slice, torch.Tensor]]:
        n = self.shape[0]
        needs_grad = torch.is_grad_enabled() and (self.x.requires_grad or self.y.requires_grad)
        if self.batch_size is None and self._kernel_fits() and not needs_grad:
            # Small enough: compute the cost once and keep it (never with autograd).
            if getattr(self, "_cost", None) is None:
                self._cost = self._block(slice(0, n))
            for start in range(0, n, block_rows):
                rows = slice(start, min(n, start + block_rows))
                yield rows, self._cost[rows]
            return
        step = min(block_rows, self.batch_size) if self.batch_size else block_rows
        for start in range(0, n, step):
            rows = slice(start, min(n, start + step))
            yield rows, self._block(rows)

    def _raw_summary(self) -> tuple[float, float, float]:
        if self.cost_fn == "sqeuclidean":
            mx, my = self.x.mean(0), self.y.mean(0)
            mean = float(self._xx.mean() + self._yy.mean() - 2.0 * (mx @ my))
            _, cmax, median = super()._raw_summary()
            return mean, cmax, median
        return super()._raw_summary()

    def _kernel_fits(self) -> bool:
        return self.batch_size is None and super()._kernel_fits()

    def cost_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-rank factors ``(A, B)`` with ``C = A @ B.T`` (squared Euclidean only).

        ``A = [|x|^2, 1, -2x]`` and ``B = [1, |y|^2, y]``, both of rank ``d + 2``,
        divided by the cost scale.
        """
        if self.cost_fn != "sqeuclidean":
            raise ValueError("A low-rank factorisation exists only for the squared Euclidean cost.")
        ones_x = torch.ones_like(self._xx)
        ones_y = torch.ones_like(self._yy)
        a = torch.cat([self._xx[:, None], ones_x[:, None], -2.0 * self.x], dim=1)
        b = torch.cat([ones_y[:, None], self._yy[:, None], self.y], dim=1)
        return a / self.scale, b


class SparseGeometry(Geometry):
    """A cost defined only on the edges of a sparse graph (CSR).

    Every pair ``(i, j)`` that is not a stored entry has infinite cost, hence a
    zero kernel: transport happens only along the graph's edges (spatial
    neighbours, candidate matches). Stored zeros are real zero costs.

    Parameters
    ----------
    cost
        ``scipy.sparse`` matrix (any format, converted to CSR) or a torch
        sparse tensor of shape ``(n, m)``; its stored values are the costs.
    scale_cost
        Divide the stored costs by this number, or by their ``"mean"``,
        ``"max"`` or ``"median"``.
    device, dtype
        Where and in which precision to compute (default: CPU, float32 for
        float32 input, else float64).
    """

    def __init__(
        self,
        cost: sp.spmatrix | sp.sparray | torch.Tensor,
        *,
        scale_cost: ScaleCost = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(scale_cost)
        if isinstance(cost, torch.Tensor):
            cost_csr = cost.to_sparse_csr()
            crow, col = cost_csr.crow_indices(), cost_csr.col_indices()
            vals = cost_csr.values()
            shape = (int(cost.shape[0]), int(cost.shape[1]))
            indptr, indices, data = crow.cpu().numpy(), col.cpu().numpy(), vals.cpu().numpy()
        elif sp.issparse(cost):
            csr = sp.csr_matrix(cost)
            csr.sort_indices()
            shape = (int(csr.shape[0]), int(csr.shape[1]))
            indptr, indices, data = csr.indptr, csr.indices, csr.data
        else:
            raise TypeError("cost must be a scipy sparse matrix or a torch sparse tensor.")
        if dtype is None:
            dtype = torch.float32 if np.asarray(data).dtype == np.float32 else torch.float64
        dev = resolve_device(device) if device is not None else torch.device("cpu")
        self.shape = shape
        self.dtype = dtype
        self.device = dev
        counts = np.diff(indptr)
        self._row = torch.from_numpy(np.repeat(np.arange(shape[0]), counts)).to(dev)
        self._col = torch.from_numpy(np.asarray(indices, dtype=np.int64)).to(dev)
        self._crow = torch.from_numpy(np.asarray(indptr, dtype=np.int64)).to(dev)
        self._vals = torch.from_numpy(np.asarray(data)).to(device=dev, dtype=dtype)
        if not torch.isfinite(self._vals).all():
            raise ValueError("SparseGeometry costs must be finite; leave absent edges unstored.")
        # Permutation that orders the edges by column: the transposed CSR.
        order = torch.argsort(self._col * shape[0] + self._row)
        self._t_order = order
        t_counts = torch.bincount(self._col, minlength=shape[1])
        self._t_crow = torch.cat([torch.zeros(1, dtype=torch.long, device=dev), t_counts.cumsum(0)])
        self._t_col = self._row[order]
        self._empty_rows = int((counts == 0).sum())

    @property
    def nnz(self) -> int:
        """Number of edges."""
        return int(self._vals.numel())

    @property
    def values(self) -> torch.Tensor:
        """Scaled edge costs in CSR order."""
        return self._vals / self.scale if self.scale != 1.0 else self._vals

    def _raw_summary(self) -> tuple[float, float, float]:
        v = self._vals
        return float(v.mean()), float(v.max()), float(v.median())

    def _raw_blocks(self, block_rows: int) -> Iterator[tuple[slice, torch.Tensor]]:
        raise TypeError("SparseGeometry has no dense blocks; use its sparse reductions.")

    def cost_matrix(self) -> torch.Tensor:
        """Dense cost with ``inf`` off the graph (small problems only)."""
        out = torch.full(self.shape, math.inf, dtype=self.dtype, device=self.device)
        out[self._row, self._col] = self.values
        return out

    def to_scipy(self) -> sp.csr_matrix:
        """Return the scaled cost as a scipy CSR matrix."""
        return sp.csr_matrix(
            (self.values.cpu().numpy(), self._col.cpu().numpy(), self._crow.cpu().numpy()),
            shape=self.shape,
        )

    def _columns_per_chunk(self, n_cols: int) -> int:
        per_col = max(1, self.nnz * torch.finfo(self.dtype).bits // 8)
        return int(max(1, min(n_cols, _BLOCK_BYTES // per_col)))

    def lse(self, h: torch.Tensor, *, axis: int, epsilon: float) -> torch.Tensor:
        n, m = self.shape
        src, dst, size = (self._col, self._row, n) if axis == 1 else (self._row, self._col, m)
        c = (self.values / epsilon).unsqueeze(1)
        out = torch.empty((size, h.shape[1]), dtype=h.dtype, device=h.device)
        step = self._columns_per_chunk(h.shape[1])
        for start in range(0, h.shape[1], step):
            cols = slice(start, min(h.shape[1], start + step))
            z = h[src, cols] - c
            zmax = torch.full((size, z.shape[1]), -math.inf, dtype=z.dtype, device=z.device)
            idx = dst.unsqueeze(1).expand_as(z)
            zmax = zmax.scatter_reduce(0, idx, z, reduce="amax", include_self=True)
            safe = torch.where(torch.isfinite(zmax), zmax, torch.zeros_like(zmax))
            s = torch.zeros_like(zmax).index_add_(0, dst, torch.exp(z - safe[dst]))
            out[:, cols] = torch.log(s) + safe
        return out

    def _kernel_matrix(self, f: torch.Tensor, g: torch.Tensor, epsilon: float, transpose: bool):
        """Sparse kernel ``exp((f_i + g_j - C_ij) / eps)`` (or its transpose).

        On CPU a scipy CSR matrix (its products are fast and predictable for
        every dtype); on other devices a torch sparse CSR tensor.
        """
        vals = torch.exp((f[self._row] + g[self._col] - self.values) / epsilon)
        n, m = self.shape
        if transpose:
            vals, crow, col, size = vals[self._t_order], self._t_crow, self._t_col, (m, n)
        else:
            crow, col, size = self._crow, self._col, (n, m)
        if self.device.type == "cpu":
            if not hasattr(self, "_np_index"):
                self._np_index = {
                    False: (self._col.numpy().astype(np.int32), self._crow.numpy()),
                    True: (self._t_col.numpy().astype(np.int32), self._t_crow.numpy()),
                }
                if self.nnz < np.iinfo(np.int32).max:
                    self._np_index = {
                        k: (i, p.astype(np.int32)) for k, (i, p) in self._np_index.items()
                    }
            idx, ptr = self._np_index[transpose]
            return sp.csr_matrix((vals.numpy(), idx, ptr), shape=size)
        return torch.sparse_csr_tensor(crow, col, vals, size=size)

    def kernel_apply(
        self,
        v: torch.Tensor,
        *,
        axis: int,
        epsilon: float,
        f: torch.Tensor,
        g: torch.Tensor,
        cache: bool = False,
    ) -> torch.Tensor:
        transpose = axis == 0
        if v.requires_grad or f.requires_grad or g.requires_grad or self._vals.requires_grad:
            # Differentiable path: gather / index_add over the edges.
            vals = torch.exp((f[self._row] + g[self._col] - self.values) / epsilon)
            src, dst, size = (
                (self._row, self._col, self.shape[1])
                if transpose
                else (self._col, self._row, self.shape[0])
            )
            out = torch.zeros((size, v.shape[1]), dtype=v.dtype, device=v.device)
            return out.index_add(0, dst, vals.unsqueeze(1) * v[src])
        kmat = self._cached(f, g, epsilon, transpose) if cache else None
        if kmat is None:
            kmat = self._kernel_matrix(f, g, epsilon, transpose)
            if cache:
                self._kernel_cache[transpose] = (f, g, float(epsilon), kmat)
        if isinstance(kmat, torch.Tensor):
            return kmat @ v
        return torch.from_numpy(np.asarray(kmat @ v.numpy()))

    def c_transform_init(self) -> tuple[torch.Tensor, torch.Tensor]:
        n, m = self.shape
        c = self.values
        f = torch.full((n,), math.inf, dtype=c.dtype, device=c.device)
        f = f.scatter_reduce(0, self._row, c, reduce="amin", include_self=True)
        f = torch.where(torch.isfinite(f), f, torch.zeros_like(f))
        g = torch.full((m,), math.inf, dtype=c.dtype, device=c.device)
        g = g.scatter_reduce(0, self._col, c - f[self._row], reduce="amin", include_self=True)
        g = torch.where(torch.isfinite(g), g, torch.zeros_like(g))
        return f, g

    def plan_cost(self, f: torch.Tensor, g: torch.Tensor, epsilon: float) -> torch.Tensor:
        # One sparse product for all columns (see Geometry.plan_cost); exact
        # column-chunked sums only if the shared kernel would overflow.
        c = self.values
        f_ref, g_ref = _column_max(f), _column_max(g)
        expo = (f_ref[self._row] + g_ref[self._col] - c) / epsilon
        if float(expo.max()) > 0.5 * math.log(torch.finfo(f.dtype).max):
            step = self._columns_per_chunk(f.shape[1])
            parts = []
            for start in range(0, f.shape[1], step):
                cols = slice(start, start + step)
                p = torch.exp((f[self._row, cols] + g[self._col, cols] - c[:, None]) / epsilon)
                parts.append((p * c[:, None]).sum(0))
            return torch.cat(parts)
        u = torch.exp((f - f_ref[:, None]) / epsilon)
        v = torch.exp((g - g_ref[:, None]) / epsilon)
        kc = expo.exp_().mul_(c)
        kmat = torch.sparse_coo_tensor(
            torch.stack([self._row, self._col]), kc, size=self.shape
        ).coalesce()
        return (u * torch.sparse.mm(kmat, v)).sum(0)

    def plan_topk(
        self, f: torch.Tensor, g: torch.Tensor, epsilon: float, k: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        logp = (f[self._row] + g[self._col] - self.values) / epsilon
        # Rank edges within each row by plan value, keep the first k.
        order = torch.argsort(-logp, stable=True)
        order = order[torch.argsort(self._row[order], stable=True)]
        row_sorted = self._row[order]
        start = self._crow[row_sorted]
        rank = torch.arange(order.numel(), device=order.device) - start
        keep = order[rank < k]
        return (
            self._row[keep].cpu().numpy(),
            self._col[keep].cpu().numpy(),
            torch.exp(logp[keep]).detach().cpu().numpy(),
        )


def _column_max(x: torch.Tensor) -> torch.Tensor:
    """Per-row maximum over columns, 0 where a row is all ``-inf``."""
    m = x.amax(1)
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def _exact_plan_cost(
    f: torch.Tensor, g: torch.Tensor, blk: torch.Tensor, epsilon: float
) -> torch.Tensor:
    """``sum_ij P_ij C_ij`` per column for a row block, with an ``(r, m, G)`` temporary."""
    c = blk.unsqueeze(-1)
    p = torch.exp((f.unsqueeze(1) + g.unsqueeze(0) - c) / epsilon)
    return torch.where(p > 0, p * c, torch.zeros_like(p)).sum(dim=(0, 1))
