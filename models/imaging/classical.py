"""Classical stain normalization baselines: Reinhard, Macenko.

Each standardizer maps a batch of RGB tensors [N,3,H,W] in [0,1] into the colour
statistics of the reference lab. Reference statistics come from
:func:`fit_reference_stats` and are plain JSON (they travel in the classifier
checkpoint header as ``reference_stain``).

- Reinhard E, Ashikhmin M, Gooch B, Shirley P. Color transfer between images.
  IEEE Computer Graphics and Applications 21(5), 2001. (We use CIE L*a*b* where the
  paper uses l-alpha-beta; the mean/std matching per channel is the same.)
- Macenko M, et al. A method for normalizing histology slides for quantitative
  analysis. ISBI 2009.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from PIL import Image

STATS_VERSION = 1
_LEVELS = 255.0  # 8-bit intensity scale used for optical density
_BACKGROUND_PERCENTILE = 99  # per-channel brightness taken as the unstained light level I0
_BETA = 0.15  # OD below this in any channel is background (Macenko et al.)
_ALPHA = 1.0  # angle percentile for robust extreme stain vectors (Macenko et al.)
_MIN_STAINED = 64  # fewer stained pixels than this: leave the image as it is
_MAX_RATIO = 2.0  # bound on the per-stain concentration rescaling of one image
_PIXELS_PER_IMAGE = 20_000  # pixels sampled per image when fitting Macenko stats


class BaselineError(Exception):
    """Reference statistics are missing, malformed or cannot be fitted."""


# ---------------------------------------------------------------------------- colour spaces

_RGB_TO_XYZ = np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]])
_XYZ_TO_RGB = np.linalg.inv(_RGB_TO_XYZ)
_WHITE = _RGB_TO_XYZ.sum(axis=1)  # D65 white of sRGB


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB in [0,1], shape [...,3] -> CIE L*a*b* (D65)."""
    lin = np.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = lin @ _RGB_TO_XYZ.T / _WHITE
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """CIE L*a*b* (D65) -> sRGB clipped to [0,1]."""
    fy = (lab[..., 0] + 16) / 116
    f = np.stack([fy + lab[..., 1] / 500, fy, fy - lab[..., 2] / 200], axis=-1)
    xyz = np.where(f > 6 / 29, f**3, 3 * (6 / 29) ** 2 * (f - 4 / 29)) * _WHITE
    lin = np.clip(xyz @ _XYZ_TO_RGB.T, 0, 1)
    return np.clip(np.where(lin > 0.0031308, 1.055 * lin ** (1 / 2.4) - 0.055, 12.92 * lin), 0, 1)


def _to_od(rgb: np.ndarray, light: np.ndarray | float = 1.0) -> np.ndarray:
    """RGB in [0,1] -> optical density (Beer-Lambert) relative to light level I0 per channel."""
    return np.maximum(-np.log((rgb * _LEVELS + 1) / (np.asarray(light) * _LEVELS + 1)), 0)


def _from_od(od: np.ndarray, light: np.ndarray | float = 1.0) -> np.ndarray:
    return np.clip(((np.asarray(light) * _LEVELS + 1) * np.exp(-od) - 1) / _LEVELS, 0, 1)


def background_light(rgb: np.ndarray) -> np.ndarray:
    """Per-channel unstained light level I0 of an image [...,3]: a high brightness percentile.

    Smears from some labs have a tinted, darker plasma background; measuring OD against it
    (Macenko et al. treat I0 as a parameter) keeps background concentrations near zero.
    """
    return np.maximum(np.percentile(rgb.reshape(-1, 3), _BACKGROUND_PERCENTILE, axis=0), 0.2)


