"""Tests of the rank model, simulator, AnnData layer, image features and CLI."""

from __future__ import annotations

import numpy as np
import pytest

import chronotope as ct
from chronotope.cli import main
from chronotope.rank import RankModel, evaluate, fit, simulate, summarize


@pytest.fixture(scope="module")
def sim():
    return simulate(4, 120, 20, n_features=16, batch_effect=1.0, seed=0)


def _split(ad):
    sl = ad.obs["slide"].astype(str).to_numpy()
    return ad[np.isin(sl, ["s0", "s1"])].copy(), ad[sl == "s2"].copy(), ad[sl == "s3"].copy()


def test_simulate_shapes_and_layers(sim):
    assert sim.shape == (480, 20)
    assert sim.obsm["features"].shape == (480, 16)
    assert sim.layers["log_rate"].shape == (480, 20)
    assert sim.varm["batch_log_factor"].shape == (20, 4)
    assert (sim.X.data >= 0).all()
    sparse = simulate(2, 50, 10, depth=50, seed=1)
    assert (sparse.X.toarray() == 0).mean() > 0.5
    none = simulate(2, 50, 10, batch_effect=0.0, slide_depth_sd=0.0, seed=1)
    assert np.allclose(none.varm["batch_log_factor"], 0)


@pytest.mark.parametrize("loss", ["list", "pair", "pcc_slide", "mse", "nb"])
def test_fit_learns_the_signal(sim, loss):
    tr, va, te = _split(sim)
    model = fit(tr, "features", "slide", loss=loss, validation=va, max_epochs=30, eval_every=5)
    s = summarize(evaluate(model, te, batch_key="slide", truth_layer="log_rate"))
    assert s["spearman"] > 0.35, s
    assert model.best_epoch_ in {5, 10, 15, 20, 25, 30}
    assert "val_pearson" in model.history_[0]


@pytest.mark.parametrize("head", ["linear", "mlp"])
@pytest.mark.parametrize("batching", ["mixed", "slide", "balanced"])
def test_heads_and_batching_run(sim, head, batching):
    tr, _, te = _split(sim)
    model = fit(tr, "features", "slide", loss="list", head=head, batching=batching,
                batch_size=64, max_epochs=3, hidden=16)
    assert model.predict(te.obsm["features"]).shape == (te.n_obs, 20)


def test_predictions_are_shift_free_for_rank_losses(sim):
    # the list loss cannot see per-slide-gene offsets: the evaluation is within slides
    tr, _, te = _split(sim)
    model = fit(tr, "features", "slide", loss="list", max_epochs=5)
    tab = evaluate(model, te, batch_key="slide")
    assert set(tab.columns) == {"slide", "gene", "pearson", "spearman"}
    assert len(tab) == 20
    assert tab.attrs["mean"] == summarize(tab)


def test_hvg_on_training_slides_only(sim):
    ad = sim.copy()
    x = ad.X.toarray()
    sl = ad.obs["slide"].astype(str).to_numpy()
    x[sl == "s3", 0] = np.random.default_rng(0).poisson(500, size=(sl == "s3").sum())
    x[sl != "s3", 0] = 0
    x[sl != "s3", 0][:1] = 1
    import scipy.sparse as sp

    ad.X = sp.csr_matrix(x)
    m = fit(ad, "features", "slide", genes=5, validation=["s3"], max_epochs=2)
    assert "g0" not in m.var_names  # variable only on the validation slide
    assert len(m.var_names) == 5
    # a validation AnnData without some genes: they are not candidates
    tr, va, _ = _split(sim)
    top = fit(tr, "features", "slide", genes=1, max_epochs=1).var_names[0]
    m2 = fit(tr, "features", "slide", genes=3, validation=va[:, va.var_names != top].copy(),
             max_epochs=1)
    assert top not in m2.var_names and len(m2.var_names) == 3


