"""Loaders for the spatial transcriptomics datasets of the data folder."""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from chronotope._errors import ChronotopeInputError
from chronotope._validate import MissingFileError, check_counts
from chronotope.datasets._rdata import read_r
from chronotope.datasets._registry import dataset_path, register
from chronotope.io._visium import (
    _counts_to_csr,
    image_size,
    read_image,
    read_scalefactors,
    read_tissue_positions,
    spatial_uns,
)
from chronotope.io.readers import read_csv_counts

__all__ = [
    "breast_slice",
    "breast_slices",
    "dlpfc",
    "her2st",
    "mouse_brain_raw",
    "mouse_olfactory_bulb",
    "starmap",
]

logger = logging.getLogger("chronotope")

DataDir = str | os.PathLike[str] | None

DLPFC_LAYERS = ("L1", "L2", "L3", "L4", "L5", "L6", "WM")
_DLPFC_FOLDER = "dlpfc_151673_151674"
_DLPFC_ALL = ("151673", "151674", "151675", "151676")
_DLPFC_META_COLUMNS = (
    "sum_umi",
    "sum_gene",
    "cell_count",
    "discard",
    "subject",
    "position",
    "replicate",
)


def _info(name: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, **{k: v for k, v in kw.items() if v is not None}}


def _sparse_from_genes_by_obs(values: np.ndarray) -> sp.csr_matrix:
    """Genes x observations dense array -> observations x genes float32 CSR."""
    return _counts_to_csr(sp.csr_matrix(np.asarray(values).T))


