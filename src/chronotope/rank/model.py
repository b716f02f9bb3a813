"""Expression-from-features models trained with the losses of :mod:`chronotope.rank.losses`.

Arrays in, arrays out: ``features`` ``(n, d)``, raw ``counts`` ``(n, G)``, slide codes
``groups`` ``(n,)`` and log size factors. Two heads share the training loop:

- ``"linear"``: ``s = x W + b`` on standardised features (the seed's linear probe);
- ``"mlp"``: one hidden layer (ReLU, dropout) then linear.

Batching (``batching=``): ``"mixed"`` draws spots of all slides at random into each
mini-batch (lists and pairs are still formed within slides inside it); ``"slide"``
makes each mini-batch one slide (or a random part of one); ``"balanced"`` takes the same
number of spots from every slide in each mini-batch.

Model selection: when validation arrays are given, the weights of the epoch with the
highest mean within-slide Pearson correlation between the score and the validation
slide's log-normalised counts are kept (not the epoch of lowest loss).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from chronotope._atomic import save_json, save_state_dict
from chronotope._errors import ChronotopeInputError
from chronotope._settings import resolve_device
from chronotope.rank.losses import LOSSES, PAIR_LOSSES, log_size_factors, sample_pairs

__all__ = ["RankModel", "RankParams", "within_slide_correlation"]

logger = logging.getLogger("chronotope")

_WEIGHTS = "weights.pt"
_PARAMS = "params.json"
_BATCHING = ("mixed", "slide", "balanced")
_HEADS = ("linear", "mlp")


@dataclass(frozen=True)
class RankParams:
    """Hyperparameters of :class:`RankModel`.

    Parameters
    ----------
    loss
        One of :data:`chronotope.rank.losses.LOSSES`: ``list``, ``pair``, ``mse``,
        ``poisson``, ``nb``, ``margin``, ``pcc``, ``pcc_slide``.
    head
        ``"linear"`` or ``"mlp"``.
    hidden
        Width of the MLP's hidden layer.
    dropout
        Dropout of the MLP's hidden layer.
    batching
        ``"mixed"``, ``"slide"`` or ``"balanced"`` (see the module docstring).
    batch_size
        Spots per mini-batch (for ``"balanced"``: in total, split evenly over slides).
    max_epochs
        Passes over the training spots.
    learning_rate
        Adam learning rate.
    weight_decay
        L2 penalty on the weights (not the biases), added to the loss.
    pairs_per_spot
        Partners drawn per spot and mini-batch for ``pair`` and ``margin``.
    margin
        Margin of the ``margin`` loss.
    eval_every
        Epochs between validation scores (model selection).
    seed
        Seed of the initialisation, the mini-batches and the pairs.
    """

    loss: str = "list"
    head: str = "linear"
    hidden: int = 128
    dropout: float = 0.1
    batching: str = "mixed"
    batch_size: int = 1024
    max_epochs: int = 200
    learning_rate: float = 1e-2
    weight_decay: float = 1e-4
    pairs_per_spot: int = 8
    margin: float = 1.0
    eval_every: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ChronotopeInputError(f"unknown loss {self.loss!r}; use one of {list(LOSSES)}")
        if self.head not in _HEADS:
            raise ChronotopeInputError(f"unknown head {self.head!r}; use one of {list(_HEADS)}")
        if self.batching not in _BATCHING:
            raise ChronotopeInputError(
                f"unknown batching {self.batching!r}; use one of {list(_BATCHING)}"
            )
        for name in ("hidden", "batch_size", "max_epochs", "pairs_per_spot", "eval_every"):
            if int(getattr(self, name)) < 1:
                raise ChronotopeInputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0 or self.weight_decay < 0 or not 0 <= self.dropout < 1:
            raise ChronotopeInputError(
                "learning_rate must be > 0, weight_decay >= 0 and dropout in [0, 1)"
            )


class _Head(nn.Module):
    def __init__(self, n_in: int, n_genes: int, head: str, hidden: int, dropout: float) -> None:
        super().__init__()
        if head == "linear":
            self.net: nn.Module = nn.Linear(n_in, n_genes)
        else:
            self.net = nn.Sequential(
                nn.Linear(n_in, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, n_genes)
            )
        # per-gene inverse dispersion of the nb loss (unused by the others)
        self.log_theta = nn.Parameter(torch.zeros(n_genes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _pearson_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ac = a - a.mean(0)
    bc = b - b.mean(0)
    den = np.sqrt((ac**2).sum(0) * (bc**2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (ac * bc).sum(0) / den
    r[den <= 1e-12] = np.nan
    return r


def within_slide_correlation(
    pred: np.ndarray, truth: np.ndarray, groups: np.ndarray, *, method: str = "pearson"
) -> np.ndarray:
    """Correlation per slide and gene, computed within each slide (never pooled).

    Parameters
    ----------
    pred, truth
        ``(n, G)`` arrays.
    groups
        ``(n,)`` slide labels.
    method
        ``"pearson"`` or ``"spearman"`` (Pearson of the within-slide ranks, ties averaged).

    Returns
    -------
    numpy.ndarray
        ``(n_slides, G)``, rows in the order of ``np.unique(groups)``; NaN where either
        side is constant within the slide.
    """
    from scipy.stats import rankdata

    pred = np.asarray(pred, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    groups = np.asarray(groups)
    out = []
    for k in np.unique(groups):
        m = groups == k
        a, b = pred[m], truth[m]
        if method == "spearman":
            a, b = rankdata(a, axis=0), rankdata(b, axis=0)
        elif method != "pearson":
            raise ChronotopeInputError(f"method must be 'pearson' or 'spearman', got {method!r}")
        out.append(_pearson_np(a, b))
    return np.vstack(out) if out else np.zeros((0, pred.shape[1]))


def _codes(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    names, codes = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    return names, codes.astype(np.int64)


def _check_arrays(
    features: np.ndarray, counts: np.ndarray | None, groups: np.ndarray | None, what: str
) -> tuple[np.ndarray, np.ndarray | None]:
    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ChronotopeInputError(f"{what} features must be a non-empty 2-D array, got {x.shape}")
    if not np.isfinite(x).all():
        raise ChronotopeInputError(f"{what} features contain NaN or infinite values")
    y = None
    if counts is not None:
        y = np.asarray(counts, dtype=np.float32)
        if y.ndim != 2 or y.shape[0] != x.shape[0]:
            raise ChronotopeInputError(
                f"{what} counts have shape {y.shape}; expected ({x.shape[0]}, n_genes)"
            )
        if not np.isfinite(y).all():
            raise ChronotopeInputError(f"{what} counts contain NaN or infinite values")
        if (y < 0).any():
            raise ChronotopeInputError(f"{what} counts contain negative values (raw counts?)")
    if groups is not None and len(groups) != x.shape[0]:
        raise ChronotopeInputError(f"{what}: {len(groups)} slide labels for {x.shape[0]} spots")
    return x, y


class RankModel:
    """Predict spot-level (relative) expression from per-spot features.

    Parameters
    ----------
    params
        Hyperparameters; keyword arguments override single fields
        (``RankModel(loss="pair")``).
    device
        Torch device (``"cpu"``, ``"cuda"``, ``None`` for CUDA when available).
    progress
        Show a progress bar over epochs.
    **overrides
        Fields of :class:`RankParams`.

    Attributes
    ----------
    var_names
        The modelled genes (order of the score columns).
    feature_key
        Where the features came from (``obsm`` key), if known; kept by :meth:`save`.
    history_
        Per evaluated epoch: ``epoch``, ``loss`` and ``val_pearson`` (with validation).
    best_epoch_
        Epoch whose weights were kept.
    """

    def __init__(
        self,
        params: RankParams | None = None,
        *,
        device: str | torch.device | None = "cpu",
        progress: bool = False,
        **overrides: Any,
    ) -> None:
        base = asdict(params or RankParams())
        unknown = set(overrides) - set(base)
        if unknown:
            raise TypeError(f"unknown RankModel parameters: {sorted(unknown)}")
        base.update(overrides)
        self.params = RankParams(**base)
        self.device = resolve_device(device)
        self.progress = progress
        self.var_names: list[str] | None = None
        self.feature_key: str | None = None
        self.network: _Head | None = None
        self.mean_: np.ndarray | None = None
        self.scale_: np.ndarray | None = None
        self.size_reference_: float | None = None
        self.history_: list[dict[str, float]] = []
        self.best_epoch_: int | None = None

    # ------------------------------------------------------------------ training
    def _batches(self, codes: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        n = codes.size
        bs = self.params.batch_size
        mode = self.params.batching
        if mode == "mixed":
            order = rng.permutation(n)
            return [order[i : i + bs] for i in range(0, n, bs)]
        slides = [np.flatnonzero(codes == k) for k in np.unique(codes)]
        if mode == "slide":
            out = []
            for idx in slides:
                idx = rng.permutation(idx)
                out += [idx[i : i + bs] for i in range(0, idx.size, bs)]
            return [out[i] for i in rng.permutation(len(out))]
        per = max(2, bs // len(slides))
        n_steps = max(1, math.ceil(max(s.size for s in slides) / per))
        perms = [rng.permutation(s) for s in slides]
        out = []
        for step in range(n_steps):
            part = []
            for p in perms:
                take = np.arange(step * per, (step + 1) * per) % p.size
                part.append(p[take[: min(per, p.size)]])
            out.append(np.concatenate(part))
        return out

    def fit(
        self,
        features: np.ndarray,
        counts: np.ndarray,
        groups: np.ndarray,
        *,
        log_size: np.ndarray | None = None,
        var_names: list[str] | np.ndarray | None = None,
        validation: tuple[np.ndarray, ...] | None = None,
    ) -> RankModel:
        """Train.

        Parameters
        ----------
        features
            ``(n, d)`` per-spot features.
        counts
            ``(n, G)`` raw counts of the modelled genes.
        groups
            ``(n,)`` slide of each spot (any labels).
        log_size
            ``(n,)`` log size factors; by default from the row sums of ``counts``
            (better: from all genes of the assay, as :func:`chronotope.rank.fit` does).
        var_names
            Names of the ``G`` genes.
        validation
            ``(features, counts, groups)`` or ``(features, counts, groups, log_size)`` of
            held-out slide(s): the epoch with the best mean within-slide Pearson
            correlation to their log-normalised counts is kept (size factors from the row
            sums of ``counts`` unless given).

        Returns
        -------
        RankModel
            ``self``, trained.
        """
        x, y = _check_arrays(features, counts, groups, "training")
        assert y is not None
        if var_names is not None and len(var_names) != y.shape[1]:
            raise ChronotopeInputError(f"{len(var_names)} var_names for {y.shape[1]} genes")
        _, codes = _codes(groups)
        if log_size is None:
            tot = y.sum(1)
            pos = tot[tot > 0]
            self.size_reference_ = float(np.median(pos)) if pos.size else 1.0
            log_size = log_size_factors(tot, reference=self.size_reference_)
        log_size = np.asarray(log_size, dtype=np.float32).ravel()
        if log_size.size != x.shape[0] or not np.isfinite(log_size).all():
            raise ChronotopeInputError("log_size must be finite with one value per spot")
        self.var_names = None if var_names is None else [str(v) for v in var_names]
        # seeded initialisation and dropout without changing torch's global generator
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.params.seed)
            return self._fit(x, y, codes, log_size, validation)

    def _fit(
        self,
        x: np.ndarray,
        y: np.ndarray,
        codes: np.ndarray,
        log_size: np.ndarray,
        validation: tuple[np.ndarray, ...] | None,
    ) -> RankModel:
        p = self.params
        rng = np.random.default_rng(p.seed)
        self.mean_ = x.mean(0)
        sd = x.std(0)
        self.scale_ = np.where(sd > 1e-8, sd, 1.0).astype(np.float32)
        dev = self.device
        xt = torch.from_numpy((x - self.mean_) / self.scale_).to(dev)
        yt = torch.from_numpy(y).to(dev)
        gt = torch.from_numpy(codes).to(dev)
        st = torch.from_numpy(log_size).to(dev)
        net = _Head(x.shape[1], y.shape[1], p.head, p.hidden, p.dropout).to(dev)
        with torch.no_grad():  # start at the mean log-normalised level of each gene
            last = net.net if p.head == "linear" else net.net[-1]
            last.bias.copy_(torch.log1p(yt * torch.exp(-st)[:, None]).mean(0))
        self.network = net
        val = None
        if validation is not None:
            vx, vy = _check_arrays(validation[0], validation[1], validation[2], "validation")
            assert vy is not None
            if vy.shape[1] != y.shape[1] or vx.shape[1] != x.shape[1]:
                raise ChronotopeInputError("validation arrays have other genes or features")
            vls = (
                np.asarray(validation[3], dtype=np.float32)
                if len(validation) > 3
                else log_size_factors(vy.sum(1))
            )
            vt = np.log1p(vy * np.exp(-vls)[:, None])
            val = (vx, vt, np.asarray(validation[2]).astype(str))
        from chronotope.domains.model import _Adam  # torch.optim imports torch._dynamo

        weights = [prm for name, prm in net.named_parameters() if name.endswith("weight")]
        opt = _Adam([(list(net.parameters()), p.learning_rate)])
        loss_fn = LOSSES[p.loss]
        epochs = range(1, p.max_epochs + 1)
        if self.progress:
            from tqdm.auto import tqdm

            epochs = tqdm(epochs, desc=f"rank[{p.loss}]", unit="epoch")
        self.history_ = []
        best = (-np.inf, None, 0)
        for epoch in epochs:
            net.train()
            total, n_b = 0.0, 0
            for idx in self._batches(codes, rng):
                it = torch.from_numpy(idx).to(dev)
                sc = net(xt[it])
                kw: dict[str, Any] = {}
                sub_g = gt[it]
                if p.loss in PAIR_LOSSES:
                    kw["pairs"] = sample_pairs(sub_g.cpu().numpy(), p.pairs_per_spot, generator=rng)
                    if p.loss == "margin":
                        kw["margin"] = p.margin
                elif p.loss == "nb":
                    kw["log_theta"] = net.log_theta
                _, sub_codes = torch.unique(sub_g, return_inverse=True)
                loss = loss_fn(sc, yt[it], sub_codes, st[it], **kw)
                if p.weight_decay > 0:
                    loss = loss + p.weight_decay * sum((w**2).sum() for w in weights)
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach())
                n_b += 1
            if epoch % p.eval_every == 0 or epoch == p.max_epochs:
                rec = {"epoch": float(epoch), "loss": total / max(n_b, 1)}
                if not math.isfinite(rec["loss"]):
                    raise FloatingPointError(f"rank[{p.loss}]: loss became {rec['loss']}")
                if val is not None:
                    r = within_slide_correlation(self.predict(val[0]), val[1], val[2])
                    score = float(np.nanmean(r)) if np.isfinite(r).any() else -np.inf
                    rec["val_pearson"] = score
                    if score > best[0]:
                        state = {k: v.detach().clone() for k, v in net.state_dict().items()}
                        best = (score, state, epoch)
                self.history_.append(rec)
        if best[1] is not None:
            net.load_state_dict(best[1])
            self.best_epoch_ = int(best[2])
        else:
            self.best_epoch_ = p.max_epochs
        self.network = net.eval()
        return self

    # ------------------------------------------------------------------ inference
    def _require_fit(self) -> _Head:
        if self.network is None or self.mean_ is None or self.scale_ is None:
            raise RuntimeError("RankModel is not fitted; call fit() or load() first")
        return self.network

    @torch.no_grad()
    def predict(self, features: np.ndarray) -> np.ndarray:
        """Scores ``(n, G)``: log expression up to a constant per slide and gene.

        For ``mse`` the score approximates the log-normalised expression; for ``poisson``
        and ``nb`` the log rate per unit size factor; for the rank losses only the
        differences between spots of one slide carry meaning.
        """
        net = self._require_fit()
        x, _ = _check_arrays(features, None, None, "prediction")
        if x.shape[1] != self.mean_.shape[0]:
            raise ChronotopeInputError(
                f"features have {x.shape[1]} columns; the model was trained on "
                f"{self.mean_.shape[0]}"
            )
        net.eval()
        xt = torch.from_numpy((x - self.mean_) / self.scale_).to(self.device)
        out = [net(xt[i : i + 8192]).cpu().numpy() for i in range(0, xt.shape[0], 8192)]
        return np.concatenate(out).astype(np.float32)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Save weights, hyperparameters, feature scaling and gene names to folder ``path``."""
        net = self._require_fit()
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise FileExistsError(f"{path} exists and is not a folder")
        if path.exists() and any(path.iterdir()) and not overwrite:
            raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True")
        path.mkdir(parents=True, exist_ok=True)
        meta = {
            "params": asdict(self.params),
            "var_names": self.var_names,
            "feature_key": self.feature_key,
            "n_features": int(self.mean_.shape[0]),
            "n_genes": int(net.log_theta.shape[0]),
            "mean": self.mean_.tolist(),
            "scale": self.scale_.tolist(),
            "size_reference": self.size_reference_,
            "best_epoch": self.best_epoch_,
            "history": self.history_,
            "format": 1,
        }
        save_state_dict(net, path / _WEIGHTS)
        save_json(meta, path / _PARAMS)
        return path

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        var_names: list[str] | np.ndarray | None = None,
        device: str | torch.device | None = "cpu",
    ) -> RankModel:
        """Load a model saved by :meth:`save`.

        Parameters
        ----------
        path
            Folder written by :meth:`save`.
        var_names
            If given, they must equal the model's genes in order (a check).
        device
            Device for the weights.
        """
        path = Path(path)
        for name in (_WEIGHTS, _PARAMS):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path / name} not found: not a saved RankModel")
        meta = json.loads((path / _PARAMS).read_text())
        model = cls(RankParams(**meta["params"]), device=device)
        if var_names is not None and meta["var_names"] is not None:
            got = [str(v) for v in var_names]
            if got != meta["var_names"]:
                missing = sorted(set(meta["var_names"]) - set(got))[:5]
                raise ChronotopeInputError(
                    f"the genes differ from the {len(meta['var_names'])} model genes "
                    f"(e.g. missing {missing}); select the model genes in the same order"
                )
        p = model.params
        net = _Head(meta["n_features"], meta["n_genes"], p.head, p.hidden, p.dropout)
        net.load_state_dict(torch.load(path / _WEIGHTS, map_location="cpu", weights_only=True))
        model.network = net.to(model.device).eval()
        model.var_names = meta["var_names"]
        model.feature_key = meta.get("feature_key")
        model.mean_ = np.asarray(meta["mean"], dtype=np.float32)
        model.scale_ = np.asarray(meta["scale"], dtype=np.float32)
        model.size_reference_ = meta.get("size_reference")
        model.best_epoch_ = meta.get("best_epoch")
        model.history_ = meta.get("history", [])
        return model
