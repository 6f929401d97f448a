"""stainbridge train adapt: adapt the classifier to one hospital without any of its labels.

    stainbridge train adapt --init-from CLASSIFIER --source DIR --out FILE [--reference DIR]
        [--standardizer SPEC] [--scale profile|auto|X] [--epochs N] [--lr LR] [--batch-size N]
        [--diversity W] [--prior site|uniform] [--reference-weight W] [--seed N] [--device auto|cpu|cuda]

Information maximization (Krause et al. 2010; Liang et al. 2020, "SHOT"): the incoming hospital's
unlabeled images, exactly as the service sees them (site geometry, then the frozen standardizer),
fine-tune the classifier to be confident on each cell (low entropy of each prediction) while
keeping the mean prediction over the site close to a class prior (KL divergence, weight
``--diversity``). Without the second term the network would put every cell in one class. Source-free by default,
as SHOT: the adapted classifier is for this site and forgets some of the reference (PBC test 0.98 ->
0.50-0.94 in the benchmark); ``--reference-weight W`` adds one labeled reference batch per step
with the checkpoint's loss, which keeps the reference (0.92-0.96) but gained less on the target
in the benchmark. Every layer trains (freezing the last one, SHOT's "hypothesis", did no better).
A random turn and flip per target batch, as cells have no orientation.

SHOT's prior is equal class shares (the KL to it is the entropy of the mean prediction, up to a
constant). A curated folder like LISC's has them; a drop folder of whole smears follows the blood's
differential (BCCD: 59% neutrophils), and there that prior spread the majority over the other
classes (BCCD lost up to 0.15 behind the raw image at weight 1). The site's shares are unknown
without labels, so ``--prior site`` (the default) takes them halfway between equal shares and the
unadapted classifier's mean prediction on the site's images (with the 8 turns and flips): a
majority stays a majority without trusting an estimate made by the classifier the stain shift
misleads. In the 3-seed bench (docs/accuracy.md), weight 1 with the site prior
against SHOT's prior at 0.5 (the previous default): BCCD behind Reinhard 0.697 -> 0.733, behind the
raw image 0.691 -> 0.760; LISC unchanged behind Reinhard (0.853) and the colour map (0.94), but
0.932 -> 0.892 behind the raw image. ``--prior uniform`` is SHOT's. Measure on a labeled sample
before deploying an adapted classifier (docs/accuracy.md, "Checking a recipe on your own labelled
sample").

Labels of the incoming hospital are never read: ``--source`` is searched recursively for images
(class sub-folders, if any, are ignored), so the drop folder's archive can be passed as it is.
The new header records the adaptation (``adaptation``: source, standardizer, options, history);
network, classes, normalization, reference stain statistics and geometry stay the checkpoint's.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from stainbridge.models import checkpoint, inference
from stainbridge.models.imaging import data, transforms
from stainbridge.models.training import classifier as train_classifier
from stainbridge.models.training import finetune
from stainbridge.models.training import runtime as tu

__all__ = ["PRIORS", "AdaptError", "adapt", "add_arguments", "class_prior", "information_maximization", "main", "run"]

DEFAULTS = {"epochs": 10, "lr": 1e-3, "batch_size": 64, "diversity": 1.0, "prior": "site", "reference_weight": 0.0}
PRIORS = ("site", "predicted", "uniform")
MIN_SOURCE_IMAGES = 32  # below this the mean prediction is too noisy to stand for the site


class AdaptError(Exception):
    """The folders or checkpoints cannot adapt this classifier; the message says what to change."""


def information_maximization(logits: Tensor, diversity: float, prior: Tensor | None = None
                             ) -> tuple[Tensor, dict[str, float]]:
    """Mean conditional entropy plus ``diversity`` times KL(mean prediction || ``prior``); the prior
    defaults to equal class shares, where this is SHOT's loss up to a constant."""
    p = logits.float().softmax(1)
    conditional = -(p * torch.log(p + 1e-6)).sum(1).mean()
    marginal = p.mean(0)
    if prior is None:
        prior = torch.full_like(marginal, 1.0 / len(marginal))
    marginal_entropy = -(marginal * torch.log(marginal + 1e-6)).sum()
    prior_kl = (marginal * (torch.log(marginal + 1e-6) - torch.log(prior.to(marginal) + 1e-6))).sum()
    loss = conditional + diversity * prior_kl
    return loss, {"entropy": conditional.item(), "marginal_entropy": marginal_entropy.item(),
                  "prior_kl": prior_kl.item()}


