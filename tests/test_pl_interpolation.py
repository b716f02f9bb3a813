"""pl.interpolation: the default colouring projects sparse slices without densifying them."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

from chronotope import pl
from chronotope.tl._slices import _log_normalised


def _slice(rng: np.random.Generator, n: int, genes: list[str], sparse: bool) -> AnnData:
    x = rng.poisson(rng.gamma(0.5, 2.0, (n, len(genes)))).astype(np.float32)
    a = AnnData(sp.csr_matrix(x) if sparse else x)
    a.var_names = genes
    a.obsm["spatial"] = rng.uniform(0, 10, (n, 2))
    return a


def test_default_colour_is_first_pc_of_stacked_slices() -> None:
    rng = np.random.default_rng(0)
    genes = [f"g{i}" for i in range(30)]
    first, second = _slice(rng, 500, genes, True), _slice(rng, 400, genes, False)
    gen = _slice(rng, 450, genes, True)
    gen.X = sp.csr_matrix(np.log1p(gen.X.toarray()))
    fig = pl.interpolation(first, gen, second)
    shown = [ax.collections[0].get_array() for ax in fig.axes]

    # dense reference: the same log-normalisation, stacked, PC1 from every row
    mats = [_log_normalised(first.X), gen.X, _log_normalised(second.X)]
    mats = [m.toarray() if sp.issparse(m) else np.asarray(m) for m in mats]
    stacked = np.concatenate(mats)
    mean = stacked.mean(0)
    _, _, vt = np.linalg.svd(stacked - mean, full_matrices=False)  # < 3,000 rows: all used
    for got, m in zip(shown, mats, strict=True):
        ref = (m - mean) @ vt[0]
        sign = np.sign(np.dot(ref, got)) or 1.0
        np.testing.assert_allclose(np.asarray(got) * sign, ref, rtol=1e-5, atol=1e-5)
