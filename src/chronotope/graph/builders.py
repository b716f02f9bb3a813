"""Spatial neighbour graphs from coordinates: kNN, radius and lattice (grid) graphs.

Arrays in, arrays out: every builder takes an ``(n, d)`` coordinate array and returns
``(connectivities, distances)`` as two :class:`scipy.sparse.csr_matrix` of shape
``(n, n)``.

Conventions shared by all builders
----------------------------------
* ``connectivities`` is ``float32`` with value ``1`` on every edge and is symmetric
  (an undirected graph). It has sorted indices and no duplicates.
* ``distances`` is ``float64`` and has **exactly the same sparsity structure** as
  ``connectivities`` (identical ``indptr`` and ``indices``). Its values are Euclidean
  distances recomputed from the coordinates, so ``distances`` is exactly symmetric too.
* Two spots at the same position, and the diagonal when ``include_self=True``, are
  edges at distance ``0``. They are kept as *explicit zeros* in ``distances``. Many
  scipy operations (``A + B``, ``A.maximum(B)``, ``eliminate_zeros()``, ``A != 0``)
  silently drop explicit zeros, so **always read the edge set from
  ``connectivities``**, and use ``distances`` only for the values on those edges
  (for instance through :func:`chronotope.graph.gaussian_weights`, which keeps the
  structure). Explicit zeros survive ``write_h5ad`` / ``read_h5ad`` and row/column
  subsetting.
* ``library`` (one label per spot, e.g. the sample of each spot) restricts edges to
  spots with the same label: the graph is block-diagonal up to a permutation, and
  every quantity (neighbours, lattice spacing) is computed per library.

The work is done by :class:`scipy.spatial.cKDTree` (``workers=-1`` where scipy
allows it) and vectorised sparse assembly; there is no dense ``n x n`` array and no
Python loop over spots (only over libraries).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.spatial import cKDTree

from chronotope._errors import ChronotopeInputError

__all__ = [
    "block_diagonal",
    "grid_graph",
    "knn_graph",
    "radius_graph",
]

logger = logging.getLogger("chronotope")

# Ring-1 cut-offs in units of the lattice spacing: halfway between the first shell of
# neighbours and the next shell that must not be included.
_HEX_CUT = (1.0 + math.sqrt(3.0)) / 2.0  # 1 (6 neighbours) vs sqrt(3) (next 6)
_SQUARE_CUT = (1.0 + math.sqrt(2.0)) / 2.0  # 1 (4 neighbours) vs sqrt(2) (diagonals)
_SQUARE_DIAG_CUT = (math.sqrt(2.0) + 2.0) / 2.0  # sqrt(2) (diagonals) vs 2
# Neighbours counted when inferring the lattice: first shell only, for both lattices.
_PROBE_CUT = 1.25
_MAX_PROBE = 200_000


# --------------------------------------------------------------------------------------
# validation and helpers
# --------------------------------------------------------------------------------------
def _check_coords(coords: np.ndarray, *, name: str = "coords") -> np.ndarray:
    arr = np.asarray(coords)
    if arr.ndim != 2 or arr.shape[1] < 1:
        raise ChronotopeInputError(f"{name} must have shape (n_obs, n_dims), got {arr.shape}.")
    if arr.dtype.kind not in "biuf":
        raise ChronotopeInputError(f"{name} must be numeric, got dtype {arr.dtype}.")
    arr = np.ascontiguousarray(arr, dtype=np.float64)
    if not np.isfinite(arr).all():
        n_bad = int((~np.isfinite(arr).all(axis=1)).sum())
        raise ChronotopeInputError(f"{name} has {n_bad} row(s) with NaN or infinite values.")
    return arr


def _groups(library: Sequence | np.ndarray | None, n: int) -> list[tuple[object, np.ndarray]]:
    """``(label, indices)`` of each library, in order of first appearance.

    A single group ``(None, arange(n))`` if ``library`` is ``None``.
    """
    if library is None:
        return [(None, np.arange(n))]
    lib = library if isinstance(library, pd.Series | pd.Categorical) else np.asarray(library)
    if len(lib) != n:
        raise ChronotopeInputError(f"library has {len(lib)} labels but coords has {n} rows.")
    codes, uniques = pd.factorize(lib, sort=False)
    codes = np.asarray(codes)
    if (codes < 0).any():
        raise ChronotopeInputError(
            f"library has {int((codes < 0).sum())} missing (NaN) label(s); every spot needs one."
        )
    order = np.argsort(codes, kind="stable")
    counts = np.bincount(codes)
    return list(zip(uniques, np.split(order, np.cumsum(counts)[:-1]), strict=True))


def _row_ids(indptr: np.ndarray) -> np.ndarray:
    return np.repeat(np.arange(len(indptr) - 1, dtype=indptr.dtype), np.diff(indptr))


def _edge_lengths(coords: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Euclidean lengths of the edges ``rows[i] -> cols[i]``, in chunks to bound memory."""
    out = np.empty(len(rows), dtype=np.float64)
    step = 4_000_000
    for s in range(0, len(rows), step):
        diff = coords[rows[s : s + step]] - coords[cols[s : s + step]]
        out[s : s + step] = np.sqrt(np.einsum("ij,ij->i", diff, diff))
    return out


