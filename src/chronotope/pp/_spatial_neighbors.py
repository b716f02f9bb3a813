"""AnnData front end for the spatial graph builders in :mod:`chronotope.graph`."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Literal

from chronotope._errors import ChronotopeInputError
from chronotope._validate import check_coordinates, get_obsm
from chronotope.graph.builders import _grid_graph, knn_graph, radius_graph

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = ["spatial_neighbors"]

logger = logging.getLogger("chronotope")

_METHODS = ("knn", "radius", "grid")


def spatial_neighbors(
    adata: AnnData,
    *,
    spatial_key: str = "spatial",
    method: Literal["knn", "radius", "grid"] = "knn",
    n_neighbors: int = 6,
    radius: float | None = None,
    n_rings: int = 1,
    grid_kind: Literal["auto", "hex", "square"] = "auto",
    include_self: bool = False,
    library_key: str | None = None,
    key_added: str = "spatial",
    copy: bool = False,
) -> AnnData | None:
    """Build a spatial neighbour graph from spot coordinates.

    Parameters
    ----------
    adata
        Annotated data with coordinates in ``adata.obsm[spatial_key]``.
    spatial_key
        Key of the ``(n_obs, 2)`` or ``(n_obs, 3)`` coordinates in ``adata.obsm``.
    method
        ``"knn"`` (:func:`chronotope.graph.knn_graph`, union-symmetrised),
        ``"radius"`` (:func:`chronotope.graph.radius_graph`) or ``"grid"``
        (:func:`chronotope.graph.grid_graph`, for Visium / ST spot lattices).
    n_neighbors
        Neighbours per spot for ``method="knn"`` (not counting the spot itself).
    radius
        Largest edge length for ``method="radius"`` (required there, unused otherwise),
        in the units of the coordinates.
    n_rings
        Rings of lattice neighbours for ``method="grid"`` (6, 18, 36, ... spots on a
        hexagonal lattice).
    grid_kind
        Lattice for ``method="grid"``: ``"hex"``, ``"square"`` or ``"auto"`` (inferred
        per library).
    include_self
        Connect each spot to itself (distance ``0``).
    library_key
        Column of ``adata.obs`` with the sample of each spot. Spots from different
        samples are never connected (block-diagonal graph) and grids are inferred per
        sample.
    key_added
        Prefix of the keys written (see below).
    copy
        Return a modified copy instead of writing into ``adata``.

    Returns
    -------
    ``None``, or a copy of ``adata`` if ``copy=True``, with:

    ``adata.obsp[f"{key_added}_connectivities"]``
        Symmetric ``float32`` CSR, ``1`` on edges.
    ``adata.obsp[f"{key_added}_distances"]``
        ``float64`` CSR of Euclidean distances with the same structure (distance-0
        edges, e.g. the diagonal, are stored as explicit zeros; read the edge set from
        the connectivities).
    ``adata.uns[f"{key_added}_neighbors"]``
        ``{"connectivities_key", "distances_key", "params"}``; ``params`` records every
        argument, and for grids the inferred ``lattice`` kind and spacing (one value
        per library when ``library_key`` is given).
    """
    # ---- validation, before any heavy work ------------------------------------------
    if method not in _METHODS:
        raise ChronotopeInputError(f"method must be one of {_METHODS}, got {method!r}.")
    if adata.n_obs == 0:
        raise ChronotopeInputError("adata has no observations.")
    coords = check_coordinates(
        get_obsm(adata, spatial_key), adata.n_obs, name=f"adata.obsm[{spatial_key!r}]"
    )
    if method == "radius" and radius is None:
        raise ChronotopeInputError(
            "method='radius' needs radius= (a distance in the units of the coordinates)."
        )
    if method != "radius" and radius is not None:
        raise ChronotopeInputError(
            f"radius is only used with method='radius' (got method={method!r})."
        )
    if method == "grid" and coords.shape[1] != 2:
        raise ChronotopeInputError(
            f"method='grid' needs 2-D coordinates, adata.obsm[{spatial_key!r}] has "
            f"{coords.shape[1]} columns; use method='knn' or 'radius'."
        )
    library = None
    if library_key is not None:
        if library_key not in adata.obs:
            have = ", ".join(map(repr, adata.obs.columns)) or "none"
            raise ChronotopeInputError(
                f"library_key {library_key!r} is not a column of adata.obs (have: {have})."
            )
        library = adata.obs[library_key]
        n_missing = int(library.isna().sum())
        if n_missing:
            raise ChronotopeInputError(
                f"adata.obs[{library_key!r}] has {n_missing} missing value(s); "
                "every spot needs a library."
            )

    params: dict = {
        "method": method,
        "spatial_key": spatial_key,
        "n_neighbors": int(n_neighbors),
        "radius": None if radius is None else float(radius),
        "n_rings": int(n_rings),
        "grid_kind": grid_kind,
        "include_self": bool(include_self),
        "library_key": library_key,
    }

    # ---- build -------------------------------------------------------------------------
    start = time.perf_counter()
    if method == "knn":
        conn, dist = knn_graph(
            coords, n_neighbors, include_self=include_self, symmetrize="union", library=library
        )
    elif method == "radius":
        conn, dist = radius_graph(coords, radius, include_self=include_self, library=library)
    else:
        conn, dist, lattices = _grid_graph(
            coords, n_rings, kind=grid_kind, include_self=include_self, library=library
        )
        if library is None:
            params["lattice"] = {"kind": lattices[0].kind, "spacing": lattices[0].spacing}
        else:
            params["lattice"] = {
                "kind": {str(lat.library): lat.kind for lat in lattices},
                "spacing": {str(lat.library): lat.spacing for lat in lattices},
            }
    logger.info(
        "spatial_neighbors: %s graph with %d edges (mean degree %.2f) in %.2f s",
        method,
        conn.nnz,
        conn.nnz / max(adata.n_obs, 1),
        time.perf_counter() - start,
    )

    # ---- write -------------------------------------------------------------------------
    if copy:
        adata = adata.copy()
    conn_key = f"{key_added}_connectivities"
    dist_key = f"{key_added}_distances"
    adata.obsp[conn_key] = conn
    adata.obsp[dist_key] = dist
    adata.uns[f"{key_added}_neighbors"] = {
        "connectivities_key": conn_key,
        "distances_key": dist_key,
        "params": params,
    }
    return adata if copy else None