@register("dlpfc", "Human DLPFC 10x Visium (Maynard 2021), slices 151673/151674, layer labels")
def dlpfc(sample: str = "151673", *, load_image: bool = True, data_dir: DataDir = None) -> AnnData:
    """Human dorsolateral prefrontal cortex, 10x Visium, one slice with manual layer labels.

    Donor Br8100; slices 151673 and 151674 are directly adjacent serial sections
    (``position`` 0 µm, replicates 1 and 2). Slices 151675/151676 of the same donor are
    kept aside for independent evaluation and are not in the data folder.

    Parameters
    ----------
    sample
        ``"151673"`` or ``"151674"``.
    load_image
        Put the low-resolution H&E image (600 x 600) in ``uns["spatial"]``.
    data_dir
        Data folder (default: see :func:`get_data_dir`).

    Returns
    -------
    AnnData
        3,639 (151673) or 3,673 (151674) in-tissue spots x 5,000 genes (the top-5000
        highly variable genes of that slice, Ensembl ids as ``var_names``; the gene sets
        differ between slices). Keys:

        - ``.X``: raw UMI counts, ``float32`` CSR;
        - ``obs["layer"]``: manual layer, categorical ``L1``…``L6``, ``WM``; NaN for the
          28/38 unlabelled spots (from ``barcode_level_layer_map.tsv``, matched by barcode);
        - ``obs["in_tissue"]`` (all 1), ``obs["array_row"]``, ``obs["array_col"]``;
        - ``obs`` spatialLIBD metadata: ``sum_umi``, ``sum_gene`` (over all genes),
          ``cell_count``, ``discard``, ``subject``, ``position``, ``replicate``;
        - ``obsm["spatial"]``: full-resolution pixel coordinates (x = column, y = row);
        - ``uns["spatial"][sample]``: ``images["lowres"]`` (``uint8`` RGB) and
          ``scalefactors`` (``tissue_lowres_scalef`` 0.045, ``spot_diameter_fullres``);
        - ``uns["chronotope_dataset"]``: provenance.

    Notes
    -----
    Source: counts from GitHub ``prabhakarlab/Banksy`` (``data/dlpfc<id>.rda``, commit
    2276ad3, MIT at that commit); positions, scale factors, image and layer map from
    ``LieberInstitute/HumanPilot`` (Artistic License 2.0); per-spot metadata from
    ``JinmiaoChenLab/SEDR_analyses`` (spatialLIBD, LIBD public data).

    Citation: Maynard KR, Collado-Torres L, Weber LM, et al. Transcriptome-scale spatial
    gene expression in the human dorsolateral prefrontal cortex. *Nature Neuroscience*
    24, 425–436 (2021). doi:10.1038/s41593-020-00787-0.
    """
    sample = str(sample)
    if sample not in _DLPFC_ALL:
        raise ChronotopeInputError(f"Unknown DLPFC sample {sample!r}; use '151673' or '151674'.")
    try:
        rda = dataset_path(_DLPFC_FOLDER, "banksy_counts", f"dlpfc{sample}.rda", data_dir=data_dir)
    except MissingFileError as err:
        if sample in ("151675", "151676"):
            raise MissingFileError(
                f"DLPFC slice {sample} is kept aside for independent evaluation and is not in "
                "the data folder; use '151673' or '151674'."
            ) from err
        raise
    tenx = dataset_path(_DLPFC_FOLDER, "humanpilot_10x", sample, data_dir=data_dir)
    layer_map = dataset_path(
        _DLPFC_FOLDER, "humanpilot_10x", "barcode_level_layer_map.tsv", data_dir=data_dir
    )
    meta_path = dataset_path(
        _DLPFC_FOLDER, "spatialLIBD_metadata", f"{sample}_metadata.tsv", data_dir=data_dir
    )
    positions = read_tissue_positions(tenx / "tissue_positions_list.txt")
    scalefactors = read_scalefactors(tenx / "scalefactors_json.json")

    obj = read_r(rda)[f"dlpfc{sample}"]
    expr = obj["expression"]  # xarray genes x spots
    genes = np.asarray(expr.coords["dim_0"].values).astype(object)
    barcodes = np.asarray(expr.coords["dim_1"].values).astype(object)
    x = _sparse_from_genes_by_obs(expr.values)
    check_counts(x, f"dlpfc{sample} counts")

    obs = pd.DataFrame(index=pd.Index(barcodes))
    missing = obs.index.difference(positions.index)
    if len(missing):
        raise ChronotopeInputError(f"{len(missing)} DLPFC barcodes lack a position.")
    pos = positions.loc[obs.index]
    lm = pd.read_csv(layer_map, sep="\t", header=None, names=["barcode", "sample", "layer"])
    lm = lm[lm["sample"].astype(str) == sample].set_index("barcode")["layer"]
    obs["layer"] = pd.Categorical(obs.index.map(lm.to_dict()), categories=list(DLPFC_LAYERS))
    obs["in_tissue"] = pos["in_tissue"].to_numpy()
    obs["array_row"] = pos["array_row"].to_numpy()
    obs["array_col"] = pos["array_col"].to_numpy()
    meta = pd.read_csv(meta_path, sep="\t", index_col=0)
    meta.index = meta.index.astype(str)
    if not obs.index.isin(meta.index).all():
        raise ChronotopeInputError(f"{meta_path.name} does not cover all barcodes of {rda.name}.")
    meta = meta.loc[obs.index]
    for c in _DLPFC_META_COLUMNS:
        if c in meta.columns:
            col = meta[c]
            obs[c] = pd.Categorical(col.astype(str)) if col.dtype == object else col.to_numpy()
    obs["discard"] = obs["discard"].astype(str).str.upper().eq("TRUE")

    adata = AnnData(X=x, obs=obs, var=pd.DataFrame({"gene_ids": genes}, index=pd.Index(genes)))
    adata.obsm["spatial"] = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(
        dtype=np.float64
    )
    images = {"lowres": read_image(tenx / "tissue_lowres_image.png")} if load_image else {}
    adata.uns["spatial"] = {sample: spatial_uns(images, scalefactors)}
    adata.uns["chronotope_dataset"] = _info(
        f"dlpfc_{sample}",
        sample=sample,
        source="prabhakarlab/Banksy (counts), LieberInstitute/HumanPilot (positions, image, "
        "layers), JinmiaoChenLab/SEDR_analyses (spatialLIBD metadata)",
        citation="Maynard KR et al. Nature Neuroscience 24, 425-436 (2021). "
        "doi:10.1038/s41593-020-00787-0",
        license="HumanPilot: Artistic-2.0; Banksy (at commit 2276ad3): MIT",
    )
    return adata