def _connectivity(
    rows: np.ndarray,
    cols: np.ndarray,
    n: int,
    *,
    include_self: bool,
    mutual: bool = False,
) -> sp.csr_matrix:
    """Symmetric binary ``float32`` CSR from directed pairs (global indices).

    ``mutual=False`` keeps an edge if either direction is listed (union); ``mutual=True``
    keeps it only if both are (requires no repeated directed pair in the input).
    """
    keep = rows != cols
    rows, cols = rows[keep], cols[keep]
    r = np.concatenate([rows, cols])
    c = np.concatenate([cols, rows])
    # Data are ones, so duplicate summing during COO -> CSR never creates zeros.
    conn = sp.csr_matrix((np.ones(len(r), dtype=np.float32), (r, c)), shape=(n, n))
    conn.sum_duplicates()
    if mutual:
        conn.data[conn.data < 2] = 0  # listed in one direction only
        conn.eliminate_zeros()
    if include_self:
        conn = sp.csr_matrix(conn + sp.identity(n, dtype=np.float32, format="csr"))
    conn.data[:] = 1.0
    conn.sort_indices()
    return conn


def _with_distances(conn: sp.csr_matrix, coords: np.ndarray) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Distances on the edges of ``conn``, same structure, explicit zeros kept."""
    rid = _row_ids(conn.indptr)
    vals = _edge_lengths(coords, rid, conn.indices)
    # Built from (data, indices, indptr): scipy keeps explicit zeros here.
    dist = sp.csr_matrix((vals, conn.indices.copy(), conn.indptr.copy()), shape=conn.shape)
    return conn, dist


def _assemble(
    rows: np.ndarray,
    cols: np.ndarray,
    coords: np.ndarray,
    *,
    include_self: bool,
    mutual: bool = False,
) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    conn = _connectivity(rows, cols, coords.shape[0], include_self=include_self, mutual=mutual)
    return _with_distances(conn, coords)


def _tree(coords: np.ndarray) -> cKDTree:
    # Unbalanced trees with loose nodes build much faster on large point sets.
    return cKDTree(coords, balanced_tree=False, compact_nodes=False)


# --------------------------------------------------------------------------------------
# kNN
# --------------------------------------------------------------------------------------
def _knn_pairs(coords: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Directed pairs (i, j) for the k nearest neighbours of each spot, self excluded."""
    n = coords.shape[0]
    if k <= 0 or n < 2:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty
    _, idx = _tree(coords).query(coords, k=k + 1, workers=-1)
    idx = idx.reshape(n, k + 1)
    # Usually column 0 is the spot itself, but with coincident spots the tree may list
    # a twin first; drop the self entry wherever it is, or the last column if absent.
    is_self = idx == np.arange(n)[:, None]
    missing = ~is_self.any(axis=1)
    is_self[missing, k] = True
    drop_first = is_self.argmax(axis=1)
    # Remove one entry per row without a Python loop.
    keep = np.ones_like(is_self)
    keep[np.arange(n), drop_first] = False
    cols = idx[keep].reshape(n, k)
    rows = np.repeat(np.arange(n), k)
    return rows, cols.ravel()


