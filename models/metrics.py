"""Classification metrics, the confusion-matrix picture and a label-free stain-likeness score, shared
by training, `eval`, the benchmarks and the lab report."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from stainbridge.models.imaging import classical
from stainbridge.models.imaging.data import otsu_threshold

__all__ = ["MIN_IMAGES_FOR_BALANCED", "STAIN_REGIONS", "STAIN_SUMMARY_SIDE", "classification_metrics",
           "draw_confusion_matrix", "stain_distance", "stain_region_colours", "stain_summary"]

MIN_IMAGES_FOR_BALANCED = 10



def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, balanced accuracy and the confusion matrix (rows: true class, columns: predicted).

    balanced_accuracy is the mean recall over the classes present in the data; balanced_accuracy_min10
    averages only over classes with at least 10 images (a class with 3 images swings it by a third).
    """
    k = len(classes)
    matrix = [[0] * k for _ in range(k)]
    for t, p in zip(y_true, y_pred, strict=True):
        matrix[t][p] += 1
    support = [sum(row) for row in matrix]
    n = sum(support)
    correct = sum(matrix[i][i] for i in range(k))
    recall: dict[str, float | None] = {
        c: (matrix[i][i] / support[i] if support[i] else None) for i, c in enumerate(classes)}
    present = [c for i, c in enumerate(classes) if support[i] > 0]
    min10 = [c for i, c in enumerate(classes) if support[i] >= MIN_IMAGES_FOR_BALANCED]

    def mean_recall(names: list[str]) -> float | None:
        return sum(recall[c] for c in names) / len(names) if names else None  # type: ignore[misc]

    return {
        "classes": list(classes),
        "n": n,
        "accuracy": correct / n if n else None,
        "balanced_accuracy": mean_recall(present),
        "balanced_accuracy_min10": mean_recall(min10),
        "balanced_accuracy_min10_classes": min10,
        "per_class_recall": recall,
        "support": dict(zip(classes, support, strict=True)),
        "confusion_matrix": matrix,
    }


