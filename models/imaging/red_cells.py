"""Red-cell diameters in an image's own pixels: the physical ruler every blood smear carries.

Red cells are about 7.5 um across in every lab, so the median red-cell diameter of a site, in the
site's native pixels, fixes its magnification whatever the lab does with its crops (tight boxes in
BCCD, fixed 224 px thumbnails in LISC). The white cell's own size is what the classifier must read,
so it is never used as the ruler.

Per image, at a working size of ``WORKING_SIDE`` px:

1. optical density of the green channel (where the eosin of red cells absorbs most) against the
   image's own background, the brightest mode of the green histogram;
2. the white cell's nucleus (blue-purple dark pixels: high red-channel density) is found and dilated,
   and Otsu's threshold on the remaining pixels' green density separates cells from plasma;
3. holes are filled (red cells have pale centres), blobs touching the nucleus (the white cell's
   cytoplasm) are dropped;
4. whole cells pass an ellipse test (area / moment-ellipse area >= 0.93, aspect <= 1.35, at least
   ``MIN_DIAMETER`` px across), which rejects clumps and fragments; cells cut by the frame are
   measured by a circle fitted to their rim (>= 90 degrees of arc, IoU of blob and circle >= 0.88).

Per site (:func:`site_diameter`): the median of the diameters within +-25 % of their mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from stainbridge.models.imaging import data

__all__ = ["MIN_CELLS", "RedCell", "SiteDiameter", "red_cells", "site_diameter"]

WORKING_SIDE = 160  # px: the longer side images are analysed at
MIN_DIAMETER = 8.0  # px at the working size
MIN_CELLS = 20  # fewer measured cells per site and the estimate is not trusted
ELLIPSE_FILL, MAX_ASPECT = 0.93, 1.35
MIN_ARC_DEG, MIN_CIRCLE_IOU = 90.0, 0.88
MODE_BAND = 0.25
MODE_BANDWIDTH = 0.1  # log units


@dataclass(frozen=True)
class RedCell:
    diameter_px: float  # in the image's native pixels
    whole: bool  # False: cut by the frame, measured by a circle fit on its rim


@dataclass(frozen=True)
class SiteDiameter:
    diameter_px: float  # median within +-25 % of the mode, native pixels
    cells: int  # cells in that band
    measured: int  # all cells measured
    whole: int
    cut: int
    images: int
    low_px: float  # bootstrap 95 % interval of diameter_px
    high_px: float


def _bright_mode(values: np.ndarray) -> float:
    """The peak of the histogram of the brightest quarter of ``values`` (0-255): the plasma
    (crowded smears are mostly red cells, so the plain mode would be a red cell's colour)."""
    upper = values[values >= np.percentile(values, 75)]
    hist, edges = np.histogram(upper, bins=64, range=(0.0, 256.0))
    hist = np.convolve(hist, [1, 2, 1], mode="same")
    i = int(np.argmax(hist))
    return float((edges[i] + edges[i + 1]) / 2)


def _density(channel: np.ndarray, background: float) -> np.ndarray:
    return -np.log(np.clip(channel / max(background, 1.0), 1e-3, None))


def _ellipse_diameter(blob: np.ndarray) -> float | None:
    """Equivalent diameter of a whole blob that passes the ellipse test, else None."""
    ys, xs = np.nonzero(blob)
    area = float(xs.size)
    cov = np.cov(np.stack([xs, ys]).astype(np.float64)) + np.eye(2) / 12.0  # pixel-area correction
    lo, hi = np.linalg.eigvalsh(cov)
    if lo <= 0:
        return None
    fill = area / (4.0 * math.pi * math.sqrt(lo * hi))
    if fill < ELLIPSE_FILL or math.sqrt(hi / lo) > MAX_ASPECT:
        return None
    diameter = 2.0 * math.sqrt(area / math.pi)
    return diameter if 4.0 * math.sqrt(lo) >= MIN_DIAMETER else None


def _circle_diameter(blob: np.ndarray) -> float | None:
    """Diameter of a blob cut by the frame, from a circle fitted to its inner rim, else None."""
    h, w = blob.shape
    rim = blob & ~ndimage.binary_erosion(blob)
    rim[0, :] = rim[-1, :] = rim[:, 0] = rim[:, -1] = False
    ys, xs = np.nonzero(rim)
    if xs.size < 12:
        return None
    x, y = xs.astype(np.float64), ys.astype(np.float64)
    a = np.stack([x, y, np.ones_like(x)], axis=1)
    (d, e, f), *_ = np.linalg.lstsq(a, -(x * x + y * y), rcond=None)  # x^2+y^2+Dx+Ey+F=0 (Kasa fit)
    cx, cy = -d / 2.0, -e / 2.0
    r2 = cx * cx + cy * cy - f
    if r2 <= 0:
        return None
    r = math.sqrt(r2)
    if 2 * r < MIN_DIAMETER or 2 * r > 1.5 * max(h, w):
        return None
    angles = np.degrees(np.arctan2(y - cy, x - cx)) % 360.0
    arc = 10.0 * np.unique((angles // 10).astype(int)).size
    if arc < MIN_ARC_DEG:
        return None
    yy, xx = np.mgrid[0:h, 0:w]
    circle = (xx - cx) ** 2 + (yy - cy) ** 2 <= r2
    iou = float((circle & blob).sum()) / float((circle | blob).sum())
    return 2.0 * r if iou >= MIN_CIRCLE_IOU else None


def red_cells(img: Image.Image) -> list[RedCell]:
    """The red cells measurable in one image, diameters in its native pixels."""
    rgb_img = img.convert("RGB")
    native = max(rgb_img.size)
    small = rgb_img.copy()
    small.thumbnail((WORKING_SIDE, WORKING_SIDE), Image.Resampling.BILINEAR)
    to_native = native / max(small.size)
    rgb = np.asarray(small, dtype=np.float32)
    if min(rgb.shape[:2]) < 2 * MIN_DIAMETER:
        return []
    od_red, od_green, od_blue = (_density(rgb[..., i], _bright_mode(rgb[..., i])) for i in range(3))
    # the nucleus: blue-purple, i.e. it absorbs red light far more than blue (red cells: the reverse)
    purple = od_red - od_blue
    nucleus = purple > max(data.otsu_threshold(purple.ravel()), 0.15)
    nucleus = ndimage.binary_opening(nucleus, iterations=1)
    near_nucleus = ndimage.binary_dilation(nucleus, iterations=3)
    away = od_green[~near_nucleus]
    if away.size < 100 or float(np.ptp(away)) < 0.1:
        return []
    threshold = max(data.otsu_threshold(away), 0.04)
    cells = ndimage.binary_fill_holes((od_green > threshold) & ~near_nucleus)
    cells = ndimage.binary_opening(cells, iterations=1)
    labels, n = ndimage.label(cells)
    if n == 0:
        return []
    touching = set(np.unique(labels[ndimage.binary_dilation(near_nucleus, iterations=2)]).tolist()) - {0}
    out = []
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None or index in touching:
            continue
        ys, xs = box
        # the blob in a frame-sized window around it, so frame contact stays visible
        pad_box = (slice(max(ys.start - 1, 0), ys.stop + 1), slice(max(xs.start - 1, 0), xs.stop + 1))
        blob = labels[pad_box] == index
        on_frame = ys.start == 0 or xs.start == 0 or ys.stop == cells.shape[0] or xs.stop == cells.shape[1]
        if on_frame:
            d = _circle_diameter(labels == index)
        else:
            d = _ellipse_diameter(blob)
        if d is not None:
            out.append(RedCell(d * to_native, whole=not on_frame))
    return out


def _mode_median(diameters: np.ndarray) -> tuple[float, int]:
    """(median of the diameters within +-MODE_BAND of the mode, how many): the mode is the peak of
    a Gaussian kernel density of log-diameters (bandwidth 0.1, i.e. ~10 %), so fragments, platelets
    and clumps in the tails do not move it."""
    logs = np.log(diameters)
    grid = np.linspace(logs.min(), logs.max(), 256)
    density = np.exp(-0.5 * ((grid[:, None] - logs[None, :]) / MODE_BANDWIDTH) ** 2).sum(axis=1)
    mode = math.exp(float(grid[int(np.argmax(density))]))
    band = diameters[(diameters >= (1 - MODE_BAND) * mode) & (diameters <= (1 + MODE_BAND) * mode)]
    return float(np.median(band)), int(band.size)


def site_diameter(per_image: list[list[RedCell]], *, bootstrap: int = 200, seed: int = 0) -> SiteDiameter | None:
    """The site's red-cell diameter from every image's measured cells; None under ``MIN_CELLS``."""
    cells = [c for im in per_image for c in im]
    if len(cells) < MIN_CELLS:
        return None
    diameters = np.array([c.diameter_px for c in cells], dtype=np.float64)
    value, band = _mode_median(diameters)
    if band < MIN_CELLS:
        return None
    rng = np.random.default_rng(seed)
    boot = [_mode_median(rng.choice(diameters, diameters.size))[0] for _ in range(bootstrap)]
    whole = sum(c.whole for c in cells)
    return SiteDiameter(diameter_px=value, cells=band, measured=len(cells), whole=whole, cut=len(cells) - whole,
                        images=len(per_image), low_px=float(np.percentile(boot, 2.5)),
                        high_px=float(np.percentile(boot, 97.5)))
