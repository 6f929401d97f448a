"""Image folders, deterministic splits and geometry normalization (the transforms: ``transforms``).

A labeled folder has one sub-folder per class (``lymphocyte/``, ...). A split manifest
records relative paths, so a manifest written on one machine reads on another.
Geometry: labs frame cells differently (PBC cells fill about a quarter of the frame,
BCCD crops are tight); :func:`normalize_geometry` rescales an image so that the
stained white cell covers the same fraction of the frame as at the reference lab.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
SPLITS = ("train", "val", "test")
MANIFEST_VERSION = 1
_ANALYSIS_SIZE = 96  # cell-fraction estimation runs on a downsampled copy of this side


class DataError(Exception):
    """A data folder, manifest or split request cannot be used as given."""


class GeometryError(DataError):
    """A geometry normalization request is inconsistent (bad scale, missing reference)."""


# ---------------------------------------------------------------------------- folders


def is_image_path(path: Path) -> bool:
    """True for a regular, non-hidden file whose suffix is in IMAGE_SUFFIXES (any case)."""
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES


def _require_dir(root: str | Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; pass a folder with one sub-folder of images per class")
    return root


def list_labeled(root: str | Path) -> list[tuple[Path, str]]:
    """(path, class) for every image in root/<class>/, sorted by class then file name."""
    root = _require_dir(root)
    items: list[tuple[Path, str]] = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted((p for p in class_dir.iterdir() if is_image_path(p)), key=lambda p: p.name)
        items.extend((p, class_dir.name) for p in files)
    if not items:
        raise DataError(
            f"no images found in class sub-folders of {root}; expected {root}/<class>/<image>"
            f" with suffixes {sorted(IMAGE_SUFFIXES)}"
        )
    return items


def list_unlabeled(root: str | Path) -> list[Path]:
    """Every image below root (recursive), sorted by relative path."""
    root = _require_dir(root)
    paths = sorted((p for p in root.rglob("*") if is_image_path(p)), key=lambda p: p.relative_to(root).as_posix())
    if not paths:
        raise DataError(f"no images found below {root}; expected files with suffixes {sorted(IMAGE_SUFFIXES)}")
    return paths


def classes_of(items: Sequence[tuple[Path, str]]) -> list[str]:
    """The sorted distinct class names of labeled items."""
    return sorted({label for _, label in items})


# ---------------------------------------------------------------------------- splits

# Crops cut from one slide share cells (the same cell photographed again as the slide is swept), so a
# split that puts one slide's crops on both sides scores a cell on its own twin. Files named
# `slide-<token>_<frame>_<box>.<ext>` (../shared/data/chula) carry their slide; any other file is its
# own group.
_SLIDE_NAME = re.compile(r"^slide-([^_]+)_")


def slide_of(path: str | Path) -> str:
    """The group a cell image belongs to for splitting: its slide token, else its own file stem."""
    name = Path(path).name
    match = _SLIDE_NAME.match(name)
    return f"slide-{match.group(1)}" if match else Path(name).stem



def _class_rng(seed: int, label: str) -> random.Random:
    digest = hashlib.sha256(f"{seed}:{label}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def make_split(root: str | Path, *, val: float = 0.1, test: float = 0.2, seed: int = 0) -> dict[str, Any]:
    """A stratified train/val/test manifest; the same files and seed give the same split."""
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise DataError(f"val={val} and test={test} must be fractions in [0, 1) summing to less than 1")
    root = _require_dir(root)
    items = list_labeled(root)
    classes = classes_of(items)
    split: dict[str, list[str]] = {name: [] for name in SPLITS}
    counts: dict[str, dict[str, int]] = {name: {} for name in SPLITS}
    for label in classes:
        rel = sorted(p.relative_to(root).as_posix() for p, lab in items if lab == label)
        _class_rng(seed, label).shuffle(rel)
        n = len(rel)
        n_test = min(round(n * test), n - 1) if n > 1 else 0
        n_val = min(round(n * val), n - 1 - n_test) if n > 1 else 0
        parts = {"test": rel[:n_test], "val": rel[n_test : n_test + n_val], "train": rel[n_test + n_val :]}
        for name in SPLITS:
            split[name].extend(sorted(parts[name]))
            counts[name][label] = len(parts[name])
    return {
        "version": MANIFEST_VERSION,
        "root": str(root.resolve()),
        "seed": seed,
        "fractions": {"val": val, "test": test},
        "classes": classes,
        "counts": counts,
        **split,
    }


def write_manifest(manifest: dict[str, Any], path: str | Path) -> str:
    """Write the manifest as stable JSON; return the sha256 hex of the written file."""
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Read and check a manifest written by write_manifest."""
    path = Path(path)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read split manifest {path}: {exc}; write one with make_split/write_manifest") from exc
    missing = [k for k in ("root", "classes", *SPLITS) if k not in manifest]
    if missing:
        raise DataError(f"split manifest {path} lacks keys {missing}; regenerate it with make_split")
    return manifest


