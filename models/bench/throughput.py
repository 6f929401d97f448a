"""`stainbridge bench throughput`: images per second through each stage of the inference path.

Stages are timed one after the other in the same process, so their ratio is meaningful on a
noisy machine: the standardizer (CycleGAN generator) alone, the classifier alone, and the whole
`run_batch` from PIL images (geometry normalization + standardizer + classifier + softmax), the
path the daemon takes. Checkpoints can be given; otherwise networks of the chosen preset are
built with random weights (speed does not depend on the weights).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from stainbridge.models import inference
from stainbridge.models.classifier import build_classifier
from stainbridge.models.cyclegan import GENERATOR_PRESETS, build_generator
from stainbridge.models.imaging.synthetic import CLASSES

PRESETS = {
    # preset: generator preset, classifier input size, batch size
    "tiny": ("tiny", 64, 16),
    "full": ("full", 256, 32),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--images", type=int, default=64, help="images timed per stage (default 64)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                        help="network sizes when no checkpoints are given (full: the reference generator at 256 px)")
    parser.add_argument("--classifier", help="classifier checkpoint (default: random ResNet-18 of the preset)")
    parser.add_argument("--standardizer", help="CycleGAN checkpoint (default: random generator of the preset)")
    parser.add_argument("--batch-size", type=int, help="images per batch (default: the preset's)")
    parser.add_argument("--json", help="also write the numbers here")


def _random_models(preset: str, device: torch.device) -> tuple[inference.Standardizer, inference.Classifier]:
    generator_preset, size, _ = PRESETS[preset]
    generator = build_generator(**GENERATOR_PRESETS[generator_preset])
    header = {"kind": "standardizer", "architecture": "resnet_generator", "arch_args": GENERATOR_PRESETS[generator_preset]}
    standardizer = inference.wrap_generator(generator, name=f"random-{preset}", header=header, device=device)
    model = inference.place_model(build_classifier(arch="resnet18", num_classes=len(CLASSES)), device)
    classifier_header = {"kind": "classifier", "architecture": "resnet18", "classes": list(CLASSES), "input_size": size,
                         "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}}
    classifier = inference.Classifier(model, classifier_header, name=f"random-{preset}", sha256="-", device=device)
    return standardizer, classifier


def _images_per_second(step: Callable[[], object], images_per_step: int, total: int, device: torch.device) -> float:
    step()  # warm-up: allocator, cuDNN autotuning, lazy initialisation
    if device.type == "cuda":
        torch.cuda.synchronize()
    steps = max(1, -(-total // images_per_step))
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * images_per_step / (time.perf_counter() - start)


def measure(args: argparse.Namespace) -> dict:
    device = inference.resolve_device(args.device)
    _, _, default_batch = PRESETS[args.preset]
    batch_size = args.batch_size or default_batch
    if args.classifier:
        classifier = inference.load_classifier(args.classifier, device=str(device))
        standardizer = (inference.load_standardizer(args.standardizer, device=str(device), classifier=classifier)
                        if args.standardizer else inference.load_standardizer("none"))
    else:
        standardizer, classifier = _random_models(args.preset, device)
        if args.standardizer:
            standardizer = inference.load_standardizer(args.standardizer, device=str(device))
    size = classifier.input_size
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, (size + 32, size + 32, 3), dtype=np.uint8)) for _ in range(batch_size)]
    batch = torch.rand(batch_size, 3, size, size, device=device)

    stages = {
        "standardizer": lambda: standardizer(batch),
        "classifier": lambda: classifier.predict(batch),
        "end_to_end": lambda: inference.run_batch(pictures, standardizer, classifier),
    }
    rates = {name: _images_per_second(step, batch_size, args.images, device) for name, step in stages.items()}
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "preset": None if args.classifier else args.preset,
        "standardizer": standardizer.name,
        "classifier": classifier.name,
        "input_size": size,
        "batch_size": batch_size,
        "images": args.images,
        "images_per_second": {k: round(v, 2) for k, v in rates.items()},
        # What share of the end-to-end time the standardizer takes: the bottleneck check.
        "standardizer_share": round(rates["end_to_end"] / rates["standardizer"], 3),
    }


def run(args: argparse.Namespace) -> int:
    if args.images < 1:
        print("stainbridge bench throughput: --images must be at least 1", file=sys.stderr)
        return 2
    try:
        result = measure(args)
    except (inference.ModelMismatch, inference.DeviceUnavailable, FileNotFoundError) as exc:
        print(f"stainbridge bench throughput: {exc}", file=sys.stderr)
        return 2
    rates = result["images_per_second"]
    print(f"device {result['device']} ({result['device_name']}), input {result['input_size']} px, batch {result['batch_size']}")
    for stage, rate in rates.items():
        print(f"  {stage:<13} {rate:>10.1f} images/s")
    print(f"  the standardizer takes {result['standardizer_share']:.0%} of the end-to-end time")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return parser


if __name__ == "__main__":
    sys.exit(run(get_args_parser().parse_args()))
