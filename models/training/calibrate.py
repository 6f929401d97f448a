"""stainbridge train calibrate: calibrated confidence and the "not one of the five" statistics of a classifier.

    stainbridge train calibrate --classifier FILE --reference DIR --out FILE [--split-manifest FILE]
        [--confidence-below P] [--ood-val-rate R] [--batch-size N] [--device auto|cpu|cuda]

Reads the classifier's own split of the reference folder (``<classifier>.split.json``, written when it
was trained; its sha256 is checked against the header), sends the training and validation cells through
the service's path (``models.inference``: the reference window, no standardizer, the classifier's logits
and penultimate features, plain and over the 8 turns and flips) and fits what ``models.abstention``
describes: the temperatures and OOD thresholds on the validation cells, the class means and shared
covariance on the training cells. The result is a new checkpoint (the same weights, a new sha256, so a
new registry version) whose header records the expected calibration error before and after.

``stainbridge train classifier`` and the benchmark's classifier training call :func:`fit` at their end;
a network trained further (fine-tune, adaptation) drops the entry, since its features moved, until it is
calibrated again here. ``--confidence-below`` and ``--ood-val-rate`` are the two thresholds to tune.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from stainbridge.models import abstention, checkpoint, inference
from stainbridge.models.imaging import data
from stainbridge.models.training.runtime import jsonable

__all__ = ["CalibrationError", "add_arguments", "fit", "fit_on_split", "image_batches", "main", "run",
           "with_abstention"]

BATCH_SIZE = 64


class CalibrationError(Exception):
    """The checkpoint or the folder cannot be calibrated as given; the message says what to change."""


def _outputs(classifier: inference.Classifier, batches: Iterable[Tensor], *, tta: bool) -> tuple[Tensor, Tensor]:
    """(logits [V,N,C], features [V,N,D]) over every batch (``inference.view_outputs``; the first view is
    the image itself, the "plain" mode)."""
    logits: list[Tensor] = []
    features: list[Tensor] = []
    for batch in batches:
        z, f = inference.view_outputs(classifier, batch, tta=tta)
        logits.append(z)
        features.append(f)
    if not logits:
        raise CalibrationError("no images to calibrate on")
    return torch.cat(logits, 1), torch.cat(features, 1)


def fit(classifier: inference.Classifier, *, train: Iterable[Tensor], train_labels: Tensor, val: Iterable[Tensor],
        val_labels: Tensor, confidence_below: float = abstention.CONFIDENCE_BELOW,
        ood_val_rate: float = abstention.OOD_VAL_RATE,
        fitted_on: dict[str, Any] | None = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Fit the abstention of ``classifier`` from [0,1] batches of the reference training and validation cells
    (as the service prepares them). Returns (the tensors to store, the header entry)."""
    train_features = _outputs(classifier, train, tta=False)[1][0]
    val_logits, val_features = _outputs(classifier, val, tta=True)
    if len(train_features) != len(train_labels) or val_logits.shape[1] != len(val_labels):
        raise CalibrationError("the labels do not match the images")
    try:
        _, tensors, record = abstention.fit_abstention(
            train_features=train_features, train_labels=train_labels,
            val_logits={"plain": val_logits[:1], "tta": val_logits}, val_features={"plain": val_features[:1], "tta": val_features},
            val_labels=val_labels, num_classes=len(classifier.classes), confidence_below=confidence_below,
            ood_val_rate=ood_val_rate, fitted_on=fitted_on)
    except abstention.AbstentionError as exc:
        raise CalibrationError(str(exc)) from None
    return tensors, record


def image_batches(paths: Sequence[Path], geometry: inference.Geometry, batch_size: int = BATCH_SIZE) -> Iterator[Tensor]:
    """Image files as the service prepares them (decoded, cut by ``geometry``), in [0,1] batches."""
    for start in range(0, len(paths), batch_size):
        yield inference.prepare_batch([data.load_rgb(p) for p in paths[start:start + batch_size]], geometry)


