"""Per-spot features from an H&E image: patches, a built-in extractor, embeddings hook.

A *feature extractor* is any callable ``patch -> 1-D array`` where ``patch`` is an
``(h, w, 3)`` ``uint8`` RGB array; :func:`image_features` calls it once per spot.
:class:`HandcraftedExtractor` is the built-in one and needs no downloaded weights:

- stain: colour deconvolution into haematoxylin / eosin / DAB (``skimage.color.rgb2hed``),
  mean, standard deviation and quartiles of each channel over the tissue pixels;
- texture: grey-level co-occurrence matrix (``skimage.feature.graycomatrix``; contrast,
  dissimilarity, homogeneity, energy, correlation, ASM at distances 1, 2, 4, averaged over
  four angles) and a uniform local binary pattern histogram (``local_binary_pattern``,
  ``P=8, R=1``);
- morphology / intensity: tissue fraction, RGB means and standard deviations, and nuclei
  found by an Otsu threshold of the haematoxylin channel (count, area fraction, mean and
  standard deviation of the area, mean eccentricity of the labelled regions, from their
  second moments).

Foundation-model embeddings (UNI, CONCH, ... computed elsewhere) enter through
:func:`load_embeddings` (a ``.npy`` file or an array, one row per spot, in
``obs_names`` order), which stores them in ``obsm``; pass that key as ``features=``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import numpy as np

from chronotope._errors import ChronotopeInputError

__all__ = [
    "FeatureExtractor",
    "HandcraftedExtractor",
    "extract_patch",
    "image_features",
    "iter_patches",
    "load_embeddings",
]

logger = logging.getLogger("chronotope")

# nuclei candidates smaller than this (pixels of the resized patch) are noise
_MIN_AREA = 8


class FeatureExtractor(Protocol):
    """``extractor(patch) -> 1-D float array`` for an ``(h, w, 3)`` ``uint8`` patch."""

    def __call__(self, patch: np.ndarray) -> np.ndarray: ...


def extract_patch(image: np.ndarray, center: tuple[float, float], size: int) -> np.ndarray:
    """The ``size x size`` patch of ``image`` centred on ``(x, y)`` (column, row).

    Parts outside the image are filled with white (255), as background.
    """
    h, w = image.shape[:2]
    half = size // 2
    cx, cy = round(float(center[0])), round(float(center[1]))
    x0, y0 = cx - half, cy - half
    out = np.full((size, size, 3), 255, dtype=np.uint8)
    xs, ys = max(x0, 0), max(y0, 0)
    xe, ye = min(x0 + size, w), min(y0 + size, h)
    if xe > xs and ye > ys:
        out[ys - y0 : ye - y0, xs - x0 : xe - x0] = image[ys:ye, xs:xe, :3]
    return out


def iter_patches(
    image: np.ndarray,
    coords: np.ndarray,
    size: int,
    *,
    scale: float = 1.0,
    progress: bool = True,
) -> Iterator[np.ndarray]:
    """Yield one patch per spot (progress bar over spots).

    Parameters
    ----------
    image
        ``(H, W, 3)`` ``uint8`` RGB image.
    coords
        ``(n, 2)`` spot centres ``(x, y)`` = (column, row) in full-resolution pixels.
    size
        Patch side in full-resolution pixels.
    scale
        ``image`` pixels per full-resolution pixel (e.g. ``tissue_hires_scalef``); the
        patch is cut at ``coords * scale`` with side ``round(size * scale)``.
    progress
        Show a tqdm progress bar.
    """
    from tqdm.auto import tqdm

    coords = np.asarray(coords, dtype=np.float64)
    side = max(4, round(size * scale))
    for xy in tqdm(coords, desc="patches", unit="spot", disable=not progress, leave=False):
        yield extract_patch(image, (xy[0] * scale, xy[1] * scale), side)


class HandcraftedExtractor:
    """Stain, texture and morphology statistics of an H&E patch (scikit-image).

    Parameters
    ----------
    resize
        Patches are resized to ``resize x resize`` pixels first (the statistics then do not
        depend on the image resolution); ``None`` keeps them.
    background
        Grey level (0-1) above which a pixel counts as background (glass).

    Attributes
    ----------
    names
        Feature names, in output order.
    """

    _GLCM_PROPS = ("contrast", "dissimilarity", "homogeneity", "energy", "correlation", "ASM")
    _DISTANCES = (1, 2, 4)

    def __init__(self, resize: int | None = 96, background: float = 0.85) -> None:
        import importlib.util

        if importlib.util.find_spec("skimage") is None:
            raise ImportError(
                "the built-in H&E feature extractor needs scikit-image: "
                "pip install 'chronotope[image]' (or scikit-image)"
            )
        if resize is not None and resize < 16:
            raise ChronotopeInputError(f"resize must be >= 16, got {resize}")
        self.resize = resize
        self.background = background
        names = []
        for c in ("H", "E", "D"):
            names += [f"{c}_{s}" for s in ("mean", "sd", "q25", "q50", "q75")]
        names += [f"glcm_{p}_d{d}" for p in self._GLCM_PROPS for d in self._DISTANCES]
        names += [f"lbp_{i}" for i in range(10)]
        names += ["tissue_fraction", "R_mean", "G_mean", "B_mean", "R_sd", "G_sd", "B_sd"]
        names += ["nuclei_count", "nuclei_area_fraction", "nuclei_mean_area",
                  "nuclei_eccentricity", "nuclei_area_sd"]
        self.names = names

    def __call__(self, patch: np.ndarray) -> np.ndarray:
        from skimage import color, feature, filters, measure

        patch = np.asarray(patch)
        if patch.ndim != 3 or patch.shape[2] < 3:
            raise ChronotopeInputError(f"patch must be (h, w, 3) RGB, got {patch.shape}")
        rgb = patch[..., :3]
        if self.resize is not None and rgb.shape[:2] != (self.resize, self.resize):
            from PIL import Image

            rgb = np.asarray(
                Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).resize(
                    (self.resize, self.resize), Image.Resampling.BILINEAR, reducing_gap=2.0
                )
            )
        f = rgb.astype(np.float64) / 255.0
        grey = color.rgb2gray(f)
        tissue = grey < self.background
        frac = float(tissue.mean())
        if tissue.sum() < 10:
            tissue = np.ones_like(tissue)
        hed = color.rgb2hed(f)
        out: list[float] = []
        for c in range(3):
            v = hed[..., c][tissue]
            q = np.quantile(v, [0.25, 0.5, 0.75])
            out += [float(v.mean()), float(v.std()), *map(float, q)]
        g8 = (grey * 63).astype(np.uint8)  # 64 grey levels
        glcm = feature.graycomatrix(
            g8, distances=list(self._DISTANCES), angles=[0, np.pi / 4, np.pi / 2, 3 * np.pi / 4],
            levels=64, symmetric=True, normed=True,
        )
        for p in self._GLCM_PROPS:
            vals = feature.graycoprops(glcm, p).mean(1)  # over angles, per distance
            out += [float(v) if np.isfinite(v) else 0.0 for v in vals]
        lbp = feature.local_binary_pattern((grey * 255).astype(np.uint8), 8, 1, method="uniform")
        hist = np.bincount(lbp.astype(np.int64).ravel(), minlength=10)[:10]
        out += list((hist / max(1, hist.sum())).astype(float))
        out += [frac]
        out += [float(f[..., c][tissue].mean()) for c in range(3)]
        out += [float(f[..., c][tissue].std()) for c in range(3)]
        h = hed[..., 0]
        try:
            thr = filters.threshold_otsu(h[tissue]) if np.ptp(h[tissue]) > 0 else np.inf
        except ValueError:
            thr = np.inf
        mask = (h > thr) & tissue
        lab = measure.label(mask)
        out += _region_stats(lab, mask)
        return np.asarray(out, dtype=np.float32)


def _region_stats(lab: np.ndarray, mask: np.ndarray) -> list[float]:
    """Count, area fraction, mean area, mean eccentricity, area sd of labelled regions."""
    n = int(lab.max())
    if n:  # drop regions under _MIN_AREA pixels (noise), relabel 1..n
        sizes = np.bincount(lab.ravel(), minlength=n + 1)
        keep = sizes >= _MIN_AREA
        keep[0] = False
        new = np.zeros(n + 1, dtype=np.int64)
        new[keep] = np.arange(1, int(keep.sum()) + 1)
        lab = new[lab]
        mask = lab > 0
        n = int(keep.sum())
    if n == 0:
        return [0.0, 0.0, 0.0, 0.0, 0.0]
    rr, cc = np.nonzero(lab)
    lb = lab[rr, cc]
    area = np.bincount(lb, minlength=n + 1)[1:].astype(float)
    mr = np.bincount(lb, rr, minlength=n + 1)[1:] / area
    mc = np.bincount(lb, cc, minlength=n + 1)[1:] / area
    dr, dc = rr - mr[lb - 1], cc - mc[lb - 1]
    a = np.bincount(lb, dr * dr, minlength=n + 1)[1:] / area
    b = np.bincount(lb, dc * dc, minlength=n + 1)[1:] / area
    c = np.bincount(lb, dr * dc, minlength=n + 1)[1:] / area
    root = np.sqrt(((a - b) / 2) ** 2 + c**2)
    l1, l2 = (a + b) / 2 + root, (a + b) / 2 - root
    ecc = np.where(l1 > 0, np.sqrt(np.clip(1 - l2 / np.maximum(l1, 1e-12), 0, 1)), 0.0)
    return [float(n), float(mask.mean()), float(area.mean()), float(ecc.mean()), float(area.std())]


def image_features(
    image: np.ndarray | str | os.PathLike[str],
    coords: np.ndarray,
    *,
    patch_size: int = 224,
    scale: float = 1.0,
    extractor: FeatureExtractor | Callable[[np.ndarray], np.ndarray] | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Features of the patch around each spot: ``(n_spots, n_features)`` ``float32``.

    Parameters
    ----------
    image
        ``(H, W, 3)`` ``uint8`` RGB array or an image file (read at full resolution).
    coords
        ``(n, 2)`` spot centres ``(x, y)`` in full-resolution pixels.
    patch_size
        Patch side in full-resolution pixels (the HER2+ ST spot is about 128 px wide, a
        200 µm pitch is 256 px).
    scale
        ``image`` pixels per full-resolution pixel (1 for the full-size image).
    extractor
        Callable per patch; default :class:`HandcraftedExtractor`.
    progress
        Progress bar over spots.
    """
    if not isinstance(image, np.ndarray):
        from chronotope.io._visium import read_image

        image = read_image(Path(image))
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] < 3:
        raise ChronotopeInputError(f"image must be (H, W, 3) RGB, got shape {image.shape}")
    if image.dtype != np.uint8:
        if image.dtype.kind == "f" and image.max() <= 1.0:
            image = (image * 255).round()
        image = np.clip(image, 0, 255).astype(np.uint8)
    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] != 2 or coords.shape[0] == 0:
        raise ChronotopeInputError(f"coords must be a non-empty (n, 2) array, got {coords.shape}")
    if not np.isfinite(coords).all():
        raise ChronotopeInputError("coords contain NaN or infinite values")
    if patch_size < 8 or scale <= 0:
        raise ChronotopeInputError("patch_size must be >= 8 and scale > 0")
    h, w = image.shape[:2]
    inside = (
        (coords[:, 0] * scale >= 0)
        & (coords[:, 0] * scale < w)
        & (coords[:, 1] * scale >= 0)
        & (coords[:, 1] * scale < h)
    )
    if not inside.any():
        raise ChronotopeInputError(
            "no spot centre falls inside the image: check that coords are (x = column, y = row) "
            "in full-resolution pixels and that scale matches the image"
        )
    if not inside.all():
        logger.warning("%d spot centre(s) lie outside the image", int((~inside).sum()))
    ext = extractor if extractor is not None else HandcraftedExtractor()
    rows = [np.asarray(ext(p), dtype=np.float32).ravel()
            for p in iter_patches(image, coords, patch_size, scale=scale, progress=progress)]
    if len({r.size for r in rows}) != 1:
        raise ChronotopeInputError("the extractor returned vectors of different lengths")
    out = np.vstack(rows)
    if not np.isfinite(out).all():
        raise ChronotopeInputError("the extractor returned NaN or infinite values")
    return out


def load_embeddings(
    embeddings: np.ndarray | str | os.PathLike[str], n_obs: int
) -> np.ndarray:
    """Precomputed per-spot embeddings (a ``.npy`` file or an array), checked.

    One row per spot in the order of the AnnData's ``obs_names``; rows must be finite.
    """
    if isinstance(embeddings, str | os.PathLike):
        path = Path(embeddings)
        if not path.is_file():
            raise FileNotFoundError(f"embeddings file {path} not found")
        x = np.load(path, allow_pickle=False)
    else:
        x = np.asarray(embeddings)
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] != n_obs:
        raise ChronotopeInputError(
            f"embeddings have shape {x.shape}; expected ({n_obs}, n_features), one row per spot"
        )
    if not np.isfinite(x).all():
        raise ChronotopeInputError("embeddings contain NaN or infinite values")
    return x