def manifest_items(manifest: dict[str, Any], split: str, *, root: str | Path | None = None) -> list[tuple[Path, str]]:
    """(absolute path, class) for one split; root overrides the manifest's root folder."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {SPLITS}")
    base = Path(root) if root is not None else Path(manifest["root"])
    return [(base / rel, rel.split("/", 1)[0]) for rel in manifest[split]]


# ---------------------------------------------------------------------------- datasets


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image file as RGB (decoded fully, file closed)."""
    with Image.open(path) as im:
        return im.convert("RGB")


class LabeledImages(Dataset):
    """(tensor, class index) pairs from (path, class name) items."""

    def __init__(self, items: Sequence[tuple[Path, str]], classes: Sequence[str], transform: Callable) -> None:
        self.items = list(items)
        self.classes = list(classes)
        self.index = {name: i for i, name in enumerate(self.classes)}
        unknown = sorted({label for _, label in self.items} - set(self.index))
        if unknown:
            raise DataError(f"classes {unknown} are not in the class list {self.classes}")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[i]
        return self.transform(load_rgb(path)), self.index[label]

    def targets(self) -> list[int]:
        """Class indices of all items, in order (for samplers and class weights)."""
        return [self.index[label] for _, label in self.items]


class UnlabeledImages(Dataset):
    """Image tensors from a list of paths."""

    def __init__(self, paths: Sequence[Path], transform: Callable) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(load_rgb(self.paths[i]))


# ---------------------------------------------------------------------------- geometry


def otsu_threshold(values: np.ndarray, bins: int = 128) -> float:
    """The threshold that best splits ``values`` into two classes (Otsu 1979)."""
    hist, edges = np.histogram(values, bins=bins)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centers[int(np.argmax(between))])


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(radius):
        padded = np.pad(out, 1)
        out = padded[1:-1, 1:-1] | padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
    return out


def _label_components(mask: np.ndarray) -> np.ndarray:
    """4-connected component labels (0 = background) by vectorised max propagation."""
    h, w = mask.shape
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), 0)
    for _ in range(4 * (h + w)):
        p = np.pad(labels, 1)
        spread = np.maximum.reduce([p[1:-1, 1:-1], p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]])
        spread = np.where(mask, spread, 0)
        if np.array_equal(spread, labels):
            break
        labels = spread
    return labels


def stain_score(rgb: np.ndarray) -> np.ndarray:
    """Per-pixel optical density in the red channel: high on purple/blue nuclei and granules.

    Romanowsky stains colour nuclei with azure/methylene blue, which absorbs red light;
    red cells (eosin) and plasma pass red light in every lab's stain, so they score low.
    """
    r = rgb[..., 0].astype(np.float32) / 255.0
    return -np.log(np.clip(r, 1 / 255, 1.0))


