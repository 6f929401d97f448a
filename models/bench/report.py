"""Report of ``stainbridge bench accuracy``: a Markdown table and a before/after image grid."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image, ImageDraw
from torch import Tensor

__all__ = ["grid", "markdown"]

PER_CLASS_IN_GRID = 2
CELL = 72  # px per image in the grid


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _mode(name: str, m: dict[str, Any]) -> str:
    if name == "validated":
        return f"{m['recipe']}, chosen on {m['reviews']} reviewed cells (not scored)"
    if "cyclegan" not in name and "_im" not in name:
        return "n/a (no training on target)"
    return "inductive" if "inductive" in name else "transductive"


def markdown(result: dict[str, Any]) -> str:
    """Table: method, mode, balanced accuracy (classes with >= 10 images), accuracy, recalls."""
    methods, setup = result["methods"], result["setup"]
    any_m = next(iter(methods.values()))
    classes = any_m["classes"]
    support = any_m["support"]
    min10 = any_m["balanced_accuracy_min10_classes"]
    lines = [
        (f"Target images: {setup['target_images']} ({', '.join(f'{c} {support[c]}' for c in classes)}); "
         f"resolution {setup['resolution_px']} px; preset {setup['preset']}; labels used for scoring only."),
        f"Balanced accuracy (headline) = mean recall over the classes with >= 10 target images: {', '.join(min10)}.",
        "",
        ("Stain Delta E = CIE76 distance of the median background / pink / nucleus colours to the reference's "
         f"(label-free; lower is more reference-like; reference validation images: "
         f"{_f(setup.get('stain_delta_e_reference_val'))}); pixel change = mean |output - input|."),
        "",
        ("| method | standardizer saw scored images | balanced acc (>=10 img classes) | balanced acc (all present) "
         "| accuracy | stain Delta E | pixel change | " + " | ".join(f"recall {c} (n={support[c]})" for c in classes) + " |"),
        "|---|---|---|---|---|---|---|" + "---|" * len(classes),
    ]
    for name, m in methods.items():
        lines.append(f"| {name} | {_mode(name, m)} | {_f(m['balanced_accuracy_min10'])} | {_f(m['balanced_accuracy'])} "
                     f"| {_f(m['accuracy'])} | {_f(m.get('delta_e'))} | {_f(m.get('pixel_change'))} | "
                     + " | ".join(_f(m['per_class_recall'][c]) for c in classes) + " |")
    lines += ["", "Confusion matrices (rows: true class, columns: predicted; order " + ", ".join(classes) + "):", ""]
    for name, m in methods.items():
        lines.append(f"- {name}: {m['confusion_matrix']}")
    cls = setup["classifier"]
    lines += ["", (f"Classifier: {cls['architecture']} {cls['checkpoint']} (sha256 {str(cls['sha256'])[:12]}), "
                   f"reference metrics {cls['reference_metrics']}, trained in {cls['train_seconds']} s"
                   f"{' (reused)' if cls['reused'] else ''}."),
              f"Geometry: {setup['geometry']}.", f"Times (s): {setup['times']}.", f"Machine: {setup['machine']}.", ""]
    return "\n".join(lines)


def _pick(labels: Tensor, n_classes: int) -> list[int]:
    picks: list[int] = []
    for c in range(n_classes):
        idx = torch.nonzero(labels == c).flatten().tolist()
        picks += idx[:: max(1, len(idx) // PER_CLASS_IN_GRID)][:PER_CLASS_IN_GRID]
    return picks


def grid(images: dict[str, Tensor], labels: Tensor, classes: list[str]) -> Image.Image:
    """One row per method (raw first), the same target images in every row, columns grouped by class."""
    picks = _pick(labels, len(classes))
    label_w = 150
    sheet = Image.new("RGB", (label_w + CELL * len(picks), 16 + CELL * len(images)), "white")
    draw = ImageDraw.Draw(sheet)
    for j, i in enumerate(picks):
        draw.text((label_w + j * CELL + 2, 2), classes[int(labels[i])][:10], fill="black")
    for r, (name, x) in enumerate(images.items()):
        draw.text((4, 16 + r * CELL + CELL // 2 - 6), name[:24], fill="black")
        for j, i in enumerate(picks):
            arr = (x[i].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            tile = Image.fromarray(arr).resize((CELL - 2, CELL - 2), Image.Resampling.BILINEAR)
            sheet.paste(tile, (label_w + j * CELL + 1, 16 + r * CELL + 1))
    return sheet
