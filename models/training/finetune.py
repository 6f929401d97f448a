"""stainbridge train finetune: adapt a trained classifier to expert-reviewed incoming images.

    stainbridge train finetune --init-from CLASSIFIER --reviewed DIR --reference DIR --out FILE
        [--standardizer SPEC] [--scale profile|auto|X] [--epochs N] [--lr LR] [--batch-size N]
        [--reference-ratio R] [--seed N] [--device auto|cpu|cuda]

The nightly job runs this (niced, in a subprocess) once enough reviews exist. Both folders hold
one sub-folder per class, as every labeled folder in stainbridge:

- ``--reviewed``: incoming-hospital images with their reviewed labels. They are classified in
  the service after the site geometry and the stain standardizer, so they are trained on exactly
  that way: each goes once through the one inference path's geometry (``resolve_geometry`` with
  ``--scale``) and the frozen ``--standardizer`` (the active one), then random turns and flips;
- ``--reference``: reference-hospital images, mixed in (``--reference-ratio`` of them per reviewed
  image, evenly spaced) with the transform the classifier was trained with, so that adapting to
  a few hundred reviews does not forget the reference hospital.

The network, classes, input size, normalization, geometry, reference stain statistics and loss
(focal gamma) come from the ``--init-from`` header and stay as they are; the new header records
what was fine-tuned on (``finetune``) and the training history. AdamW at a small learning rate,
no schedule: the weights move little, as a fine-tune should.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from stainbridge.models import abstention, checkpoint, classifier, inference
from stainbridge.models.imaging import data, transforms
from stainbridge.models.training import classifier as train_classifier
from stainbridge.models.training import runtime as tu

STANDARDIZE_BATCH = 32


class FinetuneError(Exception):
    """The folders or checkpoints cannot fine-tune this classifier; the message says what to change."""


class StandardizedImages(Dataset):
    """Reviewed images as the service's classifier sees them, with a random turn and flip per draw."""

    def __init__(self, images: Tensor, targets: list[int], seed: int) -> None:
        self.images, self.targets, self.rng = images, targets, random.Random(seed)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        image = torch.rot90(self.images[i], self.rng.randrange(4), (1, 2))
        return (image.flip(2) if self.rng.random() < 0.5 else image), self.targets[i]


def labeled_items(root: str, classes: list[str], what: str) -> list[tuple[Path, str]]:
    """(path, class) of a labeled folder whose classes the classifier knows; an unknown one is an error."""
    items = data.list_labeled(root)
    unknown = sorted({label for _, label in items} - set(classes))
    if unknown:
        raise FinetuneError(f"{what} folder {root} has classes {unknown} that the classifier does not know "
                            f"(it knows {classes}); rename or remove those sub-folders")
    return items


def trainable_classifier(path: str | Path, device: torch.device) -> tuple[nn.Module, dict[str, Any],
                                                                      inference.Classifier, nn.Module]:
    """A classifier checkpoint to train further: (its network as a trainable copy on ``device``, its header
    without the calibration, which training moves away from (``stainbridge train calibrate`` fits it again),
    the checkpoint loaded as the service loads it, the loss it was trained with: focal at its gamma, else CE)."""
    state, header = checkpoint.load_checkpoint(path)
    if header.get("kind") != "classifier":
        raise FinetuneError(f"--init-from {path} is a {header.get('kind')} checkpoint, not a classifier")
    base = inference.load_classifier(path, device=str(device))
    model = classifier.build_classifier(arch=header["architecture"], num_classes=len(base.classes))
    model.load_state_dict(abstention.network_state(state))
    header = {k: v for k, v in header.items() if k != "abstention"}
    model.to(device, memory_format=tu.memory_format(device))
    gamma = float(header.get("gamma") or 0.0)
    return model, header, base, classifier.make_loss("focal" if gamma > 0 else "ce", gamma=gamma)