def draw_confusion_matrix(matrix: Sequence[Sequence[int]], classes: Sequence[str], *, title: str = "") -> Image.Image:
    """A readable confusion-matrix picture: counts in a grid, rows true class, columns predicted."""
    font = ImageFont.load_default(size=14)
    cell, k = 64, len(classes)
    label_w = max(int(font.getlength(c)) for c in classes) + 16
    top = label_w + 40
    width, height = max(label_w + cell * k + 20, 560), top + cell * k + 20
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    legend = "rows: true class, columns: predicted"
    draw.text((8, 8), f"{title}   ({legend})" if title else legend, fill="black", font=font)
    # column labels, written vertically
    for j, name in enumerate(classes):
        text = Image.new("RGBA", (label_w, 20), (255, 255, 255, 0))
        ImageDraw.Draw(text).text((0, 2), name, fill="black", font=font)
        rotated = text.rotate(90, expand=True)
        img.paste(rotated, (label_w + j * cell + cell // 2 - 10, 32), rotated)
    peak = max((max(row) for row in matrix), default=0) or 1
    for i, name in enumerate(classes):
        y = top + i * cell
        draw.text((8, y + cell // 2 - 8), name, fill="black", font=font)
        for j in range(k):
            x = label_w + j * cell
            shade = int(255 - 200 * matrix[i][j] / peak)
            fill = (shade, shade, 255) if i == j else (255, shade, shade)
            draw.rectangle([x, y, x + cell, y + cell], fill=fill, outline="gray")
            value = str(matrix[i][j])
            tw = font.getlength(value)
            draw.text((x + (cell - tw) / 2, y + cell // 2 - 8), value, fill="black", font=font)
    return img


# --------------------------------------------------------------------------- stain likeness

STAIN_REGIONS = ("background", "other_stained", "nucleus")
_MIN_REGION_PIXELS = 8
# The score averages the two regions whose colour is the stain's and not the content's: the other
# stained pixels mix red cells (pink) with white-cell cytoplasm (blue-grey) in proportions that
# follow framing and cell class, so they are reported but not averaged.
SCORED_REGIONS = ("background", "nucleus")


def _stain_region_masks(rgb: np.ndarray, od: np.ndarray) -> dict[str, np.ndarray] | None:
    """The three stain regions of one image (RGB [H,W,3] in [0,1] and its optical density) as boolean masks,
    or None when it has too few stained or unstained pixels to split."""
    total, red = od.sum(-1), od[..., 0]
    stained = total > otsu_threshold(total.ravel())
    if stained.sum() < _MIN_REGION_PIXELS or (~stained).sum() < _MIN_REGION_PIXELS:
        return None
    nucleus = stained & (red > otsu_threshold(red[stained]))
    return {"background": ~stained, "other_stained": stained & ~nucleus, "nucleus": nucleus}


def stain_region_colours(images01: Tensor) -> dict[str, np.ndarray]:
    """Per image, the mean CIE L*a*b* colour of three stain regions found from optical density alone:
    background (low total OD), nucleus (stained and absorbing red light: azure/methylene blue) and the
    other stained pixels (red cells, cytoplasm). Each threshold is Otsu's, per image, so the regions
    follow the stain rather than fixed colours. Returns region -> [n_images_with_region, 3]."""
    rgb = images01.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    od = -np.log(np.clip(rgb, 1 / 255, 1.0))
    lab = classical.rgb_to_lab(rgb)
    colours: dict[str, list[np.ndarray]] = {r: [] for r in STAIN_REGIONS}
    for i in range(len(rgb)):
        masks = _stain_region_masks(rgb[i], od[i])
        for region, mask in (masks or {}).items():
            if mask.sum() >= _MIN_REGION_PIXELS:
                colours[region].append(lab[i][mask].mean(0))
    return {r: np.asarray(v, dtype=np.float64).reshape(-1, 3) for r, v in colours.items()}


STAIN_SUMMARY_SIDE = 64  # px: the longest side the image is reduced to before its stain is summarised


def stain_summary(image: Image.Image, *, side: int = STAIN_SUMMARY_SIDE) -> dict[str, tuple[float, float, float]]:
    """One received image's stain: the median CIE L*a*b* colour of each stain region of
    ``stain_region_colours`` (background, other stained pixels, nucleus), on a copy reduced to at most
    ``side`` px (box filter), so that it costs about a millisecond at any frame size. The median, not the
    mean, so that a few mis-assigned edge pixels do not move it. A region too small to measure is left
    out; an image that cannot be split (blank, or every pixel stained) gives {}."""
    rgb_image = image.convert("RGB")
    if max(rgb_image.size) > side:
        scale = side / max(rgb_image.size)
        rgb_image = rgb_image.resize((max(1, round(rgb_image.width * scale)), max(1, round(rgb_image.height * scale))),
                                     Image.Resampling.BOX)
    rgb = np.asarray(rgb_image, dtype=np.float32) / 255.0
    masks = _stain_region_masks(rgb, -np.log(np.clip(rgb, 1 / 255, 1.0)))
    if masks is None:
        return {}
    lab = classical.rgb_to_lab(rgb.astype(np.float64))
    return {region: tuple(float(v) for v in np.median(lab[mask], axis=0))  # type: ignore[misc]
            for region, mask in masks.items() if mask.sum() >= _MIN_REGION_PIXELS}


def stain_distance(images01: Tensor, reference: dict[str, np.ndarray]) -> dict[str, Any]:
    """How far the images' stain is from the reference lab's, label-free: per region, the CIE76 colour
    difference (Delta E*ab; about 2.3 is a just-noticeable difference) between the median region
    colour of the images and of the reference images (``stain_region_colours`` of reference images);
    ``delta_e`` is the mean over background and nucleus (``SCORED_REGIONS``). Lower is more
    reference-like; splitting by region keeps framing and cell content out of it."""
    ours = stain_region_colours(images01)
    regions = {r: float(np.linalg.norm(np.median(ours[r], 0) - np.median(reference[r], 0)))
               for r in STAIN_REGIONS if len(ours[r]) and len(reference[r])}
    scored = [regions[r] for r in SCORED_REGIONS if r in regions]
    return {"delta_e": float(np.mean(scored)) if scored else None, "delta_e_regions": regions}
