"""stainbridge train site-profile: a standardizer checkpoint fitted to one site without labels.

    stainbridge train site-profile --method colour_map|reinhard|macenko --source DIR --classifier FILE
        --out FILE [--reference DIR] [--histogram-weight W] [--seed N]

The service takes its geometry from the standardizer's site profile (``inference.resolve_geometry``,
scale "profile"). A learned standardizer gets one from ``train cyclegan`` / ``train colorization``;
this command writes one for the methods that are not trained networks: kind "standardizer",
architecture = the method, the reference stain statistics from the classifier's header, and the site
profile estimated without labels from the --source images' red cells against the classifier's
reference scale (or, for a classifier that does not record one, against a sample of --reference).

``colour_map`` (``models.imaging.colour_map``) also fits the site's colour map: a sample of --source
images and of --reference images, each cut as the service cuts it (the site's window from the profile
just estimated; the reference window for the reference), and the site's pixel colours transported onto
the reference's, keeping as much of the site's own histogram shape as it can while staying closer to
the reference stain than Reinhard on those images (by 10 %, ``colour_map.BASELINE_MARGIN``;
``--histogram-weight`` sets it by hand). It needs --reference. The classical methods learn nothing but the profile.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from stainbridge.models import checkpoint, inference
from stainbridge.models.imaging import classical, colour_map, data, site_geometry

__all__ = ["add_arguments", "fit_site_colour_map", "main", "run"]

COLOUR_SAMPLE = 1000  # images of each folder the colour map is fitted on (evenly spaced)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", choices=inference.SITE_PROFILE_METHODS, default="reinhard",
                        help="what the checkpoint runs: colour_map (the site's colours mapped onto the "
                             "reference's; needs --reference) or a classical method (default reinhard)")
    parser.add_argument("--source", required=True, help="the incoming lab's unlabeled images (searched recursively)")
    parser.add_argument("--classifier", required=True,
                        help="classifier checkpoint: its reference stain statistics and reference scale")
    parser.add_argument("--reference", default=None,
                        help="reference images: the colours colour_map maps onto, and the reference scale "
                             "when the classifier records none")
    parser.add_argument("--out", required=True, help="standardizer checkpoint to write (.safetensors)")
    parser.add_argument("--histogram-weight", type=float, default=None,
                        help="colour_map: 1 matches the site's colour histograms to the reference's, 0 only their "
                             "mean and spread; default: chosen on the site's images (the smallest weight whose "
                             "stain Delta E is 10 %% below Reinhard's)")
    parser.add_argument("--seed", type=int, default=0, help="colour_map: pixel sample and rotations")


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
    if args.method == colour_map.ARCHITECTURE and not args.reference:
        raise classical.BaselineError("--method colour_map maps the site's colours onto the reference hospital's: "
                                      "pass --reference DIR with its images")
    source = data.list_unlabeled(args.source)
    reference_all = data.list_unlabeled(args.reference) if args.reference else []
    reference = reference_all if not has_scale else []
    profile = site_geometry.training_site_profile(source, reference, classifier_geometry=geometry)
    state: dict[str, torch.Tensor] = {}
    fitted: dict[str, Any] | None = None
    if args.method == colour_map.ARCHITECTURE:
        state, fitted = fit_site_colour_map(classifier, profile, source, reference_all,
                                            histogram_weight=args.histogram_weight, seed=args.seed)
    header: dict[str, Any] = {
        "kind": "standardizer", "architecture": args.method, "reference_stain": stats,
        "classifier_sha256": classifier.sha256, "site_profile": profile,
        "training_data": {"source": {"root": str(Path(args.source).resolve()), "images": len(source),
                                     "used_for": "site profile and colour map" if fitted else "site profile only"},
                          "labels_used": False},
        "train_seconds": round(time.monotonic() - started, 1),
    }
    if fitted is not None:
        header["colour_map"] = {**fitted, "reference": str(Path(args.reference).resolve())}
    sha = checkpoint.save_checkpoint(args.out, state, header)
    print(json.dumps({"out": str(args.out), "sha256": sha, "site_profile": profile}), file=sys.stderr)
    print(sha)
    return sha


def fit_site_colour_map(classifier: inference.Classifier, profile: dict[str, Any], source: list, reference: list, *,
                        histogram_weight: float | None = None,
                        seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The colour map of ``colour_map`` fitted on samples of both folders, each image cut as the service
    cuts it, its histogram weight chosen against the service's Reinhard unless given: (checkpoint tensors,
    header section)."""
    site_cut = inference.resolve_geometry(classifier, inference.Standardizer(
        lambda batch: batch, name="site profile", header={"site_profile": profile}))
    reference_cut = inference.resolve_geometry(classifier, None)
    site_images = site_geometry.evenly(source, COLOUR_SAMPLE)
    reference_images = site_geometry.evenly(reference, COLOUR_SAMPLE)
    fitted = colour_map.fit_colour_map(
        inference.prepare_batch([data.load_rgb(p) for p in site_images], site_cut),
        inference.prepare_batch([data.load_rgb(p) for p in reference_images], reference_cut),
        baseline=inference.load_standardizer("reinhard", classifier=classifier), histogram_weight=histogram_weight,
        seed=seed)
    return fitted.state(), fitted.fit


def run(args: argparse.Namespace) -> int:
    try:
        main(args)
    except (site_geometry.GeometryEstimateError, inference.ModelMismatch, checkpoint.CheckpointError,
            classical.BaselineError, data.DataError, FileNotFoundError) as exc:
        print(f"stainbridge train site-profile: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
