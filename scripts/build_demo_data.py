"""Build the embedded demo datasets of ``chronotope.datasets.demo`` from the data folder.

Usage::

    python scripts/build_demo_data.py [--data-dir ../shared/data] [--out DIR] [--only NAME ...]

Writes one gzip-compressed ``<name>.h5ad`` per demo set and ``DATA_LICENSES.md`` into
``src/chronotope/datasets/_demo/`` (the package folder, so the files ship in the wheel).
The build is deterministic: no sampling, fixed gene order, fixed concatenation order.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from chronotope.datasets import (
    DEMO_DESCRIPTIONS,
    breast_slices,
    dlpfc,
    emt,
    get_data_dir,
    mouse_brain_raw,
    mouse_olfactory_bulb,
    starmap,
    wot,
)

OUT_DEFAULT = Path(__file__).resolve().parents[1] / "src" / "chronotope" / "datasets" / "_demo"
SIZE_BUDGET_MB = 25.0


def _concat(parts: list[AnnData], keys: list[str], name: str, info: dict[str, str]) -> AnnData:
    """Concatenate sections on their shared genes with ``obs["slice"]`` categorical."""
    for a, k in zip(parts, keys, strict=True):
        a.obs["slice"] = pd.Categorical([k] * a.n_obs, categories=keys)
        a.uns = {}
    out = anndata.concat(parts, join="inner", keys=keys, index_unique="-", merge="same")
    out.obs["slice"] = pd.Categorical(out.obs["slice"].astype(str), categories=keys)
    out.X = sp.csr_matrix(out.X, dtype=np.float32)
    out.uns["chronotope_dataset"] = {"name": name, **info}
    return out


def build_dlpfc(data_dir: Path) -> AnnData:
    return dlpfc("151673", data_dir=data_dir)


def build_breast(data_dir: Path) -> AnnData:
    parts = breast_slices(data_dir=data_dir)
    info = dict(parts[0].uns["chronotope_dataset"])
    info.pop("name", None)
    return _concat(parts, ["1", "2", "3", "4"], "breast", info)


def build_starmap(data_dir: Path) -> AnnData:
    keys = ["BZ5", "BZ9", "BZ14"]
    parts = [starmap(k, data_dir=data_dir) for k in keys]
    info = dict(parts[0].uns["chronotope_dataset"])
    info.pop("name", None)
    info.pop("section", None)
    return _concat(parts, keys, "starmap", info)


BUILDERS: dict[str, Callable[[Path], AnnData]] = {
    "dlpfc_151673": build_dlpfc,
    "breast": build_breast,
    "emt": lambda d: emt(data_dir=d),
    "mouse_brain_raw": lambda d: mouse_brain_raw(data_dir=d),
    "mouse_olfactory_bulb": lambda d: mouse_olfactory_bulb(data_dir=d),
    "starmap": build_starmap,
    "wot": lambda d: wot(data_dir=d),
}

LICENSES: dict[str, str] = {
    "dlpfc_151673": """\
### `dlpfc_151673.h5ad`: human DLPFC 10x Visium, slice 151673

- **Sources**: raw counts: GitHub `prabhakarlab/Banksy`, `data/dlpfc151673.rda` (commit
  `2276ad3`, licence at that commit: MIT); spot positions, scale factors, low-res H&E
  image and manual layer map: `LieberInstitute/HumanPilot` `10X/151673/` and
  `10X/barcode_level_layer_map.tsv` (Artistic License 2.0); per-spot metadata:
  spatialLIBD, as redistributed by `JinmiaoChenLab/SEDR_analyses` (LIBD public data, no
  licence file).
- **Citation**: Maynard KR, Collado-Torres L, Weber LM, et al. Transcriptome-scale spatial
  gene expression in the human dorsolateral prefrontal cortex. *Nature Neuroscience* 24,
  425–436 (2021). doi:10.1038/s41593-020-00787-0.
