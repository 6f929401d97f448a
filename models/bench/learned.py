"""The benchmark's learned standardizers and the service's predict on in-memory windows.

``run_learned`` trains one variant of ``accuracy.LEARNED`` for one mode (transductive: on every
target image; inductive: on one half, scoring the other, both ways; the split ignores labels) and
scores the target windows through ``score``, the service's predict (``inference.predict_views``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from stainbridge.models import checkpoint, inference
from stainbridge.models.bench import data as bench_data
from stainbridge.models.bench import training as bench_train
from stainbridge.models.imaging import classical, colour_map, site_geometry
from stainbridge.models.metrics import classification_metrics
from stainbridge.models.training import cyclegan as tg
from stainbridge.models.training import gan, semantic, site_profile

__all__ = ["ADAPTED", "COLOUR", "STAIN_STRENGTH", "as_classifier", "folds", "metrics_of", "run_colour_map", "run_learned",
           "score"]

ADAPTED = ("cyclegan_semantic",)  # variants that also fine-tune the classifier on G(F(y))
# cyclegan_colour: the colour-only recipe of `stainbridge train cyclegan --preset colour` (models.colour_generator):
# per-pixel generator, PatchGAN behind AvgPool2d(4), generator lr 1e-3, raw-teacher semantic KL weight 5.
COLOUR = {"architecture": "pointwise_colour", "generator_args": dict(tg.COLOUR_ARGS), "discriminator": "tiny",
          "generator_lr": 1e-3, "discriminator_lr": 2e-4, "semantic_weight": 5.0}
STAIN_STRENGTH = 1.0


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- prediction


def as_classifier(model: nn.Module, header: dict[str, Any], name: str, device: torch.device) -> inference.Classifier:
    """An in-memory network as the service's Classifier (same normalization, same predict)."""
    return inference.Classifier(model.eval(), header, name=name, sha256=header.get("sha256") or "", device=device)


@torch.inference_mode()
def score(images01: Tensor, standardizer: inference.Standardizer, clf: inference.Classifier, *,
          batch_size: int = 256) -> dict[str, Tensor]:
    """The service's path on prepared target windows: standardizer, then the classifier's softmax
    without and with the 8-view TTA. Returns {"plain", "tta", "standardized"} on the CPU."""
    plain, tta, standardized = [], [], []
    for i in range(0, len(images01), batch_size):
        std = standardizer(images01[i:i + batch_size].to(clf.device))
        plain.append(inference.predict_views(clf, std))
        tta.append(inference.predict_views(clf, std, tta=True))
        standardized.append(std.float().cpu())
    return {"plain": torch.cat(plain), "tta": torch.cat(tta), "standardized": torch.cat(standardized)}


def metrics_of(probs: Tensor, labels: Tensor, classes: list[str]) -> dict[str, Any]:
    return classification_metrics(labels.tolist(), probs.argmax(1).tolist(), classes)


# --------------------------------------------------------------------------- standardizers


def _semantic_term(variant: str, model: nn.Module, header: dict, classifier_path: Path,
                   device: torch.device) -> tuple[Any, dict | None]:
    if variant == "cyclegan_colour":
        # KL(8-view dihedral TTA p(x) || p(G(x))) under the frozen bench classifier, x_to_y only
        consistency = semantic.ClassConsistency.from_checkpoint(classifier_path, device, teacher="raw")
        w = COLOUR["semantic_weight"]
        term = gan.SemanticTerm(fn=consistency, weight=w, pairs=consistency.pairs)
        return term, {**consistency.describe(), "weight": w}
    anchor = classical.Reinhard.from_stats(header["reference_stain"])
    consistency = semantic.ClassConsistency(model, header["normalization"], anchor=anchor)
    fn = semantic.StructureAndClass(consistency, structure_weight=1.0)
    term = gan.SemanticTerm(fn=fn, weight=1.0, pairs=("x_to_y", "y_cycle"))
    return term, {"classifier": classifier_path.name, "sha256": header.get("sha256"), "weight": 1.0,
                  "loss": "kl(p(reinhard(real)) || p(translated)) + 1.0 * structure_loss", "pairs": list(term.pairs)}


