"""Out-of-core reading: row chunks of an h5ad reassemble to the stored matrix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData

from chronotope._errors import ChronotopeInputError
from chronotope.io import read_h5ad_backed, read_h5ad_chunks


def _write(path: Path, dense: bool = False, csc: bool = False) -> AnnData:
    rng = np.random.default_rng(0)
    x = sp.random(103, 17, density=0.2, format="csr", random_state=1, dtype=np.float32)
    x.data = np.ceil(x.data * 5)
    ad = AnnData(
        x.toarray() if dense else (x.tocsc() if csc else x),
        obs=pd.DataFrame(index=[f"c{i}" for i in range(103)]),
        var=pd.DataFrame(index=[f"g{i}" for i in range(17)]),
    )
    ad.layers["other"] = x * 2
    ad.obsm["spatial"] = rng.normal(size=(103, 2))
    ad.write_h5ad(path)
    return ad


@pytest.mark.parametrize("kind", ["csr", "csc", "dense"])
def test_chunks_reassemble(tmp_path: Path, kind: str) -> None:
    ad = _write(tmp_path / "a.h5ad", dense=kind == "dense", csc=kind == "csc")
    chunks = list(read_h5ad_chunks(tmp_path / "a.h5ad", chunk_size=20))
    assert [c[0] for c in chunks][:2] == [slice(0, 20), slice(20, 40)]
    assert chunks[-1][0] == slice(100, 103)
    assert all(sp.isspmatrix_csr(c) and c.dtype == np.float32 for _, c in chunks)
    got = sp.vstack([c for _, c in chunks]).toarray()
    np.testing.assert_array_equal(got, np.asarray(sp.csr_matrix(ad.X).toarray()))


def test_chunks_genes_and_layer(tmp_path: Path) -> None:
    ad = _write(tmp_path / "a.h5ad")
    genes = ["g5", "g0", "g16"]
    got = sp.vstack(
        [c for _, c in read_h5ad_chunks(tmp_path / "a.h5ad", chunk_size=50, genes=genes)]
    )
    np.testing.assert_array_equal(got.toarray(), ad[:, genes].X.toarray())
    mask = np.zeros(17, dtype=bool)
    mask[[2, 3]] = True
    lay = sp.vstack(
        [c for _, c in read_h5ad_chunks(tmp_path / "a.h5ad", layer="other", genes=mask)]
    )
    np.testing.assert_array_equal(lay.toarray(), ad.layers["other"][:, mask].toarray())
    with pytest.raises(ChronotopeInputError, match="not in the file"):
        next(read_h5ad_chunks(tmp_path / "a.h5ad", genes=["nope"]))
    with pytest.raises(ChronotopeInputError, match="no 'layers/missing'"):
        next(read_h5ad_chunks(tmp_path / "a.h5ad", layer="missing"))


def test_backed(tmp_path: Path) -> None:
    ad = _write(tmp_path / "a.h5ad")
    b = read_h5ad_backed(tmp_path / "a.h5ad")
    try:
        assert b.isbacked and b.n_obs == 103
        np.testing.assert_array_equal(b.obsm["spatial"], ad.obsm["spatial"])
        np.testing.assert_array_equal(sp.csr_matrix(b.X[10:30]).toarray(), ad.X[10:30].toarray())
    finally:
        b.file.close()
