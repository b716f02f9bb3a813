"""``tl.spatial_domains``: the AnnData layer of :mod:`chronotope.domains`."""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from chronotope._errors import ChronotopeInputError
from chronotope._validate import check_counts, check_finite, get_obsm
from chronotope.domains.clustering import cluster_embedding, refine_labels
from chronotope.domains.model import DomainModel, DomainModelParams
from chronotope.parallel import Scheduler, check_scheduler, describe_scheduler, scheduler_client

__all__ = ["spatial_domains"]

logger = logging.getLogger(__name__)

# Spots per requested domain below which clustering is refused.
_MIN_SPOTS_PER_DOMAIN = 5
# Principal components of the embedding that the clustering sees (GraphST's tutorial: 20).
_CLUSTER_PCS = 20


def _check_input(
    adata: AnnData, n_domains: int, spatial_key: str, batch_key: str | None, layer: str | None
) -> None:
    if not isinstance(n_domains, (int, np.integer)) or isinstance(n_domains, bool):
        raise ChronotopeInputError(f"n_domains must be an integer, got {n_domains!r}")
    if n_domains < 2:
        raise ChronotopeInputError(f"n_domains must be >= 2, got {n_domains}")
    if adata.n_obs < _MIN_SPOTS_PER_DOMAIN * n_domains:
        raise ChronotopeInputError(
            f"{adata.n_obs} spots are too few for {n_domains} domains "
            f"(need at least {_MIN_SPOTS_PER_DOMAIN * n_domains})"
        )
    coords = get_obsm(adata, spatial_key, made_by="chronotope.io.read_visium")
    if coords.ndim != 2 or coords.shape[1] not in (2, 3):
        raise ChronotopeInputError(
            f"obsm[{spatial_key!r}] must be (n_obs, 2) or (n_obs, 3), got {coords.shape}"
        )
    check_finite(np.asarray(coords, dtype=float), f"obsm[{spatial_key!r}]")
    if batch_key is not None and batch_key not in adata.obs:
        raise ChronotopeInputError(
            f"batch_key {batch_key!r} is not a column of adata.obs "
            f"(columns: {list(adata.obs.columns)[:10]})"
        )
    x = adata.X if layer is None else adata.layers[layer]
    where = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
    check_counts(x, where)
    # counts are non-negative (checked above): a gene is expressed iff its sum is > 0;
    # no boolean copy of the matrix.
    n_expressed = int((np.asarray(x.sum(axis=0)).ravel() > 0).sum())
    if n_expressed == 0:
        raise ChronotopeInputError(f"{where} is all zero: every gene has zero counts")
    if n_expressed < n_domains:
        raise ChronotopeInputError(f"only {n_expressed} genes are expressed in {where}")


