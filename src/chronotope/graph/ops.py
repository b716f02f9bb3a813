"""Operations on sparse spatial graphs: normalisation, propagation, kernels, torch export.

Everything stays sparse: normalisation rescales the stored values of a CSR matrix
(structure, explicit zeros included, is kept) and propagation is a chain of sparse
times dense (or sparse) products, never a matrix power.
"""

from __future__ import annotations

import sys
import warnings
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import scipy.sparse as sp

from chronotope._errors import ChronotopeInputError

if TYPE_CHECKING:
    import torch

__all__ = [
    "gaussian_weights",
    "normalize_adjacency",
    "propagate",
    "to_torch_sparse",
]


def _as_square_csr(A: Any, name: str = "A") -> sp.csr_matrix:
    if _is_torch(A):
        raise ChronotopeInputError(f"{name} must be a scipy sparse matrix, not a torch tensor.")
    if sp.issparse(A):
        out = sp.csr_matrix(A)
    else:
        arr = np.asarray(A)
        if arr.ndim != 2:
            raise ChronotopeInputError(f"{name} must be a 2-D matrix, got shape {arr.shape}.")
        out = sp.csr_matrix(arr)
    if out.shape[0] != out.shape[1]:
        raise ChronotopeInputError(f"{name} must be square, got shape {out.shape}.")
    return out


