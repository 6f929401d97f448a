"""Data for the cross-hospital accuracy benchmark: decoded once, geometry-normalized, in memory.

Reference (the lab the classifier is trained in): a labeled folder, split train/val/test with
``models.imaging.data.make_split`` (stratified, seeded). Target (the other lab): a labeled folder whose
labels are used for scoring only; the standardizers see its images without labels.

Geometry (``models.imaging.site_geometry``): every reference image is cut to the centred window of
``window_fraction`` of its frame; every target image to the window of the same physical width,
using the site magnification estimated without labels from red-cell diameters in native pixels
(``site_geometry.estimate_site_profile``; nucleus areas only when too few red cells are found). Both are then resized
to ``size`` px. The classifier's training images keep ``cover`` times that window so that random
zoom and rotation can be applied without running out of image.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from stainbridge.models import inference
from stainbridge.models.imaging import data, site_geometry

__all__ = ["BenchData", "BenchDataError", "center_window", "prepare", "to_float", "to_uint8"]

GEOMETRY_SAMPLE = 300  # reference images used to measure the reference red cells and nucleus area
STAIN_SAMPLE = 256  # reference windows used to fit the classical standardizers' statistics


class BenchDataError(ValueError):
    """The folders cannot be benchmarked (no images, target classes unknown to the reference...)."""


@dataclass
class BenchData:
    classes: list[str]
    size: int
    cover: float
    train_base: Tensor  # uint8 [N,3,B,B], B = round(size * cover)
    train_labels: Tensor
    train: Tensor  # uint8 [N,3,size,size], the centred window of train_base
    val: Tensor  # uint8 [N,3,size,size]
    val_labels: Tensor
    test: Tensor
    test_labels: Tensor
    target: Tensor  # uint8 [M,3,size,size], geometry-normalized target images
    target_labels: Tensor  # scoring only
    target_paths: list[str]
    target_groups: list[str]  # data.slide_of: crops of one slide stay on one side of an inductive split
    manifest: dict[str, Any]
    geometry: dict[str, Any] = field(default_factory=dict)
    stain_images: list[Image.Image] = field(default_factory=list)  # reference windows for stain statistics

    @property
    def site_profile(self) -> dict[str, Any]:
        """What a standardizer trained on this target carries for the service: its magnification, how it
        was estimated (``site_geometry.estimate_site_profile``) or "manual", and the reference window."""
        profile = dict(self.geometry.get("profile") or {"method": "manual"})
        profile.update(magnification=float(self.geometry["magnification"]),
                       reference_window_px=float(self.geometry["reference_window_px"]))
        return profile


def to_uint8(img: Image.Image) -> Tensor:
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)


def to_float(x: Tensor) -> Tensor:
    return x.float() / 255.0


def center_window(base: Tensor, cover: float, size: int) -> Tensor:
    """The centred 1/cover of uint8 images [N,3,B,B], resized to size px."""
    b = base.shape[-1]
    w = round(b / cover)
    o = (b - w) // 2
    x = base[..., o:o + w, o:o + w]
    if w != size:
        x = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        x = x.round().clamp(0, 255).to(torch.uint8)
    return x.contiguous()


def _side(path: Path) -> int:
    with Image.open(path) as im:
        return min(im.size)


def prepare(reference: str | Path, target: str | Path, *, size: int, window_fraction: float = 0.6,
            cover: float = 1.3, seed: int = 0, magnification: float | None = None,
            log: Any = print) -> BenchData:
    """Decode, split and geometry-normalize both folders (``magnification``: target px -> reference
    px; estimated without labels from red-cell diameters when None, see ``site_geometry``)."""
    ref_root, tgt_root = Path(reference), Path(target)
    manifest = data.make_split(ref_root, seed=seed)
    classes = list(manifest["classes"])
    if not manifest["train"]:
        raise BenchDataError(f"no training images under {ref_root}: expected one sub-folder per class")
    target_items = data.list_labeled(tgt_root)
    if not target_items:
        raise BenchDataError(f"no images under {tgt_root}: expected one sub-folder per class")
    unknown = sorted({label for _, label in target_items} - set(classes))
    if unknown:
        raise BenchDataError(f"target classes {unknown} are not reference classes {classes}; rename or drop those folders")

    ref_sides = [_side(ref_root / rel) for rel in manifest["train"][:: max(1, len(manifest["train"]) // 50)]]
    ref_side = float(statistics.median(ref_sides))
    window_px = window_fraction * ref_side
    geometry: dict[str, Any] = {"window_fraction": window_fraction, "reference_side_px": ref_side,
                                "reference_window_px": window_px}
    step = max(1, len(manifest["train"]) // GEOMETRY_SAMPLE)
    geometry.update(site_geometry.reference_geometry([ref_root / rel for rel in manifest["train"][::step]]))
    if magnification is None:
        profile = site_geometry.estimate_site_profile([p for p, _ in target_items], geometry)
        magnification = profile["magnification"]
        geometry.update(estimated=True, method=profile["method"], profile=profile)
        log(f"site profile ({profile['method']}): " + json.dumps({k: v for k, v in profile.items() if k != "magnification"}))
    else:
        geometry["estimated"] = False
    geometry["magnification"] = magnification
    geometry["target_window_px"] = window_px / magnification
    log(f"geometry: reference window {window_px:.0f} px, target window {window_px / magnification:.0f} native px "
        f"(magnification {magnification:.3f})")

    def stack(paths: list[Path], w_px: float, out: int) -> Tensor:
        if not paths:
            return torch.zeros(0, 3, out, out, dtype=torch.uint8)
        return torch.stack([to_uint8(site_geometry.crop_window(data.load_rgb(p), window_px=w_px, out_size=out))
                            for p in paths])

    index = {c: i for i, c in enumerate(classes)}

    def paths(split: str) -> list[Path]:
        return [ref_root / rel for rel in manifest[split]]

    def labels(split: str) -> Tensor:
        return torch.tensor([index[Path(rel).parts[0]] for rel in manifest[split]], dtype=torch.long)

    target_geometry = inference.Geometry(size, window_px=window_px / magnification, magnification=magnification)
    base = stack(paths("train"), window_px * cover, round(size * cover))
    step = max(1, len(manifest["train"]) // STAIN_SAMPLE)
    stain_images = [site_geometry.crop_window(data.load_rgb(p), window_px=window_px, out_size=size)
                    for p in paths("train")[::step]]
    return BenchData(
        classes=classes, size=size, cover=cover,
        train_base=base, train_labels=labels("train"), train=center_window(base, cover, size),
        val=stack(paths("val"), window_px, size), val_labels=labels("val"),
        test=stack(paths("test"), window_px, size), test_labels=labels("test"),
        # the target through the service's own geometry (models.inference), windowed by the site magnification
        target=torch.stack([to_uint8(target_geometry.apply(data.load_rgb(p))) for p, _ in target_items]),
        target_labels=torch.tensor([index[label] for _, label in target_items], dtype=torch.long),
        target_paths=[str(p) for p, _ in target_items],
        target_groups=[data.slide_of(p) for p, _ in target_items],
        manifest=manifest, geometry=geometry, stain_images=stain_images,
    )