def _preprocess_selected(
    adata: AnnData,
    layer: str | None,
    n_top_genes: int,
    n_comps: int,
    batch_key: str | None,
    seed: int,
    center_batches: bool = False,
) -> None:
    """HVG on the counts, then log-normalised selected genes -> PCA; no full-size layers.

    The same numbers as :func:`chronotope.pp.preprocess` followed by
    :func:`chronotope.pp.pca`, but only the selected genes are normalised (with library
    sizes over all genes), so memory holds the counts plus one copy of the selected
    genes instead of three copies of the whole matrix (the difference between fitting
    200k spots in 6 GB or not).
    """
    from chronotope import pp

    counts = adata.X if layer is None else adata.layers[layer]
    view = AnnData(counts, obs=adata.obs[[]], var=adata.var[[]])
    if batch_key is not None:
        view.obs[batch_key] = adata.obs[batch_key].to_numpy()
    pp.highly_variable_genes(view, n_top_genes=n_top_genes, batch_key=batch_key)
    for col in view.var.columns:
        adata.var[col] = view.var[col]
    adata.uns["hvg"] = view.uns["hvg"]
    genes = view.var["highly_variable"].to_numpy(dtype=bool)
    lib = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
    factor = np.divide(1e4, lib, out=np.zeros_like(lib), where=lib > 0)
    if sp.issparse(counts):
        sub = sp.csr_matrix(counts)[:, np.flatnonzero(genes)]
        fresh = sub.dtype != np.float32 or (
            sp.issparse(counts) and np.shares_memory(sub.data, counts.data)
        )
        sub = sub.astype(np.float32, copy=fresh)  # never scale the caller's counts in place
        # in place, one row span at a time (float64 products, stored as float32)
        step = max(1, (1 << 20) // max(1, sub.shape[1]))
        for lo in range(0, sub.shape[0], step):
            a, b = sub.indptr[lo], sub.indptr[min(lo + step, sub.shape[0])]
            per_row = np.diff(sub.indptr[lo : min(lo + step, sub.shape[0]) + 1])
            vals = sub.data[a:b] * np.repeat(factor[lo : lo + step], per_row)
            sub.data[a:b] = np.log1p(vals)
    else:
        sub = np.asarray(counts, dtype=np.float64)[:, genes] * factor[:, None]
        sub = np.log1p(sub).astype(np.float32)
    selected = AnnData(sub, obs=adata.obs[[]], var=adata.var[genes][[]])
    pca_batch = None
    if center_batches and batch_key is not None:
        pca_batch = "_batch"
        selected.obs[pca_batch] = adata.obs[batch_key].to_numpy()
    del view, sub
    pp.pca(
        selected,
        n_comps=n_comps,
        layer=None,
        use_highly_variable=False,
        random_state=seed,
        batch_key=pca_batch,
    )
    loadings = np.zeros((adata.n_vars, selected.varm["PCs"].shape[1]), dtype=np.float32)
    loadings[genes] = selected.varm["PCs"]
    adata.obsm["X_pca"] = selected.obsm["X_pca"]
    adata.varm["PCs"] = loadings
    adata.uns["pca"] = selected.uns["pca"]
    adata.uns["pca"]["params"]["layer"] = "log1p of the highly variable genes (not stored)"


def spatial_domains(
    adata: AnnData,
    n_domains: int = 7,
    *,
    spatial_key: str = "spatial",
    batch_key: str | None = None,
    center_batches: bool = False,
    layer: str | None = None,
    preprocess: bool = True,
    n_top_genes: int = 3000,
    n_comps: int = 100,
    n_neighbors: int = 6,
    method: Literal["gmm", "kmeans", "leiden"] = "gmm",
    refine: bool = True,
    seed: int = 0,
    device: str | None = "cpu",
    scheduler: Scheduler = None,
    tile_size: int | None = None,
    progress: bool = False,
    key_added: str = "domain",
    copy: bool = False,
    **model_params: Any,
) -> AnnData | None:
    """Find spatial domains with the graph contrastive encoder and cluster them.

    Steps (each writes new keys; ``adata.X`` is never changed):

    1. with ``preprocess=True``: seurat_v3 highly variable genes on the counts
       (:func:`chronotope.pp.highly_variable_genes`), library-size normalisation to
       1e4 and log1p of the selected genes, and :func:`chronotope.pp.pca` (``n_comps``
       components of the scaled log data; sparse input stays sparse). The numbers are
       those of :func:`chronotope.pp.preprocess` + :func:`chronotope.pp.pca`, but no
       full-size layer is stored (memory). With ``preprocess=False`` the existing
       ``obsm["X_pca"]``, ``varm["PCs"]`` and ``var["highly_variable"]`` are used;
    2. :func:`chronotope.pp.spatial_neighbors` (``n_neighbors`` nearest spots, per
       ``batch_key``), unless ``obsp["spatial_connectivities"]`` exists;
    3. :class:`chronotope.domains.DomainModel` trained on all spots (slices share weights);
    4. PCA (20 components) of the embedding, then ``method``: a tied-covariance Gaussian
       mixture (mclust ``EEE``; the spherical ``EII`` when its BIC is higher, which
       happens on small, noisy data, see :func:`chronotope.domains.gmm_eee`), k-means,
       or leiden with a resolution bisection to ``n_domains``; with ``refine=True`` a
       6-nearest-neighbour majority vote (per slice).

    Parameters
    ----------
    adata
        Raw counts in ``.X`` (or ``layer``) and coordinates in ``obsm[spatial_key]``.
    n_domains
        Number of domains.
    spatial_key
        Key of the coordinates in ``adata.obsm``.
    batch_key
        Column of ``adata.obs`` naming the slice of each spot; slices are integrated
        (shared encoder, separate graphs, per-batch gene selection).
    center_batches
        With ``batch_key``: centre each gene within each batch before the PCA (see
        ``batch_key`` of :func:`chronotope.pp.pca`), for slices from different platforms
        or protocols whose per-gene capture differs; each batch should cover the same
        tissue kinds. Used by :func:`chronotope.tl.integrate_slices`.
    layer
        Layer with the raw counts (``None``: ``.X``).
    preprocess
        Run normalisation, gene selection and PCA (see above).
    n_top_genes, n_comps
        Highly variable genes and principal components of the model input.
    n_neighbors
        Neighbours of the spatial graph.
    method
        ``"gmm"``, ``"kmeans"`` or ``"leiden"``.
    refine
        Smooth labels by a spatial majority vote.
    seed
        Seed of the model and the clustering.
    device
        Torch device of the model.
    scheduler
        Where the inference of the embedding runs, over tiles of ``tile_size`` spots
        (:meth:`chronotope.domains.DomainModel.get_embedding`): ``None`` (in-process),
        ``"local:N"`` (a local Dask cluster of ``N`` workers), a Dask scheduler address or
        a ``distributed.Client``. Training stays in this process; the embedding equals the
        one-pass one up to float rounding.
    tile_size
        Spots per inference tile (``None``: one pass in-process, 65,536 with a scheduler).
    progress
        Progress bar over training epochs.
    key_added
        ``obs[key_added]`` (categorical domains), ``obsm["X_" + key_added]``
        (embedding), ``uns[key_added]["params"]``.
    copy
        Work on and return a copy.
    **model_params
        Fields of :class:`chronotope.domains.DomainModelParams` (``n_hops``,
        ``max_epochs``, ...).

    Returns
    -------
    AnnData or None
        The copy when ``copy=True``. Writes ``obs[key_added]``, ``obsm["X_" + key_added]``,
        ``obsm["X_" + key_added + "_latent"]``, ``var["gene_importance"]`` (NaN for genes
        not used), ``uns[key_added]`` (``params``, ``hop_weights``, ``loss``, ``seconds``).
    """
    from chronotope import pp

    _check_input(adata, n_domains, spatial_key, batch_key, layer)
    check_scheduler(scheduler)
    if tile_size is not None and int(tile_size) < 1:
        raise ChronotopeInputError(f"tile_size must be >= 1, got {tile_size}")
    unknown = set(model_params) - set(DomainModelParams.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown model parameters: {sorted(unknown)}")
    if method not in ("gmm", "kmeans", "leiden"):
        raise ChronotopeInputError(f"method must be 'gmm', 'kmeans' or 'leiden', got {method!r}")
    adata = adata.copy() if copy else adata
    start = time.perf_counter()

    if preprocess:
        _preprocess_selected(
            adata, layer, n_top_genes, n_comps, batch_key, seed, center_batches=center_batches
        )
    for key, where in (("X_pca", "obsm"), ("PCs", "varm")):
        if key not in getattr(adata, where):
            raise ChronotopeInputError(
                f"adata.{where}[{key!r}] is missing: run chronotope.pp.pca or preprocess=True"
            )
    if "highly_variable" not in adata.var:
        raise ChronotopeInputError(
            "adata.var['highly_variable'] is missing: run chronotope.pp.highly_variable_genes"
        )
    genes = adata.var["highly_variable"].to_numpy(dtype=bool)
    scores = np.asarray(adata.obsm["X_pca"], dtype=np.float32)
    loadings = np.asarray(adata.varm["PCs"], dtype=np.float32)[genes]
    check_finite(scores, "obsm['X_pca']")

    if "spatial_connectivities" not in adata.obsp:
        pp.spatial_neighbors(
            adata, spatial_key=spatial_key, n_neighbors=n_neighbors, library_key=batch_key
        )
    conn = sp.csr_matrix(adata.obsp["spatial_connectivities"])

    model = DomainModel(device=device, progress=progress, seed=seed, **model_params)
    model.fit(scores, loadings, conn, var_names=adata.var_names[genes].to_numpy())
    if scheduler is None and tile_size is None:
        embedding, latent = model.get_embedding(), model.get_latent()
    else:
        with scheduler_client(scheduler) as client:
            tiles = {"scheduler": client, "tile_size": tile_size}
            embedding, latent = model.get_embedding(**tiles), model.get_latent(**tiles)
    model.release_training_data()  # the hop stack is not needed for clustering
    # scikit-learn is imported here, after training, not with the module: its ~50 MB
    # of code then lands once the training buffers are free instead of on top of them
    from sklearn.decomposition import PCA

    reduced = PCA(min(_CLUSTER_PCS, embedding.shape[1]), random_state=seed).fit_transform(embedding)
    labels = cluster_embedding(reduced, n_domains, method=method, random_state=seed)
    if refine:
        coords = np.asarray(adata.obsm[spatial_key], dtype=float)
        if batch_key is None:
            labels = refine_labels(labels, coords)
        else:
            out = labels.copy()
            for b in pd.unique(adata.obs[batch_key]):
                m = (adata.obs[batch_key] == b).to_numpy()
                if m.sum() > 6:
                    out[m] = refine_labels(labels[m], coords[m])
            labels = out

    importance = np.full(adata.n_vars, np.nan, dtype=np.float32)
    importance[genes] = model.gene_importance_
    adata.var["gene_importance"] = importance
    adata.obsm[f"X_{key_added}"] = embedding
    adata.obsm[f"X_{key_added}_latent"] = latent
    cats = [str(c) for c in range(int(labels.max()) + 1)]
    adata.obs[key_added] = pd.Categorical([str(v) for v in labels], categories=cats)
    params = {
        "n_domains": int(n_domains),
        "spatial_key": spatial_key,
        "batch_key": batch_key,
        "center_batches": bool(center_batches),
        "layer": layer,
        "preprocess": bool(preprocess),
        "n_top_genes": int(n_top_genes),
        "n_comps": int(n_comps),
        "n_neighbors": int(n_neighbors),
        "method": method,
        "refine": bool(refine),
        "seed": int(seed),
        "scheduler": describe_scheduler(scheduler),
        **{k: v for k, v in model.params.__dict__.items() if v is not None},
    }
    adata.uns[key_added] = {
        "params": params,
        "hop_weights": model.hop_weights_,
        "loss": pd.DataFrame(model.history_).to_numpy(dtype=np.float32),
        "loss_columns": np.array(["contrastive", "reconstruction", "gate"]),
        "seconds": float(time.perf_counter() - start),
    }
    logger.info(
        "spatial_domains: %d spots into %d domains in %.1f s",
        adata.n_obs,
        len(cats),
        adata.uns[key_added]["seconds"],
    )
    return adata if copy else None
