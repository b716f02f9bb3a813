"""AnnData bridge of the dynamics module: representation, times, gene map."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from chronotope._errors import ChronotopeInputError
from chronotope.dynamics._anndata import gene_map_from_adata, read_snapshots


def _adata() -> ad.AnnData:
    rng = np.random.default_rng(0)
    a = ad.AnnData(rng.normal(size=(40, 6)).astype(np.float32))
    a.obs["time"] = pd.Categorical(np.repeat(["0", "2"], 20))
    a.obs["day"] = np.repeat(["day0", "day2"], 20)
    w = np.linalg.qr(rng.normal(size=(6, 3)))[0]
    a.varm["PCs"] = w
    a.obsm["X_pca"] = (a.X - a.X.mean(0)) @ w
    return a


def test_read_snapshots_and_gene_map() -> None:
    a = _adata()
    x, t = read_snapshots(a, "time", "X_pca")
    assert x.shape == (40, 3)
    np.testing.assert_array_equal(np.unique(t.astype(float)), [0.0, 2.0])
    gm = gene_map_from_adata(a, "X_pca")
    assert gm is not None and gm.var_names == list(a.var_names)
    # x -> genes -> x is exact for orthonormal loadings
    np.testing.assert_allclose(gm.to_rep(gm.to_genes(x)), x, atol=1e-5)
    assert gene_map_from_adata(a, "X").dim == 6
    assert gene_map_from_adata(a, "X_umap") is None
    with pytest.raises(ChronotopeInputError, match="obs\\['nope'\\]"):
        read_snapshots(a, "nope", "X_pca")
    with pytest.raises(ChronotopeInputError, match="X_umap"):
        read_snapshots(a, "time", "X_umap")
