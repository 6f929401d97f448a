"""The in-process modes of `bench throughput`, and the images they share with the service mode.

- ``make_images``: cells drawn by ``models.imaging.synthetic`` at the reference lab's frame size
  (360x363), alternately JPEG and PNG, each file different (no duplicate hashes for the service).
- ``naive``: how the thesis notebooks ran inference: one file at a time, PIL decode, float32,
  the standardizer and then the classifier called on a batch of one.
- ``pipeline``: the one inference path in-process, batched: PIL decode of a batch, then
  ``inference.run_batch`` (geometry, standardizer, classifier, softmax, results).
- ``stage_times``: the same batches once more with each stage timed on its own: hash (sha256
  over the file bytes, as the service's intake does), decode, geometry, standardizer, classifier.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from stainbridge.models import inference
from stainbridge.models.imaging.synthetic import CLASSES, image_rng, render_cell

FRAME = (360, 363)  # width x height of the reference lab's cell images (PBC)


def make_images(folder: Path, n: int, *, seed: int = 0, protocol: str = "incoming") -> list[Path]:
    """``n`` distinct synthetic cell images of 360x363 px, even ones JPEG (quality 92), odd ones PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    width, height = FRAME
    paths = []
    for i in range(n):
        label = CLASSES[i % len(CLASSES)]
        img = render_cell(label, protocol=protocol, size=height, rng=image_rng(seed, protocol, label, i))
        img = img.crop(((height - width) // 2, 0, (height - width) // 2 + width, height))
        if i % 2 == 0:
            path = folder / f"cell-{i:05d}.jpg"
            img.save(path, format="JPEG", quality=92)
        else:
            path = folder / f"cell-{i:05d}.png"
            img.save(path, format="PNG")
        paths.append(path)
    return paths


def decode(path: Path) -> Image.Image:
    """PIL decode to RGB (what the service's intake does for PNG/JPEG, without its guards)."""
    with Image.open(path) as img:
        return img.convert("RGB")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batches(paths: list[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(paths), size):
        yield paths[start:start + size]


def naive(paths: list[Path], standardizer: inference.Standardizer, classifier: inference.Classifier) -> tuple[int, float]:
    """One image at a time, float32: (images classified, seconds)."""
    geometry = inference.resolve_geometry(classifier, standardizer)
    device = classifier.device

    def one(path: Path) -> str:
        x = inference.prepare_batch([decode(path)], geometry)
        scores, _ = inference.classify_batch(x, standardizer, classifier)
        return classifier.classes[int(scores.probabilities[0].argmax())]

    with inference.full_precision():
        one(paths[0])  # warm-up: allocator, lazy initialisation
        _sync(device)
        start = time.perf_counter()
        done = sum(1 for path in paths if one(path))
        _sync(device)
        return done, time.perf_counter() - start


def pipeline(paths: list[Path], standardizer: inference.Standardizer, classifier: inference.Classifier, *,
             batch_size: int, tta: bool = False) -> tuple[int, float]:
    """Batched: decode a batch, then ``inference.run_batch`` (``tta``: the 8-view mean, as ``[models] tta``):
    (images classified, seconds)."""
    device = classifier.device
    inference.run_batch([decode(p) for p in paths[:batch_size]], standardizer, classifier, tta=tta)  # warm-up
    _sync(device)
    start = time.perf_counter()
    done = 0
    for chunk in _batches(paths, batch_size):
        done += len(inference.run_batch([decode(p) for p in chunk], standardizer, classifier, tta=tta))
    _sync(device)
    return done, time.perf_counter() - start


def stage_times(paths: list[Path], standardizer: inference.Standardizer, classifier: inference.Classifier, *,
                batch_size: int) -> dict[str, float]:
    """Seconds spent per stage over all ``paths``, each stage timed on its own, batched."""
    device = classifier.device
    geometry = inference.resolve_geometry(classifier, standardizer)
    totals = dict.fromkeys(("hash", "decode", "geometry", "standardizer", "classifier"), 0.0)

    def timed(stage: str, fn: Callable[..., Any], *args: Any) -> Any:
        start = time.perf_counter()
        out = fn(*args)
        _sync(device)
        totals[stage] += time.perf_counter() - start
        return out

    for chunk in _batches(paths, batch_size):
        timed("hash", lambda files: [hashlib.sha256(p.read_bytes()).hexdigest() for p in files], chunk)
        images = timed("decode", lambda files: [decode(p) for p in files], chunk)
        batch = timed("geometry", lambda pictures: inference.prepare_batch(pictures, geometry).to(device), images)
        standardized = timed("standardizer", standardizer, batch)
        timed("classifier", inference.predict_views, classifier, standardized)
    return totals

