"""Training steps of the cross-hospital benchmark, on in-memory tensors from ``models.bench.data``.

The loops are the repository's own (``models.training.classifier.train_one_epoch``/``evaluate``,
``models.training.gan.train_one_epoch`` with its losses, pool and schedule);
what differs from ``stainbridge train ...`` is the data (decoded once, geometry-normalized by the
site magnification) and the classifier's strong stain augmentation (``models.imaging.stain_augment``).
Every checkpoint carries the usual header: training data, metrics, code version.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from stainbridge.models import abstention, checkpoint, classifier, colorization, cyclegan, inference
from stainbridge.models.bench.data import BenchData, to_float
from stainbridge.models.imaging import classical, data, stain_augment
from stainbridge.models.training import calibrate, gan, semantic
from stainbridge.models.training import classifier as tc
from stainbridge.models.training import colorization as tcol
from stainbridge.models.training import cyclegan as tg
from stainbridge.models.training import runtime as tu

__all__ = [
    "adapt_classifier",
    "augmentation_name",
    "batches",
    "build_model",
    "calibrate_reference_classifier",
    "classifier_header",
    "load_reference_classifier",
    "reference_scores",
    "train_reference_classifier",
    "train_standardizer",
]


def build_model(arch: str, num_classes: int) -> nn.Module:
    """Any of ``models.classifier.ARCHITECTURES`` (resnet18/34, or the CPU-sized ``resnet18_w16``)."""
    return classifier.build_classifier(arch=arch, num_classes=num_classes)


def batches(x: Tensor, y: Tensor, batch_size: int) -> list[tuple[Tensor, Tensor]]:
    """Fixed evaluation batches of [0,1] floats from uint8 images."""
    return [(to_float(x[i:i + batch_size]), y[i:i + batch_size]) for i in range(0, len(x), batch_size)]


def _fit(model: nn.Module, loader: Any, *, epochs: int, lr: float, device: torch.device, log: Any) -> list[dict]:
    """AdamW with a cosine schedule (as ``stainbridge train classifier``) and the project's focal loss (gamma 2)."""
    criterion = classifier.make_loss("focal", gamma=2.0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1))
    prep = tc.InputPrep(device, tc.NORMALIZATION)
    history = []
    for epoch in range(epochs):
        stats = tc.train_one_epoch(model, criterion, opt, loader, prep, epoch, argparse.Namespace(epochs=epochs), True)
        sched.step()
        history.append({"epoch": epoch + 1, **{f"train_{k}": v for k, v in stats.items()}})
        log(json.dumps(history[-1]))
    return history


def classifier_header(d: BenchData, *, arch: str, metrics: dict[str, Any], history: list[dict], extra: dict[str, Any],
                      reference_root: str | Path, split_path: Path) -> dict[str, Any]:
    counts = {c: int((d.train_labels == i).sum()) for i, c in enumerate(d.classes)}
    fraction = statistics.median(data.estimate_cell_fraction(im) for im in d.stain_images)
    return {
        "kind": "classifier", "architecture": arch, "arch_args": {"num_classes": len(d.classes)},
        "classes": d.classes, "input_size": d.size, "normalization": tc.NORMALIZATION,
        # the reference side only: the target's magnification belongs to the standardizer's site profile
        "geometry": {"reference_cell_fraction": float(fraction),
                     **{k: d.geometry.get(k) for k in ("window_fraction", "reference_side_px", "reference_window_px",
                                                        "reference_red_cell_diameter_px", "reference_red_cells",
                                                        "reference_nucleus_area_px")}},
        "reference_stain": classical.fit_reference_stats(d.stain_images),
        "training_data": {"root": str(Path(reference_root).resolve()), "counts": counts,
                          "split_counts": {k: len(d.manifest[k]) for k in ("train", "val", "test")},
                          "split_manifest": split_path.name,
                          "split_manifest_sha256": hashlib.sha256(split_path.read_bytes()).hexdigest(), **extra},
        "metrics": {**metrics, "history": history}, "loss": "focal", "gamma": 2.0,
        "code_version": checkpoint.code_version(),
    }


def reference_scores(model: nn.Module, d: BenchData, device: torch.device) -> dict[str, Any]:
    prep = tc.InputPrep(device, tc.NORMALIZATION)
    out: dict[str, Any] = {}
    for name, x, y in (("val", d.val, d.val_labels), ("test", d.test, d.test_labels)):
        if len(x):
            out.update(tc.summary(tc.evaluate(model, batches(x, y, 256), prep, d.classes), name))
    return out


