"""The small demo datasets embedded in the package (compressed h5ad files in ``_demo/``)."""

from __future__ import annotations

from importlib import resources

import anndata
import numpy as np
import scipy.sparse as sp
from anndata import AnnData

from chronotope._errors import ChronotopeInputError
from chronotope._validate import MissingFileError

__all__ = ["DEMO_DESCRIPTIONS", "demo", "demo_names"]

#: Demo name -> one-line description (also the file stem in ``_demo/``).
DEMO_DESCRIPTIONS: dict[str, str] = {
    "dlpfc_151673": "Human DLPFC Visium slice 151673: 3,639 spots x 5,000 genes, layer labels, "
    "low-res H&E",
    "breast": "Breast cancer ST, 4 serial sections (PASTE data) in one AnnData, obs['slice'] "
    "'1'..'4', 6,397 shared genes",
    "emt": "EMT mass-cytometry time course (DiffusionOT input), 87,354 cells, 2-D PCA, 7 "
    "time points",
    "mouse_brain_raw": "Visium mouse brain, all 4,992 barcodes (obs['in_tissue']), 100 genes, "
    "low-res H&E",
    "mouse_olfactory_bulb": "Mouse olfactory bulb ST, 262 spots x 15,928 genes, 5 layer labels",
    "starmap": "STARmap mouse mPFC, 3 sections in one AnnData (obs['slice']), 166 genes, "
    "layer and cell-type labels",
    "wot": "Waddington-OT test data, 9,679 cells, day 0/2, 20-D diffusion map, growth scores",
}

_PACKAGE = "chronotope.datasets"
_FOLDER = "_demo"


def _resource(name: str) -> resources.abc.Traversable:
    return resources.files(_PACKAGE).joinpath(_FOLDER, f"{name}.h5ad")


def demo_names() -> list[str]:
    """Names of the embedded demo datasets present in this installation.

    Returns
    -------
    list of str
        Pass one to :func:`demo`. Descriptions: ``DEMO_DESCRIPTIONS``.
    """
    return [n for n in DEMO_DESCRIPTIONS if _resource(n).is_file()]


def demo(name: str = "dlpfc_151673") -> AnnData:
    """Load an embedded demo dataset (no data folder needed).

    Parameters
    ----------
    name
        - ``"dlpfc_151673"``: :func:`dlpfc` slice 151673 (all 5,000 stored genes, layer
          labels in ``obs["layer"]``, low-res H&E in ``uns["spatial"]["151673"]``);
        - ``"breast"``: the four PASTE breast sections concatenated, 6,397 shared genes,
          ``obs["slice"]`` categorical ``"1"``…``"4"``, ``obs_names`` ``"<spot>-<slice>"``,
          ST array coordinates in ``obsm["spatial"]``;
        - ``"emt"``: :func:`emt` (``obs["time"]`` 1…7, ``obsm["X_pca"]``);
        - ``"mouse_brain_raw"``: :func:`mouse_brain_raw` (``obs["in_tissue"]`` 0/1);
        - ``"mouse_olfactory_bulb"``: :func:`mouse_olfactory_bulb`;
        - ``"starmap"``: the three :func:`starmap` sections concatenated (166 genes,
          ``obs["slice"]`` ``"BZ5"``, ``"BZ9"``, ``"BZ14"``);
        - ``"wot"``: :func:`wot`.

        Sources, citations and licences: ``_demo/DATA_LICENSES.md`` in the package.

    Returns
    -------
    AnnData
        A new object on every call; spatial counts as ``float32`` CSR in ``.X``,
        provenance in ``uns["chronotope_dataset"]``.
    """
    if name not in DEMO_DESCRIPTIONS:
        raise ChronotopeInputError(
            f"Unknown demo dataset {name!r}; available: {', '.join(DEMO_DESCRIPTIONS)}."
        )
    res = _resource(name)
    if not res.is_file():
        raise MissingFileError(
            f"Demo file {name}.h5ad is missing from the installed package; rebuild it with "
            "scripts/build_demo_data.py."
        )
    with resources.as_file(res) as path:
        adata = anndata.read_h5ad(path)
    if sp.issparse(adata.X) and (adata.X.format != "csr" or adata.X.dtype != np.float32):
        adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    return adata
