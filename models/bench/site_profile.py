"""`stainbridge site-profile`: print the label-free geometry estimate of one or more sites.

    stainbridge site-profile --reference ../shared/data/pbc --target ../shared/data/bccd ../shared/data/lisc

The reference's scale comes from ``--reference`` (an evenly spaced sample of its images) or from a
classifier checkpoint's ``geometry`` header (``--classifier``), the way the service and `train
cyclegan` see it. Each target folder is read whole (labels, if its sub-folders are classes, are
ignored). One JSON line per site: magnification, method, red-cell diameter in native pixels with
its bootstrap interval, cells counted, seconds taken.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from stainbridge.models import checkpoint
from stainbridge.models.imaging import data, site_geometry

__all__ = ["add_arguments", "main", "run"]

REFERENCE_SAMPLE = 300


def add_arguments(parser: argparse.ArgumentParser) -> None:
    ref = parser.add_mutually_exclusive_group(required=True)
    ref.add_argument("--reference", help="reference image folder (its red cells set the scale)")
    ref.add_argument("--classifier", help="classifier checkpoint whose geometry header holds the reference scale")
    parser.add_argument("--target", nargs="+", required=True, help="one or more unlabeled (or labeled) image folders")
    parser.add_argument("--sample", type=int, default=REFERENCE_SAMPLE,
                        help=f"reference images measured, evenly spaced (default {REFERENCE_SAMPLE})")


def reference_of(args: argparse.Namespace) -> dict[str, Any]:
    """The reference geometry block, measured from --reference or read from --classifier."""
    if args.classifier:
        _, header = checkpoint.load_checkpoint(args.classifier)
        geo = header.get("geometry") or {}
        if not geo.get("reference_red_cell_diameter_px") and not geo.get("reference_nucleus_area_px"):
            raise site_geometry.GeometryEstimateError(
                f"{args.classifier} records no reference red-cell diameter or nucleus area; "
                "retrain it with this stainbridge version or pass --reference DIR")
        return dict(geo)
    paths = data.list_unlabeled(args.reference)
    sample = paths[:: max(1, len(paths) // max(1, args.sample))][: args.sample]
    return {**site_geometry.reference_geometry(sample), "reference_images": len(sample)}


def main(args: argparse.Namespace, *, log: Any = print) -> list[dict[str, Any]]:
    started = time.monotonic()
    reference = reference_of(args)
    log(json.dumps({"site": "reference", **{k: v for k, v in reference.items() if k.startswith("reference_")},
                    "seconds": round(time.monotonic() - started, 1)}))
    rows = []
    for folder in args.target:
        started = time.monotonic()
        profile = site_geometry.estimate_site_profile(data.list_unlabeled(folder), reference)
        rows.append({"site": str(folder), **profile, "seconds": round(time.monotonic() - started, 1)})
        log(json.dumps(rows[-1]))
    return rows


def run(args: argparse.Namespace) -> int:
    try:
        main(args)
    except (site_geometry.GeometryEstimateError, data.DataError, checkpoint.CheckpointError, FileNotFoundError) as exc:
        print(f"stainbridge site-profile: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