def test_save_load_roundtrip(sim, tmp_path):
    import torch

    tr, _, te = _split(sim)
    state = torch.get_rng_state()
    model = fit(tr, "features", "slide", loss="nb", head="mlp", max_epochs=3, hidden=8)
    assert torch.equal(state, torch.get_rng_state())  # the global generator is left alone
    again = fit(tr, "features", "slide", loss="nb", head="mlp", max_epochs=3, hidden=8)
    np.testing.assert_allclose(again.predict(te.obsm["features"]),
                               model.predict(te.obsm["features"]))  # seeded
    model.save(tmp_path / "m")
    back = RankModel.load(tmp_path / "m", var_names=model.var_names)
    np.testing.assert_allclose(back.predict(te.obsm["features"]),
                               model.predict(te.obsm["features"]), rtol=1e-6)
    assert back.var_names == model.var_names
    assert back.feature_key == "features"
    with pytest.raises(ValueError, match="genes differ"):
        RankModel.load(tmp_path / "m", var_names=model.var_names[::-1])
    with pytest.raises(FileExistsError):
        model.save(tmp_path / "m")
    with pytest.raises(FileNotFoundError):
        RankModel.load(tmp_path / "nothing")


def test_bad_inputs(sim):
    tr, _, _ = _split(sim)
    with pytest.raises(ValueError, match="unknown loss"):
        fit(tr, "features", "slide", loss="huber")
    with pytest.raises(ValueError, match="obsm"):
        fit(tr, "nope", "slide")
    with pytest.raises(ValueError, match="obs"):
        fit(tr, "features", "nope")
    bad = tr.copy()
    bad.obsm["features"][0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fit(bad, "features", "slide")
    neg = tr.copy()
    neg.X = neg.X.toarray()
    neg.X[0, 0] = -1
    with pytest.raises(ValueError, match="negative"):
        fit(neg, "features", "slide")
    with pytest.raises(ValueError, match="not in obs"):
        fit(tr, "features", "slide", validation=["s9"])
    with pytest.raises(ValueError, match=r"not in adata\.var_names"):
        fit(tr, "features", "slide", genes=["zzz"])
    with pytest.raises(ValueError, match="batching"):
        RankModel(batching="random")
    m = fit(tr, "features", "slide", max_epochs=1)
    with pytest.raises(ValueError, match="columns"):
        m.predict(np.zeros((3, 2)))
    with pytest.raises(RuntimeError, match="not fitted"):
        RankModel().predict(np.zeros((3, 2)))


def test_tl_predict_evaluate_and_plots(sim, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    tr, _, te = _split(sim)
    model = ct.tl.rank_fit(tr, "features", "slide", genes=8, max_epochs=5)
    assert tr.uns["rank"]["genes"] == model.var_names
    pred = ct.tl.rank_predict(te, model)
    assert list(pred.var_names) == model.var_names
    assert pred.layers["predicted"].shape == (te.n_obs, 8)
    assert pred.var["measured"].all()
    np.testing.assert_allclose(pred.obs["rank_total_counts"], np.asarray(te.X.sum(1)).ravel())
    assert "predicted" not in te.layers
    for loss in ("list", "mse"):
        m = ct.tl.rank_fit(tr, "features", "slide", genes=8, loss=loss, max_epochs=3)
        ct.tl.rank_evaluate(te, m, batch_key="slide")
    assert set(te.uns["rank_evaluation"]) == {"list", "mse"}
    pred.obsm["spatial"] = np.random.default_rng(0).random((te.n_obs, 2))
    one = tr.copy()
    ct.tl.rank_fit(one, "features", None, genes=4, max_epochs=1)  # no batch key: one slide
    ct.tl.rank_evaluate(te, m)
    one.write_h5ad(tmp_path / "tr.h5ad")  # uns entries are h5ad-safe
    te.write_h5ad(tmp_path / "te.h5ad")
    ct.pl.rank_losses(te)
    ct.pl.rank_maps(pred, n_genes=2)


def test_image_features_and_embeddings(tmp_path):
    from chronotope.rank.image import HandcraftedExtractor, extract_patch, image_features

    rng = np.random.default_rng(0)
    img = np.full((200, 300, 3), 240, dtype=np.uint8)
    img[50:150, 50:150] = rng.integers(60, 200, size=(100, 100, 3))
    coords = np.array([[100.0, 100.0], [250.0, 100.0], [5.0, 5.0]])
    p = extract_patch(img, (5, 5), 20)
    assert p.shape == (20, 20, 3) and (p[:5, :5] == 255).all()
    ext = HandcraftedExtractor(resize=32)
    f = image_features(img, coords, patch_size=40, extractor=ext, progress=False)
    assert f.shape == (3, len(ext.names)) and np.isfinite(f).all()
    assert f[0, ext.names.index("tissue_fraction")] > f[1, ext.names.index("tissue_fraction")]
    f2 = image_features(img, coords, patch_size=40, extractor=lambda q: q.mean((0, 1)),
                        progress=False)
    assert f2.shape == (3, 3)
    with pytest.raises(ValueError, match="inside the image"):
        image_features(img, coords + 1e4, patch_size=40, progress=False)
    from anndata import AnnData

    ad = AnnData(np.zeros((3, 2), dtype=np.float32))
    ad.obsm["spatial"] = coords
    ct.tl.histology_features(ad, img, patch_size=40, progress=False)
    assert ad.obsm["X_histology"].shape[0] == 3
    np.save(tmp_path / "e.npy", np.ones((3, 4)))
    ct.tl.load_embeddings(ad, tmp_path / "e.npy")
    assert ad.obsm["X_embedding"].shape == (3, 4)
    with pytest.raises(ValueError, match="one row per spot"):
        ct.tl.load_embeddings(ad, np.ones((2, 4)))
    import anndata

    ad.uns.clear()  # the h5ad gets only the coordinates
    ad.write_h5ad(tmp_path / "spots.h5ad")
    from PIL import Image

    Image.fromarray(img).save(tmp_path / "he.png")
    with pytest.raises(SystemExit) as exc:
        main(["-q", "rank", "features", str(tmp_path / "spots.h5ad"), "--image",
              str(tmp_path / "he.png"), "--patch-size", "40", "-o", str(tmp_path / "f.h5ad")])
    assert exc.value.code in (0, None)
    got = anndata.read_h5ad(tmp_path / "f.h5ad").obsm["X_histology"]
    np.testing.assert_allclose(got, image_features(img, coords, patch_size=40, progress=False))


def _run(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out = capsys.readouterr()
    return (0 if exc.value.code is None else int(exc.value.code)), out.out, out.err


def test_cli_roundtrip(sim, tmp_path, capsys):
    import anndata as ad

    tr, _, te = _split(sim)
    tr.write_h5ad(tmp_path / "train.h5ad")
    te.write_h5ad(tmp_path / "test.h5ad")
    code, out, err = _run(capsys, "-q", "rank", "fit", str(tmp_path / "train.h5ad"),
                          "--features", "features", "--batch-key", "slide", "--loss", "list",
                          "-o", str(tmp_path / "model"), "--max-epochs", "3")
    assert code == 0, err
    model = RankModel.load(tmp_path / "model")
    assert model.var_names == list(tr.var_names)  # all genes without --n-genes
    code, out, err = _run(capsys, "rank", "predict", str(tmp_path / "model"),
                          str(tmp_path / "test.h5ad"), "-o", str(tmp_path / "pred.h5ad"))
    assert code == 0, err
    pred = ad.read_h5ad(tmp_path / "pred.h5ad")
    assert list(pred.var_names) == model.var_names
    np.testing.assert_allclose(pred.layers["predicted"], model.predict(te.obsm["features"]),
                               rtol=1e-6)
    code, out, err = _run(capsys, "rank", "evaluate", str(tmp_path / "model"),
                          str(tmp_path / "test.h5ad"), "--batch-key", "slide",
                          "-o", str(tmp_path / "ev.csv"))
    assert code == 0, err
    assert "spearman" in out and (tmp_path / "ev.csv").is_file()
    code, _, err = _run(capsys, "rank", "fit", str(tmp_path / "train.h5ad"), "--features",
                        "nope", "-o", str(tmp_path / "m2"))
    assert code == 1 and "error:" in err
    code, _, err = _run(capsys, "-q", "rank", "fit", str(tmp_path / "train.h5ad"), "--features",
                        "features", "--n-genes", "5", "-o", str(tmp_path / "model"))
    assert code == 1 and "not empty" in err
