"""Diffusion kernels on spot arrays: FFT convolution on lattices, sparse radius graph otherwise.

A kernel ``K`` is an ``N x N`` linear operator, never materialised densely: column ``j``
is the distribution over observed spots of a molecule released at spot ``j``. Every
column sums to 1 over the spots of the array (in and out of tissue): a molecule that a
Gaussian would carry past the edge of the array is kept on its nearest side, by
dividing each column by its in-array mass (``K = K_raw diag(1 / K_raw^T 1)``).

Two implementations share one interface (``apply(Z) = K Z`` and ``apply_t(R) = K^T R``
for ``N x B`` torch tensors):

- :class:`LatticeKernel`: spots on a square grid (Stereo-seq bins, Slide-seq-like
  rasters) or on the Visium hexagonal array (``array_row``, ``array_col``); ``K_raw``
  is a translation-invariant convolution done with ``torch.fft`` (cost independent of
  sigma, ``O(cells log cells)`` per gene);
- :class:`SparseKernel`: any coordinates; ``K_raw`` is a Gaussian on the radius graph
  truncated at ``truncate * sigma`` (:func:`chronotope.graph.radius_graph`), applied as
  one torch sparse product.

Distances and ``sigma`` are in units of the spot spacing (centre-to-centre distance of
adjacent spots).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.sparse as sp
import torch

from chronotope._errors import ChronotopeInputError
from chronotope._settings import resolve_device

__all__ = [
    "LatticeKernel",
    "SparseKernel",
    "infer_lattice",
    "make_kernel",
    "profile",
]

Profile = Literal["gaussian", "student"]


def profile(
    d2: np.ndarray, sigma: float, kind: Profile = "gaussian", nu: float = 1.0
) -> np.ndarray:
    """Unnormalised radial kernel at squared distances ``d2`` (spacing units).

    ``"gaussian"``: ``exp(-d2 / (2 sigma^2))`` (the Gibbs kernel of the squared
    Euclidean cost at ``epsilon = 2 sigma^2``). ``"student"``: the heavy-tailed 2-D
    Student-t ``(1 + d2 / (nu sigma^2))^(-(nu + 2) / 2)`` (``nu = 1``: Cauchy-like tails).
    """
    if kind == "gaussian":
        return np.exp(-d2 / (2.0 * sigma * sigma))
    if kind == "student":
        return (1.0 + d2 / (nu * sigma * sigma)) ** (-(nu + 2.0) / 2.0)
    raise ChronotopeInputError(f"unknown kernel profile {kind!r}; use 'gaussian' or 'student'")


@dataclass(frozen=True)
class Lattice:
    """Integer cell index of every spot on a regular grid.

    Attributes
    ----------
    kind
        ``"square"`` or ``"hex"`` (Visium: rows ``r``, columns ``c`` with ``r + c`` of one
        parity; neighbours in a row are 2 columns apart).
    rows, cols
        Cell index of every spot (``int64``, starting at 0).
    """

    kind: str
    rows: np.ndarray
    cols: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.rows.max()) + 1, int(self.cols.max()) + 1

    def cell_offsets(self) -> tuple[float, float]:
        """Physical size (spacing units) of one step in rows and in columns."""
        if self.kind == "hex":
            return math.sqrt(3.0) / 2.0, 0.5
        return 1.0, 1.0


def infer_lattice(
    coords: np.ndarray | None = None,
    *,
    array_row: np.ndarray | None = None,
    array_col: np.ndarray | None = None,
    tol: float = 0.2,
) -> Lattice | None:
    """Find the lattice of the spots, or ``None`` when they are not on one.

    With ``array_row`` / ``array_col`` (Visium) the hexagonal array is used directly
    (``row + col`` must have one parity, cells unique). Otherwise ``coords`` are tested
    for an axis-aligned square grid (spacing from the nearest-neighbour distance, every
    spot within ``tol`` spacings of a cell, cells unique).
    """
    if array_row is not None and array_col is not None:
        r = np.asarray(array_row, dtype=np.int64)
        c = np.asarray(array_col, dtype=np.int64)
        r, c = r - r.min(), c - c.min()
        par = (r + c) % 2
        if r.size and (par == par[0]).all():
            if np.unique(r * (c.max() + 1) + c).size == r.size:
                return Lattice("hex", r, c)
        sq = np.unique(r * (c.max() + 1) + c).size == r.size
        if sq:
            return Lattice("square", r, c)
        return None
    if coords is None:
        return None
    xy = np.asarray(coords, dtype=np.float64)[:, :2]
    if xy.shape[0] < 4:
        return None
    s = spot_spacing(xy)
    g = (xy - xy.min(axis=0)) / s
    cells = np.rint(g)
    if np.abs(g - cells).max() > tol:
        return None
    cells = cells.astype(np.int64)
    r, c = cells[:, 1], cells[:, 0]
    if np.unique(r * (c.max() + 1) + c).size != r.size:
        return None
    return Lattice("square", r, c)


def spot_spacing(coords: np.ndarray) -> float:
    """Median distance from a spot to its nearest other spot (the spot spacing)."""
    from scipy.spatial import cKDTree

    xy = np.asarray(coords, dtype=np.float64)
    n = xy.shape[0]
    if n < 2:
        return 1.0
    probe = xy if n <= 20000 else xy[np.linspace(0, n - 1, 20000).astype(np.int64)]
    d, _ = cKDTree(xy).query(probe, k=2)
    d = d[:, 1]
    d = d[d > 0]
    if d.size == 0:
        raise ChronotopeInputError("all spots share one position; cannot find the spacing")
    return float(np.median(d))


class LatticeKernel:
    """FFT convolution kernel on a lattice; columns normalised to sum to 1 in the array.

    Parameters
    ----------
    lattice
        Cell index of every spot (:func:`infer_lattice`).
    sigma
        Kernel width in spot spacings.
    kind, nu
        Radial profile (:func:`profile`).
    truncate
        Kernel support radius in units of ``sigma`` (Gaussian: 4; heavy tails: more).
    device, dtype
        Torch device and float dtype of the operator.
    """

    def __init__(
        self,
        lattice: Lattice,
        sigma: float,
        *,
        kind: Profile = "gaussian",
        nu: float = 1.0,
        truncate: float = 4.0,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        from scipy.fft import next_fast_len

        if not np.isfinite(sigma) or sigma <= 0:
            raise ChronotopeInputError(f"sigma must be > 0, got {sigma}")
        self.sigma, self.kind, self.nu = float(sigma), kind, float(nu)
        self.device = resolve_device(device or "cpu")
        self.dtype = dtype
        self.n = lattice.rows.size
        h, w = lattice.shape
        dr, dc = lattice.cell_offsets()
        radius = truncate * sigma
        rh = max(1, math.ceil(radius / dr))
        rw = max(1, math.ceil(radius / dc))
        rh, rw = min(rh, h), min(rw, w)  # wider than the array is pointless
        self.hp = next_fast_len(h + 2 * rh)
        self.wp = next_fast_len(w + 2 * rw, real=True)
        ii = np.arange(-rh, rh + 1)[:, None] * dr
        jj = np.arange(-rw, rw + 1)[None, :] * dc
        k = profile(ii * ii + jj * jj, sigma, kind, nu)
        k[k < 1e-12 * k.max()] = 0.0
        full = np.zeros((self.hp, self.wp))
        # centre of the kernel at cell (0, 0) with wrap-around: circular = linear here
        full[np.ix_(np.arange(-rh, rh + 1) % self.hp, np.arange(-rw, rw + 1) % self.wp)] = k
        self._kf = torch.fft.rfft2(torch.as_tensor(full, dtype=torch.float64)).to(
            device=self.device,
            dtype=torch.complex64 if dtype == torch.float32 else torch.complex128,
        )
        # spots sit in the top-left h x w corner; the rest is zero padding (>= rh, rw)
        self._flat = torch.as_tensor(lattice.rows * self.wp + lattice.cols, device=self.device)
        ones = torch.ones(self.n, 1, dtype=dtype, device=self.device)
        colsum = self._raw(ones)[:, 0]
        self._inv = (1.0 / colsum.clamp_min(1e-30)).unsqueeze(1)
        self.self_weight = float(k.max()) * self._inv[:, 0]  # K_jj per column

    def _raw(self, z: torch.Tensor) -> torch.Tensor:
        b = z.shape[1]
        grid = torch.zeros(b, self.hp * self.wp, dtype=self.dtype, device=self.device)
        grid[:, self._flat] = z.T.to(self.dtype)
        f = torch.fft.rfft2(grid.view(b, self.hp, self.wp))
        del grid
        f *= self._kf
        out = torch.fft.irfft2(f, s=(self.hp, self.wp)).reshape(b, -1)
        return out[:, self._flat].T.contiguous()

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        """``K @ z`` for an ``N x B`` tensor."""
        return self._raw(z * self._inv)

    def apply_t(self, r: torch.Tensor) -> torch.Tensor:
        """``K.T @ r`` for an ``N x B`` tensor (the raw kernel is symmetric)."""
        return self._raw(r) * self._inv


class SparseKernel:
    """Truncated kernel on the radius graph; one torch sparse product per application.

    Parameters
    ----------
    coords
        Spot coordinates in spacing units, ``(N, 2)`` or ``(N, 3)``.
    sigma, kind, nu, truncate, device, dtype
        As :class:`LatticeKernel`; edges longer than ``truncate * sigma`` are dropped.
    """

    def __init__(
        self,
        coords: np.ndarray,
        sigma: float,
        *,
        kind: Profile = "gaussian",
        nu: float = 1.0,
        truncate: float = 3.0,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        from chronotope.graph import radius_graph
        from chronotope.graph.ops import to_torch_sparse

        if not np.isfinite(sigma) or sigma <= 0:
            raise ChronotopeInputError(f"sigma must be > 0, got {sigma}")
        self.sigma, self.kind, self.nu = float(sigma), kind, float(nu)
        self.device = resolve_device(device or "cpu")
        self.dtype = dtype
        self.n = coords.shape[0]
        _, dist = radius_graph(coords, max(truncate * sigma, 1e-9), include_self=True)
        dist = sp.csr_matrix(dist)
        d2 = np.asarray(dist.data, dtype=np.float64) ** 2
        dist.data = profile(d2, sigma, kind, nu)
        dist.eliminate_zeros()
        colsum = np.asarray(dist.sum(axis=0)).ravel()
        kmat = sp.csr_matrix(dist @ sp.diags(1.0 / np.maximum(colsum, 1e-300)))
        self.self_weight = torch.as_tensor(kmat.diagonal(), dtype=dtype, device=self.device)
        self._k = to_torch_sparse(kmat, device=self.device, dtype=dtype)
        self._kt = to_torch_sparse(sp.csr_matrix(kmat.T), device=self.device, dtype=dtype)
        self.nnz = int(kmat.nnz)

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        """``K @ z`` for an ``N x B`` tensor."""
        return self._k @ z

    def apply_t(self, r: torch.Tensor) -> torch.Tensor:
        """``K.T @ r`` for an ``N x B`` tensor."""
        return self._kt @ r


Kernel = LatticeKernel | SparseKernel


def make_kernel(
    coords: np.ndarray,
    sigma: float,
    *,
    lattice: Lattice | None = None,
    method: Literal["auto", "fft", "sparse"] = "auto",
    kind: Profile = "gaussian",
    nu: float = 1.0,
    truncate: float | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Kernel:
    """Build the kernel: FFT on a lattice (``method="auto"`` when one is given), else sparse.

    ``coords`` are in spacing units (used by the sparse kernel only).
    """
    if method == "fft" and lattice is None:
        raise ChronotopeInputError("method='fft' needs spots on a lattice (none was found)")
    if method in ("auto", "fft") and lattice is not None:
        t = truncate if truncate is not None else (4.0 if kind == "gaussian" else 12.0)
        return LatticeKernel(
            lattice, sigma, kind=kind, nu=nu, truncate=t, device=device, dtype=dtype
        )
    if method not in ("auto", "sparse", "fft"):
        raise ChronotopeInputError(f"method must be 'auto', 'fft' or 'sparse', got {method!r}")
    t = truncate if truncate is not None else (3.0 if kind == "gaussian" else 8.0)
    return SparseKernel(coords, sigma, kind=kind, nu=nu, truncate=t, device=device, dtype=dtype)
