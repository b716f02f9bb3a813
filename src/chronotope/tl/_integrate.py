"""``tl.integrate_slices``: slices of different platforms in one embedding and one frame."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from chronotope._errors import ChronotopeInputError
from chronotope._validate import check_coordinates, check_counts

__all__ = ["integrate_slices"]

logger = logging.getLogger(__name__)


def _spacing(xy: np.ndarray) -> float:
    from scipy.spatial import cKDTree

    if len(xy) < 2:
        return float("nan")
    return float(np.median(cKDTree(xy).query(xy, k=2)[0][:, 1]))


def integrate_slices(
    adata: Sequence[AnnData],
    *,
    n_domains: int = 7,
    names: Sequence[str] | None = None,
    batch_key: str = "slice",
    reference: int = 0,
    policy: str = "star",
    spatial_key: str = "spatial",
    layer: str | None = None,
    align: bool = True,
    scaling: bool = True,
    center_slices: bool = True,
    alpha: float = 0.1,
    mass: float | None = None,
    tau: float = 1.0,
    allow_reflection: bool = False,
    n_top_genes: int = 3000,
    n_comps: int = 100,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = False,
    **model_params: Any,
) -> AnnData:
    """Bring slices of one tissue, possibly from different platforms, together.

    Slices may differ in technology (Visium, legacy ST, Stereo-seq bins, ...), hence in
    spot size and spacing, coordinate units, gene panel and per-gene capture. They are
    integrated in three steps:

    1. **Shared genes.** Genes are matched by name; only those measured in every slice
       are kept (an error names the counts when fewer than 20 are shared).
    2. **One frame.** :func:`chronotope.tl.align_slices` (``policy``, default ``"star"``
       onto ``reference``) with ``scaling=True``: the spatial term of the fused
       Gromov-Wasserstein is relative, so slices in other units or at other resolutions
       are matched, and an isotropic scale is fitted with the rotation and translation.
       Expression features for the alignment are centred per slice
       (``center_slices``).
    3. **One embedding.** :func:`chronotope.tl.spatial_domains` on all spots with the
       slice as ``batch_key``: one encoder shared by all slices, a spatial graph per
       slice (each at its own spacing), genes selected per slice and, with
       ``center_slices``, each gene centred within each slice before the PCA (a
       platform's capture bias of a gene is removed instead of becoming a component).
       Domains are clustered jointly, so a domain label means the same in every slice.

    Parameters
    ----------
    adata
        Two or more slices: raw counts in ``.X`` (or ``layer``), coordinates in
        ``obsm[spatial_key]``, gene names in ``var_names``.
    n_domains
        Number of joint domains.
    names
        Slice names (default ``"0"``, ``"1"``, ...), written to ``obs[batch_key]``.
    batch_key
        ``obs`` column of the result naming each spot's slice.
    reference, policy
        The slice whose frame is kept, and how slices are chained (see
        :func:`chronotope.tl.align_slices`).
    spatial_key, layer
        Where the coordinates and counts are.
    align
        Align the slices (``False``: only the joint embedding; coordinates are copied).
    scaling
        Fit a scale between slices (coordinates in different units). Turn it off when
        all slices share units (e.g. micrometres) to fit a rigid transform only.
    center_slices
        Centre each gene within each slice before the PCAs (see ``batch_key`` of
        :func:`chronotope.pp.pca`). It assumes each slice covers the same kinds of
        tissue; turn it off for slices whose composition differs widely.
    alpha, mass, tau, allow_reflection
        Alignment options (see :func:`chronotope.slices.align_pair`).
    n_top_genes, n_comps
        Genes selected and principal components of the encoder's input.
    seed, device, progress
        Seed, torch device, progress bar over training.
    **model_params
        Fields of :class:`chronotope.domains.DomainModelParams`.

    Returns
    -------
    AnnData
        A new object over all spots and the shared genes: ``.X`` the counts of the
        shared genes, ``obs[batch_key]``, the ``obs`` columns common to all slices,
        ``obsm["spatial"]`` (each slice's own coordinates), ``obsm["spatial_aligned"]``,
        ``obsp["alignment_plan"]`` (plans as blocks: rows = partner spots, columns =
        moving spots), ``obs["domain"]``, ``obsm["X_domain"]`` (the joint embedding),
        ``uns["alignment"]``, ``uns["domain"]`` and ``uns["integration"]`` (slice names,
        gene counts, spot spacing of each slice in its own and in the reference's units,
        seconds). The input slices are not changed.
    """
    from chronotope.slices import shared_genes
    from chronotope.tl._domains import spatial_domains
    from chronotope.tl._slices import align_slices

    start = time.perf_counter()
    slices = list(adata) if not isinstance(adata, AnnData) else [adata]
    if len(slices) < 2:
        raise ChronotopeInputError("integrate_slices needs a list of at least two slices")
    names = [str(i) for i in range(len(slices))] if names is None else [str(n) for n in names]
    if len(names) != len(slices) or len(set(names)) != len(names):
        raise ChronotopeInputError(f"names must be {len(slices)} distinct strings, got {names}")
    if not 0 <= reference < len(slices):
        raise ChronotopeInputError(f"reference {reference} is not a slice index")
    coords = []
    for name, a in zip(names, slices, strict=True):
        if a.n_obs < max(n_domains, 3):
            raise ChronotopeInputError(f"slice {name} has {a.n_obs} spots")
        if spatial_key not in a.obsm:
            raise ChronotopeInputError(f"slice {name}: obsm[{spatial_key!r}] is missing")
        if layer is not None and layer not in a.layers:
            raise ChronotopeInputError(f"slice {name}: layers[{layer!r}] is missing")
        coords.append(check_coordinates(a.obsm[spatial_key], a.n_obs, f"slice {name}"))
        check_counts(a.X if layer is None else a.layers[layer], f"slice {name} counts")
    genes = shared_genes(slices)
    logger.info(
        "integrate_slices: %d shared genes (%s)",
        len(genes),
        ", ".join(f"{n}: {a.n_vars}" for n, a in zip(names, slices, strict=True)),
    )

    blocks = []
    for a in slices:
        x = a.X if layer is None else a.layers[layer]
        blocks.append(sp.csr_matrix(x)[:, a.var_names.get_indexer(genes)])
    common = [c for c in slices[0].obs.columns if all(c in a.obs for a in slices[1:])]
    obs = pd.concat([a.obs[common].reset_index(drop=True) for a in slices], ignore_index=True)
    sizes = [a.n_obs for a in slices]
    obs[batch_key] = pd.Categorical(np.repeat(names, sizes), categories=names)
    obs.index = [f"{n}:{o}" for n, a in zip(names, slices, strict=True) for o in a.obs_names]
    joint = AnnData(sp.vstack(blocks, format="csr"), obs=obs, var=pd.DataFrame(index=genes))
    joint.obsm["spatial"] = np.concatenate([c[:, :2] if c.shape[1] > 2 else c for c in coords])

    if align:
        align_slices(
            joint,
            batch_key=batch_key,
            policy=policy,  # type: ignore[arg-type]
            reference=reference,
            alpha=alpha,
            mass=mass,
            tau=tau,
            allow_reflection=allow_reflection,
            scaling=scaling,
            center_slices=center_slices,
            seed=seed,
            device=device,
        )
    else:
        joint.obsm["spatial_aligned"] = joint.obsm["spatial"].copy()
    spatial_domains(
        joint,
        n_domains,
        batch_key=batch_key,
        center_batches=center_slices,
        n_top_genes=n_top_genes,
        n_comps=min(n_comps, len(genes) - 1, joint.n_obs - 1),
        seed=seed,
        device=device,
        progress=progress,
        **model_params,
    )
    offsets = np.cumsum([0, *sizes])
    aligned = joint.obsm["spatial_aligned"]
    joint.uns["integration"] = {
        "slices": np.asarray(names),
        "n_genes": np.asarray([a.n_vars for a in slices]),
        "n_shared_genes": len(genes),
        "spacing_own_units": np.asarray([_spacing(c) for c in coords]),
        "spacing_reference_units": np.asarray(
            [_spacing(aligned[offsets[i] : offsets[i + 1]]) for i in range(len(slices))]
        ),
        "center_slices": bool(center_slices),
        "scaling": bool(scaling),
        "seconds": float(time.perf_counter() - start),
    }
    return joint
