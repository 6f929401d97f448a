"""stainbridge train colorization: the ColorizationGAN standardizer, trained on reference images only.

    stainbridge train colorization --reference DIR --out FILE [--preset tiny|cpu|full] [--epochs N]
        [--steps-per-epoch N] [--size PX] [--batch-size N] [--l1-weight 100] [--lr 2e-4]
        [--source DIR [--classifier FILE]] [--seed N] [--device auto|cpu|cuda]

pix2pix as a colorization model (``models.colorization``; Isola et al. 2017 and the authors'
``colorization_model.py``): a U-Net predicts the reference images' ab channels from their L
channel (matched to the reference lightness statistics, as at inference), a PatchGAN judges
(L, ab) pairs, and the generator minimises
    L_G = BCE(D(L, G(L)), real) + l1_weight * |G(L) - ab|_1        (pix2pix eq. 4, lambda = 100)
    L_D = (BCE(D(L, ab), real) + BCE(D(L, G(L)), fake)) / 2
with Adam 2e-4 (0.5, 0.999), constant then linear decay over the second half of the epochs.
Presets: tiny (seconds on a CPU, tests), cpu (64 px, ngf 16, 6 levels), full (256 px, unet_256,
ngf 64, 8 levels, for a GPU). No incoming image is needed; with --source the checkpoint also
carries the incoming site's profile (its magnification from red cells, ``site_geometry``), the
reference scale taken from --classifier's geometry header when given.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from stainbridge.models import checkpoint, colorization, cyclegan
from stainbridge.models.imaging import data, site_geometry, transforms
from stainbridge.models.training import cyclegan as tg
from stainbridge.models.training import gan
from stainbridge.models.training import runtime as tu

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"unet": "tiny", "discriminator": "tiny", "size": 32, "epochs": 2, "batch_size": 4, "steps": 4},
    "cpu": {"unet": "cpu", "discriminator": "tiny", "size": 64, "epochs": 4, "batch_size": 16, "steps": 150},
    "full": {"unet": "full", "discriminator": "full", "size": 256, "epochs": 20, "batch_size": 8, "steps": 500},
}
L1_WEIGHT = 100.0
LIGHTNESS_SAMPLE = 256  # reference images whose L statistics the standardizer matches inputs to


class TrainingError(Exception):
    """The options or data cannot train a colorization standardizer."""


def lightness_stats(images01: Tensor) -> tuple[float, float]:
    """(mean over images of the mean of L, mean over images of the std of L) of [N,3,H,W] in [0,1]."""
    lightness = colorization.rgb_to_lab(images01)[:, 0]
    return float(lightness.mean(dim=(1, 2)).mean()), float(lightness.std(dim=(1, 2)).mean())


def _bce(prediction: Tensor, real: bool) -> Tensor:
    target = torch.ones_like(prediction) if real else torch.zeros_like(prediction)
    return F.binary_cross_entropy_with_logits(prediction, target)


def train_colorizer(batches: Iterator[Tensor], *, arch_args: dict[str, Any], discriminator_args: dict[str, Any],
                    epochs: int, steps: int, lr: float = 2e-4, l1_weight: float = L1_WEIGHT, seed: int = 0,
                    device: torch.device = torch.device("cpu"),
                    log: Any = print) -> tuple[colorization.ColorizationStandardizer, list[dict[str, float]]]:
    """Train on endless batches of reference images ([N,3,S,S] in [0,1]); returns (model in eval mode, history)."""
    tu.seed_everything(seed)
    model = colorization.build_colorization(**arch_args).to(device)
    disc = cyclegan.build_discriminator(**discriminator_args).to(device)  # sees cat(L, ab): 3 channels
    opt_g = gan.make_optimizer(model.parameters(), lr=lr)
    opt_d = gan.make_optimizer(disc.parameters(), lr=lr)
    half = max(1, epochs // 2)
    scheds = [gan.make_scheduler(o, n_epochs=half, n_epochs_decay=epochs - half) for o in (opt_g, opt_d)]
    history: list[dict[str, float]] = []
    model.train(), disc.train()
    for epoch in range(epochs):
        totals = {"g_gan": 0.0, "g_l1": 0.0, "d": 0.0}
        for _ in range(steps):
            rgb = next(batches).to(device, torch.float32)
            with torch.no_grad():
                lightness = model.normalized_lightness(rgb)
                l_unit = colorization.l_to_unit(lightness)
                ab_real = colorization.rgb_to_lab(rgb)[:, 1:] / colorization.AB_SCALE
            ab_fake = model.predict_ab(l_unit)
            # discriminator: real (L, ab) pairs vs generated ones
            opt_d.zero_grad(set_to_none=True)
            d_loss = 0.5 * (_bce(disc(torch.cat([l_unit, ab_real], 1)), True)
                            + _bce(disc(torch.cat([l_unit, ab_fake.detach()], 1)), False))
            d_loss.backward()
            opt_d.step()
            # generator: fool D, and stay close to the true colour (pix2pix eq. 4)
            opt_g.zero_grad(set_to_none=True)
            g_gan = _bce(disc(torch.cat([l_unit, ab_fake], 1)), True)
            g_l1 = F.l1_loss(ab_fake, ab_real)
            (g_gan + l1_weight * g_l1).backward()
            opt_g.step()
            for k, v in (("g_gan", g_gan), ("g_l1", g_l1), ("d", d_loss)):
                totals[k] += float(v.detach())
        for s in scheds:
            s.step()
        history.append({"epoch": epoch + 1, **{k: round(v / steps, 5) for k, v in totals.items()}})
        log(json.dumps(history[-1]))
    return model.eval(), history


def standardizer_header(model: colorization.ColorizationStandardizer, arch_args: dict[str, Any], *,
                        discriminator_args: dict[str, Any], input_size: int, history: list[dict[str, float]],
                        training_data: dict[str, Any], options: dict[str, Any], train_seconds: float) -> dict[str, Any]:
    """The contract of a colorization standardizer checkpoint (read by ``inference.load_standardizer``)."""
    return {
        "kind": "standardizer", "architecture": "colorization",
        "arch_args": {**arch_args, "l_mean": model.l_mean, "l_std": model.l_std},
        "input_size": input_size, "value_range": [-1.0, 1.0],
        "direction": "any->reference (reference colour predicted from lightness)",
        "training_data": {**training_data, "labels_used": False},
        "metrics": {"final": history[-1] if history else {}, "history": history},
        "discriminator_args": discriminator_args, "training_options": options,
        "train_seconds": round(train_seconds, 1), "code_version": checkpoint.code_version(),
    }


def save(model: colorization.ColorizationStandardizer, header: dict[str, Any], out: Path) -> str:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return checkpoint.save_checkpoint(out, state, tu.jsonable(header))


# --------------------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reference", required=True, help="reference-lab images (labels ignored; searched recursively)")
    parser.add_argument("--out", required=True, help="standardizer checkpoint to write (.safetensors)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                        help="tiny: seconds on a CPU; cpu: 64 px, small U-Net; full: 256 px unet_256 on a GPU")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--steps-per-epoch", dest="steps", type=int, default=None)
    parser.add_argument("--size", type=int, default=None, help="training crop in pixels")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--l1-weight", type=float, default=L1_WEIGHT, help="weight of the L1 colour term (pix2pix: 100)")
    parser.add_argument("--source", default=None,
                        help="the incoming lab's unlabeled images: estimate its site profile into the checkpoint")
    parser.add_argument("--classifier", default=None,
                        help="classifier whose geometry header gives the reference scale for the site profile")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train a ColorizationGAN standardizer", add_help=add_help)
    add_arguments(parser)
    return parser


def main(args: argparse.Namespace) -> str:
    """Train and write the checkpoint; returns its sha256."""
    started = time.monotonic()
    opts = {**PRESETS[args.preset], **{k: v for k, v in vars(args).items() if v is not None}}
    arch_args = dict(colorization.UNET_PRESETS[opts["unet"]])
    multiple = 2 ** int(arch_args["num_downs"])
    if opts["size"] % multiple:
        raise TrainingError(f"--size must be a multiple of {multiple} for the {opts['unet']} U-Net, got {opts['size']}")
    device = tu.select_device(args.device, tu.init_distributed())
    source = data.list_unlabeled(args.source) if args.source else []  # fail early on an empty folder
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = data.list_unlabeled(args.reference)
    tf = transforms.train_transform(opts["size"], color_augment=False, scale_augment=(1.0, 1.15))
    loader = DataLoader(data.UnlabeledImages(paths, tf), batch_size=opts["batch_size"], shuffle=True,
                        drop_last=len(paths) >= opts["batch_size"], num_workers=args.workers,
                        generator=torch.Generator().manual_seed(args.seed))
    eval_tf = transforms.eval_transform(opts["size"], scale=1.0)
    sample = torch.stack([eval_tf(data.load_rgb(p)) for p in paths[:: max(1, len(paths) // LIGHTNESS_SAMPLE)]])
    arch_args["l_mean"], arch_args["l_std"] = lightness_stats(sample)
    d_args = dict(cyclegan.DISCRIMINATOR_PRESETS[opts["discriminator"]])
    model, history = train_colorizer(gan.forever(loader), arch_args=arch_args, discriminator_args=d_args,
                                     epochs=opts["epochs"], steps=opts["steps"], lr=args.lr,
                                     l1_weight=args.l1_weight, seed=args.seed, device=device,
                                     log=lambda m: print(m, file=sys.stderr))
    training_data: dict[str, Any] = {"reference": {"root": str(Path(args.reference).resolve()), "images": len(paths)},
                                     "source": None}
    header = standardizer_header(model, {k: v for k, v in arch_args.items() if k not in ("l_mean", "l_std")},
                                 discriminator_args=d_args, input_size=opts["size"], history=history,
                                 training_data=training_data,
                                 options={k: opts[k] for k in ("preset", "unet", "epochs", "steps", "batch_size",
                                                               "lr", "l1_weight", "seed")},
                                 train_seconds=time.monotonic() - started)
    if args.source:
        header["training_data"]["source"] = {"root": str(Path(args.source).resolve()), "images": len(source),
                                             "used_for": "site profile only"}
        header.update(tg.site_profile_fields(source, paths, args.classifier))
    sha = save(model, header, out)
    print(json.dumps({"out": str(out), "sha256": sha, "seconds": round(time.monotonic() - started, 1)}), file=sys.stderr)
    print(sha)
    return sha


def run(args: argparse.Namespace) -> int:
    try:
        main(args)
    except (TrainingError, checkpoint.CheckpointError, data.DataError, site_geometry.GeometryEstimateError) as exc:
        print(f"stainbridge train colorization: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run(get_args_parser().parse_args()))