def _breast_one(k: int, data_dir: DataDir) -> AnnData:
    if k not in (1, 2, 3, 4):
        raise ChronotopeInputError(f"Breast slices are numbered 1 to 4, got {k!r}.")
    counts = dataset_path("paste_breast_slices", f"slice{k}.csv", data_dir=data_dir)
    coords = dataset_path("paste_breast_slices", f"slice{k}_coor.csv", data_dir=data_dir)
    adata = read_csv_counts(counts, coords, transpose=False)
    adata.obs["slice"] = pd.Categorical([str(k)] * adata.n_obs, categories=["1", "2", "3", "4"])
    adata.uns["chronotope_dataset"] = _info(
        f"breast_slice_{k}",
        source="raphael-group/paste sample_data (commit 5f0d58c)",
        citation="Ståhl PL et al. Science 353, 78-82 (2016). doi:10.1126/science.aaf2403; "
        "PASTE: Zeira R et al. Nature Methods 19, 567-575 (2022)",
        license="BSD-3-Clause (PASTE repository)",
    )
    return adata


_BREAST_DOC_TAIL = """
    Notes
    -----
    Four consecutive sections (layers 1–4) of one breast-cancer biopsy, original ST
    platform (100 µm spots, 200 µm pitch), no region labels. Spots per slice: 254, 251,
    264, 262; genes: 7,998, 7,713, 7,453, 7,571 (6,397 shared by all four).

    Source: GitHub ``raphael-group/paste``, ``sample_data/`` (commit 5f0d58c); licence
    BSD 3-Clause (© 2020 Princeton University), no separate data licence.

    Citation: Ståhl PL, Salmén F, Vickovic S, et al. Visualization and analysis of gene
    expression in tissue sections by spatial transcriptomics. *Science* 353, 78–82 (2016).
    doi:10.1126/science.aaf2403. PASTE: Zeira R, Land M, Strzalkowski A, Raphael BJ.
    *Nature Methods* 19, 567–575 (2022). doi:10.1038/s41592-022-01459-6.
"""


@register("breast_slice", "Breast cancer ST (Ståhl 2016), one of 4 serial sections (PASTE data)")
def breast_slice(slice: int = 1, *, data_dir: DataDir = None) -> AnnData:
    """One of the four serial breast-cancer ST sections of the PASTE sample data.

    Parameters
    ----------
    slice
        Section number, 1 to 4.
    data_dir
        Data folder (default: see :func:`get_data_dir`).

    Returns
    -------
    AnnData
        Spots x genes: ``.X`` raw UMI counts (``float32`` CSR), ``obs_names`` the spot ids
        ``"<x>x<y>"``, ``obsm["spatial"]`` ST array coordinates (x, y; 1 unit = 200 µm),
        ``obs["slice"]`` categorical ``"1"``…``"4"``, ``uns["chronotope_dataset"]``.
    """
    return _breast_one(int(slice), data_dir)


def breast_slices(*, data_dir: DataDir = None) -> list[AnnData]:
    """The four serial breast-cancer ST sections of the PASTE sample data, in order.

    Parameters
    ----------
    data_dir
        Data folder (default: see :func:`get_data_dir`).

    Returns
    -------
    list of AnnData
        ``[breast_slice(1), ..., breast_slice(4)]``; genes differ between slices.
    """
    return [_breast_one(k, data_dir) for k in (1, 2, 3, 4)]


breast_slice.__doc__ = (breast_slice.__doc__ or "") + _BREAST_DOC_TAIL
breast_slices.__doc__ = (breast_slices.__doc__ or "") + _BREAST_DOC_TAIL

_HER2_SECTIONS = ("C1", "C2", "C3", "C4", "C5", "B4")
_HER2_IMAGES = {
    "C2": "C2_5714_HE_BT_C2.jpg",
    "C3": "C3_5714_HE_BT_D1.jpg",
    "C4": "C4_5714_HE_BT_D2.jpg",
    "C5": "C5_5714_HE_BT_E1.jpg",
    "B4": "B4_BT10737_D2_HE.jpg",
}


