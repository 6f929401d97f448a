"""The benchmark's label-free classifier adaptation rows: ``<standardizer>_im`` (``models.training.adapt``).

For each standardizer in ``STANDARDIZERS`` (and the site colour map, when the bench fits one) the
reference classifier is adapted, as ``stainbridge train adapt`` does, on the target windows that
standardizer produced (information maximization with ``train adapt``'s default class prior; no target
label), then scores them through the service's predict. Transductive: adapted on every target image;
inductive: on one half (seeded, label-blind split), scoring the other, both ways.
Each adapted classifier is written to the out-dir as ``classifier_im_<standardizer>_<mode>[_fold<k>]``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from stainbridge.models import checkpoint, classifier, inference
from stainbridge.models.bench import learned
from stainbridge.models.bench import training as bench_train
from stainbridge.models.bench.data import BenchData
from stainbridge.models.imaging import stain_augment
from stainbridge.models.training import adapt
from stainbridge.models.training import runtime as tu

__all__ = ["PRIORS", "STANDARDIZERS", "run_information_maximization"]

STANDARDIZERS = ("raw", "reinhard")
PRIORS = adapt.PRIORS


def _adapted(model: nn.Module, header: dict[str, Any], d: BenchData, target01: Tensor, out: Path, *,
             opts: argparse.Namespace, seed: int, device: torch.device, standardizer: str,
             log: Callable[[str], Any]) -> tuple[inference.Classifier, dict[str, Any]]:
    started = time.monotonic()
    tu.seed_everything(seed)
    tuned = bench_train.build_model(header["architecture"], len(d.classes))
    tuned.load_state_dict(model.state_dict())
    tuned.to(device)
    prior_kind = getattr(opts, "im_prior", None) or adapt.DEFAULTS["prior"]
    prior = adapt.class_prior(prior_kind, learned.as_classifier(model, header, "reference", device), target01)
    reference = stain_augment.AugmentedBatches(d.train_base, d.train_labels, out=d.size, batch_size=opts.im_batch,
                                               cover=d.cover, seed=seed + 1)
    history = adapt.adapt(tuned, target01, lambda: reference, normalization=header["normalization"],
                          criterion=classifier.make_loss("focal", gamma=float(header.get("gamma") or 2.0)),
                          epochs=opts.im_epochs, lr=adapt.DEFAULTS["lr"], batch_size=opts.im_batch,
                          diversity=adapt.DEFAULTS["diversity"], prior=prior,
                          reference_weight=adapt.DEFAULTS["reference_weight"],
                          seed=seed, device=device, log=log)
    new = {k: v for k, v in header.items() if k not in ("sha256", "abstention")}  # abstention: fitted before adapting
    new["adaptation"] = {"method": "information maximization", "standardizer": standardizer, "labels_used": False,
                         "target_images": len(target01), "epochs": opts.im_epochs, "batch_size": opts.im_batch,
                         "seed": seed,
                         **{k: adapt.DEFAULTS[k] for k in ("lr", "diversity", "reference_weight")}, "prior": prior_kind,
                         "class_prior": [round(float(v), 4) for v in prior]}
    # what adapting to the site cost at home: the reference's own val/test windows
    new["metrics"] = {**bench_train.reference_scores(tuned.eval(), d, device), "history": history,
                      "before_adaptation": {k: v for k, v in header["metrics"].items() if k != "history"}}
    new["train_seconds"] = round(time.monotonic() - started, 1)
    state = {k: v.detach().cpu() for k, v in tuned.state_dict().items()}
    new["sha256"] = checkpoint.save_checkpoint(out, state, tu.jsonable(new))
    return inference.Classifier(tuned.eval(), new, name=out.stem, sha256=new["sha256"], device=device), new


def run_information_maximization(mode: str, d: BenchData, model: nn.Module, header: dict[str, Any],
                                 standardized: dict[str, list[Tensor]], folds: list[tuple[Tensor, Tensor]],
                                 opts: argparse.Namespace, out_dir: Path, device: torch.device,
                                 log: Callable[[str], Any]) -> dict[str, Any]:
    """``standardized``: per standardizer, per fold, every target window after that fold's standardizer (as
    scored; a site-fitted one, the colour map, differs per fold); ``folds``: (fit, score) index pairs of the
    mode. Returns {"results": rows, "runs": checkpoints}."""
    results: dict[str, Any] = {}
    runs = []
    n = len(d.target)
    identity = inference.load_standardizer("none")
    for name, per_fold in standardized.items():
        plain, tta = torch.zeros(n, len(d.classes)), torch.zeros(n, len(d.classes))
        shown = torch.zeros_like(per_fold[0])
        for fold, ((fit, held), images) in enumerate(zip(folds, per_fold)):
            shown[held] = images[held]
            out = out_dir / f"classifier_im_{name}_{mode}{'' if mode == 'transductive' else f'_fold{fold}'}.safetensors"
            log(f"adapting the classifier on {len(fit)} {name} target windows (unlabeled) -> {out.name}")
            clf, new = _adapted(model, header, d, images[fit], out, opts=opts, seed=opts.seed + fold, device=device,
                                standardizer=name, log=log)
            # the windows are already standardized: score them through the identity
            scored = learned.score(images[held], identity, clf)
            plain[held], tta[held] = scored["plain"], scored["tta"]
            runs.append({"checkpoint": out.name, "sha256": new["sha256"], "train_seconds": new["train_seconds"],
                         "target_images_seen": len(fit),
                         "reference_test_accuracy": new["metrics"].get("test_accuracy"),
                         "reference_test_balanced_accuracy": new["metrics"].get("test_balanced_accuracy")})
        key = f"{name}_im" if mode == "transductive" else f"{name}_im_inductive"
        results[key] = (plain, shown)
        results[f"{key}_tta"] = (tta, shown)
    return {"results": results, "runs": runs}