def calibrate_reference_classifier(model: nn.Module, header: dict[str, Any], d: BenchData,
                                   device: torch.device) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The abstention (``models.abstention``) of a reference classifier, fitted as ``stainbridge train calibrate``
    fits it (``calibrate.fit``) on the in-memory reference windows: train split for the feature statistics,
    validation split for the temperatures and the OOD threshold. Returns (tensors, header entry)."""
    clf = inference.Classifier(model.eval(), header, name="reference", sha256="", device=device)
    return calibrate.fit(clf, train=[to_float(d.train[i:i + 256]) for i in range(0, len(d.train), 256)],
                         train_labels=d.train_labels, val=[to_float(d.val[i:i + 256]) for i in range(0, len(d.val), 256)],
                         val_labels=d.val_labels,
                         fitted_on={"root": str(Path(header["training_data"]["root"])),
                                    "through": "the benchmark's reference windows (models.bench.data)"})


def augmentation_name(strength: float, lab: float = 0.0, tight_crops: float = 0.0) -> str:
    """How a reference classifier's header names its augmentation (a reused classifier must match it)."""
    return (f"models.imaging.stain_augment strength {strength}" + (f" lab {lab}" if lab > 0 else "")
            + (f" tight_crops {tight_crops}" if tight_crops > 0 else ""))


def train_reference_classifier(d: BenchData, out: Path, *, arch: str, epochs: int, batch_size: int, lr: float,
                               strength: float, seed: int, reference_root: str | Path, device: torch.device,
                               log: Any = print, lab: float = 0.0,
                               tight_crops: float = 0.0) -> tuple[nn.Module, dict[str, Any]]:
    """Train on the reference train split with stain augmentation (``lab`` > 0: with the L*a*b* template
    jitter, ``stain_augment.lab_jitter``; ``tight_crops`` > 0: that share of images framed as a tight crop,
    ``stain_augment.tight_crop``); write checkpoint + split manifest."""
    started = time.monotonic()
    tu.seed_everything(seed)
    model = build_model(arch, len(d.classes)).to(device)
    loader = stain_augment.AugmentedBatches(d.train_base, d.train_labels, out=d.size, batch_size=batch_size,
                                            strength=strength, cover=d.cover, seed=seed, lab=lab,
                                            tight_crops=tight_crops)
    history = _fit(model, loader, epochs=epochs, lr=lr, device=device, log=log)
    split_path = Path(f"{out}.split.json")
    data.write_manifest(d.manifest, split_path)
    header = classifier_header(d, arch=arch, metrics=reference_scores(model, d, device), history=history,
                               reference_root=reference_root, split_path=split_path,
                               extra={"augmentation": augmentation_name(strength, lab, tight_crops)})
    header.update(epochs=epochs, seed=seed, train_seconds=round(time.monotonic() - started, 1))
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tensors, header["abstention"] = calibrate_reference_classifier(model, header, d, device)
    header["sha256"] = checkpoint.save_checkpoint(out, {**state, **tensors}, tu.jsonable(header))
    return model.eval(), header


def load_reference_classifier(path: Path, d: BenchData, device: torch.device,
                              augmentation: str | None = None) -> tuple[nn.Module, dict] | None:
    """The checkpoint at ``path`` if it was trained for these classes, size and geometry (and, when given,
    with this ``augmentation_name``), else None."""
    if not path.exists():
        return None
    state, header = checkpoint.load_checkpoint(path)
    geo = header.get("geometry") or {}
    if (header.get("kind") != "classifier" or header.get("classes") != d.classes or header.get("input_size") != d.size
            or abs(float(geo.get("window_fraction", -1)) - d.geometry["window_fraction"]) > 1e-9
            or (augmentation is not None
                and (header.get("training_data") or {}).get("augmentation") != augmentation)):
        return None
    model = build_model(header["architecture"], len(d.classes))
    model.load_state_dict(abstention.network_state(state))
    header["sha256"] = checkpoint.file_sha256(path)
    return model.to(device).eval(), header


def _dihedral_stream(x: Tensor, batch_size: int, g: torch.Generator) -> Iterator[Tensor]:
    """Endless random batches of [0,1] images from uint8 x, each batch turned and flipped at random."""
    while True:
        idx = torch.randint(len(x), (batch_size,), generator=g)
        b = torch.rot90(to_float(x[idx]), int(torch.randint(4, (1,), generator=g)), (2, 3))
        yield b.flip(3) if torch.rand(1, generator=g) < 0.5 else b