@register("her2st", "HER2+ breast tumour ST (Andersson 2021), 6 sections, H&E, C1 labels")
def her2st(
    section: str = "C1",
    *,
    load_image: bool = True,
    image_max_size: int = 2000,
    data_dir: DataDir = None,
) -> AnnData:
    """HER2-positive breast tumour, Spatial Transcriptomics, one section with its H&E image.

    Parameters
    ----------
    section
        ``"C1"``…``"C5"`` (patient C) or ``"B4"`` (patient B). C1 is the only section
        with pathologist labels and has **no** image; C6 is kept aside for independent
        evaluation and is not in the data folder.
    load_image
        Load the H&E image (all sections but C1).
    image_max_size
        Longest side, in pixels, of the stored ``"hires"`` image (the original JPEGs are
        about 9,300 x 9,900 px); a ``"lowres"`` copy of at most 600 px is stored too.
    data_dir
        Data folder (default: see :func:`get_data_dir`).

    Returns
    -------
    AnnData
        Spots x genes (C1 176 x 15,557, C2 187, C3 180, C4 184, C5 181, B4 283 spots;
        gene sets differ, 13,767 shared). Keys:

        - ``.X``: raw UMI counts, ``float32`` CSR; ``obs_names`` the spot ids ``"<x>x<y>"``;
        - ``obsm["spatial"]``: spot centres in full-size H&E pixels (``pixel_x`` = column,
          ``pixel_y`` = row);
        - ``obs["array_x"]``, ``obs["array_y"]`` (integer ST array coordinates) and
          ``obs["array_x_refined"]``, ``obs["array_y_refined"]`` (fiducial-aligned);
        - ``obs["patient"]``, ``obs["section"]``;
        - ``obs["cluster"]``: expression-based cluster of the study (categorical, NaN
          where not annotated; not ground truth);
        - ``obs["label"]`` (C1 only): pathologist region, categorical ``invasive cancer``,
          ``connective tissue``, ``undetermined``, ``adipose tissue`` (NaN for the spot
          without label);
        - ``uns["spatial"][section]`` (not C1): ``images["hires"]``, ``images["lowres"]``
          (``uint8`` RGB) and ``scalefactors`` (``tissue_hires_scalef``,
          ``tissue_lowres_scalef`` = image px / full-size px; ``spot_diameter_fullres``
          = half the median nearest-spot distance, i.e. the 100 µm spot in full-size
          pixels, estimated from the coordinates).

    Notes
    -----
    Source: GitHub ``almaan/her2st`` (commit 85df741), files copied byte-for-byte. The
    repository has **no licence file** and states no data licence; treat as public
    research data with citation required, check the terms before commercial use.

    Citation: Andersson A, Larsson L, Stenbeck L, et al. Spatial deconvolution of
    HER2-positive breast cancer delineates tumor-associated cell type interactions.
    *Nature Communications* 12, 6012 (2021). doi:10.1038/s41467-021-26271-2.
    """
    section = str(section).upper()
    if section not in _HER2_SECTIONS:
        extra = " C6 is kept aside for independent evaluation." if section == "C6" else ""
        raise ChronotopeInputError(
            f"Unknown her2st section {section!r}; use one of {list(_HER2_SECTIONS)}.{extra}"
        )
    folder = "her2st_subset"
    cnt_path = dataset_path(folder, "ST-cnts", f"{section}.tsv.gz", data_dir=data_dir)
    spot_path = dataset_path(folder, "ST-spotfiles", f"{section}_selection.tsv", data_dir=data_dir)
    clu_path = dataset_path(
        folder, "ST-cluster-lbl", f"{section}-cluster-annotation.tsv.gz", data_dir=data_dir
    )
    img_path = None
    if load_image and section in _HER2_IMAGES:
        img_path = dataset_path(folder, "ST-imgs", _HER2_IMAGES[section], data_dir=data_dir)

    pos = pd.read_csv(spot_path, sep="\t")
    pos.index = pos["x"].astype(str) + "x" + pos["y"].astype(str)
    df = pd.read_csv(cnt_path, sep="\t", index_col=0)
    df.index = df.index.astype(str)
    keep = df.index.isin(pos.index)
    if not keep.all():
        warnings.warn(
            f"her2st {section}: {int((~keep).sum())} spot(s) without a position were dropped.",
            stacklevel=2,
        )
        df = df.loc[keep]
    x = _counts_to_csr(sp.csr_matrix(df.to_numpy(dtype=np.float32)))
    check_counts(x, f"her2st {section} counts")
    pos = pos.loc[df.index]
    obs = pd.DataFrame(index=pd.Index(df.index.to_numpy(dtype=object)))
    obs["array_x"] = pos["x"].to_numpy(np.int64)
    obs["array_y"] = pos["y"].to_numpy(np.int64)
    obs["array_x_refined"] = pos["new_x"].to_numpy(np.float64)
    obs["array_y_refined"] = pos["new_y"].to_numpy(np.float64)
    obs["patient"] = pd.Categorical([section[0]] * len(obs))
    obs["section"] = pd.Categorical([section] * len(obs))
    clu = pd.read_csv(clu_path, sep="\t", index_col=0)
    clu.index = clu["x"].astype(int).astype(str) + "x" + clu["y"].astype(int).astype(str)
    clu = clu[~clu.index.duplicated()]
    cl = obs.index.map(clu["label"].astype(str).to_dict())
    cats = sorted(clu["label"].astype(int).unique())
    obs["cluster"] = pd.Categorical(cl, categories=[str(c) for c in cats])
    if section == "C1":
        lab_path = dataset_path(
            folder, "ST-pat-lbl", "C1_labeled_coordinates.tsv", data_dir=data_dir
        )
        lab = pd.read_csv(lab_path, sep="\t")
        key = (
            lab["x"].round().astype(int).astype(str)
            + "x"
            + lab["y"].round().astype(int).astype(str)
        )
        lab = pd.Series(lab["label"].to_numpy(), index=key)
        lab = lab[~lab.index.duplicated()]
        obs["label"] = pd.Categorical(
            obs.index.map(lab.to_dict()),
            categories=["invasive cancer", "connective tissue", "undetermined", "adipose tissue"],
        )
    adata = AnnData(X=x, obs=obs, var=pd.DataFrame(index=pd.Index(df.columns.astype(str))))
    xy = pos[["pixel_x", "pixel_y"]].to_numpy(np.float64)
    adata.obsm["spatial"] = xy
    if img_path is not None:
        from PIL import Image

        full_w, _ = image_size(img_path)
        hires = read_image(img_path, max_size=image_max_size)
        h_scale = hires.shape[1] / full_w
        lo_size = min(600, image_max_size)
        lo_w = max(1, round(hires.shape[1] * lo_size / max(hires.shape[:2])))
        lo_h = max(1, round(hires.shape[0] * lo_size / max(hires.shape[:2])))
        lowres = np.asarray(
            Image.fromarray(hires).resize((lo_w, lo_h), Image.Resampling.LANCZOS), dtype=np.uint8
        )
        # Spot pitch (200 µm) in pixels: median distance to the nearest other spot.
        from scipy.spatial import cKDTree

        dist, _ = cKDTree(xy).query(xy, k=2)
        pitch = float(np.median(dist[:, 1]))
        scalefactors = {
            "tissue_hires_scalef": h_scale,
            "tissue_lowres_scalef": lo_w / full_w,
            "spot_diameter_fullres": abs(pitch) / 2,
        }
        adata.uns["spatial"] = {
            section: spatial_uns({"hires": hires, "lowres": lowres}, scalefactors)
        }
    elif load_image and section == "C1":
        logger.info("her2st C1 has no H&E image in the data folder; uns['spatial'] not set.")
    adata.uns["chronotope_dataset"] = _info(
        f"her2st_{section}",
        section=section,
        source="almaan/her2st (commit 85df741)",
        citation="Andersson A et al. Nature Communications 12, 6012 (2021). "
        "doi:10.1038/s41467-021-26271-2",
        license="no licence stated in the repository (public research data, cite)",
    )
    return adata


