"""stainbridge eval: accuracy of a classifier (optionally behind a standardizer) on a labeled folder.

    stainbridge eval --classifier clf.safetensors --data DIR [--standardizer FILE|none|reinhard|macenko]
                     [--json FILE] [--split test|all] [--scale profile|auto|X] [--tta] [--batch-size N] [--device auto|cpu|cuda]

The images go through the same path as in the daemon (models.inference: geometry normalization,
standardizer, classifier). With ``--split test`` (the default) and a data folder that is the one the
classifier was trained on, only the held-out test images of its split manifest (``<classifier>.split.json``)
are used, so the evaluation never touches training images; any other folder is evaluated whole.
The JSON result also gets a confusion-matrix PNG next to it (``<json stem>.confusion.png``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from stainbridge.models import checkpoint, inference
from stainbridge.models.imaging import data
from stainbridge.models.metrics import classification_metrics, draw_confusion_matrix
from stainbridge.models.training.runtime import Progress, write_json


class EvaluationError(Exception):
    """The data folder cannot be evaluated with this classifier (classes, split, empty folder)."""


# ---------------------------------------------------------------------------------------------
# data selection


def select_images(data_root: Path, classifier_path: Path, header: dict[str, Any],
                  split: str) -> tuple[list[tuple[Path, str]], str]:
    """The (path, label) pairs to evaluate and a word saying which ("test" or "all")."""
    items = data.list_labeled(data_root)
    if not items:
        raise EvaluationError(f"no labeled images under {data_root}: expected one sub-folder per class")
    if split == "all":
        return items, "all"
    manifest_path = Path(f"{classifier_path}.split.json")
    train_root = (header.get("training_data") or {}).get("root")
    same_root = train_root is not None and Path(train_root).resolve() == data_root.resolve()
    if manifest_path.exists():
        manifest = data.read_manifest(manifest_path)
        if Path(manifest["root"]).resolve() == data_root.resolve():
            test = set(manifest["test"])
            chosen = [(p, c) for p, c in items if p.relative_to(data_root).as_posix() in test]
            if not chosen:
                raise EvaluationError(f"the split manifest {manifest_path} has no test images in {data_root}")
            return chosen, "test"
    if same_root:
        raise EvaluationError(
            f"{data_root} is the classifier's training folder but its split manifest {manifest_path} "
            "is missing: restore it, or pass --split all knowing that training images are included")
    return items, "all"


# ---------------------------------------------------------------------------------------------
# the command


def evaluate_folder(classifier: inference.Classifier, standardizer: inference.Standardizer,
                    items: Sequence[tuple[Path, str]], *, scale: str = inference.SCALE_FROM_PROFILE,
                    tta: bool = False, batch_size: int = 32) -> dict[str, Any]:
    """Run every image through standardizer + classifier in batches and return the metrics."""
    classes = list(classifier.classes)
    unknown = sorted({label for _, label in items} - set(classes))
    if unknown:
        raise EvaluationError(
            f"the data has classes {unknown} that the classifier does not know ({classes}); "
            "remove those folders or evaluate a classifier trained on them")
    index = {c: i for i, c in enumerate(classes)}
    y_true, y_pred = [], []
    progress = Progress(len(items), desc="eval")
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        images = []
        for path, _ in chunk:
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        results = inference.run_batch(images, standardizer, classifier, scale=scale, tta=tta)
        y_true += [index[label] for _, label in chunk]
        y_pred += [index[r.label] for r in results]
        progress.update(len(chunk))
    return classification_metrics(y_true, y_pred, classes)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--classifier", required=True, help="classifier checkpoint (.safetensors)")
    parser.add_argument("--data", required=True, help="labeled image folder, one sub-folder per class")
    parser.add_argument("--standardizer", default="none",
                        help="CycleGAN checkpoint, or none|reinhard|macenko (default none)")
    parser.add_argument("--json", default=None, help="write the metrics here (+ <stem>.confusion.png)")
    parser.add_argument("--split", choices=("test", "all"), default="test",
                        help="test: only the held-out test images when --data is the training folder")
    parser.add_argument("--scale", default=inference.SCALE_FROM_PROFILE,
                        help="geometry: 'profile' (the standardizer's site magnification, the service's default), "
                             "a magnification by hand, or 'auto' (frame zoom by stained-cell fraction)")
    parser.add_argument("--tta", action="store_true", help="average over the 8 turns and flips of each image")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Evaluate a stainbridge classifier", add_help=add_help)
    add_arguments(parser)
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    device = str(inference.resolve_device(args.device))
    clf_path = Path(args.classifier)
    classifier = inference.load_classifier(clf_path, device=device)
    standardizer = inference.load_standardizer(args.standardizer, device=device, classifier=classifier)
    data_root = Path(args.data)
    items, used = select_images(data_root, clf_path, classifier.header, args.split)
    metrics = evaluate_folder(classifier, standardizer, items, scale=str(args.scale), tta=args.tta,
                              batch_size=args.batch_size)
    metrics.update({
        "split": used,
        "data": str(data_root),
        "scale": str(args.scale),
        "classifier": {"path": str(clf_path), "sha256": classifier.sha256},
        "standardizer": {"name": standardizer.name, "sha256": standardizer.sha256},
    })
    if args.json:
        json_path = Path(args.json)
        write_json(json_path, metrics)
        title = f"{standardizer.name} | n={metrics['n']} | acc={metrics['accuracy']:.3f}"
        draw_confusion_matrix(metrics["confusion_matrix"], metrics["classes"], title=title).save(
            json_path.with_suffix(".confusion.png"))
    return metrics


def run(args: argparse.Namespace) -> int:
    try:
        metrics = main(args)
    except (EvaluationError, inference.ModelMismatch, inference.DeviceUnavailable, checkpoint.CheckpointError,
            data.DataError, FileNotFoundError) as exc:
        print(f"stainbridge eval: {exc}", file=sys.stderr)
        return 2
    summary = {k: metrics[k] for k in ("n", "accuracy", "balanced_accuracy", "balanced_accuracy_min10")}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(run(get_args_parser().parse_args()))