@torch.inference_mode()
def class_prior(kind: str, classifier: inference.Classifier, target01: Tensor) -> Tensor:
    """The class shares the adaptation keeps the site's mean prediction near (see the module's text):
    ``uniform``; ``predicted``: ``classifier``'s mean prediction over the standardized site images (8 turns
    and flips), computed before adapting; ``site``: halfway between equal shares and that."""
    equal = torch.full((len(classifier.classes),), 1.0 / len(classifier.classes))
    if kind == "uniform":
        return equal
    if kind not in PRIORS:
        raise AdaptError(f"unknown --prior {kind!r}: use one of {', '.join(PRIORS)}")
    predicted = _probabilities(classifier, target01, tta=True).mean(0)
    return predicted if kind == "predicted" else 0.5 * predicted + 0.5 * equal


def _probabilities(classifier: inference.Classifier, target01: Tensor, *, tta: bool) -> Tensor:
    """[N,C] softmax over the standardized images, 256 at a time (a site's folder may not fit one batch)."""
    return torch.cat([inference.predict_views(classifier, target01[i:i + 256], tta=tta)
                      for i in range(0, len(target01), 256)])


def _dihedral(batch: Tensor, g: torch.Generator) -> Tensor:
    k = int(torch.randint(0, 8, (1,), generator=g))
    batch = torch.rot90(batch, k % 4, (2, 3))
    return batch.flip(3) if k >= 4 else batch


def _cycle(batches: Callable[[], Iterable[tuple[Tensor, Tensor]]]) -> Iterator[tuple[Tensor, Tensor]]:
    while True:
        yielded = False
        for batch in batches():
            yielded = True
            yield batch
        if not yielded:
            raise AdaptError("the reference batches are empty; pass a reference folder with images")


def adapt(model: nn.Module, target01: Tensor, reference_batches: Callable[[], Iterable[tuple[Tensor, Tensor]]] | None,
          *, normalization: dict[str, list[float]], criterion: nn.Module, epochs: int, lr: float, batch_size: int,
          diversity: float, prior: Tensor | None, reference_weight: float, seed: int, device: torch.device,
          log: Callable[[str], Any] = print) -> list[dict[str, float]]:
    """Fine-tune ``model`` in place on standardized target images [N,3,S,S] in [0,1] (no labels) with
    information maximization towards ``prior`` (``class_prior``; None: equal shares), plus
    ``reference_weight`` x ``criterion`` on one labeled reference batch per step (``reference_batches()``
    returns an epoch of (images in [0,1], labels)). Returns per-epoch means."""
    if len(target01) < 2:
        raise AdaptError(f"{len(target01)} incoming images cannot be adapted on: the mean prediction needs several")
    prep = train_classifier.InputPrep(device, normalization)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-3, nesterov=True)
    g = torch.Generator().manual_seed(seed)
    reference = _cycle(reference_batches) if reference_batches is not None and reference_weight > 0 else None
    steps = max(1, math.floor(len(target01) / batch_size))
    history = []
    model.train()
    for epoch in range(epochs):
        sums: dict[str, float] = {}
        order = torch.randperm(len(target01), generator=g)
        for step in range(steps):
            batch = _dihedral(target01[order[step * batch_size:(step + 1) * batch_size]], g)
            with tu.autocast(device):
                logits = model(prep(batch))
            loss, parts = information_maximization(logits, diversity, prior)
            if reference is not None:
                images, labels = next(reference)
                with tu.autocast(device):
                    ref_logits = model(prep(images))
                ref_loss = criterion(ref_logits.float(), labels.to(device))
                loss = loss + reference_weight * ref_loss
                parts["reference_loss"] = ref_loss.item()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for k, v in {**parts, "loss": loss.item()}.items():
                sums[k] = sums.get(k, 0.0) + v
        history.append({"epoch": epoch + 1, **{k: round(v / steps, 5) for k, v in sums.items()}})
        log(json.dumps(history[-1]))
    return history


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--init-from", required=True, metavar="CLASSIFIER", help="classifier checkpoint to adapt")
    parser.add_argument("--source", required=True,
                        help="the incoming hospital's images, searched recursively; no labels are read")
    parser.add_argument("--reference", default=None,
                        help="reference-hospital images, one sub-folder per class; needed with --reference-weight > 0")
    parser.add_argument("--out", required=True, help="classifier checkpoint to write (.safetensors)")
    parser.add_argument("--standardizer", default="none",
                        help="the standardizer the service applies first: none, reinhard, macenko or a checkpoint "
                             "(its site profile sets the geometry); default none")
    parser.add_argument("--scale", default=inference.SCALE_FROM_PROFILE,
                        help="site magnification as in [site] scale: profile (default), auto or a number")
    parser.add_argument("--epochs", type=int, default=DEFAULTS["epochs"])
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    parser.add_argument("--diversity", type=float, default=DEFAULTS["diversity"],
                        help="weight of the KL divergence of the site's mean prediction from --prior (default 1; 0 "
                             "lets every cell fall into one class)")
    parser.add_argument("--prior", default=DEFAULTS["prior"], choices=PRIORS,
                        help="class shares the site's mean prediction is kept near: site (default; halfway between "
                             "equal shares and the unadapted classifier's mean prediction on the site), predicted "
                             "(that mean prediction itself) or uniform (equal shares, as SHOT; for a curated folder "
                             "with about as many cells of each class)")
    parser.add_argument("--reference-weight", type=float, default=DEFAULTS["reference_weight"],
                        help="weight of a labeled reference batch's loss per step (default 0: source-free)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Adapt a stainbridge classifier to a hospital without its labels",
                                     add_help=add_help)
    add_arguments(parser)
    return parser