def _is_torch(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _float_dtype(dtype: np.dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    return dtype if dtype in (np.float32, np.float64) else np.dtype(np.float64)


def normalize_adjacency(
    A: sp.spmatrix | sp.sparray,
    *,
    mode: Literal["sym", "row"] = "sym",
    self_loops: bool = True,
) -> sp.csr_matrix:
    """Normalise a (weighted) adjacency matrix.

    With ``Ã = A + I`` if ``self_loops`` else ``A``, and ``D`` the diagonal of the row
    sums of ``Ã``:

    * ``mode="sym"``: ``D^-1/2 Ã D^-1/2`` (the GCN propagation matrix; symmetric when
      ``A`` is, eigenvalues in ``[-1, 1]``, and ``1`` is an eigenvalue with
      eigenvector ``D^1/2 1`` on every component with edges).
    * ``mode="row"``: ``D^-1 Ã`` (random walk; rows of non-isolated nodes sum to 1).

    Isolated nodes (zero row sum) get a zero row and column instead of a division by
    zero; with ``self_loops=True`` they have degree 1 and keep their own value.

    Parameters
    ----------
    A
        Square sparse matrix with non-negative weights (e.g. ``obsp["spatial_connectivities"]``
        or :func:`gaussian_weights`). ``I`` is added even where ``A`` already has a
        diagonal entry.
    mode
        ``"sym"`` or ``"row"``.
    self_loops
        Add the identity before normalising.

    Returns
    -------
    CSR matrix with the structure of ``Ã``, ``float32`` if ``A`` is ``float32``, else
    ``float64``.
    """
    if mode not in ("sym", "row"):
        raise ChronotopeInputError(f"mode must be 'sym' or 'row', got {mode!r}.")
    A = _as_square_csr(A)
    dtype = _float_dtype(A.dtype)
    A = A.astype(dtype, copy=True)
    if A.data.size and not np.isfinite(A.data).all():
        raise ChronotopeInputError("A contains NaN or infinite weights.")
    if A.data.size and A.data.min() < 0:
        raise ChronotopeInputError("A has negative weights; normalisation needs weights >= 0.")
    if self_loops:
        A = sp.csr_matrix(A + sp.identity(A.shape[0], dtype=dtype, format="csr"))
    A.sort_indices()
    deg = np.asarray(A.sum(axis=1), dtype=np.float64).ravel()
    rows = np.repeat(np.arange(A.shape[0]), np.diff(A.indptr))
    with np.errstate(divide="ignore"):
        if mode == "sym":
            inv = np.where(deg > 0, 1.0 / np.sqrt(deg), 0.0)
            scale = inv[rows] * inv[A.indices]
        else:
            inv = np.where(deg > 0, 1.0 / deg, 0.0)
            scale = inv[rows]
    A.data = (A.data * scale).astype(dtype, copy=False)
    return A


def to_torch_sparse(
    A: sp.spmatrix | sp.sparray,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Convert a scipy sparse matrix to a ``torch.sparse_csr_tensor``.

    Parameters
    ----------
    A
        Any scipy sparse matrix (converted to CSR first).
    device
        Target device (``None``: CPU).
    dtype
        Value dtype (``None``: keep ``A``'s, with float16 and integers as float32).

    Returns
    -------
    Sparse CSR tensor with ``int64`` indices, on ``device``.
    """
    import torch

    if not sp.issparse(A):
        raise ChronotopeInputError(f"A must be a scipy sparse matrix, got {type(A).__name__}.")
    A = sp.csr_matrix(A)
    values = torch.from_numpy(np.ascontiguousarray(A.data))
    if dtype is None and values.dtype not in (torch.float32, torch.float64):
        dtype = torch.float32
    with warnings.catch_warnings():  # "sparse CSR support is in beta" on every call
        warnings.filterwarnings(
            "ignore", message=".*[Ss]parse CSR tensor support", category=UserWarning
        )
        t = torch.sparse_csr_tensor(
            torch.from_numpy(A.indptr.astype(np.int64)),
            torch.from_numpy(A.indices.astype(np.int64)),
            values,
            size=A.shape,
            check_invariants=False,  # scipy's CSR is valid by construction
        )
        return t.to(device=device, dtype=dtype)


def propagate(
    A: sp.spmatrix | sp.sparray,
    X: np.ndarray | sp.spmatrix | sp.sparray | torch.Tensor,
    n_hops: int,
    *,
    normalize: Literal["sym", "row"] | None = "sym",
    self_loops: bool = True,
) -> list:
    """Multi-hop feature propagation ``[X, PX, P²X, …, P^n_hops X]``.

    ``P`` is ``normalize_adjacency(A, mode=normalize, self_loops=self_loops)``, or ``A``
    itself when ``normalize=None``. Each hop is one sparse product with the previous
    hop, so the cost is ``n_hops * nnz(P) * n_features`` and ``P^k`` is never formed.

    Parameters
    ----------
    A
        Square sparse adjacency, shape ``(n_obs, n_obs)``.
    X
        Features with ``n_obs`` rows: a numpy array (1-D or 2-D), a scipy sparse matrix,
        or a dense ``torch.Tensor`` (the products then run in torch on ``X.device``
        with a sparse CSR ``P``).
    n_hops
        Number of propagation steps (``0`` returns ``[X]``).
    normalize
        ``"sym"``, ``"row"`` (see :func:`normalize_adjacency`) or ``None`` to use ``A``
        as given.
    self_loops
        Add ``I`` before normalising (ignored when ``normalize=None``).

    Returns
    -------
    A list of ``n_hops + 1`` items of the same kind as ``X`` (numpy arrays, CSR
    matrices, or tensors on ``X.device``); element ``k`` is ``P^k X``. Stack or
    concatenate them as needed (``np.stack``, ``np.hstack``, ``torch.cat``).
    """
    if int(n_hops) != n_hops or n_hops < 0:
        raise ChronotopeInputError(f"n_hops must be an integer >= 0, got {n_hops}.")
    if normalize is None:
        P = _as_square_csr(A)
    else:
        P = normalize_adjacency(A, mode=normalize, self_loops=self_loops)
    n = P.shape[0]
    if X.shape[0] != n:
        raise ChronotopeInputError(f"X has {X.shape[0]} rows but A is {n} x {n}.")
    out = [X]
    if _is_torch(X):
        import torch

        if X.layout != torch.strided:
            raise ChronotopeInputError("torch X must be a dense (strided) tensor.")
        dtype = X.dtype if X.is_floating_point() else torch.float32
        Pt = to_torch_sparse(P, device=X.device, dtype=dtype)
        cur = X.to(dtype)
        vec = cur.ndim == 1
        if vec:
            cur = cur.unsqueeze(1)
        for _ in range(int(n_hops)):
            cur = Pt @ cur
            out.append(cur.squeeze(1) if vec else cur)
        return out
    if sp.issparse(X):
        cur = sp.csr_matrix(X)
        P = P.astype(np.result_type(P.dtype, _float_dtype(cur.dtype)), copy=False)
        for _ in range(int(n_hops)):
            cur = sp.csr_matrix(P @ cur)
            out.append(cur)
        return out
    cur = np.asarray(X)
    if cur.ndim not in (1, 2):
        raise ChronotopeInputError(f"X must be 1-D or 2-D, got shape {cur.shape}.")
    dtype = _float_dtype(cur.dtype)
    P = P.astype(dtype, copy=False)
    cur = cur.astype(dtype, copy=False)
    for _ in range(int(n_hops)):
        cur = np.asarray(P @ cur)
        out.append(cur)
    return out


def gaussian_weights(
    distances: sp.spmatrix | sp.sparray,
    sigma: float | None = None,
) -> sp.csr_matrix:
    """Gaussian kernel weights ``exp(-d² / (2 sigma²))`` on the stored edges.

    The structure of ``distances`` is kept exactly, so an edge stored with distance
    ``0`` (coincident spots, the diagonal) gets weight ``1`` rather than disappearing.

    Parameters
    ----------
    distances
        Sparse distance matrix, e.g. ``obsp["spatial_distances"]``.
    sigma
        Kernel width in the units of the distances. ``None`` uses the median of the
        positive stored distances.

    Returns
    -------
    CSR matrix of weights in ``(0, 1]``, same structure and float dtype as ``distances``.
    """
    D = _as_square_csr(distances, "distances")
    dtype = _float_dtype(D.dtype)
    d = D.data.astype(np.float64)
    if d.size and (not np.isfinite(d).all() or d.min() < 0):
        raise ChronotopeInputError("distances must be finite and >= 0.")
    if sigma is None:
        positive = d[d > 0]
        if positive.size == 0:
            raise ChronotopeInputError("No positive distance stored; pass sigma explicitly.")
        sigma = float(np.median(positive))
    sigma = float(sigma)
    if not (np.isfinite(sigma) and sigma > 0):
        raise ChronotopeInputError(f"sigma must be a positive number, got {sigma}.")
    w = np.exp(-(d**2) / (2.0 * sigma**2)).astype(dtype)
    return sp.csr_matrix((w, D.indices.copy(), D.indptr.copy()), shape=D.shape)