def fit_on_split(classifier: inference.Classifier, root: Path, manifest: dict[str, Any], *,
                 batch_size: int = BATCH_SIZE, confidence_below: float = abstention.CONFIDENCE_BELOW,
                 ood_val_rate: float = abstention.OOD_VAL_RATE,
                 fitted_on: dict[str, Any] | None = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """:func:`fit` on the train and val files of a split manifest of ``root``, through the reference geometry
    (magnification 1: these are the reference lab's own cells)."""
    index = {c: i for i, c in enumerate(classifier.classes)}
    geometry = inference.resolve_geometry(classifier, None, scale="1.0")
    items = {split: data.manifest_items(manifest, split, root=root) for split in ("train", "val")}
    unknown = sorted({label for split in items.values() for _, label in split} - set(index))
    if unknown:
        raise CalibrationError(f"the split lists classes {unknown} that the classifier does not know ({classifier.classes})")
    if not items["val"]:
        raise CalibrationError(f"the split of {root} has no validation images to fit the temperature on")
    labels = {split: torch.tensor([index[label] for _, label in items[split]]) for split in items}
    source = {"root": str(root.resolve()), "manifest_seed": manifest.get("seed"),
              "through": "models.inference (reference window, no standardizer)", **(fitted_on or {})}
    return fit(classifier, train=image_batches([p for p, _ in items["train"]], geometry, batch_size),
               train_labels=labels["train"], val=image_batches([p for p, _ in items["val"]], geometry, batch_size),
               val_labels=labels["val"], confidence_below=confidence_below, ood_val_rate=ood_val_rate,
               fitted_on=source)


def with_abstention(state: dict[str, Tensor], header: dict[str, Any], tensors: dict[str, Tensor],
                    record: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A classifier's (state, header) with this abstention in place of any earlier one."""
    return ({**abstention.network_state(state), **tensors},
            {**{k: v for k, v in header.items() if k not in ("created", "sha256")}, "abstention": record})


# --------------------------------------------------------------------------- the command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--classifier", required=True, help="classifier checkpoint (.safetensors)")
    parser.add_argument("--reference", required=True,
                        help="the labeled reference folder it was trained on (its split says which cells are which)")
    parser.add_argument("--out", required=True, help="the calibrated checkpoint to write (a new file)")
    parser.add_argument("--split-manifest", default=None,
                        help="the classifier's split (default <classifier>.split.json, as training writes it)")
    parser.add_argument("--confidence-below", type=float, default=abstention.CONFIDENCE_BELOW,
                        help="flag a cell low_confidence below this calibrated confidence (default %(default)s)")
    parser.add_argument("--ood-val-rate", type=float, default=abstention.OOD_VAL_RATE,
                        help="the OOD threshold lets this share of reference validation cells through as "
                             "not_a_known_class (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Calibrate a stainbridge classifier", add_help=add_help)
    add_arguments(parser)
    return parser


def _manifest(args: argparse.Namespace, header: dict[str, Any]) -> dict[str, Any]:
    path = Path(args.split_manifest or f"{args.classifier}.split.json")
    if not path.is_file():
        raise CalibrationError(f"no split manifest at {path}: the classifier's training wrote <checkpoint>.split.json "
                               "next to it; pass --split-manifest FILE if it was moved")
    expected = (header.get("training_data") or {}).get("split_manifest_sha256")
    if expected and hashlib.sha256(path.read_bytes()).hexdigest() != expected:
        raise CalibrationError(f"{path} is not the split this classifier was trained with (its sha256 differs from "
                               "the header's training_data.split_manifest_sha256); pass the right --split-manifest")
    return data.read_manifest(path)


def main(args: argparse.Namespace) -> str:
    """Write the calibrated checkpoint; returns its sha256."""
    if Path(args.out).resolve() == Path(args.classifier).resolve():
        raise CalibrationError("--out must be a new file: the calibrated checkpoint is a new version, and the "
                               "registry refuses a registered file whose bytes changed")
    device = str(inference.resolve_device(args.device))
    classifier = inference.load_classifier(args.classifier, device=device)
    state, header = checkpoint.load_checkpoint(args.classifier, expected_sha256=classifier.sha256)
    tensors, record = fit_on_split(classifier, Path(args.reference), _manifest(args, header),
                                   batch_size=args.batch_size, confidence_below=args.confidence_below,
                                   ood_val_rate=args.ood_val_rate,
                                   fitted_on={"calibrated_from": classifier.sha256})
    state, header = with_abstention(state, header, tensors, record)
    sha = checkpoint.save_checkpoint(args.out, state, jsonable(header))
    manifest_path = Path(args.split_manifest or f"{args.classifier}.split.json")
    Path(f"{args.out}.split.json").write_bytes(manifest_path.read_bytes())  # eval --split test finds it, as after training
    summary = {m: {k: record["modes"][m][k] for k in ("temperature", "ece_before", "ece_after", "val_flagged")}
               for m in abstention.MODES}
    print(json.dumps({"out": str(args.out), "sha256": sha, **summary}), file=sys.stderr)
    print(sha)
    return sha


def run(args: argparse.Namespace) -> int:
    try:
        main(args)
    except (CalibrationError, checkpoint.CheckpointError, inference.ModelMismatch, data.DataError,
            FileNotFoundError) as exc:
        print(f"stainbridge train calibrate: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run(get_args_parser().parse_args()))
