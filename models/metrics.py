"""Classification metrics and the confusion-matrix picture, shared by training, `eval`, the
benchmarks and the lab report."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image, ImageDraw, ImageFont

__all__ = ["MIN_IMAGES_FOR_BALANCED", "classification_metrics", "draw_confusion_matrix"]

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