def knn_graph(
    coords: np.ndarray,
    n_neighbors: int = 6,
    *,
    include_self: bool = False,
    symmetrize: Literal["union", "mutual"] = "union",
    library: Sequence | np.ndarray | None = None,
) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """k-nearest-neighbour graph.

    Parameters
    ----------
    coords
        Spot coordinates, shape ``(n_obs, n_dims)``.
    n_neighbors
        Number of nearest neighbours of each spot, not counting the spot itself.
        Clipped (with a warning) to the size of a library minus one.
    include_self
        Add the diagonal (each spot its own neighbour, distance ``0``).
    symmetrize
        The kNN relation is not symmetric. ``"union"`` connects ``i`` and ``j`` if
        either is among the other's neighbours (every spot then has at least
        ``n_neighbors`` neighbours); ``"mutual"`` only if both are (at most
        ``n_neighbors``).
    library
        Optional label per spot (e.g. sample id); spots with different labels are
        never connected and neighbours are searched within each library.

    Returns
    -------
    connectivities
        ``float32`` CSR, ``1`` on edges, symmetric.
    distances
        ``float64`` CSR with the same structure; see the module notes on explicit zeros.
    """
    coords = _check_coords(coords)
    if int(n_neighbors) != n_neighbors or n_neighbors < 1:
        raise ChronotopeInputError(f"n_neighbors must be a positive integer, got {n_neighbors}.")
    if symmetrize not in ("union", "mutual"):
        raise ChronotopeInputError(f"symmetrize must be 'union' or 'mutual', got {symmetrize!r}.")
    n_neighbors = int(n_neighbors)
    all_rows, all_cols = [], []
    for label, grp in _groups(library, coords.shape[0]):
        k = min(n_neighbors, len(grp) - 1)
        if k < n_neighbors:
            where = "the data have" if label is None else f"library {label!r} has"
            warnings.warn(
                f"n_neighbors={n_neighbors} but {where} only {len(grp)} spot(s); "
                f"using n_neighbors={max(k, 0)} there.",
                UserWarning,
                stacklevel=2,
            )
        r, c = _knn_pairs(coords[grp], k)
        all_rows.append(grp[r])
        all_cols.append(grp[c])
    rows, cols = np.concatenate(all_rows), np.concatenate(all_cols)
    return _assemble(rows, cols, coords, include_self=include_self, mutual=symmetrize == "mutual")