@torch.inference_mode()
def standardize(items: list[tuple[Path, str]], base: inference.Classifier, standardizer: inference.Standardizer,
                scale: str) -> Tensor:
    """[N,3,S,S] in [0,1] on the CPU: geometry then standardizer, as ``inference.run_batch`` does."""
    geometry = inference.resolve_geometry(base, standardizer, scale=scale)
    out = []
    for start in range(0, len(items), STANDARDIZE_BATCH):
        images = [data.load_rgb(path) for path, _ in items[start:start + STANDARDIZE_BATCH]]
        batch = inference.prepare_batch(images, geometry).to(base.device)
        out.append(standardizer(batch).float().cpu())
    return torch.cat(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--init-from", required=True, metavar="CLASSIFIER", help="classifier checkpoint to fine-tune")
    parser.add_argument("--reviewed", required=True, help="reviewed incoming images, one sub-folder per class")
    parser.add_argument("--reference", required=True, help="reference-hospital images, one sub-folder per class")
    parser.add_argument("--out", required=True, help="classifier checkpoint to write (.safetensors)")
    parser.add_argument("--standardizer", default="none",
                        help="the standardizer the service applies first: none, reinhard, macenko or a "
                             "checkpoint (default none)")
    parser.add_argument("--scale", default=inference.SCALE_FROM_PROFILE,
                        help="site magnification as in [site] scale: profile (default), auto or a number")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--reference-ratio", type=float, default=1.0,
                        help="reference images mixed in per reviewed image (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Fine-tune a stainbridge classifier on reviewed images",
                                     add_help=add_help)
    add_arguments(parser)
    return parser


def main(args: argparse.Namespace) -> str:
    """Fine-tune and write the classifier checkpoint; returns its sha256."""
    started = time.monotonic()
    if args.epochs < 1 or args.batch_size < 1 or args.reference_ratio < 0:
        raise FinetuneError("--epochs and --batch-size must be >= 1 and --reference-ratio >= 0")
    tu.seed_everything(args.seed)
    device = tu.select_device(args.device, tu.DistInfo())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    # the classifier to adapt, and the standardizer in front of it
    model, header, base, criterion = trainable_classifier(args.init_from, device)
    classes, size = base.classes, base.input_size
    standardizer = inference.load_standardizer(args.standardizer, device=str(device), classifier=base)

    # data: reviewed (standardized once, frozen standardizer) + evenly spaced reference images
    reviewed = labeled_items(args.reviewed, classes, "--reviewed")
    if not reviewed:
        raise FinetuneError(f"no reviewed images under {args.reviewed}")
    index = {c: k for k, c in enumerate(classes)}
    reviewed_set = StandardizedImages(standardize(reviewed, base, standardizer, args.scale),
                                      [index[label] for _, label in reviewed], args.seed)
    reference_all = labeled_items(args.reference, classes, "--reference")
    n_reference = min(len(reference_all), round(args.reference_ratio * len(reviewed)))
    step = max(1, len(reference_all) // max(1, n_reference))
    reference = reference_all[::step][:n_reference]
    reference_set = data.LabeledImages(reference, classes, transforms.train_transform(size, color_augment=False))
    train_set = ConcatDataset([reviewed_set, reference_set]) if reference else reviewed_set
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=len(train_set) > args.batch_size,
                        generator=torch.Generator().manual_seed(args.seed))

    prep = train_classifier.InputPrep(device, header["normalization"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)

    history = []
    for epoch in range(args.epochs):
        stats = train_classifier.train_one_epoch(model, criterion, optimizer, loader, prep, epoch, args, True)
        history.append({"epoch": epoch + 1, **{f"train_{k}": v for k, v in stats.items()}})
        print(json.dumps(history[-1]), file=sys.stderr)

    counts = {c: sum(1 for _, label in reviewed if label == c) for c in classes}
    new_header = {
        **header,
        "metrics": {"final": history[-1], "history": history, "before_finetune": header.get("metrics") or {}},
        "finetune": {
            "init_from": {"path": str(Path(args.init_from).resolve()), "sha256": base.sha256},
            "standardizer": {"name": standardizer.name, "sha256": standardizer.sha256},
            "scale": args.scale,
            "reviewed": {"root": str(Path(args.reviewed).resolve()), "images": len(reviewed), "counts": counts},
            "reference": {"root": str(Path(args.reference).resolve()), "images": len(reference)},
            "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "seed": args.seed,
        },
        "train_seconds": round(time.monotonic() - started, 1),
        "code_version": checkpoint.code_version(),
    }
    new_header.pop("created", None)
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    sha = checkpoint.save_checkpoint(out, weights, tu.jsonable(new_header))
    print(json.dumps({"out": str(out), "sha256": sha, **history[-1]}), file=sys.stderr)
    print(sha)
    return sha


def run(args: argparse.Namespace) -> int:
    try:
        main(args)
    except (FinetuneError, checkpoint.CheckpointError, inference.ModelMismatch, data.DataError,
            FileNotFoundError) as exc:
        print(f"stainbridge train finetune: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run(get_args_parser().parse_args()))