def main(args: argparse.Namespace) -> str:
    """Adapt and write the classifier checkpoint; returns its sha256."""
    started = time.monotonic()
    if args.epochs < 1 or args.batch_size < 2 or args.diversity < 0 or args.reference_weight < 0:
        raise AdaptError("--epochs must be >= 1, --batch-size >= 2, --diversity and --reference-weight >= 0")
    tu.seed_everything(args.seed)
    device = tu.select_device(args.device, tu.DistInfo())
    model, header, base, criterion = finetune.trainable_classifier(args.init_from, device)
    standardizer = inference.load_standardizer(args.standardizer, device=str(device), classifier=base)

    source = data.list_unlabeled(args.source)
    if len(source) < MIN_SOURCE_IMAGES:
        raise AdaptError(f"{args.source} holds {len(source)} images; adapting needs at least {MIN_SOURCE_IMAGES} "
                         "(a few hundred is better: the mean prediction stands for the whole site)")
    if args.reference_weight > 0 and not args.reference:
        raise AdaptError("--reference-weight > 0 needs --reference DIR (reference images, one sub-folder per class)")
    target = finetune.standardize([(path, "") for path in source], base, standardizer, args.scale)
    prior = class_prior(args.prior, base, target)
    loader = None
    reference: list[tuple[Path, str]] = []
    if args.reference_weight > 0:
        reference = finetune.labeled_items(args.reference, base.classes, "--reference")
        if not reference:
            raise AdaptError(f"no labeled images under {args.reference}; it needs one sub-folder per class")
        reference_set = data.LabeledImages(reference, base.classes,
                                           transforms.train_transform(base.input_size, color_augment=False))
        loader = DataLoader(reference_set, batch_size=args.batch_size, shuffle=True,
                            drop_last=len(reference) > args.batch_size, generator=torch.Generator().manual_seed(args.seed))

    log = (lambda msg: print(msg, file=sys.stderr, flush=True))
    history = adapt(model, target, (lambda: loader) if loader is not None else None, normalization=header["normalization"], criterion=criterion,
                    epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, diversity=args.diversity,
                    prior=prior, reference_weight=args.reference_weight, seed=args.seed, device=device, log=log)
    predicted = _class_shares(model.eval(), target, base, device)
    new_header = {
        **header,
        "metrics": {"final": history[-1], "history": history, "before_adaptation": header.get("metrics") or {}},
        "adaptation": {
            "method": "information maximization (entropy + diversity x KL(mean prediction || prior)) + reference loss",
            "init_from": {"path": str(Path(args.init_from).resolve()), "sha256": base.sha256},
            "standardizer": {"name": standardizer.name, "sha256": standardizer.sha256},
            "scale": args.scale, "labels_used": False,
            "source": {"root": str(Path(args.source).resolve()), "images": len(source)},
            "reference": ({"root": str(Path(args.reference).resolve()), "images": len(reference)} if reference else None),
            "predicted_class_shares": predicted,
            "class_prior": {c: round(float(v), 4) for c, v in zip(base.classes, prior, strict=True)},
            **{k: getattr(args, k) for k in ("epochs", "lr", "batch_size", "diversity", "prior", "reference_weight",
                                             "seed")},
        },
        "train_seconds": round(time.monotonic() - started, 1),
        "code_version": checkpoint.code_version(),
    }
    new_header.pop("created", None)
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    sha = checkpoint.save_checkpoint(args.out, weights, tu.jsonable(new_header))
    print(json.dumps({"out": str(args.out), "sha256": sha, "predicted_class_shares": predicted, **history[-1]}),
          file=sys.stderr)
    print(sha)
    return sha


@torch.inference_mode()
def _class_shares(model: nn.Module, target01: Tensor, base: inference.Classifier, device: torch.device) -> dict[str, float]:
    """Share of the incoming images predicted as each class after adaptation: what the site will see."""
    adapted = inference.Classifier(model, base.header, name="adapted", sha256="", device=device)
    counts = torch.bincount(_probabilities(adapted, target01, tta=False).argmax(1), minlength=len(base.classes)).float()
    return {c: round(float(v / len(target01)), 4) for c, v in zip(base.classes, counts, strict=True)}


def run(args: argparse.Namespace) -> int:
    try:
        main(args)
    except (AdaptError, finetune.FinetuneError, checkpoint.CheckpointError, inference.ModelMismatch, data.DataError,
            FileNotFoundError) as exc:
        print(f"stainbridge train adapt: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run(get_args_parser().parse_args()))