def folds(n: int, mode: str, seed: int, groups: Sequence[str] | None = None) -> list[tuple[Tensor, Tensor]]:
    """(fit indices, score indices) per standardizer to train; the split ignores labels. ``groups``: one key per
    image (``data.slide_of``); the images of one group stay on one side (crops of one slide, the same cell
    photographed again), the groups dealt in a seeded order, each to the half with fewer images so far."""
    if mode == "transductive":
        every = torch.arange(n)
        return [(every, every)]
    g = torch.Generator().manual_seed(seed + 123)
    if groups is None or len(set(groups)) == n:
        perm = torch.randperm(n, generator=g)
        a, b = perm[: n // 2], perm[n // 2:]
        return [(a, b), (b, a)]
    if len(groups) != n:
        raise ValueError(f"need one group per image: {len(groups)} groups for {n} images")
    members: dict[str, list[int]] = {}
    for index, key in enumerate(groups):
        members.setdefault(key, []).append(index)
    keys = sorted(members)
    halves: tuple[list[int], list[int]] = ([], [])
    for k in torch.randperm(len(keys), generator=g).tolist():
        min(halves, key=len).extend(members[keys[k]])
    a, b = (torch.tensor(sorted(h), dtype=torch.long) for h in halves)
    return [(a, b), (b, a)]


def run_colorization(mode: str, d: bench_data.BenchData, model: nn.Module, header: dict, cls_path: Path,
                     opts: argparse.Namespace, out_dir: Path, device: torch.device,
                     cache: dict[str, Any]) -> dict[str, Any]:
    """The ColorizationGAN (``models.colorization``), trained on the reference train windows only: it never
    sees a target image, so transductive and inductive are the same model (trained once, saved under both
    names, both rows reported; ``cache`` keeps it between the modes)."""
    clf = as_classifier(model, header, cls_path.stem, device)
    ckpt = out_dir / f"standardizer_colorization_{mode}.safetensors"
    trained = cache.get("colorization")
    if trained is None:
        _log(f"training the colorization standardizer on {len(d.train)} reference windows (no target image)")
        trained = bench_train.train_colorization(
            d.train, unet=opts.colorization_unet, epochs=opts.colorization_epochs, steps=opts.colorization_steps,
            batch_size=opts.colorization_batch, discriminator=opts.discriminator, seed=opts.seed, device=device,
            log=_log, training_data={"reference": {"root": str(Path(opts.reference).resolve()), "images": len(d.train),
                                                   "split": "train"}, "source": None, "geometry": d.geometry})
        cache["colorization"] = trained
    g, sh = trained
    sh = {**sh, "site_profile": d.site_profile}
    sh["sha256"] = bench_train.save_colorization(g, sh, ckpt)
    scored = score(bench_data.to_float(d.target), inference.wrap_generator(g, name=ckpt.stem, header=sh,
                                                                           sha256=sh["sha256"], device=device), clf)
    key = "colorization" if mode == "transductive" else "colorization_inductive"
    return {"results": {key: (scored["plain"], scored["standardized"]), f"{key}_tta": (scored["tta"], scored["standardized"])},
            "runs": [{"checkpoint": ckpt.name, "sha256": sh["sha256"], "train_seconds": sh["train_seconds"],
                      "target_images_seen": 0}]}


def run_colour_map(mode: str, d: bench_data.BenchData, model: nn.Module, header: dict, cls_path: Path,
                   opts: argparse.Namespace, out_dir: Path, device: torch.device,
                   variant: str = "colour_map") -> dict[str, Any]:
    """The site colour map (``models.imaging.colour_map``, as ``stainbridge train site-profile --method
    colour_map``): fitted per fold on the fit half's target windows (every window, transductive) and the
    reference train windows, the same sample sizes as the command; ``variant`` "colour_map_balanced"
    white-balances each image first (``balance=True``). Returns the rows, the checkpoints and
    "per_fold": every target window through each fold's map (for the adapted-classifier rows)."""
    clf = as_classifier(model, header, cls_path.stem, device)
    x = bench_data.to_float(d.target)
    n = len(x)
    reference = bench_data.to_float(torch.stack(site_geometry.evenly(d.train, site_profile.COLOUR_SAMPLE)))
    reinhard = inference.load_standardizer("reinhard", classifier=clf)
    plain, tta = torch.zeros(n, len(d.classes)), torch.zeros(n, len(d.classes))
    shown, per_fold, runs = torch.zeros_like(x), [], []
    for fold, (fit, held) in enumerate(folds(n, mode, opts.seed, d.target_groups)):
        started = time.monotonic()
        site = torch.stack(site_geometry.evenly(x[fit], site_profile.COLOUR_SAMPLE))
        fitted = colour_map.fit_colour_map(site, reference, baseline=reinhard, seed=opts.seed + fold,
                                           balance=variant == "colour_map_balanced")
        ckpt = out_dir / f"standardizer_{variant}_{mode}{'' if mode == 'transductive' else f'_fold{fold}'}.safetensors"
        sh = {"kind": "standardizer", "architecture": colour_map.ARCHITECTURE, "reference_stain": header["reference_stain"],
              "classifier_sha256": header.get("sha256"), "site_profile": d.site_profile,
              "colour_map": fitted.fit,
              "training_data": {"source": {"root": str(Path(opts.target).resolve()), "images": len(fit), "mode": mode,
                                           "fold": fold, "scored_images_seen": mode == "transductive"},
                                "reference": {"root": str(Path(opts.reference).resolve()), "images": len(reference),
                                              "split": "train"}, "labels_used": False, "geometry": d.geometry},
              "train_seconds": round(time.monotonic() - started, 1)}
        sha = checkpoint.save_checkpoint(ckpt, fitted.state(), sh)
        scored = score(x, inference.Standardizer(fitted, name=ckpt.stem, header=sh, sha256=sha, device=device), clf)
        plain[held], tta[held] = scored["plain"][held], scored["tta"][held]
        shown[held] = scored["standardized"][held]
        per_fold.append(scored["standardized"])
        runs.append({"checkpoint": ckpt.name, "sha256": sha, "train_seconds": sh["train_seconds"],
                     "target_images_seen": len(fit)})
    key = variant if mode == "transductive" else f"{variant}_inductive"
    return {"results": {key: (plain, shown), f"{key}_tta": (tta, shown)}, "runs": runs, "per_fold": per_fold}


def run_learned(variant: str, mode: str, d: bench_data.BenchData, model: nn.Module, header: dict, cls_path: Path,
                opts: argparse.Namespace, out_dir: Path, device: torch.device,
                cache: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train the variant's standardizer(s) for one mode; returns method name -> probabilities etc."""
    if variant == "colorization":
        return run_colorization(mode, d, model, header, cls_path, opts, out_dir, device, {} if cache is None else cache)
    clf = as_classifier(model, header, cls_path.stem, device)
    n = len(d.target)
    results: dict[str, Any] = {}
    probs = {k: torch.zeros(n, len(d.classes)) for k in ("plain", "tta", "adapted", "adapted_tta")}
    standardized = torch.zeros(n, 3, d.size, d.size)
    reference = d.train
    infos = []
    for fold, (fit, held) in enumerate(folds(n, mode, opts.seed, d.target_groups)):
        term, info = _semantic_term(variant, model, header, cls_path, device)
        ckpt = out_dir / f"standardizer_{variant}_{mode}{'' if mode == 'transductive' else f'_fold{fold}'}.safetensors"
        _log(f"training {ckpt.name} on {len(fit)} target + {len(reference)} reference images (unlabeled)")
        if variant == "cyclegan_colour":
            train_kw: dict[str, Any] = {
                "generator": opts.generator, "discriminator": COLOUR["discriminator"], "epochs": opts.colour_epochs,
                "steps": opts.colour_steps, "batch_size": opts.colour_batch, "architecture": COLOUR["architecture"],
                "generator_args": COLOUR["generator_args"], "discriminator_pool": opts.colour_pool,
                "generator_lr": COLOUR["generator_lr"], "discriminator_lr": COLOUR["discriminator_lr"]}
        else:
            train_kw = {"generator": opts.generator, "discriminator": opts.discriminator, "epochs": opts.gan_epochs,
                        "steps": opts.gan_steps, "batch_size": opts.gan_batch}
        g_xy, g_yx, sh = bench_train.train_standardizer(
            d.target[fit], reference, ckpt, **train_kw, semantic_term=term,
            semantic_info=info, seed=opts.seed + fold, device=device, log=_log, site_profile=d.site_profile,
            training_data={"source": {"root": str(Path(opts.target).resolve()), "images": len(fit), "mode": mode,
                                      "fold": fold, "scored_images_seen": mode == "transductive"},
                           "reference": {"root": str(Path(opts.reference).resolve()), "images": len(reference),
                                         "split": "train"},
                           "geometry": d.geometry})
        x = bench_data.to_float(d.target[held])
        standardizer = inference.wrap_generator(g_xy, name=ckpt.stem, header=sh, sha256=sh["sha256"], device=device)
        scored = score(x, standardizer, clf)
        standardized[held] = scored["standardized"]
        probs["plain"][held], probs["tta"][held] = scored["plain"], scored["tta"]
        entry = {"checkpoint": ckpt.name, "sha256": sh["sha256"], "train_seconds": sh["train_seconds"]}
        if variant in ADAPTED and opts.adapt_epochs > 0:
            gfy = semantic.translate(g_xy, semantic.translate(g_yx, bench_data.to_float(reference)))
            tuned_path = out_dir / f"classifier_adapted_{variant}_{mode}_fold{fold}.safetensors"
            tuned, th = bench_train.adapt_classifier(
                model, header, d, gfy, tuned_path,
                epochs=opts.adapt_epochs, batch_size=opts.batch_size, lr=opts.lr / 5, strength=STAIN_STRENGTH,
                seed=opts.seed + fold, device=device, standardizer_sha=sh["sha256"], log=_log)
            adapted = score(x, standardizer, as_classifier(tuned, th, tuned_path.stem, device))
            probs["adapted"][held], probs["adapted_tta"][held] = adapted["plain"], adapted["tta"]
            entry.update(adapted_classifier=th["sha256"], adapted_train_seconds=th["train_seconds"],
                         adapted_reference_test_accuracy=th["metrics"].get("test_accuracy"))
        infos.append(entry)
    suffix = "" if mode == "transductive" else "_inductive"
    results[f"{variant}{suffix}"] = (probs["plain"], standardized)
    results[f"{variant}{suffix}_tta"] = (probs["tta"], standardized)
    if variant in ADAPTED and opts.adapt_epochs > 0:
        results[f"{variant}_adapted{suffix}"] = (probs["adapted"], standardized)
        results[f"{variant}_adapted{suffix}_tta"] = (probs["adapted_tta"], standardized)
    return {"results": results, "runs": infos}
