"""``tl.align_slices`` and ``tl.interpolate_slices``: slices in one frame, slices between."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

from chronotope._errors import ChronotopeInputError
from chronotope._settings import resolve_device
from chronotope._validate import check_coordinates, check_counts
from chronotope.parallel import Scheduler, check_scheduler, describe_scheduler, parallel_map

__all__ = ["align_slices", "interpolate_slices"]

logger = logging.getLogger(__name__)


def _split(adata: AnnData, batch_key: str) -> tuple[list[AnnData], list[str], list[np.ndarray]]:
    if batch_key not in adata.obs:
        raise ChronotopeInputError(f"adata.obs[{batch_key!r}] is missing")
    col = adata.obs[batch_key]
    names = list(col.cat.categories) if hasattr(col, "cat") else list(dict.fromkeys(col))
    names = [n for n in names if (col == n).any()]
    if len(names) < 2:
        raise ChronotopeInputError(f"adata.obs[{batch_key!r}] names {len(names)} slice(s); 2+")
    idx = [np.flatnonzero((col == n).to_numpy()) for n in names]
    return [adata[i] for i in idx], [str(n) for n in names], idx


def _align_pair_task(item: tuple, *, kwargs: dict[str, Any]) -> Any:
    """One pair of :func:`align_slices` (a ``parallel_map`` task)."""
    from chronotope.slices import align_pair

    fa, ca, fb, cb = item
    return align_pair(fa, ca, fb, cb, **kwargs)


def align_slices(
    adata: Sequence[AnnData] | AnnData,
    *,
    batch_key: str | None = None,
    policy: Literal["sequential", "star"] = "sequential",
    reference: int = 0,
    spatial_key: str = "spatial",
    layer: str | None = None,
    alpha: float = 0.1,
    epsilon: float = 0.01,
    mass: float | None = None,
    tau: float = 1.0,
    n_patches: int = 1000,
    n_candidates: int = 12,
    allow_reflection: bool = False,
    scaling: bool = False,
    n_top_genes: int = 3000,
    n_comps: int = 30,
    center_slices: bool = False,
    nonrigid: float | None = None,
    seed: int = 0,
    device: str = "cpu",
    scheduler: Scheduler = None,
    key_added: str = "spatial_aligned",
) -> list[sp.csr_matrix]:
    """Align slices into the frame of a reference slice.

    Expression features are a joint PCA over the shared genes
    (:func:`chronotope.slices.shared_features`). Each pair is aligned by
    :func:`chronotope.slices.align_pair` (FGW on spatial patches, rigid transform,
    sparse spot-level plan).

    Parameters
    ----------
    adata
        A list of slices, or one AnnData holding several with ``batch_key``. Raw counts
        in ``.X`` (or ``layer``), coordinates in ``obsm[spatial_key]``.
    batch_key
        With one AnnData: the ``obs`` column naming each spot's slice (slices in the
        order of its categories).
    policy
        ``"sequential"``: slice ``i`` is aligned to slice ``i - 1`` (towards the
        reference) and transforms are composed; ``"star"``: every slice is aligned to
        the reference directly.
    reference
        Index of the slice whose frame is kept.
    spatial_key, layer
        Where the coordinates and counts are.
    alpha, epsilon, mass, tau, n_patches, n_candidates, allow_reflection, scaling
        See :func:`chronotope.slices.align_pair`.
    n_top_genes, n_comps, center_slices
        Joint features (see :func:`chronotope.slices.shared_features`).
    nonrigid
        ``None`` (default): rigid alignment only. A number: after the rigid step, each
        moving slice also gets a smooth displacement field fitted to its plan
        (:func:`chronotope.slices.fit_displacement`) with this smoothness in spot
        spacings (2 is a good start; larger is smoother); the field is written to
        ``obsm[key_added + "_displacement"]`` and ``obsm[key_added]`` holds the rigid
        positions plus the field.
    seed, device
        Seed (PCA, patches); torch device.
    scheduler
        Where the pairs are aligned (they are independent; transforms are composed and
        displacements fitted here afterwards): ``None`` (in-process), ``"local:N"`` (a
        local Dask cluster of ``N`` workers), a Dask scheduler address or a
        ``distributed.Client`` (see :func:`chronotope.parallel.parallel_map`). The same
        result on every scheduler.
    key_added
        ``obsm`` key of the aligned coordinates.

    Returns
    -------
    list of scipy.sparse.csr_matrix
        The plans of the aligned pairs, in the order written to ``uns``.

    Writes, for a list: to each slice ``obsm[key_added]`` and ``uns["alignment"]``
    (``reference``, ``policy``, the transform to the reference frame, the ``partner``
    slice index and the ``plan`` with rows = the partner's spots and columns = this
    slice's spots, a sparse matrix that survives h5ad round trips; the reference has no
    plan; with ``nonrigid`` also ``obsm[key_added + "_displacement"]``). For one AnnData
    with ``batch_key``: ``obsm[key_added]`` (and the displacement), the plans as blocks
    of ``obsp["alignment_plan"]`` (rows = partner spots, columns = moving spots), and
    ``uns["alignment"]`` with the transforms by slice name. Nothing else is changed.
    """
    t_start = time.perf_counter()
    joint = None
    if isinstance(adata, AnnData):
        if batch_key is None:
            raise ChronotopeInputError("pass a list of slices, or one AnnData and batch_key")
        joint = adata
        slices, names, index = _split(adata, batch_key)
    else:
        slices = list(adata)
        names = [str(i) for i in range(len(slices))]
        index = []
    n = len(slices)
    if n < 2:
        raise ChronotopeInputError("at least two slices are needed")
    if not 0 <= reference < n:
        raise ChronotopeInputError(f"reference {reference} is not a slice index (0..{n - 1})")
    if policy not in ("sequential", "star"):
        raise ChronotopeInputError(f"policy must be 'sequential' or 'star', got {policy!r}")
    if nonrigid is not None and not (np.isfinite(nonrigid) and nonrigid >= 0):
        raise ChronotopeInputError(f"nonrigid must be None or a smoothness >= 0, got {nonrigid}")
    check_scheduler(scheduler)
    resolve_device(device)
    coords = []
    for i, a in enumerate(slices):
        if spatial_key not in a.obsm:
            raise ChronotopeInputError(f"slice {names[i]}: obsm[{spatial_key!r}] is missing")
        coords.append(check_coordinates(a.obsm[spatial_key], a.n_obs, f"slice {names[i]}"))
        check_counts(a.X if layer is None else a.layers[layer], f"slice {names[i]} counts")

    from chronotope.slices import fit_displacement, shared_features
    from chronotope.slices.rigid import RigidTransform

    feats = shared_features(
        slices,
        layer=layer,
        n_top_genes=n_top_genes,
        n_comps=n_comps,
        center_slices=center_slices,
        seed=seed,
    )
    d = coords[0].shape[1]
    identity = RigidTransform(np.eye(d), np.zeros(d))
    to_ref: dict[int, RigidTransform] = {reference: identity}
    pairs: list[tuple[int, int]] = []  # (partner, moving)
    if policy == "star":
        pairs = [(reference, i) for i in range(n) if i != reference]
    else:
        pairs = [(i + 1, i) for i in range(reference - 1, -1, -1)]
        pairs += [(i - 1, i) for i in range(reference + 1, n)]
    plans: list[sp.csr_matrix] = []
    results: dict[int, Any] = {}
    kwargs = dict(
        alpha=alpha,
        epsilon=epsilon,
        mass=mass,
        tau=tau,
        n_patches=n_patches,
        n_candidates=n_candidates,
        allow_reflection=allow_reflection,
        scaling=scaling,
        seed=seed,
        device=device,
    )
    final = {reference: coords[reference].astype(float)}
    shift = {reference: np.zeros_like(final[reference])}
    # the pairs are independent (each aligns the slices' own coordinates)
    aligned_pairs = parallel_map(
        _align_pair_task,
        [(feats[p], coords[p], feats[m], coords[m]) for p, m in pairs],
        scheduler=scheduler,
        shared={"kwargs": kwargs},
        progress=False,
        desc="align pairs",
    )
    for (partner, moving), res in zip(pairs, aligned_pairs, strict=True):
        to_ref[moving] = res.transform.compose(to_ref[partner])
        results[moving] = (partner, res)
        plans.append(res.plan)
        final[moving] = to_ref[moving].apply(coords[moving])
        shift[moving] = np.zeros_like(final[moving])
        if nonrigid is not None:
            # the partner is already placed (sequential pairs run from the reference out)
            shift[moving] = fit_displacement(
                final[partner], final[moving], res.plan, smoothness=nonrigid
            )
            final[moving] = final[moving] + shift[moving]
        logger.info(
            "aligned slice %s onto %s: %.1f deg, kept mass %.3f",
            names[moving],
            names[partner],
            res.transform.angle_degrees if d == 2 else float("nan"),
            res.info["kept_mass"],
        )
    params = {
        "reference": names[reference],
        "policy": policy,
        "alpha": alpha,
        "epsilon": epsilon,
        "mass": -1.0 if mass is None else mass,
        "tau": tau,
        "n_patches": n_patches,
        "n_candidates": n_candidates,
        "nonrigid": -1.0 if nonrigid is None else float(nonrigid),
        "scheduler": describe_scheduler(scheduler),
        "seconds": time.perf_counter() - t_start,
    }
    if joint is None:
        for i, a in enumerate(slices):
            a.obsm[key_added] = final[i]
            if nonrigid is not None:
                a.obsm[f"{key_added}_displacement"] = shift[i]
            entry: dict[str, Any] = {"params": params, "transform": to_ref[i].to_dict()}
            if i in results:
                partner, res = results[i]
                entry.update(partner=partner, plan=res.plan, info=_plain(res.info))
            a.uns["alignment"] = entry
        return plans
    aligned = np.zeros((joint.n_obs, d))
    displacement = np.zeros((joint.n_obs, d))
    blocks = []
    for i in range(n):
        aligned[index[i]] = final[i]
        displacement[index[i]] = shift[i]
        if i in results:
            partner, res = results[i]
            coo = res.plan.tocoo()
            blocks.append((index[partner][coo.row], index[i][coo.col], coo.data))
    rows, cols, vals = (np.concatenate(x) for x in zip(*blocks, strict=True))
    joint.obsm[key_added] = aligned
    if nonrigid is not None:
        joint.obsm[f"{key_added}_displacement"] = displacement
    joint.obsp["alignment_plan"] = sp.csr_matrix(
        (vals, (rows, cols)), shape=(joint.n_obs, joint.n_obs)
    )
    joint.uns["alignment"] = {
        "params": params,
        "slices": names,
        "transforms": {names[i]: to_ref[i].to_dict() for i in range(n)},
        "partners": {names[m]: names[p] for m, (p, _) in results.items()},
    }
    return plans


def _plain(info: dict[str, Any]) -> dict[str, Any]:
    """``info`` with tuples as arrays (h5ad-writable)."""
    out: dict[str, Any] = {}
    for k, v in info.items():
        if isinstance(v, dict):
            out[k] = _plain(v)
        elif isinstance(v, tuple):
            out[k] = np.asarray(v)
        else:
            out[k] = v
    return out


def _log_normalised(x: Any) -> sp.csr_matrix:
    """log1p of counts scaled to 1e4 per spot (sparse float32)."""
    m = sp.csr_matrix(x, dtype=np.float64)
    lib = np.asarray(m.sum(axis=1)).ravel()
    scale = np.divide(1e4, lib, out=np.zeros_like(lib), where=lib > 0)
    m = sp.diags(scale) @ m
    m.data = np.log1p(m.data)
    return sp.csr_matrix(m, dtype=np.float32)


def interpolate_slices(
    adata: AnnData | Sequence[AnnData],
    other: AnnData | None = None,
    *,
    t: float = 0.5,
    spatial_key: str = "spatial",
    layer: str | None = None,
    labels_key: str | None = None,
    alpha: float = 0.1,
    tau: float = 1.0,
    n_spots: int | None = None,
    n_comps: int = 30,
    seed: int = 0,
    device: str = "cpu",
) -> AnnData:
    """Generate the slice between two aligned slices (or along a sequence of slices).

    The pair is aligned with :func:`chronotope.slices.align_pair` (moving slice onto the
    earlier one) and the slice at ``t`` is generated by displacement interpolation along
    the plan (:func:`chronotope.slices.interpolate_pair`): its own spot set on a lattice
    at the interpolated spacing, ``(1 - t) n_A + t n_B`` spots, expression the plan's
    combination of the two slices' log-normalised expression.

    Parameters
    ----------
    adata, other
        Two slices, or a sequence of slices as ``adata`` (then ``t`` in
        ``[0, n - 1]`` is a position along the sequence: ``t = 1.5`` is halfway between
        the second and third slice). Raw counts in ``.X`` (or ``layer``), coordinates in
        ``obsm[spatial_key]``, genes matched by name.
    t
        Where to generate.
    spatial_key, layer
        Where the coordinates and counts are.
    labels_key
        ``obs`` column of categorical labels to carry over (kernel-weighted vote of the
        two slices' labels, weights ``1 - t`` and ``t``).
    alpha, tau
        Alignment: spatial weight and unbalancedness (``tau < 1`` for developmental
        series whose size changes), see :func:`chronotope.slices.align_pair`.
    n_spots
        Spots to generate (default ``(1 - t) n_A + t n_B``).
    n_comps, seed, device
        Joint features of the alignment; seed; torch device.

    Returns
    -------
    AnnData
        ``X``: generated log1p-normalised expression (float32, shared genes);
        ``obsm["spatial"]``: generated positions in the frame of the first slice of the
        pair; ``obs["density"]``; ``obs[labels_key]`` when asked; ``uns["interpolation"]``.
    """
    from chronotope.slices import align_pair, interpolate_pair, shared_features, shared_genes

    seq = [adata] if isinstance(adata, AnnData) else list(adata)
    if other is not None:
        if len(seq) != 1:
            raise ChronotopeInputError("pass two slices, or one sequence of slices")
        seq.append(other)
    if len(seq) < 2:
        raise ChronotopeInputError("at least two slices are needed")
    if not 0.0 <= t <= len(seq) - 1:
        raise ChronotopeInputError(f"t must be in [0, {len(seq) - 1}], got {t}")
    i = min(int(np.floor(t)), len(seq) - 2)
    frac = float(t - i)
    a, b = seq[i], seq[i + 1]
    coords = []
    for name, s in (("A", a), ("B", b)):
        if spatial_key not in s.obsm:
            raise ChronotopeInputError(f"slice {name}: obsm[{spatial_key!r}] is missing")
        coords.append(check_coordinates(s.obsm[spatial_key], s.n_obs, f"slice {name}"))
        check_counts(s.X if layer is None else s.layers[layer], f"slice {name} counts")
        if labels_key is not None and labels_key not in s.obs:
            raise ChronotopeInputError(f"slice {name}: obs[{labels_key!r}] is missing")
    if coords[0].shape[1] != 2:
        raise ChronotopeInputError("interpolation needs 2-D coordinates")
    fa, fb = shared_features([a, b], layer=layer, n_comps=n_comps, seed=seed)
    res = align_pair(fa, coords[0], fb, coords[1], alpha=alpha, tau=tau, seed=seed, device=device)
    genes = shared_genes([a, b])
    ea = _log_normalised(
        (a.X if layer is None else a.layers[layer])[:, a.var_names.get_indexer(genes)]
    )
    eb = _log_normalised(
        (b.X if layer is None else b.layers[layer])[:, b.var_names.get_indexer(genes)]
    )
    pos, expr, density = interpolate_pair(
        res.plan, coords[0], res.aligned, ea, eb, frac, n_spots=n_spots
    )
    out = AnnData(expr)
    out.var_names = genes
    out.obs_names = [f"t{t:g}-{k}" for k in range(out.n_obs)]
    out.obsm["spatial"] = pos
    out.obs["density"] = density
    if labels_key is not None:
        out.obs[labels_key] = _vote(res.plan, coords[0], res.aligned, a, b, labels_key, frac, pos)
    out.uns["interpolation"] = {
        "t": float(t),
        "pair": np.array([i, i + 1]),
        "fraction": frac,
        "alpha": alpha,
        "tau": tau,
        "expression": "log1p(counts / total * 1e4) combined along the plan",
        "frame": f"slice {i} (the earlier slice of the pair)",
    }
    return out


def _vote(plan, ya, xb, a, b, key, t, pos) -> Any:
    """Label of each generated spot: kernel-weighted vote of the atoms' labels."""
    import pandas as pd
    from scipy.spatial import cKDTree

    p = sp.coo_matrix(plan)
    la = a.obs[key].astype(str).to_numpy()[p.row]
    lb = b.obs[key].astype(str).to_numpy()[p.col]
    atoms = (1.0 - t) * ya[p.row] + t * xb[p.col]
    cats = np.unique(np.concatenate([la, lb]))
    spacing = float(np.median(cKDTree(pos).query(pos, k=2)[0][:, 1])) if len(pos) > 1 else 1.0
    d, j = cKDTree(atoms).query(pos, k=min(16, len(atoms)))
    d, j = np.atleast_2d(d), np.atleast_2d(j)
    kern = np.exp(-(d**2) / (2 * (spacing / 2) ** 2)) * p.data[j]
    votes = np.zeros((len(pos), cats.size))
    ia, ib = np.searchsorted(cats, la), np.searchsorted(cats, lb)
    for c in range(j.shape[1]):
        np.add.at(votes, (np.arange(len(pos)), ia[j[:, c]]), (1 - t) * kern[:, c])
        np.add.at(votes, (np.arange(len(pos)), ib[j[:, c]]), t * kern[:, c])
    return pd.Categorical(cats[votes.argmax(axis=1)], categories=cats)