def train_standardizer(target: Tensor, reference: Tensor, out: Path, *, generator: str, discriminator: str,
                       epochs: int, steps: int, batch_size: int, semantic_term: gan.SemanticTerm | None,
                       semantic_info: dict | None, training_data: dict[str, Any], seed: int, device: torch.device,
                       log: Any = print, architecture: str = "resnet_generator",
                       generator_args: dict[str, Any] | None = None, discriminator_pool: int = 1,
                       generator_lr: float = 2e-4, discriminator_lr: float = 2e-4,
                       site_profile: dict[str, Any] | None = None,
                       ) -> tuple[nn.Module, nn.Module, dict[str, Any]]:
    """CycleGAN X=target -> Y=reference on unlabeled uint8 images; returns (G_XY, G_YX, header).

    By default G and F are ``cyclegan.GENERATOR_PRESETS[generator]`` ResNet generators. Any other
    ``architecture`` of ``cyclegan.GENERATORS`` (e.g. ``"pointwise_colour"``) is built from
    ``generator_args``; ``discriminator_pool > 1`` puts AvgPool2d in front of both discriminators."""
    started = time.monotonic()
    tu.seed_everything(seed)
    if architecture == "resnet_generator":
        g_args = dict(cyclegan.GENERATOR_PRESETS[generator])
    else:
        g_args = dict(generator_args or {})
    d_args = dict(cyclegan.DISCRIMINATOR_PRESETS[discriminator])
    if discriminator_pool != 1:
        d_args["pool"] = discriminator_pool
    setup = tg.build_setup(architecture=architecture, generator_args=g_args, discriminator_args=d_args,
                           epochs=epochs, generator_lr=generator_lr, discriminator_lr=discriminator_lr, seed=seed,
                           device=device)
    g = torch.Generator().manual_seed(seed)
    xs, ys = _dihedral_stream(target, batch_size, g), _dihedral_stream(reference, batch_size, g)
    history = []
    for epoch in range(epochs):
        stats = setup.train_epoch(xs, ys, steps=steps, epoch=epoch, epochs=epochs, semantic=semantic_term,
                                  device=device)
        history.append({"epoch": epoch + 1, **stats})
        log(json.dumps(history[-1]))
    header = tg.standardizer_header(
        setup, input_size=int(target.shape[-1]), training_data=training_data, history=history,
        semantic_info=semantic_info, epochs=epochs, steps=steps, batch_size=batch_size, seed=seed,
        training_options={"generator_lr": generator_lr, "discriminator_lr": discriminator_lr,
                          "discriminator_pool": discriminator_pool},
        train_seconds=time.monotonic() - started)
    if site_profile:
        header["site_profile"] = site_profile
    header["sha256"] = checkpoint.save_checkpoint(out, setup.generator_state(), tu.jsonable(header))
    return setup.nets["g_xy"].eval(), setup.nets["g_yx"].eval(), header


def train_colorization(reference: Tensor, *, unet: str, epochs: int, steps: int, batch_size: int, discriminator: str,
                       seed: int, device: torch.device, training_data: dict[str, Any],
                       log: Any = print) -> tuple[nn.Module, dict[str, Any]]:
    """The ColorizationGAN on uint8 reference windows (turned and flipped at random), as
    ``stainbridge train colorization`` trains it; returns (model, header without sha256)."""
    started = time.monotonic()
    arch_args = dict(colorization.UNET_PRESETS[unet])
    l_mean, l_std = tcol.lightness_stats(to_float(reference[:: max(1, len(reference) // tcol.LIGHTNESS_SAMPLE)]))
    d_args = dict(cyclegan.DISCRIMINATOR_PRESETS[discriminator])
    g = torch.Generator().manual_seed(seed)
    model, history = tcol.train_colorizer(_dihedral_stream(reference, batch_size, g),
                                          arch_args={**arch_args, "l_mean": l_mean, "l_std": l_std},
                                          discriminator_args=d_args, epochs=epochs, steps=steps, seed=seed,
                                          device=device, log=log)
    header = tcol.standardizer_header(model, arch_args, discriminator_args=d_args, input_size=int(reference.shape[-1]),
                                      history=history, training_data=training_data,
                                      options={"unet": unet, "epochs": epochs, "steps": steps,
                                               "batch_size": batch_size, "l1_weight": tcol.L1_WEIGHT, "seed": seed},
                                      train_seconds=time.monotonic() - started)
    return model, header


def save_colorization(model: nn.Module, header: dict[str, Any], out: Path) -> str:
    return tcol.save(model, {k: v for k, v in header.items() if k != "sha256"}, out)


def adapt_classifier(model: nn.Module, header: dict[str, Any], d: BenchData, translated: Tensor, out: Path, *,
                     epochs: int, batch_size: int, lr: float, strength: float, seed: int, device: torch.device,
                     standardizer_sha: str, log: Any = print) -> tuple[nn.Module, dict[str, Any]]:
    """Fine-tune a copy of the reference classifier on translated reference images (e.g. G(F(y)),
    labels of y) mixed with augmented reference images; write it as a classifier checkpoint."""
    started = time.monotonic()
    tu.seed_everything(seed)
    tuned = build_model(header["architecture"], len(d.classes))
    tuned.load_state_dict(model.state_dict())
    tuned.to(device)
    reference = stain_augment.AugmentedBatches(d.train_base, d.train_labels, out=d.size, batch_size=batch_size,
                                               strength=strength, cover=d.cover, seed=seed + 1)
    loader = semantic.MixedBatches(translated, d.train_labels, reference, seed=seed)
    history = _fit(tuned, loader, epochs=epochs, lr=lr, device=device, log=log)
    new = {k: v for k, v in header.items() if k != "abstention"}  # fitted to the features before fine-tuning
    new["training_data"] = {**header["training_data"], "fine_tuned_from": header.get("sha256"),
                            "translated_by_standardizer": standardizer_sha,
                            "translated_images": "G(F(y)) of the reference train split, labels of y"}
    new["metrics"] = {**reference_scores(tuned, d, device), "history": history}
    new.update(epochs=epochs, seed=seed, train_seconds=round(time.monotonic() - started, 1))
    new.pop("sha256", None)
    state = {k: v.detach().cpu() for k, v in tuned.state_dict().items()}
    new["sha256"] = checkpoint.save_checkpoint(out, state, tu.jsonable(new))
    return tuned.eval(), new

