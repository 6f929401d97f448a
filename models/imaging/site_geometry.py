"""Per-site magnification (the site profile's geometry) from red-cell diameters in native pixels.

Labs crop single-cell images differently. The reference lab (PBC, CellaVision) saves a fixed
360x363 frame with the cell in the middle; another lab (BCCD) saves a tight box around each cell,
so the crop's own side (131-367 px there) already carries the cell's size: a lymphocyte crop is
small, a monocyte crop large. Resizing every crop to the same frame, or zooming a whole site by one
frame-relative factor, throws that away and makes a lymphocyte as big as a monocyte.

What stays constant within a site is the magnification (pixels per micrometre). Every smear
carries a ruler that does not depend on how a lab crops: red cells are about 7.5 um across in every
lab. :func:`estimate_site_profile` measures the red cells of the site's unlabeled images
(``models.imaging.red_cells``) and compares their diameter with the reference's:

    k = reference red-cell diameter (px) / target red-cell diameter (native px)
    target window (native px) = reference window (px) / k

With fewer than ``red_cells.MIN_CELLS`` measurable red cells it falls back to the stained nucleus
area (k = sqrt(reference area / target area)), which depends on the lab's crop and the class mix
(it said k = 0.92 on LISC, whose 224 px thumbnails are resized crops; red cells say 1.6, the
label-peeking oracle ~1.7), and the profile records which method was used.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from stainbridge.models.imaging import data, red_cells

__all__ = ["GeometryEstimateError", "crop_window", "estimate_site_profile", "evenly", "nucleus_area", "reference_geometry",
           "site_magnification"]

RED_CELL_METHOD, NUCLEUS_METHOD = "red_cell_diameter", "nucleus_area"


class GeometryEstimateError(ValueError):
    """No stained cell was found in enough images to estimate a magnification."""


def nucleus_area(img: Image.Image) -> float:
    """Area in native pixels of the stained cell nucleus nearest the centre (0.0 if none found)."""
    mask = data.cell_mask(img)
    if not mask.any():
        return 0.0
    w, h = img.size
    return float(mask.sum()) * (w / mask.shape[1]) * (h / mask.shape[0])


def median_nucleus_area(images: Iterable[Image.Image]) -> float:
    """Median nucleus area over the images where a nucleus was found."""
    areas = [a for a in (nucleus_area(im) for im in images) if a > 0]
    if not areas:
        raise GeometryEstimateError("no stained nucleus found in any image; set the magnification by hand")
    return float(statistics.median(areas))


def site_magnification(reference_area: float, target_area: float) -> float:
    """Factor k that converts target native pixels into reference pixels (same physical size)."""
    if not (reference_area > 0 and target_area > 0):
        raise GeometryEstimateError(f"nucleus areas must be positive, got {reference_area} and {target_area}")
    return math.sqrt(reference_area / target_area)


def crop_window(img: Image.Image, *, window_px: float, out_size: int) -> Image.Image:
    """The centred square window of ``window_px`` native pixels resized to ``out_size``; a window
    larger than the image is padded with the image's median border colour."""
    if window_px <= 0:
        raise GeometryEstimateError(f"window_px must be positive, got {window_px}")
    side = min(img.size)
    return data.normalize_geometry(img, scale=side / window_px, out_size=out_size)


ImageSource = Image.Image | str | Path


def _images(items: Iterable[ImageSource]) -> Iterable[Image.Image]:
    for item in items:
        yield item if isinstance(item, Image.Image) else data.load_rgb(item)


def red_cell_diameter(images: Iterable[ImageSource]) -> red_cells.SiteDiameter | None:
    """The site's red-cell diameter in native pixels (None when too few red cells were measured)."""
    return red_cells.site_diameter([red_cells.red_cells(im) for im in _images(images)])