def batch_to_numpy(batch: torch.Tensor) -> np.ndarray:
    if batch.ndim != 4 or batch.shape[1] != 3:
        raise BaselineError(f"expected a batch of RGB images [N,3,H,W], got shape {tuple(batch.shape)}")
    return batch.detach().to("cpu", torch.float64).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def numpy_to_batch(images: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(like.device, like.dtype)


def _pil_to_float(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.float64) / 255.0


# ---------------------------------------------------------------------------- Macenko core


def macenko_stain_matrix(od: np.ndarray) -> np.ndarray | None:
    """[2,3] unit stain vectors (first: the nuclear/haematoxylin-like stain) from OD pixels [P,3]; None if too few stained."""
    stained = od[np.all(od > _BETA, axis=1)]
    if len(stained) < _MIN_STAINED:
        return None
    _, eigvecs = np.linalg.eigh(np.cov(stained, rowvar=False))
    plane = eigvecs[:, 1:3]  # the two largest eigenvectors span the stain plane
    plane = plane * np.where(plane.sum(axis=0) < 0, -1, 1)  # point into positive OD
    proj = stained @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [_ALPHA, 100 - _ALPHA])
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    if not (np.all(np.isfinite(v1)) and np.all(np.isfinite(v2))) or abs(float(v1 @ v2)) > 0.9999:
        return None
    # The nuclear stain (azure/haematoxylin) absorbs red light most: larger red component first.
    stains = np.stack([v1, v2]) if v1[0] > v2[0] else np.stack([v2, v1])
    stains = stains * np.where(stains.sum(axis=1, keepdims=True) < 0, -1, 1)
    return stains / np.linalg.norm(stains, axis=1, keepdims=True)


def macenko_concentrations(od: np.ndarray, stains: np.ndarray) -> np.ndarray:
    """Least-squares stain concentrations [P,2] of OD pixels [P,3] for stain vectors [2,3]."""
    return od @ np.linalg.pinv(stains)


# ---------------------------------------------------------------------------- fitting


def fit_reference_stats(images: Iterable[Image.Image], *, seed: int = 0) -> dict[str, Any]:
    """JSON-serialisable reference statistics for the classical standardizers from reference-lab images."""
    rng = np.random.default_rng(seed)
    means, stds, od_samples, lights = [], [], [], []
    for img in images:
        rgb = _pil_to_float(img)
        lab = rgb_to_lab(rgb).reshape(-1, 3)
        means.append(lab.mean(axis=0))
        stds.append(lab.std(axis=0))
        lights.append(background_light(rgb))
        od = _to_od(rgb.reshape(-1, 3), lights[-1])
        take = rng.choice(len(od), size=min(len(od), _PIXELS_PER_IMAGE), replace=False)
        od_samples.append(od[take])
    if not means:
        raise BaselineError("no reference images given; pass the reference lab's training images")
    od_all = np.concatenate(od_samples)
    stains = macenko_stain_matrix(od_all)
    if stains is None:
        raise BaselineError(
            "reference images hold too few stained pixels to fit Macenko stain vectors;"
            " pass stained cell images, not blank frames"
        )
    # Per-image 99th percentiles under the pooled stain vectors, then their median: a typical
    # image's range, not the extreme of the pooled set.
    maxima = []
    for od in od_samples:
        stained = od[np.all(od > _BETA, axis=1)]
        if len(stained) >= _MIN_STAINED:
            maxima.append(np.percentile(macenko_concentrations(stained, stains), 99, axis=0))
    return {
        "version": STATS_VERSION,
        "n_images": len(means),
        "reinhard": {
            "lab_mean": [float(v) for v in np.mean(means, axis=0)],
            "lab_std": [float(v) for v in np.mean(stds, axis=0)],
        },
        "macenko": {
            "stain_matrix": [[float(v) for v in row] for row in stains],
            "max_concentrations": [float(v) for v in np.median(maxima, axis=0)],
            "background": [float(v) for v in np.median(lights, axis=0)],
        },
    }


def _section(stats: dict[str, Any], name: str, keys: tuple[str, ...]) -> dict[str, Any]:
    section = stats.get(name) if isinstance(stats, dict) else None
    if not isinstance(section, dict) or any(k not in section for k in keys):
        raise BaselineError(
            f"reference stats lack '{name}' with keys {list(keys)}; recompute them with fit_reference_stats"
        )
    return section