@register("mouse_olfactory_bulb", "Mouse olfactory bulb ST (Ståhl 2016), 262 spots, 5 layers")
def mouse_olfactory_bulb(*, data_dir: DataDir = None) -> AnnData:
    """Mouse olfactory bulb, Spatial Transcriptomics, one section with 5 layer labels.

    Parameters
    ----------
    data_dir
        Data folder (default: see :func:`get_data_dir`).

    Returns
    -------
    AnnData
        262 spots x 15,928 genes (full transcriptome). Keys:

        - ``.X``: raw counts, ``float32`` CSR; ``obs_names`` 18-mer spot barcodes;
        - ``obs["layer"]``: categorical with the levels exactly as stored
          (``1: Granular Cell Layer`` 66, ``2: Mitral Cell Layer`` 38,
          ``3: Outer Plexiform Layer`` 59, ``4: Glomerular Layer`` 50,
          ``5: Olfactory Nerve Layer`` 47); NaN for the 2 unlabelled spots;
        - ``obsm["spatial"]``: ST array coordinates (x, y; 1 unit = 200 µm), matched by
          barcode (the stored position table is in a different order).

    Notes
    -----
    Source: GitHub ``JEFworks-Lab/STdeconvolve``, ``data/mOB.rda`` (commit c79bdaa);
    licence GPL-3 (package ``DESCRIPTION``), no separate data licence.

    Citation: Ståhl PL, Salmén F, Vickovic S, et al. *Science* 353, 78–82 (2016).
    doi:10.1126/science.aaf2403. Packaged with labels by Miller BF, et al. *Nature
    Communications* 13, 2339 (2022). doi:10.1038/s41467-022-30033-z.
    """
    path = dataset_path("mob_st_stdeconvolve", "mOB.rda", data_dir=data_dir)
    mob = read_r(path)["mOB"]
    counts = mob["counts"]
    genes = np.asarray(counts.coords["dim_0"].values).astype(object)
    barcodes = np.asarray(counts.coords["dim_1"].values).astype(object)
    x = _sparse_from_genes_by_obs(counts.values)
    check_counts(x, "mOB counts")
    pos = mob["pos"]
    pos.index = pos.index.astype(str)
    obs = pd.DataFrame(index=pd.Index(barcodes))
    if not obs.index.isin(pos.index).all():
        raise ChronotopeInputError("mOB: some spots have no position.")
    annot = mob["annot"]
    if not isinstance(annot, pd.Series):  # pragma: no cover - rdata without names
        raise ChronotopeInputError("mOB: the layer annotation has no spot names.")
    levels = list(annot.cat.categories)
    obs["layer"] = pd.Categorical(obs.index.map(annot.astype(str).to_dict()), categories=levels)
    adata = AnnData(X=x, obs=obs, var=pd.DataFrame(index=pd.Index(genes)))
    adata.obsm["spatial"] = pos.loc[obs.index, ["x", "y"]].to_numpy(np.float64)
    adata.uns["chronotope_dataset"] = _info(
        "mouse_olfactory_bulb",
        source="JEFworks-Lab/STdeconvolve data/mOB.rda (commit c79bdaa)",
        citation="Ståhl PL et al. Science 353, 78-82 (2016). doi:10.1126/science.aaf2403; "
        "Miller BF et al. Nature Communications 13, 2339 (2022)",
        license="GPL-3 (STdeconvolve package)",
    )
    return adata


