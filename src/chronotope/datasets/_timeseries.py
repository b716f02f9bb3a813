"""Loaders for the time-series (snapshot) datasets of the data folder."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from chronotope._errors import ChronotopeInputError
from chronotope.datasets._registry import dataset_path, register

__all__ = ["deepruot", "emt", "misa", "misa_velocity", "tigon", "weinreb", "wot"]

DataDir = str | os.PathLike[str] | None


def _adata(
    x: np.ndarray,
    time: np.ndarray,
    *,
    obsm_key: str | None,
    var_prefix: str,
    obs: dict[str, Any] | None = None,
    obs_names: Sequence[str] | None = None,
    info: dict[str, Any],
) -> AnnData:
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = x.shape[0]
    index = pd.Index([str(i) for i in range(n)] if obs_names is None else list(obs_names))
    df = pd.DataFrame(index=index)
    df["time"] = np.asarray(time, dtype=np.float64)
    for k, v in (obs or {}).items():
        df[k] = v
    var = pd.DataFrame(index=pd.Index([f"{var_prefix}{i + 1}" for i in range(x.shape[1])]))
    adata = AnnData(X=x, obs=df, var=var)
    if obsm_key is not None:
        adata.obsm[obsm_key] = x.copy()
    adata.uns["chronotope_dataset"] = info
    return adata


def _ordered_labels(labels: np.ndarray, order: Sequence[str]) -> pd.Categorical:
    return pd.Categorical(np.asarray(labels).astype(str), categories=list(order), ordered=True)


_DOT_SOURCE = "liujuntan/DiffusionOT Input/ (commit bb3c5bd)"
_DOT_LICENSE = "MIT (DiffusionOT repository, © 2025 Juntan Liu)"


@register("emt", "EMT mass cytometry time course (Karacosta 2019), 7 time points, 2-D PCA")
def emt(*, data_dir: DataDir = None) -> AnnData:
    """Lung-cancer EMT time course (mass cytometry), DiffusionOT's input embedding.

    Parameters
    ----------
    data_dir
        Data folder (default: see :func:`get_data_dir`).

    Returns
    -------
    AnnData
        87,354 cells x 2 (a scaled 2-D PCA of 38 protein markers). Keys:

        - ``.X`` and ``obsm["X_pca"]``: the embedding, ``float32``;
        - ``obs["time"]``: time point 1.0…7.0 as stored (the real times are not in the
          file); cells per time 11,791, 12,367, 12,299, 12,812, 12,529, 12,805, 12,751;
        - ``obs["cell_type"]``: EMT state ``E``, ``pEMT``, ``M``, ``MET``;
        - ``uns["markers"]``: the 38 marker channels behind the PCA.

    Notes
    -----
    Source: GitHub ``liujuntan/DiffusionOT``, ``Input/EMT.npz`` and
    ``Rawdata/gene_name_EMT.csv`` (commit bb3c5bd); licence MIT.

    Citation: Karacosta LG, et al. Mapping lung cancer epithelial-mesenchymal transition
    states and trajectories with single-cell resolution. *Nature Communications* 10,
    5587 (2019). Preprocessing: Liu J, Li C, Zhou P, Nie Q. DiffusionOT (GitHub
    liujuntan/DiffusionOT, 2025).
    """
    z = np.load(dataset_path("diffusionot_inputs", "EMT.npz", data_dir=data_dir), allow_pickle=True)
    markers_path = dataset_path("diffusionot_inputs", "gene_name_EMT.csv", data_dir=data_dir)
    t = np.asarray(z["time_label"]).astype(np.float64)
    types = np.asarray(z["type_label"]).astype(str)
    adata = _adata(
        z["pca_scaled"],
        t,
        obsm_key="X_pca",
        var_prefix="PC",
        obs={"cell_type": pd.Categorical(types, categories=["E", "pEMT", "M", "MET"])},
        info={
            "name": "emt",
            "source": _DOT_SOURCE + " EMT.npz",
            "citation": "Karacosta LG et al. Nature Communications 10, 5587 (2019); "
            "DiffusionOT (Liu J, Li C, Zhou P, Nie Q, 2025)",
            "license": _DOT_LICENSE,
        },
    )
    markers = pd.read_csv(markers_path, index_col=0).iloc[:, 0].astype(str).tolist()
    adata.uns["markers"] = np.asarray(markers, dtype=object)
    return adata


_WEINREB_TYPES = (
    "Undifferentiated",
    "Neu",
    "Mo",
    "Ba",
    "Er",
    "Mk",
    "Ma",
    "Eos",
    "cDC",
    "pDC1",
    "pDC2",
)


@register("weinreb", "Weinreb mouse hematopoiesis (days 2/4/6), 2-D autoencoder latent")
def weinreb(*, data_dir: DataDir = None) -> AnnData:
    """Mouse hematopoiesis in vitro (Weinreb 2020), DiffusionOT's 2-D latent embedding.

    Parameters
    ----------
    data_dir
        Data folder (default: see :func:`get_data_dir`).

    Returns
    -------
    AnnData
        43,968 cells x 2 (scaled autoencoder latent). Keys:

        - ``.X`` and ``obsm["X_latent"]``: the embedding, ``float32``;
        - ``obs["time"]``: day of culture 2.0, 4.0, 6.0 (13,035, 16,830, 14,103 cells);
        - ``obs["cell_type"]``: 11 annotations (``Undifferentiated``, ``Neu``, ``Mo``, ...).

    Notes
    -----
    Source: GitHub ``liujuntan/DiffusionOT``, ``Input/Mouse_latent_ae_scaled.npz``
    (commit bb3c5bd); licence MIT. The TIGON / DeepRUOT 2-D versions of the same
    experiment: ``tigon("lineage")``, ``deepruot("mouse_hematopoiesis")``.

    Citation: Weinreb C, Rodriguez-Fraticelli A, Camargo FD, Klein AM. Lineage tracing
    on transcriptional landscapes links state to fate during differentiation.
    *Science* 367, eaaw3381 (2020). GEO GSE140802.
    """
    path = dataset_path("diffusionot_inputs", "Mouse_latent_ae_scaled.npz", data_dir=data_dir)
    z = np.load(path, allow_pickle=True)
    t = np.asarray(z["time_label"]).astype(str).astype(np.float64)
    types = np.asarray(z["type_label"]).astype(str)
    cats = [c for c in _WEINREB_TYPES if c in set(types)] + sorted(set(types) - set(_WEINREB_TYPES))
    return _adata(
        z["latent_ae_scaled"],
        t,
        obsm_key="X_latent",
        var_prefix="latent",
        obs={"cell_type": pd.Categorical(types, categories=cats)},
        info={
            "name": "weinreb",
            "source": _DOT_SOURCE + " Mouse_latent_ae_scaled.npz",
            "citation": "Weinreb C et al. Science 367, eaaw3381 (2020)",
            "license": _DOT_LICENSE,
        },
    )


def _stack(parts: Sequence[np.ndarray], times: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x = np.concatenate([np.asarray(p, dtype=np.float64) for p in parts], axis=0)
    t = np.concatenate([np.full(len(p), float(ti)) for p, ti in zip(parts, times, strict=True)])
    return x, t


#: DiffusionOT's default time grid for the MISA snapshots (``create_args`` in its utility.py).
MISA_TIMES = (0.0, 1.0, 2.0, 6.0)


@register("misa", "Simulated MISA two-gene network, 4 time points (t = 0, 1, 2, 6)")
def misa(*, times: Sequence[float] | None = MISA_TIMES, data_dir: DataDir = None) -> AnnData:
    """Simulated mutual-inhibition / self-activation (MISA) two-gene network snapshots.

    Parameters
    ----------
    times
        Real time of each of the four snapshots; default DiffusionOT's grid
        ``(0, 1, 2, 6)``. ``None``: the time-point index 0…3.
    data_dir
        Data folder (default: see :func:`get_data_dir`).

    Returns
    -------
    AnnData
        2,725 cells x 2 genes (``gene1``, ``gene2``), ``.X`` ``float32``;
        ``obs["time"]`` = ``times`` (500, 716, 771, 738 cells);
        ``obs["time_point"]`` = index 0…3.

    Notes
    -----
    Source: GitHub ``liujuntan/DiffusionOT``, ``Input/MISA.npy`` (commit bb3c5bd);
    licence MIT. Synthetic data; the true drift is :func:`misa_velocity`. Citation: Liu J,
    Li C, Zhou P, Nie Q. DiffusionOT (GitHub liujuntan/DiffusionOT, 2025).
    """
    arr = np.load(
        dataset_path("diffusionot_inputs", "MISA.npy", data_dir=data_dir), allow_pickle=True
    )
    parts = list(arr.ravel())
    grid = list(range(len(parts))) if times is None else [float(v) for v in times]
    if len(grid) != len(parts):
        raise ChronotopeInputError(f"MISA.npy has {len(parts)} time points; got {len(grid)} times.")
    x, t = _stack(parts, grid)
    return _adata(
        x,
        t,
        obsm_key=None,
        var_prefix="gene",
        obs={"time_point": np.concatenate([np.full(len(p), i) for i, p in enumerate(parts)])},
        info={
            "name": "misa",
            "source": _DOT_SOURCE + " MISA.npy",
            "citation": "DiffusionOT (Liu J, Li C, Zhou P, Nie Q, 2025); simulated data",
            "license": _DOT_LICENSE,
        },
    )


def misa_velocity(x: Any) -> Any:
    r"""True drift of the MISA simulation (DiffusionOT ``True_v``).

    .. math::

        \dot x_1 = \frac{a x_1^n}{s^n + x_1^n} + \frac{b s^n}{s^n + x_2^n} - k x_1, \qquad
        \dot x_2 = \frac{a x_2^n}{s^n + x_2^n} + \frac{b s^n}{s^n + x_1^n} - k x_2,

    with ``a = 0.7``, ``b = 0.8``, ``s = 0.5``, ``n = 4``, ``k = 1`` (self-activation plus
    mutual inhibition).

    Parameters
    ----------
    x
        ``(n, 2)`` points, a numpy array or a torch tensor (differentiable).

    Returns
    -------
    numpy.ndarray or torch.Tensor
        ``(n, 2)`` velocities, the same type as ``x``.
    """
    a, b, s, n, k = 0.7, 0.8, 0.5, 4, 1.0
    x1, x2 = x[:, 0], x[:, 1]
    sn = s**n
    d1 = a * x1**n / (sn + x1**n) + b * sn / (sn + x2**n) - k * x1
    d2 = a * x2**n / (sn + x2**n) + b * sn / (sn + x1**n) - k * x2
    if isinstance(x, np.ndarray):
        return np.stack([d1, d2], axis=1)
    import torch

    return torch.stack([d1, d2], dim=1)


# name -> (file, times, time labels, citation of the underlying data)
_TIGON: dict[str, tuple[str, tuple[float, ...], tuple[str, ...] | None, str]] = {
    "lineage": (
        "Lineage.npy",
        (2.0, 4.0, 6.0),
        ("day 2", "day 4", "day 6"),
        "Weinreb C et al. Science 367, eaaw3381 (2020)",
    ),
    "emt": (
        "EMT.npy",
        (0.0, 1.0 / 3.0, 1.0, 3.0, 7.0),
        ("0d", "8h", "1d", "3d", "7d"),
        "Cook DP, Vanderhyden BC. Nature Communications 11, 2142 (2020)",
    ),
    "bifurcation": (
        "Bifurcation.npy",
        tuple(float(i) for i in range(8)),
        None,
        "Bargaje R et al. PNAS 114, 2271-2276 (2017)",
    ),
    "simulation": ("Simulation.npy", (0.0, 1.0, 2.0, 3.0, 4.0), None, "simulated data"),
}


@register("tigon", "TIGON inputs: Weinreb lineage, A549 EMT, iPSC bifurcation, simulation")
def tigon(name: str = "emt", *, data_dir: DataDir = None) -> AnnData:
    """TIGON's low-dimensional time-series snapshots.

    Parameters
    ----------
    name
        - ``"lineage"``: Weinreb hematopoiesis, 2-D, days 2/4/6 (1,429, 3,781, 5,788 cells);
        - ``"emt"``: A549 TGFB1 EMT (Cook 2020), 3-D, 0 d, 8 h, 1 d, 3 d, 7 d
          (577, 885, 788, 754, 129 cells);
        - ``"bifurcation"``: iPSC → cardiomyocyte single-cell qPCR (Bargaje 2017), 4-D,
          8 time points (index 0…7; real times not stored);
        - ``"simulation"``: simulated, 3-D, 5 time points (index 0…4).
    data_dir
        Data folder (default: see :func:`get_data_dir`).

    Returns
    -------
    AnnData
        Cells x d, ``.X`` ``float32``. ``obs["time"]``: days for ``lineage`` (2, 4, 6) and
        ``emt`` (0, 1/3, 1, 3, 7), time-point index otherwise; ``obs["time_point"]``: index
        0, 1, ...; ``obs["time_label"]`` (``lineage``, ``emt``): ordered categorical.

    Notes
    -----
    Source: GitHub ``yutongo/TIGON``, ``Input/*.npy`` (commit 1ed92cf); licence MIT.
    The EMT time order follows the sizes in ``EMT_data/AE_EMT_time.csv``.

    Citation: Sha Y, Qiu Y, Zhou P, Nie Q. Reconstructing growth and dynamic trajectories
    from single-cell transcriptomics data. *Nature Machine Intelligence* 6, 25–39 (2024).
    doi:10.1038/s42256-023-00763-w (plus the data source named above).
    """
    key = str(name).lower()
    if key not in _TIGON:
        raise ChronotopeInputError(f"Unknown TIGON dataset {name!r}; use one of {list(_TIGON)}.")
    fname, times, labels, cite = _TIGON[key]
    arr = np.load(dataset_path("tigon_inputs", fname, data_dir=data_dir), allow_pickle=True)
    parts = list(arr.ravel())
    if len(parts) != len(times):
        raise ChronotopeInputError(f"{fname}: expected {len(times)} time points, got {len(parts)}.")
    x, t = _stack(parts, times)
    obs: dict[str, Any] = {
        "time_point": np.concatenate([np.full(len(p), i) for i, p in enumerate(parts)])
    }
    if labels is not None:
        lab = np.concatenate(
            [np.full(len(p), lb, dtype=object) for p, lb in zip(parts, labels, strict=True)]
        )
        obs["time_label"] = _ordered_labels(lab, labels)
    return _adata(
        x,
        t,
        obsm_key=None,
        var_prefix="dim",
        obs=obs,
        info={
            "name": f"tigon_{key}",
            "source": f"yutongo/TIGON Input/{fname} (commit 1ed92cf)",
            "citation": "Sha Y et al. Nature Machine Intelligence 6, 25-39 (2024); " + cite,
            "license": "MIT (TIGON repository)",
        },
    )


_DEEPRUOT = {
    "emt": ("emt.csv", "A549 TGFB1 EMT (Cook & Vanderhyden, Nat Commun 11, 2142, 2020)"),
    "mouse_hematopoiesis": ("mouse_hematopoiesis.csv", "Weinreb C et al. Science 367 (2020)"),
    "simulation_gene": ("simulation_gene_data.csv", "simulated gene network"),
    "gaussian_10d": ("gaussian_10d.csv", "synthetic Gaussian mixture"),
    "gaussian_20d": ("gaussian_20d.csv", "synthetic Gaussian mixture"),
}


@register("deepruot", "DeepRUOT inputs: EMT 10-D, Weinreb 2-D, gene simulation, Gaussians")
def deepruot(name: str = "emt", *, data_dir: DataDir = None) -> AnnData:
    """DeepRUOT's time-series snapshots (CSV with a time-index column).

    Parameters
    ----------
    name
        - ``"emt"``: A549 EMT, 10-D, 3,133 cells, time index 0–3 (577, 885, 788, 883;
          the last probably merges TIGON's 3 d and 7 d groups);
        - ``"mouse_hematopoiesis"``: Weinreb, 2-D, 10,998 cells, index 0–2 (= days 2, 4, 6;
          the same points as ``tigon("lineage")``);
        - ``"simulation_gene"``: gene-network simulation, 2-D, 3,031 cells, index 0–4;
        - ``"gaussian_10d"``, ``"gaussian_20d"``: Gaussian mixtures, 1,900 cells, index 0–1.
    data_dir
        Data folder (default: see :func:`get_data_dir`).

    Returns
    -------
    AnnData
        Cells x d, ``.X`` ``float32`` (``var_names`` ``x1``…``xd`` as in the file),
        ``obs["time"]`` = the stored time index (column ``samples``) as float.

    Notes
    -----
    Source: GitHub ``zhenyiizhang/DeepRUOT``, ``data/*.csv`` (commit 2289c81); README:
    MIT licence (MIOflow-derived code: Yale Non-Commercial License); no LICENSE file.

    Citation: Zhang Z, Li T, Zhou P. Learning stochastic dynamics from snapshots through
    regularized unbalanced optimal transport. *ICLR 2025* (plus the data source above).
    """
    key = str(name).lower()
    if key not in _DEEPRUOT:
        raise ChronotopeInputError(
            f"Unknown DeepRUOT dataset {name!r}; use one of {list(_DEEPRUOT)}."
        )
    fname, cite = _DEEPRUOT[key]
    df = pd.read_csv(dataset_path("deepruot_data", fname, data_dir=data_dir))
    if "samples" not in df.columns:
        raise ChronotopeInputError(f"{fname}: no 'samples' (time index) column.")
    feats = [c for c in df.columns if c != "samples"]
    adata = _adata(
        df[feats].to_numpy(),
        df["samples"].to_numpy(np.float64),
        obsm_key=None,
        var_prefix="x",
        info={
            "name": f"deepruot_{key}",
            "source": f"zhenyiizhang/DeepRUOT data/{fname} (commit 2289c81)",
            "citation": "Zhang Z, Li T, Zhou P. ICLR 2025; " + cite,
            "license": "MIT per README (MIOflow-derived code: Yale Non-Commercial)",
        },
    )
    adata.var_names = [str(c) for c in feats]
    return adata


@register("wot", "Waddington-OT test data: day 0 vs day 2, 20-D diffusion map, growth scores")
def wot(*, data_dir: DataDir = None) -> AnnData:
    """Waddington-OT test data: two days of a reprogramming time course with growth scores.

    Parameters
    ----------
    data_dir
        Data folder (default: see :func:`get_data_dir`).

    Returns
    -------
    AnnData
        9,679 cells x 20 diffusion components (``DC1``…``DC20``). Keys:

        - ``.X`` and ``obsm["X_diffmap"]``: the embedding, ``float32``;
        - ``obs["time"]``: day 0.0 (4,060 cells) or 2.0 (5,619);
        - ``obs["growth_score"]``: per-cell growth score (0.039–0.957);
        - ``obs["sample"]``: id prefix (``day-0-c1-2i``, ``day-2-c1-2i``, ``day-2-c2-2i``).

    Notes
    -----
    Source: GitHub ``broadinstitute/wot``, ``tests/data/{days,diffusion_map,
    growth_scores}.csv.gz`` at the initial commit 03920f1; licence BSD 3-Clause (© 2019
    Broad Institute). The repository does not describe these files; that they come from
    the study below is inferred from the repository and the cell ids.

    Citation: Schiebinger G, Shu J, Tabaka M, et al. Optimal-transport analysis of
    single-cell gene expression identifies developmental trajectories in reprogramming.
    *Cell* 176, 928–943 (2019). doi:10.1016/j.cell.2019.01.006.
    """
    folder = "wot_testdata_day0_day2"
    days = pd.read_csv(dataset_path(folder, "days.csv.gz", data_dir=data_dir), index_col=0)
    dm = pd.read_csv(dataset_path(folder, "diffusion_map.csv.gz", data_dir=data_dir), index_col=0)
    gs = pd.read_csv(dataset_path(folder, "growth_scores.csv.gz", data_dir=data_dir), index_col=0)
    if not (dm.index.equals(days.index) and dm.index.equals(gs.index)):
        days = days.reindex(dm.index)
        gs = gs.reindex(dm.index)
        if days.isna().any().any() or gs.isna().any().any():
            raise ChronotopeInputError("WOT test files do not hold the same cell ids.")
    ids = dm.index.astype(str)
    adata = _adata(
        dm.to_numpy(),
        days["day"].to_numpy(np.float64),
        obsm_key="X_diffmap",
        var_prefix="DC",
        obs={
            "growth_score": gs["growth_score"].to_numpy(np.float64),
            "sample": pd.Categorical(ids.str.rsplit("_", n=1).str[0]),
        },
        obs_names=list(ids),
        info={
            "name": "wot",
            "source": "broadinstitute/wot tests/data (initial commit 03920f1)",
            "citation": "Schiebinger G et al. Cell 176, 928-943 (2019). "
            "doi:10.1016/j.cell.2019.01.006",
            "license": "BSD-3-Clause (wot repository)",
        },
    )
    adata.var_names = [str(c) for c in dm.columns]
    return adata
