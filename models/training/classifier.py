"""stainbridge train classifier: a ResNet-18/34 cell classifier with a focal loss.

    stainbridge train classifier --data DIR --out FILE [--arch resnet18|resnet34] [--loss focal|ce]
        [--preset tiny|full] [--epochs N] [--pretrained FILE] [--seed N] [--resume] [--batch-size N]
        [--size PX] [--color-augment] [--gamma G] [--workers N] [--split-manifest FILE]
    torchrun --nproc-per-node 4 -m stainbridge.models.training.classifier --data DIR --out FILE --preset full

Shaped like torchvision's references/classification/train.py: parse -> data -> model ->
optimizer/scheduler -> resume -> train_one_epoch / evaluate -> checkpoint.

The stratified split manifest (models.imaging.data.make_split) is written next to the checkpoint as
``<out>.split.json``; the validation split is only reported per epoch (no model selection), the
test split is scored once at the end and again by ``stainbridge eval --split test``. After every epoch the model + optimizer + scheduler go to
``<out>.state`` (safetensors, no pickle) and ``--resume`` continues from there.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from stainbridge.models import checkpoint, classifier, inference
from stainbridge.models.imaging import classical, data, site_geometry, transforms
from stainbridge.models.metrics import classification_metrics
from stainbridge.models.training import calibrate, resume
from stainbridge.models.training import runtime as tu

# Explicit flags override these. tiny: seconds on a laptop CPU for ~100 images; full: a GPU run.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"arch": "resnet18", "size": 64, "epochs": 5, "batch_size": 16},
    "full": {"arch": "resnet18", "size": 224, "epochs": 30, "batch_size": 64},
}
DEFAULT_LR = {"adamw": 1e-3, "sgd": 0.02}
# The classifier sees (x - mean) / std of [0, 1] RGB; ImageNet's, so that --pretrained weights fit.
NORMALIZATION = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
STAT_SAMPLE = 256  # images used to fit the reference stain and cell-size statistics


class TrainingError(Exception):
    """The data or the options cannot produce a classifier (empty folder, bad resume state...)."""


def resolve_options(args: argparse.Namespace) -> argparse.Namespace:
    """Fill every option left unset from the preset."""
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.lr is None:
        args.lr = DEFAULT_LR[args.opt]
    return args


def make_criterion(args: argparse.Namespace) -> nn.Module:
    """stainbridge.models.classifier's FocalLoss (or plain cross-entropy); no label smoothing, which would blunt
    the confidences the daemon stores."""
    return classifier.make_loss(args.loss, gamma=args.gamma)


def load_split(args: argparse.Namespace, data_root: Path, out: Path) -> dict[str, Any]:
    split_path = Path(f"{out}.split.json")
    if args.split_manifest:
        manifest = data.read_manifest(Path(args.split_manifest))
    elif args.resume and split_path.exists():
        manifest = data.read_manifest(split_path)
    else:
        manifest = data.make_split(data_root, seed=args.seed)
    if Path(manifest["root"]).resolve() != data_root.resolve():
        raise TrainingError(f"the split manifest is for {manifest['root']}, not {data_root}; "
                            "drop --split-manifest or pass the matching --data")
    if not manifest["train"]:
        raise TrainingError(f"no training images under {data_root}: expected one sub-folder per class")
    return manifest


def reference_statistics(root: Path, rel_paths: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """geometry and reference stain stats from an evenly spaced training sample. The geometry records the
    reference window (the whole frame: the classifier trains on full frames), so that the one inference
    path can cut other labs' images to the same physical width, and the reference red-cell diameter (native px)
    that site profiles measure other labs against."""
    step = max(1, len(rel_paths) // STAT_SAMPLE)
    images = []
    for rel in list(rel_paths)[::step][:STAT_SAMPLE]:
        with Image.open(root / rel) as im:
            images.append(im.convert("RGB"))
    fraction = statistics.median(data.estimate_cell_fraction(im) for im in images)
    window = statistics.median(min(im.size) for im in images)
    geometry = {"reference_cell_fraction": float(fraction), "reference_window_px": float(window),
                "window_fraction": 1.0,
                # the reference's scale, which site profiles compare other labs against (red cells, else nuclei)
                **site_geometry.reference_geometry(images)}
    return geometry, classical.fit_reference_stats(images)


class InputPrep:
    """Moves a [0, 1] batch to the device, normalizes it as the header says, sets the memory format."""

    def __init__(self, device: torch.device, normalization: dict[str, list[float]]) -> None:
        self.device = device
        self.mean = torch.tensor(normalization["mean"], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(normalization["std"], device=device).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        return ((images - self.mean) / self.std).contiguous(memory_format=tu.memory_format(self.device))


def train_one_epoch(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                    loader: DataLoader, prep: InputPrep, epoch: int, args: argparse.Namespace,
                    is_main: bool) -> dict[str, float]:
    model.train()
    device = prep.device
    progress = tu.Progress(len(loader), desc=f"epoch {epoch + 1}/{args.epochs}", enabled=is_main)
    for images, targets in loader:
        images = prep(images)
        targets = targets.to(device, non_blocking=True)
        with tu.autocast(device):
            logits = model(images)
        loss = criterion(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        acc = (logits.argmax(1) == targets).float().mean().item()
        progress.update(1, loss=loss.item(), acc=acc, lr=optimizer.param_groups[0]["lr"])
    return progress.averages()


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, prep: InputPrep, classes: Sequence[str]) -> dict[str, Any]:
    """Metrics of the bare (unwrapped) model; every rank computes the same numbers on the full split."""
    model = tu.unwrap(model)
    model.eval()
    y_true: list[int] = []
    y_pred: list[int] = []
    for images, targets in loader:
        images = prep(images)
        with tu.autocast(prep.device):
            logits = model(images)
        y_pred += logits.argmax(1).tolist()
        y_true += targets.tolist()
    return classification_metrics(y_true, y_pred, classes)


def summary(metrics: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {f"{prefix}_{k}": metrics[k] for k in ("n", "accuracy", "balanced_accuracy")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="labeled image folder, one sub-folder per class")
    parser.add_argument("--out", required=True, help="checkpoint to write (.safetensors)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                        help="tiny: 64 px, 5 epochs, CPU seconds; full: 224 px, 30 epochs, GPU")
    parser.add_argument("--arch", choices=("resnet18", "resnet34"), default=None)
    parser.add_argument("--loss", choices=("focal", "ce"), default="focal")
    parser.add_argument("--gamma", type=float, default=2.0, help="focal loss gamma (0 equals cross-entropy)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="per process")
    parser.add_argument("--size", type=int, default=None, help="input size in pixels")
    parser.add_argument("--lr", type=float, default=None, help="default 1e-3 for adamw, 0.02 for sgd")
    parser.add_argument("--opt", choices=("adamw", "sgd"), default="adamw")
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--pretrained", default=None, help="local ImageNet weights file (safetensors or .pth)")
    parser.add_argument("--color-augment", action="store_true", help="colour jitter during training")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue from <out>.state")
    parser.add_argument("--workers", type=int, default=0, help="data loader processes")
    parser.add_argument("--split-manifest", default=None, help="use this split instead of making one")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train a stainbridge cell classifier", add_help=add_help)
    add_arguments(parser)
    return parser


def main(args: argparse.Namespace) -> str:
    """Train and write the checkpoint; returns its sha256 (empty string on non-main ranks)."""
    args = resolve_options(args)
    dist = tu.init_distributed()
    try:
        return _train(args, dist)
    finally:
        tu.cleanup_distributed(dist)


def _train(args: argparse.Namespace, dist: tu.DistInfo) -> str:
    started = time.monotonic()
    tu.seed_everything(args.seed, rank=dist.rank)
    device = tu.select_device(args.device, dist)
    data_root, out = Path(args.data), Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    # data
    manifest = load_split(args, data_root, out)
    split_path = Path(f"{out}.split.json")
    if dist.is_main:
        data.write_manifest(manifest, split_path)
    classes = list(manifest["classes"])
    train_set = data.LabeledImages(data.manifest_items(manifest, "train", root=data_root), classes,
                                   transforms.train_transform(args.size, color_augment=args.color_augment))
    eval_tf = transforms.eval_transform(args.size)
    val_set = data.LabeledImages(data.manifest_items(manifest, "val", root=data_root), classes, eval_tf)
    test_set = data.LabeledImages(data.manifest_items(manifest, "test", root=data_root), classes, eval_tf)
    sampler = DistributedSampler(train_set, seed=args.seed, shuffle=True) if dist.distributed else None
    generator = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=sampler is None, sampler=sampler,
                              num_workers=args.workers, drop_last=len(train_set) > args.batch_size,
                              generator=generator, pin_memory=device.type == "cuda")
    val_loader = DataLoader(val_set, batch_size=args.batch_size, num_workers=args.workers)
    test_loader = DataLoader(test_set, batch_size=args.batch_size, num_workers=args.workers)

    # model, loss, optimizer, schedule
    model = classifier.build_classifier(arch=args.arch, num_classes=len(classes), pretrained_file=args.pretrained)
    model.to(device, memory_format=tu.memory_format(device))
    criterion = make_criterion(args)
    prep = InputPrep(device, NORMALIZATION)
    if args.opt == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay, nesterov=True)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(args.epochs, 1))
    train_model: nn.Module = model
    if dist.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.local_rank] if device.type == "cuda" else None)

    # resume
    state_file = resume.state_path(out)
    start_epoch, history = 0, []
    if args.resume:
        header = resume.load_training_state(state_file, modules={"model": model},
                                        optimizers={"optimizer": optimizer}, schedulers={"scheduler": scheduler})
        start_epoch, history = header["epoch"], list(header["extra"].get("history", []))
        scheduler.T_max = max(args.epochs, 1)  # --epochs may extend a finished run
        if dist.is_main:
            print(f"resumed from {state_file} after epoch {start_epoch}", file=sys.stderr)

    for epoch in range(start_epoch, args.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        train_stats = train_one_epoch(train_model, criterion, optimizer, train_loader, prep, epoch, args,
                                      dist.is_main)
        scheduler.step()
        val = evaluate(model, val_loader, prep, classes) if len(val_set) else None
        history.append({"epoch": epoch + 1, **{f"train_{k}": v for k, v in train_stats.items()},
                        **(summary(val, "val") if val else {})})
        if dist.is_main:
            print(json.dumps(history[-1]), file=sys.stderr)
            resume.save_training_state(state_file, modules={"model": model}, optimizers={"optimizer": optimizer},
                                   schedulers={"scheduler": scheduler}, epoch=epoch + 1,
                                   extra={"history": history, "arch": args.arch, "out": str(out)})
        tu.barrier(dist)

    if not dist.is_main:
        return ""
    # final checkpoint with the full contract header
    val = evaluate(model, val_loader, prep, classes) if len(val_set) else None
    test = evaluate(model, test_loader, prep, classes) if len(test_set) else None
    geometry, reference_stain = reference_statistics(data_root, manifest["train"])
    counts = {c: sum(1 for rel in manifest["train"] if Path(rel).parts[0] == c) for c in classes}
    header = {
        "kind": "classifier",
        "architecture": args.arch,
        "arch_args": {"num_classes": len(classes)},
        "classes": classes,
        "input_size": args.size,
        "normalization": NORMALIZATION,
        "geometry": geometry,
        "reference_stain": reference_stain,
        "training_data": {
            "root": str(data_root.resolve()),
            "counts": counts,
            "split_counts": {k: len(manifest[k]) for k in ("train", "val", "test")},
            "split_manifest": split_path.name,
            "split_manifest_sha256": hashlib.sha256(split_path.read_bytes()).hexdigest(),
        },
        "metrics": {**(summary(val, "val") if val else {}), **(summary(test, "test") if test else {}),
                    "history": history},
        "loss": args.loss,
        "gamma": args.gamma if args.loss == "focal" else 0.0,
        "epochs": args.epochs,
        "seed": args.seed,
        "pretrained": Path(args.pretrained).name if args.pretrained else None,
        "train_seconds": round(time.monotonic() - started, 1),
        "code_version": checkpoint.code_version(),
    }
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    state, header = _calibrated(model, header, state, data_root, manifest, device)
    sha = checkpoint.save_checkpoint(out, state, tu.jsonable(header))
    final = {k: v for k, v in header["metrics"].items() if k != "history"}
    print(json.dumps({"out": str(out), "sha256": sha, **final}), file=sys.stderr)
    print(sha)
    return sha


def _calibrated(model: nn.Module, header: dict[str, Any], state: dict[str, torch.Tensor], data_root: Path,
                manifest: dict[str, Any], device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The checkpoint with its calibrated confidence and OOD statistics (``stainbridge train calibrate``'s fit on
    this split); without them, and saying why, when the split cannot support a fit (e.g. no validation images)."""
    clf = inference.Classifier(tu.unwrap(model).eval(), header, name="trained", sha256="", device=device)
    try:
        tensors, record = calibrate.fit_on_split(clf, data_root, manifest)
    except calibrate.CalibrationError as exc:
        print(f"not calibrated ({exc}): the checkpoint runs at temperature 1 without an OOD score", file=sys.stderr)
        return state, header
    modes = {m: {k: record["modes"][m][k] for k in ("temperature", "ece_before", "ece_after")} for m in record["modes"]}
    print(json.dumps({"calibration": modes}), file=sys.stderr)
    return calibrate.with_abstention(state, header, tensors, record)


def run(args: argparse.Namespace) -> int:
    try:
        main(args)
    except (TrainingError, resume.TrainingStateError, checkpoint.CheckpointError, data.DataError,
            classifier.PretrainedWeightsError) as exc:
        print(f"stainbridge train classifier: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run(get_args_parser().parse_args()))
