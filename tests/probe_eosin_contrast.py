"""A development probe, not collected by pytest: how much eosinophil-neutrophil colour contrast a lab's
cells carry, before and after its colour map, and whether widening it after the map helps.

    python tests/probe_eosin_contrast.py --reference ../shared/data/pbc --target ../shared/data/bccd \
        --run runs/d0-bccd [--size 64] [--gains 1 1.5 2]

`--run` is a `bench accuracy` out-dir (its classifier.safetensors, classifier_im_colour_map_transductive
and standardizer_colour_map_transductive). Labels are used only to group and score, never to fit.
Per class: the mean L*a*b* of the stained, non-nucleus pixels within 0.3 of the window's side from its
centre (the cell's cytoplasm), for the reference test windows, the raw target windows and the mapped
ones. Then, per gain, those pixels' a*/b* spread around the site's pooled mean is widened and both
classifiers score the result (balanced accuracy over classes with >= 10 images, 8-view TTA).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from stainbridge.models.bench import data as bench_data
from stainbridge.models.imaging import classical
from stainbridge.models.imaging.data import otsu_threshold
from stainbridge.models.inference import predict_views
from stainbridge.models.networks import load_classifier, load_standardizer


def cytoplasm_masks(images01: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """L*a*b* of each image and, per image, its stained non-nucleus pixels near the centre (Otsu, as the
    stain regions of models.metrics)."""
    rgb = images01.permute(0, 2, 3, 1).numpy().astype(np.float64)
    od, lab = -np.log(np.clip(rgb, 1 / 255, 1)), classical.rgb_to_lab(rgb)
    n, h, w, _ = rgb.shape
    yy, xx = np.mgrid[:h, :w]
    centre = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (0.3 * h) ** 2
    masks = np.zeros((n, h, w), dtype=bool)
    for i in range(n):
        total, red = od[i].sum(-1), od[i][..., 0]
        stained = total > otsu_threshold(total.ravel())
        nucleus = stained & (red > otsu_threshold(red[stained]))
        masks[i] = centre & stained & ~nucleus
    return lab, masks


def print_class_colours(name: str, images01: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> None:
    lab, masks = cytoplasm_masks(images01)
    means = np.array([lab[i][m].mean(0) if m.sum() > 10 else np.full(3, np.nan) for i, m in enumerate(masks)])
    for k, cls in enumerate(classes):
        v = means[(labels == k).numpy()]
        if len(v) >= 3:
            L, a, b = np.nanmean(v, axis=0)
            print(f"{name:8s} {cls:11s} n={len(v):4d}  L* {L:5.1f}  a* {a:5.1f}  b* {b:5.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--run", required=True, help="a bench accuracy out-dir")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--gains", type=float, nargs="+", default=[1.0, 1.5, 2.0])
    args = parser.parse_args()
    torch.set_num_threads(2)
    data = bench_data.prepare(args.reference, args.target, size=args.size, seed=0, log=lambda *a: None)
    standardizer = load_standardizer(f"{args.run}/standardizer_colour_map_transductive.safetensors")
    classifiers = {"plain": load_classifier(f"{args.run}/classifier.safetensors"),
                   "adapted": load_classifier(f"{args.run}/classifier_im_colour_map_transductive.safetensors")}
    target = bench_data.to_float(data.target)
    with torch.no_grad():
        mapped = standardizer(target)
    print_class_colours("ref", bench_data.to_float(data.test), data.test_labels, data.classes)
    print_class_colours("raw", target, data.target_labels, data.classes)
    print_class_colours("mapped", mapped, data.target_labels, data.classes)

    lab, masks = cytoplasm_masks(mapped)
    centre = lab[masks][:, 1:].mean(0)  # pooled over the site: label-free
    truth = data.target_labels.numpy()
    scored = [k for k in range(len(data.classes)) if (truth == k).sum() >= 10]
    for gain in args.gains:
        widened = lab.copy()
        region = widened[masks]
        region[:, 1:] = centre + gain * (region[:, 1:] - centre)
        widened[masks] = region
        images = torch.from_numpy(classical.lab_to_rgb(widened)).float().permute(0, 3, 1, 2).clamp(0, 1)
        for name, classifier in classifiers.items():
            with torch.no_grad():
                probs = torch.cat([predict_views(classifier, images[i:i + 64], tta=True)
                                   for i in range(0, len(images), 64)])
            pred = probs.argmax(1).numpy()
            recall = {data.classes[k]: float((pred[truth == k] == k).mean()) for k in range(len(data.classes))
                      if (truth == k).any()}
            balanced = np.mean([recall[data.classes[k]] for k in scored])
            print(f"gain {gain:g} {name:8s} balanced {balanced:.3f}  " +
                  "  ".join(f"{c} {r:.2f}" for c, r in recall.items()))


if __name__ == "__main__":
    main()