_STARMAP_SECTIONS = {
    "BZ5": "20180417_BZ5_control",
    "BZ9": "20180419_BZ9_control",
    "BZ14": "20180424_BZ14_control",
}
STARMAP_LAYERS = {"1": "L1", "2": "L2/3", "3": "L5", "4": "L6"}


@register("starmap", "STARmap mouse mPFC (Wang 2018), 3 sections, 166 genes, layer labels")
def starmap(section: str = "BZ5", *, data_dir: DataDir = None) -> AnnData:
    """STARmap mouse medial prefrontal cortex, one section with layer and cell-type labels.

    Parameters
    ----------
    section
        ``"BZ5"`` (1,049 cells), ``"BZ9"`` (1,053) or ``"BZ14"`` (1,088): three sections
        from different mice. The full names (``"20180417_BZ5_control"``, ...) work too.
    data_dir
        Data folder (default: see :func:`get_data_dir`).

    Returns
    -------
    AnnData
        Cells x 166 genes. Keys:

        - ``.X``: raw counts, ``float32`` CSR; ``obs_names`` cell ids such as ``69x4486``;
        - ``obsm["spatial"]``: cell centroids (x, y) in pixels of the original images;
        - ``obs["domain"]``: the manual spatial-domain label as stored, ``"1"``…``"4"``;
        - ``obs["layer"]``: the same mapped to ``L1``, ``L2/3``, ``L5``, ``L6`` (mapping
          inferred from cell types, not stated in the source);
        - ``obs["cell_type"]``: 15 cell types of the original study (``eL2/3``, ``Astro``,
          ...).

    Notes
    -----
    Source: GitHub ``zhengli09/BASS-Analysis``, ``data/starmap_mpfc.RData`` (commit
    81dfe73); licence GPL-3, no separate data licence.

    Citation: Wang X, Allen WE, Wright MA, et al. Three-dimensional intact-tissue
    sequencing of single-cell transcriptional states. *Science* 361, eaat5691 (2018).
    doi:10.1126/science.aat5691. Domain labels: Li Z, Zhou X. BASS. *Genome Biology* 23,
    168 (2022). doi:10.1186/s13059-022-02734-7.
    """
    short = {v: k for k, v in _STARMAP_SECTIONS.items()}
    key = _STARMAP_SECTIONS.get(str(section).upper(), None)
    if key is None and section in short:
        key = str(section)
    if key is None:
        raise ChronotopeInputError(
            f"Unknown STARmap section {section!r}; use one of {list(_STARMAP_SECTIONS)}."
        )
    path = dataset_path("starmap_mpfc_bass", "starmap_mpfc.RData", data_dir=data_dir)
    o = read_r(path)
    cnt = o["starmap_cnts"][key]
    info = o["starmap_info"][key]
    genes = np.asarray(cnt.coords["dim_0"].values).astype(object)
    cells = np.asarray(cnt.coords["dim_1"].values).astype(object)
    x = _sparse_from_genes_by_obs(cnt.values)
    check_counts(x, f"STARmap {key} counts")
    info.index = info.index.astype(str)
    info = info.loc[cells]
    obs = pd.DataFrame(index=pd.Index(cells))
    z = info["z"].astype(str).to_numpy()
    obs["domain"] = pd.Categorical(z, categories=list(STARMAP_LAYERS))
    obs["layer"] = pd.Categorical(
        [STARMAP_LAYERS.get(v) for v in z], categories=list(STARMAP_LAYERS.values())
    )
    obs["cell_type"] = pd.Categorical(info["c"].astype(str).to_numpy())
    adata = AnnData(X=x, obs=obs, var=pd.DataFrame(index=pd.Index(genes)))
    adata.obsm["spatial"] = info[["x", "y"]].to_numpy(np.float64)
    adata.uns["chronotope_dataset"] = _info(
        f"starmap_{short[key]}",
        section=short[key],
        source="zhengli09/BASS-Analysis data/starmap_mpfc.RData (commit 81dfe73)",
        citation="Wang X et al. Science 361, eaat5691 (2018). doi:10.1126/science.aat5691; "
        "Li Z, Zhou X. Genome Biology 23, 168 (2022)",
        license="GPL-3 (BASS-Analysis repository)",
    )
    return adata


