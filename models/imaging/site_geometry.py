"""Per-site magnification from the stained nucleus area in native pixels.

Labs crop single-cell images differently. The reference lab (PBC, CellaVision) saves a fixed
360x363 frame with the cell in the middle; another lab (BCCD) saves a tight box around each cell,
so the crop's own side (131-367 px there) already carries the cell's size: a lymphocyte crop is
small, a monocyte crop large. Resizing every crop to the same frame, or zooming a whole site by one
frame-relative factor, throws that away and makes a lymphocyte as big as a monocyte.

What stays constant within a site is the magnification (pixels per micrometre). This module
estimates it relative to the reference from the median area, in native pixels, of the stained
nucleus nearest the centre (``models.data.cell_mask``), then cuts from every image a window that
spans the same physical width as the reference window:

    k = sqrt(median nucleus area of reference images / median nucleus area of target images)
    target window (native px) = reference window (px) / k

On PBC vs BCCD: k = 0.89; lymphocytes come out small and monocytes large, as under the microscope.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable

from PIL import Image

from stainbridge.models.imaging import data

__all__ = ["GeometryEstimateError", "crop_window", "nucleus_area", "site_magnification"]


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