- **Subset / transform**: 3,639 in-tissue spots x the 5,000 genes stored in the Banksy
  file (that slice's top-5000 highly variable genes; all of them kept); counts stored as
  float32 CSR; layer labels matched by barcode; 600 x 600 low-res image as uint8.
""",
    "breast": """\
### `breast.h5ad`: breast cancer Spatial Transcriptomics, 4 serial sections

- **Source**: GitHub `raphael-group/paste`, `sample_data/slice{1..4}.csv`,
  `slice{1..4}_coor.csv` (commit `5f0d58c`). Licence: BSD 3-Clause (© 2020 Princeton
  University); no separate data licence.
- **Citation**: Ståhl PL, Salmén F, Vickovic S, et al. Visualization and analysis of gene
  expression in tissue sections by spatial transcriptomics. *Science* 353, 78–82 (2016).
  doi:10.1126/science.aaf2403. PASTE: Zeira R, Land M, Strzalkowski A, Raphael BJ.
  *Nature Methods* 19, 567–575 (2022). doi:10.1038/s41592-022-01459-6.
- **Subset / transform**: the four sections concatenated in order (1,031 spots), restricted
  to the 6,397 genes shared by all four; `obs["slice"]` = "1".."4"; spot ids suffixed with
  `-<slice>`; coordinates in ST array units; counts as float32 CSR.
""",
    "emt": """\
### `emt.h5ad`: lung-cancer EMT time course (mass cytometry), DiffusionOT input

- **Source**: GitHub `liujuntan/DiffusionOT`, `Input/EMT.npz` and
  `Rawdata/gene_name_EMT.csv` (commit `bb3c5bd`). Licence: MIT (© 2025 Juntan Liu).
- **Citation**: Karacosta LG, et al. Mapping lung cancer epithelial-mesenchymal transition
  states and trajectories with single-cell resolution. *Nature Communications* 10, 5587
  (2019). DiffusionOT: Liu J, Li C, Zhou P, Nie Q (GitHub liujuntan/DiffusionOT, 2025).
- **Subset / transform**: all 87,354 cells; the stored scaled 2-D PCA as `.X` and
  `obsm["X_pca"]` (float32); time labels 1–7 as `obs["time"]`; EMT states as
  `obs["cell_type"]`; the 38 marker names in `uns["markers"]`.
""",
    "mouse_brain_raw": """\
### `mouse_brain_raw.h5ad`: 10x Visium adult mouse brain, all 4,992 barcodes

- **Source**: GitHub `zijianni/SpotClean` (commit `27c955a`), `data/mbrain_raw.rda` and
  `inst/extdata/V1_Adult_Mouse_Brain_spatial/`. Licence: GPL-3 (SpotClean package).
  Underlying data: 10x Genomics demonstration dataset `V1_Adult_Mouse_Brain` (Space Ranger
  1.0.0), distributed by 10x Genomics under the Creative Commons Attribution licence.
- **Citation**: Ni Z, Prasad A, Chen S, et al. SpotClean adjusts for spot swapping in
  spatial transcriptomics data. *Nature Communications* 13, 2971 (2022).
  doi:10.1038/s41467-022-30587-y. Data: 10x Genomics.
- **Subset / transform**: as shipped by SpotClean (top-100 expressed genes, all barcodes in
  and out of tissue); counts as float32 CSR; `obs["in_tissue"]`; 576 x 600 low-res H&E as
  uint8.
""",
    "mouse_olfactory_bulb": """\
### `mouse_olfactory_bulb.h5ad`: mouse olfactory bulb Spatial Transcriptomics

- **Source**: GitHub `JEFworks-Lab/STdeconvolve`, `data/mOB.rda` (commit `c79bdaa`).
  Licence: GPL-3 (STdeconvolve package); no separate data licence.
- **Citation**: Ståhl PL, et al. *Science* 353, 78–82 (2016). doi:10.1126/science.aaf2403.
  Labels packaged by Miller BF, et al. *Nature Communications* 13, 2339 (2022).
  doi:10.1038/s41467-022-30033-z.
- **Subset / transform**: all 262 spots x 15,928 genes; counts as float32 CSR; layer labels
  (matched by barcode) in `obs["layer"]`; ST array coordinates.
""",
    "starmap": """\
### `starmap.h5ad`: STARmap mouse medial prefrontal cortex, 3 sections

- **Source**: GitHub `zhengli09/BASS-Analysis`, `data/starmap_mpfc.RData` (commit
  `81dfe73`). Licence: GPL-3; no separate data licence.
- **Citation**: Wang X, Allen WE, Wright MA, et al. Three-dimensional intact-tissue
  sequencing of single-cell transcriptional states. *Science* 361, eaat5691 (2018).
  doi:10.1126/science.aat5691. Domain labels: Li Z, Zhou X. BASS. *Genome Biology* 23, 168
  (2022). doi:10.1186/s13059-022-02734-7.
- **Subset / transform**: the three sections (BZ5, BZ9, BZ14; 3,190 cells) concatenated,
  166 genes; `obs["slice"]`; `obs["domain"]` as stored ("1".."4") and `obs["layer"]`
  mapped to L1, L2/3, L5, L6 (an inferred mapping); counts as float32 CSR.
""",
    "wot": """\
### `wot.h5ad`: Waddington-OT test data (day 0, day 2)

- **Source**: GitHub `broadinstitute/wot`, `tests/data/{days,diffusion_map,growth_scores}.csv.gz`
  at the initial commit `03920f1`. Licence: BSD 3-Clause (© 2019 Broad Institute).
- **Citation**: Schiebinger G, Shu J, Tabaka M, et al. Optimal-transport analysis of
  single-cell gene expression identifies developmental trajectories in reprogramming.
  *Cell* 176, 928–943 (2019). doi:10.1016/j.cell.2019.01.006 (origin inferred from the
  repository and the cell ids; the files are not described there).
- **Subset / transform**: all 9,679 cells; 20-D diffusion map as `.X` and
  `obsm["X_diffmap"]` (float32); day as `obs["time"]`; `obs["growth_score"]`.
""",
}

HEADER = """\
# Licences of the embedded demo data

The files in this folder are small derived copies of public datasets, built by
`scripts/build_demo_data.py` from the data folder with the loaders of
`chronotope.datasets` (no sampling; the build is deterministic). They are distributed
under the licences of their sources, listed below; chronotope's own BSD-3-Clause licence
does not apply to them. Please cite the original studies when you use them.

Storage: plain h5ad files (read with `anndata.read_h5ad`), counts as float32 CSR, numeric
arrays gzip-9 + shuffle compressed, strings as fixed-length UTF-8, and `obsm` embeddings
identical to `.X` (time series) stored as HDF5 hard links to `X`.

| file | size | licence of the source |
| --- | --- | --- |
"""

SHORT_LICENSE = {
    "dlpfc_151673": "Artistic-2.0 (HumanPilot) / MIT (Banksy) / LIBD public data",
    "breast": "BSD-3-Clause (PASTE)",
    "emt": "MIT (DiffusionOT)",
    "mouse_brain_raw": "GPL-3 (SpotClean) / CC BY (10x Genomics)",
    "mouse_olfactory_bulb": "GPL-3 (STdeconvolve)",
    "starmap": "GPL-3 (BASS-Analysis)",
    "wot": "BSD-3-Clause (wot)",
}


def _repack(src: Path, dst: Path, links: dict[str, str]) -> None:
    """Copy an h5ad file, making it smaller but still a plain h5ad that anndata reads.

    - numeric arrays: gzip level 9 with the byte-shuffle filter (counts compress ~2x better);
    - variable-length strings (obs/var names, categories): fixed-length UTF-8, which avoids
      HDF5's per-string heap overhead (about 20 bytes per name);
    - ``links``: ``{path: target}`` datasets stored as HDF5 hard links to an identical
      dataset (e.g. ``obsm/X_pca`` -> ``X``), read back as independent arrays.
    """
    with h5py.File(src, "r") as fi, h5py.File(dst, "w") as fo:
        for k, v in fi.attrs.items():
            fo.attrs[k] = v

        def copy(gi: h5py.Group, go: h5py.Group) -> None:
            for key, obj in gi.items():
                if isinstance(obj, h5py.Group):
                    g = go.create_group(key)
                    for a, b in obj.attrs.items():
                        g.attrs[a] = b
                    copy(obj, g)
                    continue
                if obj.name.lstrip("/") in links:
                    continue
                kw: dict[str, object] = {}
                if obj.shape != () and obj.size > 0:
                    kw = {"compression": "gzip", "compression_opts": 9}
                    kw["shuffle"] = obj.dtype.kind in "fiub"
                sdt = h5py.check_string_dtype(obj.dtype)
                if sdt is not None and sdt.length is None and obj.shape != () and obj.size > 0:
                    vals = obj.asstr()[()]
                    enc = [x.encode("utf-8") for x in np.asarray(vals).ravel()]
                    dt = h5py.string_dtype("utf-8", max(1, max(len(b) for b in enc)))
                    data = np.array(enc, dtype=dt).reshape(np.shape(vals))
                    d = go.create_dataset(key, data=data, **kw)
                else:
                    d = go.create_dataset(key, data=obj[()], dtype=obj.dtype, **kw)
                for a, b in obj.attrs.items():
                    d.attrs[a] = b

        copy(fi, fo)
        for path, target in links.items():
            fo[path] = fo[target]


def write(adata: AnnData, path: Path) -> None:
    """Write a compact h5ad: sparse float32 counts, gzip + shuffle, obsm copies of X linked."""
    if sp.issparse(adata.X):
        adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    links = {
        f"obsm/{k}": "X"
        for k, v in adata.obsm.items()
        if isinstance(adata.X, np.ndarray)
        and isinstance(v, np.ndarray)
        and v.dtype == adata.X.dtype
        and np.array_equal(v, adata.X)
    }
    tmp = path.with_suffix(".tmp.h5ad")
    try:
        adata.write_h5ad(tmp)
        _repack(tmp, path, links)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=OUT_DEFAULT)
    parser.add_argument("--only", nargs="*", choices=list(BUILDERS), default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    data_dir = get_data_dir(args.data_dir)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    names = args.only or list(BUILDERS)
    assert set(BUILDERS) == set(DEMO_DESCRIPTIONS), "keep BUILDERS and DEMO_DESCRIPTIONS in sync"
    for name in names:
        adata = BUILDERS[name](data_dir)
        path = out / f"{name}.h5ad"
        write(adata, path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        print(
            f"{name}: {adata.n_obs} x {adata.n_vars} -> {path.stat().st_size / 1e6:.2f} MB {digest}"
        )

    rows, total = [], 0
    for name in BUILDERS:
        path = out / f"{name}.h5ad"
        if path.is_file():
            size = path.stat().st_size
            total += size
            rows.append(f"| `{name}.h5ad` | {size / 1e6:.2f} MB | {SHORT_LICENSE[name]} |")
    body = "\n".join(rows) + f"\n\nTotal: {total / 1e6:.2f} MB.\n\n## Datasets\n\n"
    body += "\n".join(LICENSES[n] for n in BUILDERS if (out / f"{n}.h5ad").is_file())
    (out / "DATA_LICENSES.md").write_text(HEADER + body)
    print(f"total {total / 1e6:.2f} MB (budget {SIZE_BUDGET_MB} MB)")
    if total / 1e6 > SIZE_BUDGET_MB:
        raise SystemExit(f"Demo data exceed the {SIZE_BUDGET_MB} MB budget.")


if __name__ == "__main__":
    main()
