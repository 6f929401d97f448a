"""stainbridge bench accuracy: cross-hospital accuracy of every standardization method.

    stainbridge bench accuracy --reference DIR --target DIR [--preset tiny|cpu|full] [--json OUT]
        [--out-dir DIR] [--size PX] [--mode transductive|inductive|both] [--threads N]
        [--variants cyclegan_semantic cyclegan_colour colorization colour_map colour_map_balanced im]
        [--markdown FILE] [--grid FILE] [--reviews N]

1. Geometry (``models.bench.data``/``models.imaging.site_geometry``): reference images are cut to a centred
   window, target images to the window of the same physical width (site magnification estimated
   without labels from red-cell diameters, nucleus areas as the fallback), all resized to --size.
2. The classifier is trained on the reference train split with strong stain augmentation
   (``models.imaging.stain_augment``), or reused from --out-dir when one fits.
3. Standardizers: none (raw), Reinhard, Macenko (``models.imaging.classical``, fitted to
   the reference training windows); the CycleGAN with the class-preservation and
   structure terms (``models.semantic``); and that CycleGAN with the classifier fine-tuned on
   G(F(y)), reference images sent through the round trip with their labels ("adapted").
   Also "cyclegan_colour", the colour-only recipe (``models.colour_generator``, as ``stainbridge train
   cyclegan --preset colour``): per-pixel generator, discriminators behind AvgPool2d(4), generator lr
   1e-3, KL(8-view TTA p(x) || p(G(x))) weight 5 under the frozen classifier; no classifier adaptation.
   The CycleGANs train on unlabeled images only. The plain CycleGAN (no class-preservation term) and
   histogram matching were measured and deleted: each lost to the raw image on BCCD and on LISC. "colorization": the ColorizationGAN (``models.colorization``,
   as ``stainbridge train colorization``), pix2pix L -> ab trained on the reference windows only.
   "colour_map" (``models.imaging.colour_map``, as ``stainbridge train site-profile --method colour_map``):
   one colour map per site, the site's pooled L*a*b* histograms matched to the reference windows'
   (the deleted histogram matching above was per image, like Reinhard); "colour_map_balanced", the same map
   fitted and applied after a per-image white balance to the reference's background (a camera that sets its
   white balance per frame). "im"
   (``models.bench.adaptation``): the classifier adapted to the target without labels behind raw,
   Reinhard and the colour map (``<method>_im`` rows), as ``stainbridge train adapt``.
4. Scoring on the labeled target images, each method also with 8-fold dihedral test-time
   augmentation (``_tta``). Target labels are used for nothing else, except with ``--reviews N``:
   the ``validated`` row simulates the site's validation (``models.bench.validated``): N cells
   chosen by the service's rule are reviewed, the recipe is chosen on their labels and scored on
   the other cells only.

Modes: ``transductive`` (the standardizer sees every target image, unlabeled, as the nightly
retraining does) and ``inductive`` (target images split in two halves by a seeded shuffle that
ignores labels and keeps the crops of one slide on one side, ``data.slide_of``; a standardizer
trained on one half scores the other, both ways). Classical methods do not learn from the target,
so they have one result for both modes.
Outputs in --out-dir: checkpoints, results.json (or --json), results.md, grid.png, and
probabilities.safetensors: every row's [N, classes] softmax on the target images (tensor per method,
plus ``target_labels``; the header names the classes and the target files), for analyses over recipes
(averages, label-free choices) without scoring again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from stainbridge.models import checkpoint, inference
from stainbridge.models.bench import adaptation, learned, validated
from stainbridge.models.bench import data as bench_data
from stainbridge.models.bench import report as bench_report
from stainbridge.models.bench import training as bench_train
from stainbridge.models.imaging import classical, site_geometry
from stainbridge.models.metrics import stain_distance, stain_region_colours
from stainbridge.models.training import cyclegan as tg

PRESETS: dict[str, dict[str, Any]] = {
    # minutes on a CPU with small synthetic folders
    "tiny": {"size": 32, "window_fraction": 0.6, "arch": "resnet18_w16", "epochs": 2, "batch_size": 32,
             "lr": 1e-3, "gan_epochs": 2, "gan_steps": 8, "gan_batch": 4, "generator": "tiny",
             "discriminator": "tiny", "adapt_epochs": 1, "colour_epochs": 2, "colour_steps": 4, "colour_batch": 4,
             "colour_pool": 2,  # 32 px / 4 would leave the tiny PatchGAN a 1x1 map
             "colorization_unet": "tiny", "colorization_epochs": 1, "colorization_steps": 4, "colorization_batch": 4,
             "im_epochs": 1, "im_batch": 16},
    # the CPU study on real data: 64 px, well under an hour on 2 cores
    "cpu": {"size": 64, "window_fraction": 0.6, "arch": "resnet18_w16", "epochs": 16, "batch_size": 64,
            "lr": 1e-3, "gan_epochs": 4, "gan_steps": 100, "gan_batch": 4, "generator": "tiny",
            "discriminator": "tiny", "adapt_epochs": 2, "colour_epochs": 4, "colour_steps": 200, "colour_batch": 8,
            "colour_pool": 4,
            "colorization_unet": "cpu", "colorization_epochs": 4, "colorization_steps": 150, "colorization_batch": 16,
            "im_epochs": 10, "im_batch": 64},
    # a GPU
    "full": {"size": 128, "window_fraction": 0.6, "arch": "resnet18", "epochs": 30, "batch_size": 128,
             "lr": 2e-3, "gan_epochs": 10, "gan_steps": 400, "gan_batch": 8, "generator": "small",
             "discriminator": "small", "adapt_epochs": 5, "colour_epochs": 10, "colour_steps": 400, "colour_batch": 8,
             "colour_pool": 4,
             "colorization_unet": "unet_128", "colorization_epochs": 10, "colorization_steps": 400,
             "colorization_batch": 16, "im_epochs": 10, "im_batch": 64},
}
CLASSICAL = ("reinhard", "macenko")
LEARNED = ("cyclegan_semantic", "cyclegan_colour", "colorization")
# the site colour map (models.imaging.colour_map), fitted per mode like a learned one; "colour_map_balanced": the same
# with each image white-balanced to the reference background first (colour_map.white_balance)
SITE_FITTED = ("colour_map", "colour_map_balanced")
ADAPTATION = ("im",)  # label-free classifier adaptation behind each classical standardizer (models.bench.adaptation)


class BenchError(Exception):
    """The benchmark cannot run with these folders or options."""


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reference", required=True, help="labeled reference-lab folder (one sub-folder per class)")
    parser.add_argument("--target", required=True, help="labeled target-lab folder; labels used only for scoring")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                        help="tiny: minutes on synthetic data; cpu: the 64 px CPU study; full: a GPU")
    parser.add_argument("--json", default=None, help="results JSON (default <out-dir>/results.json)")
    parser.add_argument("--out-dir", default="runs/bench-accuracy", help="checkpoints, report and grid; "
                        "a classifier already there for the same classes/size/geometry is reused")
    parser.add_argument("--size", type=int, default=None, help="input size in pixels (multiple of 4)")
    parser.add_argument("--mode", choices=("transductive", "inductive", "both"), default="both")
    parser.add_argument("--arch", choices=("resnet18", "resnet34", "resnet18_w16"), default=None,
                        help="classifier; resnet18_w16 (models.small_resnet) is the CPU preset's")
    parser.add_argument("--epochs", type=int, default=None, help="classifier epochs")
    parser.add_argument("--gan-steps", type=int, default=None,
                        help="CycleGAN steps per epoch (cyclegan, cyclegan_semantic)")
    parser.add_argument("--colour-steps", type=int, default=None,
                        help="steps per epoch of cyclegan_colour (cpu preset: 4 epochs x 200, batch 8)")
    parser.add_argument("--variants", nargs="+", choices=LEARNED + SITE_FITTED + ADAPTATION, default=None,
                        help="learned standardizers to train, the site colour map, and 'im' (the classifier adapted "
                             "without labels behind raw, Reinhard and the colour map, as `stainbridge train "
                             "adapt`); default: all but colour_map_balanced (measured, not adopted: docs/accuracy.md)")
    parser.add_argument("--markdown", default=None, help="markdown report (default <out-dir>/results.md)")
    parser.add_argument("--grid", default=None, help="example grid PNG (default <out-dir>/grid.png)")
    parser.add_argument("--magnification", type=float, default=None,
                        help="target px -> reference px (an oracle when chosen by looking at results); "
                             "estimated without labels from red-cell diameters when omitted")
    parser.add_argument("--lab-jitter", type=float, default=0.0,
                        help="the reference classifier's augmentation also moves each image to a random L*a*b* "
                             "stain template (models.imaging.stain_augment.lab_jitter; 1 = its standard "
                             "deviations); 0, the default, leaves it out")
    parser.add_argument("--tight-crops", type=float, default=0.0,
                        help="share of the reference classifier's training images framed as another lab's tight crop "
                             "(a smaller centred square padded with its border colour, as the service pads a crop "
                             "smaller than the window; models.imaging.stain_augment.tight_crop); default 0")
    parser.add_argument("--im-prior", choices=adaptation.PRIORS, default=None,
                        help="the class prior of the 'im' rows' adaptation (`train adapt --prior`; default: its "
                             "default)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--reviews", type=int, default=0, metavar="N",
                        help="simulate a site's validation: N target cells chosen by the service's rule are "
                             "reviewed, the recipe is chosen on them and scored on the other cells (row "
                             "'validated', models.bench.validated); 0, the default, leaves it out")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Cross-hospital accuracy benchmark", add_help=add_help)
    add_arguments(parser)
    return parser


def _options(args: argparse.Namespace) -> argparse.Namespace:
    opts = argparse.Namespace(**vars(args))
    for key, value in PRESETS[args.preset].items():
        if getattr(opts, key, None) is None:
            setattr(opts, key, value)
    if opts.size % 4 or opts.size < 16:
        raise BenchError(f"--size must be a multiple of 4 and at least 16, got {opts.size}")
    if opts.reviews < 0:
        raise BenchError(f"--reviews must be 0 (off) or a number of cells, got {opts.reviews}")
    return opts


def main(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    opts = _options(args)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = torch.device("cuda" if opts.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if opts.device == "auto" else opts.device))
    out_dir = Path(opts.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}

    t = time.monotonic()
    d = bench_data.prepare(opts.reference, opts.target, size=opts.size, window_fraction=opts.window_fraction,
                           seed=opts.seed, magnification=opts.magnification, log=_log)
    times["prepare_s"] = round(time.monotonic() - t, 1)

    cls_path = out_dir / "classifier.safetensors"
    t = time.monotonic()
    augmentation = bench_train.augmentation_name(learned.STAIN_STRENGTH, opts.lab_jitter, opts.tight_crops)
    loaded = bench_train.load_reference_classifier(cls_path, d, device, augmentation)
    if loaded is None:
        _log(f"training the reference classifier ({opts.arch}, {opts.size} px, {opts.epochs} epochs, {augmentation})")
        model, header = bench_train.train_reference_classifier(
            d, cls_path, arch=opts.arch, epochs=opts.epochs, batch_size=opts.batch_size, lr=opts.lr,
            strength=learned.STAIN_STRENGTH, seed=opts.seed, reference_root=opts.reference, device=device, log=_log,
            lab=opts.lab_jitter, tight_crops=opts.tight_crops)
        reused = False
    else:
        model, header = loaded
        reused = True
        _log(f"reusing {cls_path} (trained in {header.get('train_seconds')} s)")
    times["classifier_s"] = round(time.monotonic() - t, 1)

    x = bench_data.to_float(d.target)
    clf = learned.as_classifier(model, header, cls_path.stem, device)
    methods: dict[str, Any] = {}
    images: dict[str, Tensor] = {"raw": x}
    outputs: dict[str, tuple[Tensor, Tensor]] = {}
    t = time.monotonic()
    for name in ("raw", *CLASSICAL):
        scored = learned.score(x, inference.load_standardizer("none" if name == "raw" else name, classifier=clf), clf)
        images[name] = scored["standardized"]
        outputs[name] = (scored["plain"], scored["standardized"])
        outputs[f"{name}_tta"] = (scored["tta"], scored["standardized"])
    times["classical_s"] = round(time.monotonic() - t, 1)

    runs: dict[str, Any] = {}
    trained: dict[str, Any] = {}  # standardizers that do not depend on the mode, trained once
    modes = ("transductive", "inductive") if opts.mode == "both" else (opts.mode,)
    for mode in modes:
        mode_folds = learned.folds(len(d.target), mode, opts.seed, d.target_groups)
        to_adapt = {k: [images[k]] * len(mode_folds) for k in adaptation.STANDARDIZERS}
        for variant in (v for v in (opts.variants or ("colour_map",)) if v in SITE_FITTED):
            t = time.monotonic()
            r = learned.run_colour_map(mode, d, model, header, cls_path, opts, out_dir, device, variant=variant)
            outputs.update(r["results"])
            runs[f"{variant}_{mode}"] = r["runs"]
            to_adapt[variant] = r["per_fold"]
            times[f"{variant}_{mode}_s"] = round(time.monotonic() - t, 1)
            key = variant if mode == "transductive" else f"{variant}_inductive"
            images.setdefault(key, r["results"][key][1])
        if "im" in (opts.variants or ADAPTATION):
            t = time.monotonic()
            r = adaptation.run_information_maximization(mode, d, model, header, to_adapt, mode_folds, opts, out_dir,
                                                        device, _log)
            outputs.update(r["results"])
            runs[f"im_{mode}"] = r["runs"]
            times[f"im_{mode}_s"] = round(time.monotonic() - t, 1)
        for variant in (v for v in (opts.variants or LEARNED) if v in LEARNED):
            t = time.monotonic()
            r = learned.run_learned(variant, mode, d, model, header, cls_path, opts, out_dir, device, trained)
            outputs.update(r["results"])
            runs[f"{variant}_{mode}"] = r["runs"]
            times[f"{variant}_{mode}_s"] = round(time.monotonic() - t, 1)
            key = variant if mode == "transductive" else f"{variant}_inductive"
            images.setdefault(key, r["results"][key][1])

    # label-free: how reference-like each method's output looks (stain colours of background, pink and
    # nucleus pixels vs the held-out reference windows), and how much it changed the pixels
    reference_colours = stain_region_colours(bench_data.to_float(d.test))
    stain_scores: dict[int, dict[str, Any]] = {}
    for name, (probs, standardized) in outputs.items():
        key = id(standardized)  # TTA rows share their method's images
        if key not in stain_scores:
            stain_scores[key] = {**stain_distance(standardized, reference_colours),
                                 "pixel_change": float((standardized - x).abs().mean())}
        methods[name] = {**learned.metrics_of(probs, d.target_labels, d.classes), **stain_scores[key]}
    probabilities = {name: probs for name, (probs, _) in outputs.items()}
    checkpoint.save_checkpoint(out_dir / "probabilities.safetensors", {**probabilities, "target_labels": d.target_labels},
                               {"kind": "bench_probabilities", "classes": d.classes, "seed": opts.seed,
                                "target": str(Path(opts.target).resolve()),
                                "target_files": [str(Path(p).relative_to(Path(opts.target))) for p in d.target_paths]})
    reference_self = stain_distance(bench_data.to_float(d.val), reference_colours)["delta_e"]
    times["total_s"] = round(time.monotonic() - started, 1)
    setup = {
        "reference": str(Path(opts.reference).resolve()), "target": str(Path(opts.target).resolve()),
        "preset": opts.preset, "resolution_px": opts.size, "mode": opts.mode, "seed": opts.seed,
        "geometry": d.geometry, "classifier": {"checkpoint": cls_path.name, "sha256": header.get("sha256"),
                                               "architecture": header["architecture"], "reused": reused,
                                               "train_seconds": header.get("train_seconds"),
                                               "reference_metrics": {k: v for k, v in header["metrics"].items()
                                                                     if k != "history"}},
        "standardizer_runs": runs, "target_images": len(d.target), "target_labels_used_for": "scoring only",
        "stain_delta_e_reference_val": reference_self,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "device": str(device), "cuda": torch.cuda.get_device_name(0) if device.type == "cuda" else None},
        "times": times, "code_version": checkpoint.code_version(),
        "options": {k: v for k, v in vars(opts).items() if isinstance(v, (int, float, str, bool, type(None)))},
    }
    result = {"methods": methods, "setup": setup}
    if opts.reviews:
        methods.update(validated.validated_rows(outputs, d.target_labels, d.classes, d.target_paths,
                                                reviews=opts.reviews, seed=opts.seed))
    json_path = Path(opts.json) if opts.json else out_dir / "results.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2))
    md_path = Path(opts.markdown) if opts.markdown else out_dir / "results.md"
    grid_path = Path(opts.grid) if opts.grid else out_dir / "grid.png"
    md_path.write_text(bench_report.markdown(result))
    bench_report.grid(images, d.target_labels, d.classes).save(grid_path)
    _log(f"wrote {json_path}, {md_path}, {grid_path} in {times['total_s']} s")
    return result


def run(args: argparse.Namespace) -> int:
    try:
        main(args)
    except (BenchError, bench_data.BenchDataError, site_geometry.GeometryEstimateError, checkpoint.CheckpointError,
            classical.BaselineError, tg.TrainingError, validated.ValidationBenchError, OSError) as exc:
        print(f"stainbridge bench accuracy: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run(get_args_parser().parse_args()))
