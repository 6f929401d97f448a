"""stainbridge train site-profile: a classical standardizer checkpoint that carries a site profile.

    stainbridge train site-profile --method reinhard --source DIR --classifier FILE --out FILE [--reference DIR]

The service takes its geometry from the standardizer's site profile (``inference.resolve_geometry``,
scale "profile"). A learned standardizer gets one from ``train cyclegan`` / ``train colorization``;
a classical method named in the configuration ("reinhard") has no file to carry it. This command
writes that file: kind "standardizer", architecture = the method, the reference stain statistics
from the classifier's header (what the method fits to), and the site profile estimated without
labels from the --source images' red cells against the classifier's reference scale (or, for a
classifier that does not record one, against a sample of --reference). No tensors are learned.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from stainbridge.models import checkpoint, inference
from stainbridge.models.imaging import data, site_geometry

__all__ = ["add_arguments", "main", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", choices=inference.CLASSICAL_STANDARDIZERS, default="reinhard",
                        help="classical standardizer the checkpoint runs (default reinhard)")
    parser.add_argument("--source", required=True, help="the incoming lab's unlabeled images (searched recursively)")
    parser.add_argument("--classifier", required=True,
                        help="classifier checkpoint: its reference stain statistics and reference scale")
    parser.add_argument("--reference", default=None,
                        help="reference images, only needed when the classifier records no reference scale")
    parser.add_argument("--out", required=True, help="standardizer checkpoint to write (.safetensors)")


def main(args: argparse.Namespace) -> str:
    started = time.monotonic()
    classifier = inference.load_classifier(args.classifier, device="cpu")
    stats = classifier.header.get("reference_stain")
    if not stats:
        raise inference.ModelMismatch(f"{args.classifier} carries no reference stain statistics for {args.method}; "
                                      "retrain it with this stainbridge version")
    geometry = classifier.header.get("geometry") or {}
    has_scale = geometry.get("reference_red_cell_diameter_px") or geometry.get("reference_nucleus_area_px")
    if not has_scale and not args.reference:
        raise site_geometry.GeometryEstimateError(
            f"{args.classifier} records no reference red-cell diameter; pass --reference DIR to measure it")
    source = data.list_unlabeled(args.source)
    reference = data.list_unlabeled(args.reference) if args.reference and not has_scale else []
    profile = site_geometry.training_site_profile(source, reference, classifier_geometry=geometry)
    header: dict[str, Any] = {
        "kind": "standardizer", "architecture": args.method, "reference_stain": stats,
        "classifier_sha256": classifier.sha256, "site_profile": profile,
        "training_data": {"source": {"root": str(Path(args.source).resolve()), "images": len(source),
                                     "used_for": "site profile only"}, "labels_used": False},
        "train_seconds": round(time.monotonic() - started, 1),
    }
    sha = checkpoint.save_checkpoint(args.out, {}, header)
    print(json.dumps({"out": str(args.out), "sha256": sha, "site_profile": profile}), file=sys.stderr)
    print(sha)
    return sha


def run(args: argparse.Namespace) -> int:
    try:
        main(args)
    except (site_geometry.GeometryEstimateError, inference.ModelMismatch, checkpoint.CheckpointError,
            data.DataError, FileNotFoundError) as exc:
        print(f"stainbridge train site-profile: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