# --------------------------------------------------------------------------------------
# radius
# --------------------------------------------------------------------------------------
def _radius_pairs(coords: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    if coords.shape[0] < 2:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty
    pairs = _tree(coords).query_pairs(radius, output_type="ndarray")
    return pairs[:, 0], pairs[:, 1]


def radius_graph(
    coords: np.ndarray,
    radius: float,
    *,
    include_self: bool = False,
    library: Sequence | np.ndarray | None = None,
) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Connect every pair of spots at Euclidean distance ``<= radius``.

    Parameters
    ----------
    coords
        Spot coordinates, shape ``(n_obs, n_dims)``.
    radius
        Largest edge length, in the units of ``coords``.
    include_self
        Add the diagonal (distance ``0``).
    library
        Optional label per spot; spots with different labels are never connected.

    Returns
    -------
    connectivities
        ``float32`` CSR, ``1`` on edges, symmetric.
    distances
        ``float64`` CSR with the same structure; see the module notes on explicit zeros.
    """
    coords = _check_coords(coords)
    radius = float(radius)
    if not np.isfinite(radius) or radius < 0:
        raise ChronotopeInputError(f"radius must be a finite number >= 0, got {radius}.")
    all_rows, all_cols = [], []
    for _label, grp in _groups(library, coords.shape[0]):
        r, c = _radius_pairs(coords[grp], radius)
        all_rows.append(grp[r])
        all_cols.append(grp[c])
    rows, cols = np.concatenate(all_rows), np.concatenate(all_cols)
    return _assemble(rows, cols, coords, include_self=include_self)


# --------------------------------------------------------------------------------------
# grid (lattice)
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Lattice:
    kind: str  # "hex" or "square"
    spacing: float  # centre-to-centre distance of adjacent spots (nan if unknown)
    library: object = None  # library label (None without libraries)


def _infer_lattice(
    coords: np.ndarray,
    tree: cKDTree,
    kind: str,
    spacing: float | None,
    *,
    library: object = None,
) -> _Lattice:
    """Estimate the lattice type and spacing from nearest-neighbour distances.

    The first estimate is the median distance to the nearest *distinct* spot (robust
    to missing spots: a spot needs one present neighbour). Jitter biases that minimum
    low, so the spacing is refined as the median length of all first-shell edges.
    The lattice type follows from the size of the first shell: 6 on a hexagonal
    lattice, 4 on a square one (90th percentile over spots, robust to gaps and borders).
    """
    n = coords.shape[0]
    if n < 2:
        return _Lattice(kind if kind != "auto" else "hex", float("nan"), library)
    if n > _MAX_PROBE:  # a deterministic, evenly spread subsample is plenty
        probe = coords[np.linspace(0, n - 1, _MAX_PROBE).astype(np.int64)]
    else:
        probe = coords
    k = min(9, n)
    d, _ = tree.query(probe, k=k, workers=-1)
    d = d[:, 1:]  # column 0 is a spot at distance 0 (itself or a twin)
    scale = float(np.abs(coords).max()) or 1.0
    pos = d > 1e-9 * scale
    if spacing is None:
        first = np.where(pos, d, np.inf).min(axis=1)
        first = first[np.isfinite(first)]
        if first.size == 0:
            return _Lattice(kind if kind != "auto" else "hex", float("nan"), library)
        s0 = float(np.median(first))
    else:
        s0 = float(spacing)
    shell = pos & (d <= _PROBE_CUT * s0)
    if kind == "auto":
        counts = shell.sum(axis=1)
        kind = "hex" if np.quantile(counts, 0.9) >= 5 else "square"
    if spacing is None:
        s = float(np.median(d[shell])) if shell.any() else s0
    else:
        s = s0
    return _Lattice(kind, s, library)


def _lattice_basis(vectors: np.ndarray, lat: _Lattice) -> np.ndarray:
    """Two lattice vectors (columns) fitted to first-shell edge vectors.

    The orientation comes from the circular mean of ``6 * angle`` (hex) or ``4 * angle``
    (square); each edge is assigned to its lattice direction and the basis vectors are
    the mean edge of directions 0 and 1, so a mild affine distortion of the lattice
    (different x / y scales, shear) is absorbed.
    """
    order = 6 if lat.kind == "hex" else 4
    step = 2 * np.pi / order
    if len(vectors) > _MAX_PROBE:  # plenty for two mean vectors
        vectors = vectors[np.linspace(0, len(vectors) - 1, _MAX_PROBE).astype(np.int64)]
    vec = np.vstack([vectors, -vectors])
    phi = np.arctan2(vec[:, 1], vec[:, 0])
    theta = np.angle(np.exp(1j * order * phi).mean()) / order if len(vec) else 0.0
    cls = np.rint((phi - theta) / step).astype(np.int64) % order
    basis = np.empty((2, 2))
    for b in (0, 1):
        sel = vec[cls == b]
        angle = theta + b * step
        ideal = lat.spacing * np.array([np.cos(angle), np.sin(angle)])
        basis[:, b] = sel.mean(axis=0) if len(sel) else ideal
    if abs(np.linalg.det(basis)) < 1e-6 * lat.spacing**2:  # degenerate fit: ideal lattice
        angles = theta + np.array([0.0, step])
        basis = lat.spacing * np.vstack([np.cos(angles), np.sin(angles)])
    return basis


def _ring_pairs(
    coords: np.ndarray,
    tree: cKDTree,
    first_pairs: np.ndarray,
    lat: _Lattice,
    n_rings: int,
    diagonals: bool,
) -> np.ndarray:
    """Pairs at most ``n_rings`` hops apart *on the lattice* (missing spots do not matter).

    Hop counts come from the lattice coordinates of each displacement (rounded to
    integers in a basis fitted to the first shell), not from paths through present
    spots, so gaps in the tissue do not remove ring-2+ neighbours.
    """
    delta = coords[first_pairs[:, 1]] - coords[first_pairs[:, 0]]
    shell = np.einsum("ij,ij->i", delta, delta) <= (_PROBE_CUT * lat.spacing) ** 2
    basis = _lattice_basis(delta[shell], lat)
    # farthest lattice point within n_rings hops, plus slack for jitter / distortion
    reach = n_rings * (math.sqrt(2.0) if (lat.kind == "square" and diagonals) else 1.0)
    stretch = np.linalg.norm(basis, axis=0).max() / lat.spacing
    pairs = tree.query_pairs((reach * stretch + 0.35) * lat.spacing, output_type="ndarray")
    inv = np.linalg.inv(basis)
    keep = np.empty(len(pairs), dtype=bool)
    step = 4_000_000
    for s in range(0, len(pairs), step):  # chunks bound the temporaries
        p = pairs[s : s + step]
        d = coords[p[:, 1]] - coords[p[:, 0]]
        # explicit 2x2 product: far faster than a BLAS call on an (m, 2) array
        u = np.rint(d[:, 0] * inv[0, 0] + d[:, 1] * inv[0, 1])
        v = np.rint(d[:, 0] * inv[1, 0] + d[:, 1] * inv[1, 1])
        if lat.kind == "hex":  # basis at 60 degrees: axial coordinates
            hops = (np.abs(u) + np.abs(v) + np.abs(u + v)) / 2
        elif diagonals:
            hops = np.maximum(np.abs(u), np.abs(v))
        else:
            hops = np.abs(u) + np.abs(v)
        keep[s : s + step] = hops <= n_rings
    return pairs[keep]


def _grid_graph(
    coords: np.ndarray,
    n_rings: int = 1,
    *,
    kind: Literal["auto", "hex", "square"] = "auto",
    diagonals: bool = False,
    spacing: float | None = None,
    include_self: bool = False,
    library: Sequence | np.ndarray | None = None,
) -> tuple[sp.csr_matrix, sp.csr_matrix, list[_Lattice]]:
    coords = _check_coords(coords)
    if coords.shape[1] != 2:
        raise ChronotopeInputError(
            f"grid graphs need 2-D coordinates, got {coords.shape[1]}-D; use knn or radius."
        )
    if int(n_rings) != n_rings or n_rings < 1:
        raise ChronotopeInputError(f"n_rings must be a positive integer, got {n_rings}.")
    if kind not in ("auto", "hex", "square"):
        raise ChronotopeInputError(f"kind must be 'auto', 'hex' or 'square', got {kind!r}.")
    if spacing is not None and not (np.isfinite(spacing) and spacing > 0):
        raise ChronotopeInputError(f"spacing must be a positive number, got {spacing}.")
    n = coords.shape[0]
    all_rows, all_cols, lattices = [], [], []
    for label, grp in _groups(library, n):
        sub = coords[grp]
        tree = _tree(sub)
        lat = _infer_lattice(sub, tree, kind, spacing, library=label)
        lattices.append(lat)
        if not np.isfinite(lat.spacing):
            continue
        if lat.kind == "hex":
            cut = _HEX_CUT
        else:
            cut = _SQUARE_DIAG_CUT if diagonals else _SQUARE_CUT
        logger.info(
            "grid graph: %s lattice, spacing %.4g, ring-1 cut-off %.4g (%d spots)",
            lat.kind,
            lat.spacing,
            cut * lat.spacing,
            len(grp),
        )
        pairs = tree.query_pairs(cut * lat.spacing, output_type="ndarray")
        if n_rings > 1:
            pairs = np.vstack([pairs, _ring_pairs(sub, tree, pairs, lat, n_rings, diagonals)])
        all_rows.append(grp[pairs[:, 0]])
        all_cols.append(grp[pairs[:, 1]])
    if all_rows:
        rows, cols = np.concatenate(all_rows), np.concatenate(all_cols)
    else:
        rows = cols = np.empty(0, dtype=np.int64)
    conn, dist = _assemble(rows, cols, coords, include_self=include_self)
    return conn, dist, lattices


def grid_graph(
    coords: np.ndarray,
    n_rings: int = 1,
    *,
    kind: Literal["auto", "hex", "square"] = "auto",
    diagonals: bool = False,
    spacing: float | None = None,
    include_self: bool = False,
    library: Sequence | np.ndarray | None = None,
) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Neighbours on a regular spot lattice (10x Visium hexagonal, ST square).

    Ring 1 holds the adjacent lattice positions: 6 on a hexagonal lattice, 4 on a
    square one (8 with ``diagonals=True``). Ring ``k`` adds the positions ``k`` steps
    away on the lattice, so a full hexagonal neighbourhood has 6, 18, 36, ... spots for
    ``n_rings = 1, 2, 3``, and a square one 4, 12, 24 (8, 24, 48 with diagonals). Steps
    are counted on the lattice itself (from lattice coordinates fitted to the spots,
    which absorbs rotation and mild affine distortion), not along paths through
    present spots, so a missing spot does not cut its neighbours off from each other.

    The lattice spacing is inferred per library from nearest-neighbour distances
    (medians, so missing spots, tissue borders and position jitter of a few percent of
    the spacing do not matter), and ring-1 edges are the pairs closer than halfway
    between the first and the second shell of the lattice (``(1 + sqrt(3)) / 2`` times
    the spacing for hex, ``(1 + sqrt(2)) / 2`` for square). Pass pixel or micrometre
    coordinates (``obsm["spatial"]``), not Visium array indices, whose axes are scaled
    differently.

    Parameters
    ----------
    coords
        2-D spot coordinates, shape ``(n_obs, 2)``.
    n_rings
        Number of rings (hops on the lattice).
    kind
        ``"hex"``, ``"square"``, or ``"auto"`` to decide from the size of the first shell
        of neighbours (6 vs 4).
    diagonals
        Square lattice only: also connect the 4 diagonal positions (8-neighbourhood).
    spacing
        Centre-to-centre distance of adjacent spots. ``None`` infers it (per library).
    include_self
        Add the diagonal (distance ``0``).
    library
        Optional label per spot; spots with different labels are never connected.

    Returns
    -------
    connectivities
        ``float32`` CSR, ``1`` on edges, symmetric.
    distances
        ``float64`` CSR with the same structure holding Euclidean distances; see the
        module notes on explicit zeros.
    """
    conn, dist, _ = _grid_graph(
        coords,
        n_rings,
        kind=kind,
        diagonals=diagonals,
        spacing=spacing,
        include_self=include_self,
        library=library,
    )
    return conn, dist


# --------------------------------------------------------------------------------------
# block-diagonal combination
# --------------------------------------------------------------------------------------
def block_diagonal(
    blocks: Sequence[sp.spmatrix | sp.sparray],
    positions: Sequence[np.ndarray] | None = None,
) -> sp.csr_matrix:
    """Combine per-sample square sparse matrices into one, with no edges between samples.

    Stored entries, explicit zeros included, are kept as they are (no arithmetic is done
    on the values), so the function is safe for distance matrices.

    Parameters
    ----------
    blocks
        One square sparse matrix per sample.
    positions
        For each block, the global index of each of its rows (e.g.
        ``np.flatnonzero(labels == s)``). ``None`` stacks the blocks in order. Together
        the positions must cover ``0 .. n - 1`` exactly once.

    Returns
    -------
    CSR matrix of shape ``(n, n)`` with ``n`` the total number of rows, sorted indices.
    """
    mats = [sp.csr_matrix(b) for b in blocks]
    if not mats:
        raise ChronotopeInputError("block_diagonal needs at least one block.")
    for i, m in enumerate(mats):
        if m.shape[0] != m.shape[1]:
            raise ChronotopeInputError(f"block {i} is not square (shape {m.shape}).")
    sizes = [m.shape[0] for m in mats]
    n = int(sum(sizes))
    if positions is None:
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        positions = [np.arange(o, o + s) for o, s in zip(offsets, sizes, strict=True)]
    else:
        positions = [np.asarray(p, dtype=np.int64) for p in positions]
        if len(positions) != len(mats):
            raise ChronotopeInputError(
                f"got {len(mats)} blocks but {len(positions)} position arrays."
            )
        for i, (m, p) in enumerate(zip(mats, positions, strict=True)):
            if p.shape != (m.shape[0],):
                raise ChronotopeInputError(
                    f"positions[{i}] has shape {p.shape}, block {i} has {m.shape[0]} rows."
                )
        allpos = np.concatenate(positions)
        if not np.array_equal(np.sort(allpos), np.arange(n)):
            raise ChronotopeInputError("positions must cover 0 .. n - 1 exactly once.")
    rows = np.concatenate([p[_row_ids(m.indptr)] for m, p in zip(mats, positions, strict=True)])
    cols = np.concatenate([p[m.indices] for m, p in zip(mats, positions, strict=True)])
    data = np.concatenate([m.data for m in mats])
    order = np.lexsort((cols, rows))
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))])
    return sp.csr_matrix((data[order], cols[order], indptr), shape=(n, n))