# ---------------------------------------------------------------------------- standardizers


class Reinhard:
    """Match each image's per-channel L*a*b* mean and standard deviation to the reference."""

    name = "reinhard"

    def __init__(self, lab_mean: Iterable[float], lab_std: Iterable[float]) -> None:
        self.mean = np.asarray(list(lab_mean), dtype=np.float64)
        self.std = np.asarray(list(lab_std), dtype=np.float64)

    @classmethod
    def from_stats(cls, stats: dict[str, Any]) -> Reinhard:
        s = _section(stats, "reinhard", ("lab_mean", "lab_std"))
        return cls(s["lab_mean"], s["lab_std"])

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        lab = rgb_to_lab(batch_to_numpy(batch))
        mu = lab.mean(axis=(1, 2), keepdims=True)
        sd = lab.std(axis=(1, 2), keepdims=True)
        out = (lab - mu) / np.maximum(sd, 1e-6) * self.std + self.mean
        return numpy_to_batch(lab_to_rgb(out), batch)


class Macenko:
    """Re-express each image's stain concentrations with the reference stain vectors and ranges."""

    name = "macenko"

    def __init__(
        self,
        stain_matrix: Iterable[Iterable[float]],
        max_concentrations: Iterable[float],
        background: Iterable[float] = (1.0, 1.0, 1.0),
    ) -> None:
        self.stains = np.asarray([list(r) for r in stain_matrix], dtype=np.float64)
        self.max_conc = np.asarray(list(max_concentrations), dtype=np.float64)
        self.light = np.asarray(list(background), dtype=np.float64)
        if self.stains.shape != (2, 3) or self.max_conc.shape != (2,) or self.light.shape != (3,):
            raise BaselineError("Macenko stats need a 2x3 stain matrix, 2 max concentrations and 3 background levels")

    @classmethod
    def from_stats(cls, stats: dict[str, Any]) -> Macenko:
        s = _section(stats, "macenko", ("stain_matrix", "max_concentrations", "background"))
        return cls(s["stain_matrix"], s["max_concentrations"], s["background"])

    def normalize_one(self, rgb: np.ndarray) -> np.ndarray:
        """One image [H,W,3] in [0,1]; returned unchanged when it has too few stained pixels."""
        od = _to_od(rgb.reshape(-1, 3), background_light(rgb))
        stains = macenko_stain_matrix(od)
        if stains is None:
            return rgb
        conc = macenko_concentrations(od, stains)
        source_max = np.percentile(conc[np.all(od > _BETA, axis=1)], 99, axis=0)
        if not np.all(source_max > 1e-6):
            return rgb
        # Blood-smear stain vectors are close together (ill-conditioned), so a per-stain ratio
        # far from 1 mostly amplifies noise and background; bound it.
        conc = conc * np.clip(self.max_conc / source_max, 1 / _MAX_RATIO, _MAX_RATIO)
        return _from_od(np.maximum(conc, 0) @ self.stains, self.light).reshape(rgb.shape)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        images = batch_to_numpy(batch)
        return numpy_to_batch(np.stack([self.normalize_one(im) for im in images]), batch)


# Histogram matching was measured and deleted: it lost to the raw image on both labs (see the
# cross-hospital table in docs/accuracy.md).
STANDARDIZERS: dict[str, type[Reinhard | Macenko]] = {
    "reinhard": Reinhard,
    "macenko": Macenko,
}


def build_standardizer(name: str, stats: dict[str, Any]) -> Reinhard | Macenko:
    """The named classical standardizer with reference stats; raises BaselineError on an unknown name."""
    try:
        cls = STANDARDIZERS[name]
    except KeyError:
        raise BaselineError(f"unknown classical standardizer {name!r}; choose one of {sorted(STANDARDIZERS)}") from None
    return cls.from_stats(stats)