def reference_geometry(images: Sequence[ImageSource]) -> dict[str, Any]:
    """What a classifier's header records about its reference lab's scale: the red-cell diameter and
    the median nucleus area, both in the reference images' pixels (each None if not measurable)."""
    ruler = red_cell_diameter(images)
    try:
        area: float | None = median_nucleus_area(_images(images))
    except GeometryEstimateError:
        area = None
    return {"reference_red_cell_diameter_px": ruler.diameter_px if ruler else None,
            "reference_red_cells": ruler.cells if ruler else 0, "reference_nucleus_area_px": area}


def estimate_site_profile(images: Sequence[ImageSource], reference: dict[str, Any]) -> dict[str, Any]:
    """The site profile's geometry, without labels: magnification k (target px -> reference px) from
    red-cell diameters, or from nucleus areas when either side has too few red cells (``method``
    says which, ``fallback_reason`` why). ``reference``: a classifier header's geometry block (or
    :func:`reference_geometry`). Raises GeometryEstimateError when neither cue can be measured."""
    ref_d = reference.get("reference_red_cell_diameter_px")
    ruler = red_cell_diameter(images) if ref_d else None
    if ruler is not None:
        k = float(ref_d) / ruler.diameter_px
        return {"magnification": k, "method": RED_CELL_METHOD, "red_cell_diameter_px": ruler.diameter_px,
                "red_cell_diameter_interval_px": [ruler.low_px, ruler.high_px],
                "magnification_interval": [float(ref_d) / ruler.high_px, float(ref_d) / ruler.low_px],
                "red_cells": ruler.cells, "red_cells_measured": ruler.measured, "red_cells_whole": ruler.whole,
                "red_cells_cut": ruler.cut, "images": ruler.images, "reference_red_cell_diameter_px": float(ref_d)}
    why = ("the reference has no red-cell diameter" if not ref_d
           else f"fewer than {red_cells.MIN_CELLS} measurable red cells in {len(images)} images")
    ref_area = reference.get("reference_nucleus_area_px")
    if not ref_area:
        raise GeometryEstimateError(f"{why}, and the reference has no nucleus area either; "
                                    "set the magnification by hand ([site] scale or --magnification)")
    area = median_nucleus_area(_images(images))
    return {"magnification": site_magnification(float(ref_area), area), "method": NUCLEUS_METHOD,
            "fallback_reason": why, "nucleus_area_px": area, "reference_nucleus_area_px": float(ref_area),
            "images": len(images)}


SOURCE_SAMPLE = 2000  # incoming images measured when a standardizer is trained (evenly spaced)
REFERENCE_SAMPLE = 300  # reference images measured when no classifier header gives the reference scale


def evenly(items: Sequence[ImageSource], n: int) -> list[ImageSource]:
    """At most ``n`` of ``items``, evenly spaced from the first to the last (a sample that covers the whole
    folder, whose files are often sorted by class or by date)."""
    if len(items) <= n:
        return list(items)
    if n <= 1:
        return list(items[:n])
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


def training_site_profile(source: Sequence[ImageSource], reference: Sequence[ImageSource], *,
                          classifier_geometry: dict[str, Any] | None = None) -> dict[str, Any]:
    """The site profile a standardizer checkpoint carries, estimated without labels when it is trained:
    the reference scale from the classifier's geometry header when it records one (what the service
    pairs the standardizer with), else measured on a sample of ``reference``; the site's from a
    sample of ``source``. ``reference_window_px`` is the classifier's, else the reference frame side.
    Raises GeometryEstimateError when neither red cells nor nuclei can be measured."""
    geo = dict(classifier_geometry or {})
    if geo.get("reference_red_cell_diameter_px") or geo.get("reference_nucleus_area_px"):
        ref = geo
    else:
        sample = [data.load_rgb(p) if not isinstance(p, Image.Image) else p for p in evenly(reference, REFERENCE_SAMPLE)]
        ref = {**reference_geometry(sample), "reference_window_px": float(statistics.median(min(im.size) for im in sample))}
    profile = estimate_site_profile(evenly(source, SOURCE_SAMPLE), ref)
    window = geo.get("reference_window_px") or ref.get("reference_window_px")
    profile["reference_window_px"] = float(window) if window else None
    profile["source_images"] = len(source)
    return profile