def cell_mask(img: Image.Image) -> np.ndarray:
    """Boolean mask (at analysis resolution) of the stained white cell nearest the centre."""
    small = img.convert("RGB")
    small.thumbnail((_ANALYSIS_SIZE, _ANALYSIS_SIZE), Image.Resampling.BILINEAR)
    score = stain_score(np.asarray(small))
    lo, hi = np.percentile(score, [5, 99.5])
    if hi - lo < 0.15:  # flat image: nothing stained stands out
        return np.zeros(score.shape, dtype=bool)
    threshold = max(otsu_threshold(score), lo + 0.35 * (hi - lo))
    mask = _dilate(score > threshold, 2)  # join nuclear lobes and granules into one object
    labels = _label_components(mask)
    ids, areas = np.unique(labels[labels > 0], return_counts=True)
    if ids.size == 0:
        return np.zeros(score.shape, dtype=bool)
    h, w = score.shape
    yy, xx = np.mgrid[0:h, 0:w]
    best, best_score = 0, -1.0
    for comp, area in zip(ids, areas):
        sel = labels == comp
        cy, cx = yy[sel].mean() / h - 0.5, xx[sel].mean() / w - 0.5
        weight = math.exp(-((cy**2 + cx**2) / (2 * 0.2**2)))  # prefer objects near the centre
        if area * weight > best_score:
            best, best_score = comp, area * weight
    return labels == best


def estimate_cell_fraction(img: Image.Image) -> float:
    """Fraction of the frame covered by the bounding box of the stained white cell's nucleus and
    dark granules (0.0 if none found). PBC frames give about 0.12, tight BCCD crops about 0.5."""
    mask = cell_mask(img)
    if not mask.any():
        return 0.0
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    box = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
    return float(box / mask.size)


def auto_scale(img: Image.Image, reference_cell_fraction: float, *, limits: tuple[float, float] = (0.33, 3.0)) -> float:
    """Zoom factor that makes img's estimated cell fraction match the reference (1.0 if no cell found)."""
    fraction = estimate_cell_fraction(img)
    if fraction <= 0:
        return 1.0
    return float(np.clip(math.sqrt(reference_cell_fraction / fraction), *limits))


def site_scale(images: Sequence[Image.Image], reference_cell_fraction: float) -> float:
    """One zoom factor for a whole site: sqrt(reference / median cell fraction of its images).

    A per-site factor keeps the size differences between classes (small lymphocytes, large
    monocytes) that a per-image "auto" factor would erase; use it as settings.site.scale.
    """
    fractions = [f for f in (estimate_cell_fraction(im) for im in images) if f > 0]
    if not fractions:
        raise GeometryError("no stained cell found in any image; set the site scale by hand")
    return float(math.sqrt(reference_cell_fraction / float(np.median(fractions))))


def _border_colour(rgb: np.ndarray) -> tuple[int, int, int]:
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    return tuple(int(v) for v in np.median(border, axis=0))


def normalize_geometry(
    img: Image.Image,
    *,
    scale: float | str = 1.0,
    out_size: int,
    reference_cell_fraction: float | None = None,
) -> Image.Image:
    """Square RGB image of out_size px, zoomed by scale (>1 magnifies) about the centre.

    scale="auto" zooms so the estimated cell fraction matches reference_cell_fraction.
    Zooming in centre-crops; zooming out pads with the median border colour.
    """
    img = img.convert("RGB")
    if isinstance(scale, str):
        if scale.strip().lower() == "auto":
            if reference_cell_fraction is None or not reference_cell_fraction > 0:
                raise GeometryError(
                    "scale='auto' needs reference_cell_fraction > 0 (from the classifier's geometry header);"
                    " pass a numeric scale instead"
                )
            factor = auto_scale(img, reference_cell_fraction)
        else:
            try:
                factor = float(scale)
            except ValueError as exc:
                raise GeometryError(f"scale must be 'auto' or a number, got {scale!r}") from exc
    else:
        factor = float(scale)
    if not (math.isfinite(factor) and factor > 0):
        raise GeometryError(f"scale must be a positive number, got {scale!r}")
    if out_size < 1:
        raise GeometryError(f"out_size must be a positive number of pixels, got {out_size}")
    w, h = img.size
    side = min(w, h)
    if factor >= 1:
        crop = max(1, round(side / factor))
        left, top = (w - crop) // 2, (h - crop) // 2
        return img.resize((out_size, out_size), Image.Resampling.BILINEAR, box=(left, top, left + crop, top + crop))
    left, top = (w - side) // 2, (h - side) // 2
    square = img.crop((left, top, left + side, top + side))
    inner = max(1, round(out_size * factor))
    canvas = Image.new("RGB", (out_size, out_size), _border_colour(np.asarray(square)))
    offset = (out_size - inner) // 2
    canvas.paste(square.resize((inner, inner), Image.Resampling.BILINEAR), (offset, offset))
    return canvas