@register(
    "mouse_brain_raw", "Visium mouse brain, all 4,992 barcodes incl. out-of-tissue, 100 genes"
)
def mouse_brain_raw(*, load_image: bool = True, data_dir: DataDir = None) -> AnnData:
    """10x Visium adult mouse brain: raw counts of every barcode, in and out of tissue.

    The SpotClean example data, for background / spot-swapping correction.

    Parameters
    ----------
    load_image
        Put the low-resolution H&E image (576 x 600 px) in ``uns["spatial"]``.
    data_dir
        Data folder (default: see :func:`get_data_dir`).

    Returns
    -------
    AnnData
        4,992 barcodes x 100 genes (the top-100 expressed genes). Keys:

        - ``.X``: raw UMI counts, ``float32`` CSR;
        - ``obs["in_tissue"]``: 0/1 int (2,702 in tissue, 2,290 outside);
        - ``obs["array_row"]``, ``obs["array_col"]``;
        - ``obsm["spatial"]``: full-resolution pixel coordinates (x = column, y = row);
        - ``uns["spatial"]["V1_Adult_Mouse_Brain"]``: ``images["lowres"]`` and
          ``scalefactors`` (``tissue_lowres_scalef`` 0.0510).

    Notes
    -----
    Source: GitHub ``zijianni/SpotClean`` (commit 27c955a), ``data/mbrain_raw.rda`` and
    ``inst/extdata/V1_Adult_Mouse_Brain_spatial/``; SpotClean licence GPL-3. Underlying
    data: 10x Genomics demonstration dataset ``V1_Adult_Mouse_Brain`` (Space Ranger
    1.0.0), distributed by 10x under Creative Commons Attribution.

    Citation: Ni Z, Prasad A, Chen S, et al. SpotClean adjusts for spot swapping in
    spatial transcriptomics data. *Nature Communications* 13, 2971 (2022).
    doi:10.1038/s41467-022-30587-y.
    """
    folder = "spotclean_mbrain_raw"
    path = dataset_path(folder, "mbrain_raw.rda", data_dir=data_dir)
    sdir = dataset_path(folder, "V1_Adult_Mouse_Brain_spatial", data_dir=data_dir)
    positions = read_tissue_positions(sdir / "tissue_positions_list.csv")
    scalefactors = read_scalefactors(sdir / "scalefactors_json.json")
    m = read_r(path)["mbrain_raw"]
    shape = tuple(int(v) for v in m.Dim)
    csc = sp.csc_matrix((np.asarray(m.x), np.asarray(m.i), np.asarray(m.p)), shape=shape)
    x = _counts_to_csr(csc.T)
    check_counts(x, "mbrain_raw counts")
    genes = np.asarray(m.Dimnames[0]).astype(object)
    barcodes = np.asarray(m.Dimnames[1]).astype(object)
    obs = pd.DataFrame(index=pd.Index(barcodes))
    if not obs.index.isin(positions.index).all():
        raise ChronotopeInputError("mbrain_raw: some barcodes have no position.")
    pos = positions.loc[obs.index]
    obs["in_tissue"] = pos["in_tissue"].to_numpy(np.int64)
    obs["array_row"] = pos["array_row"].to_numpy()
    obs["array_col"] = pos["array_col"].to_numpy()
    adata = AnnData(X=x, obs=obs, var=pd.DataFrame(index=pd.Index(genes)))
    adata.obsm["spatial"] = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(
        dtype=np.float64
    )
    images = {"lowres": read_image(sdir / "tissue_lowres_image.png")} if load_image else {}
    adata.uns["spatial"] = {"V1_Adult_Mouse_Brain": spatial_uns(images, scalefactors)}
    adata.uns["chronotope_dataset"] = _info(
        "mouse_brain_raw",
        source="zijianni/SpotClean (commit 27c955a); 10x Genomics V1_Adult_Mouse_Brain",
        citation="Ni Z et al. Nature Communications 13, 2971 (2022). "
        "doi:10.1038/s41467-022-30587-y; 10x Genomics V1_Adult_Mouse_Brain",
        license="SpotClean: GPL-3; 10x Genomics data: CC BY",
    )
    return adata
