"""Tests for the plotting helpers."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from chronotope import pl


@pytest.fixture
def adata() -> ad.AnnData:
    rng = np.random.default_rng(0)
    n = 50
    a = ad.AnnData(
        X=sp.csr_matrix(rng.poisson(1.0, size=(n, 4)).astype(np.float32)),
        obs=pd.DataFrame(
            {
                "layer": pd.Categorical(rng.choice(["L1", "L2", "WM"], n)),
                "score": rng.normal(size=n),
            },
            index=[f"s{i}" for i in range(n)],
        ),
        var=pd.DataFrame(index=["g0", "g1", "g2", "g3"]),
    )
    a.obsm["spatial"] = rng.uniform(0, 100, size=(n, 2))
    return a


@pytest.mark.parametrize("color", [None, "layer", "score", "g2"])
def test_spatial_returns_axes(adata, color):
    ax = pl.spatial(adata, color=color)
    assert isinstance(ax, plt.Axes)
    n_points = sum(len(c.get_offsets()) for c in ax.collections)
    assert n_points == adata.n_obs
    if color == "layer":
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert labels == ["L1", "L2", "WM"]
    if color in ("score", "g2"):
        assert len(ax.figure.axes) == 2  # colorbar
    plt.close(ax.figure)


def test_spatial_array_and_existing_axes(adata):
    fig, axes = plt.subplots(1, 2)
    out = pl.spatial(adata, color=np.arange(adata.n_obs), ax=axes[1], title="idx")
    assert out is axes[1]
    assert out.get_title() == "idx"
    plt.close(fig)


def test_spatial_errors_are_actionable(adata):
    with pytest.raises(ValueError, match="neither a column"):
        pl.spatial(adata, color="nope")
    with pytest.raises(ValueError, match="expected 50"):
        pl.spatial(adata, color=np.zeros(3))
    with pytest.raises(ValueError, match="obsm\\['xy'\\] not found"):
        pl.spatial(adata, spatial_key="xy")
