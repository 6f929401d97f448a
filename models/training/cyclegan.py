"""stainbridge train cyclegan: an unpaired stain standardizer G (incoming lab X -> reference lab Y).

    stainbridge train cyclegan --source DIR --reference DIR --out FILE [--preset tiny|full] [--epochs N]
        [--seed N] [--resume] [--size PX] [--semantic-classifier FILE --semantic-weight W]
        [--generator resnet|colour] [--discriminator-pool N] [--generator-lr LR] [--semantic-teacher reinhard|raw]
        [--init-from STANDARDIZER]

--init-from warm-starts G (X -> reference) from a standardizer checkpoint of the same architecture
(the nightly job fine-tunes the active standardizer this way); F and the discriminators start fresh.

--preset colour is the colour-only recipe (models.colour_generator): a per-pixel colour generator that
cannot change morphology, PatchGAN ndf 16 / 2 layers behind AvgPool2d(4), generator lr 1e-3
(discriminators --lr 2e-4), 64 px, batch 8 and, with --semantic-classifier, weight 5 and the raw teacher.

Unpaired and label-free: every image below --source (the incoming lab, searched recursively) and
below --reference is used as an unlabeled image; class folders, if any, are ignored, so no label
can leak into the GAN. Networks, losses, image pool and schedule come from models.cyclegan (Zhu et
al. 2017: LSGAN, cycle lambda 10, identity 0.5, pool 50, Adam 2e-4 (0.5, 0.999), constant then
linear decay over the second half of the epochs).

Semantic term (optional, --semantic-classifier): a frozen classifier trained on the reference lab
should give the same class distribution on G(x) as on x after a colour-only Reinhard normalization
to the reference stain (whose statistics travel in that classifier's header):
    L_sem = KL( p(reinhard(x)) || p(G(x)) ) * --semantic-weight
and likewise for a reference image and its cycle G(F(y)) (there Reinhard is nearly the identity).
Colour is the GAN's job; the term only penalises changing what the classifier sees in the cell.
With --semantic-teacher raw the target is instead the classifier's 8-view dihedral TTA softmax on the
untranslated source image, on the x_to_y pair only: L_sem = KL( TTA p(x) || p(G(x)) ) * weight. It is
computed (no gradient) on each source batch as drawn, i.e. on the same random crop G sees.

The checkpoint also carries the site profile (``header["site_profile"]``): the magnification of the
source lab relative to the reference, estimated without labels from red-cell diameters of the
--source images (``models.imaging.site_geometry``), which the service's geometry uses. The nightly
retraining, which runs this command, re-estimates it.

Only G is kept in the final checkpoint (kind "standardizer"); the full state (G, F, D_X, D_Y and
both optimizers) is written to ``<out>.state`` after each epoch for --resume, and a sample grid
(rows: real X, G(X), F(G(X))) to ``<out>.samples.png``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchvision.utils import make_grid, save_image

from stainbridge.models import checkpoint, cyclegan
from stainbridge.models.imaging import classical, data, site_geometry, transforms
from stainbridge.models.training import gan, resume, semantic
from stainbridge.models.training import runtime as tu

# Explicit flags override these. tiny: seconds on a CPU for ~50 images per side; full: a GPU run;
# colour: the colour-only generator recipe (see module doc).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"generator": "tiny", "discriminator": "tiny", "size": 64, "epochs": 2, "batch_size": 4},
    "full": {"generator": "full", "discriminator": "full", "size": 256, "epochs": 20, "batch_size": 4},
    "colour": {"generator_type": "colour", "discriminator": "tiny", "discriminator_pool": 4, "generator_lr": 1e-3,
               "semantic_weight": 5.0, "semantic_teacher": "raw", "size": 64, "epochs": 2, "batch_size": 8},
}
# Applied after the preset, for anything neither it nor a flag set.
FALLBACKS: dict[str, Any] = {"generator_type": "resnet", "generator": "tiny", "discriminator_pool": 1,
                             "semantic_weight": 1.0, "semantic_teacher": "reinhard"}
COLOUR_ARGS: dict[str, int] = {"hidden": 32, "layers": 2}
SAMPLE_ROWS = 8


class TrainingError(Exception):
    """The folders or options cannot train a standardizer (empty folder, torchrun, bad classifier)."""


def resolve_options(args: argparse.Namespace) -> argparse.Namespace:
    for key, value in [*PRESETS[args.preset].items(), *FALLBACKS.items()]:
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.generator_lr is None:
        args.generator_lr = args.lr
    if args.discriminator_pool < 1:
        raise TrainingError(f"--discriminator-pool must be >= 1, got {args.discriminator_pool}")
    if args.generator_type == "resnet" and args.size % 4:
        raise TrainingError(f"--size must be a multiple of 4 for the ResNet generator, got {args.size}")
    return args


def init_generator(setup: "CycleGANSetup", path: str) -> dict[str, Any]:
    """Warm start: load G (X -> Y) from standardizer checkpoint ``path``; its architecture must be the one
    these options build. Returns what the new checkpoint's header records about it."""
    state, header = checkpoint.load_checkpoint(path)
    theirs = (header.get("kind"), header.get("architecture"), tu.jsonable(header.get("arch_args") or {}))
    ours = ("standardizer", setup.architecture, tu.jsonable(setup.generator_args))
    if theirs != ours:
        raise TrainingError(f"--init-from {path}: it is a {theirs[0]} {theirs[1]} {theirs[2]}, these options build a "
                            f"standardizer {ours[1]} {ours[2]}; pick the matching --preset/--generator, or drop "
                            "--init-from to train from scratch")
    try:
        setup.nets["g_xy"].load_state_dict(state)
    except RuntimeError as exc:
        raise TrainingError(f"--init-from {path}: its weights do not fit {setup.architecture}: {exc}") from None
    return {"path": str(Path(path).resolve()), "sha256": checkpoint.file_sha256(path)}


def generator_spec(args: argparse.Namespace) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(architecture of ``cyclegan.GENERATORS``, generator arch_args, discriminator args) for the options."""
    if args.generator_type == "colour":
        arch, g_args = "pointwise_colour", dict(COLOUR_ARGS)
    else:
        arch, g_args = "resnet_generator", dict(cyclegan.GENERATOR_PRESETS[args.generator])
    return arch, g_args, dict(cyclegan.DISCRIMINATOR_PRESETS[args.discriminator], pool=args.discriminator_pool)


@dataclass
class CycleGANSetup:
    """Everything one CycleGAN run trains (Zhu et al. 2017, sec. 4 and the reference implementation):
    G: X->Y and F: Y->X, discriminators D_X and D_Y, one Adam per pair, constant-then-linear-decay
    schedules, and the two 50-image pools of generated images the discriminators learn from."""

    architecture: str
    generator_args: dict[str, Any]
    discriminator_args: dict[str, Any]
    nets: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler]
    pools: dict[str, gan.ImagePool]

    def train_epoch(self, xs: Iterator[Tensor], ys: Iterator[Tensor], *, steps: int, epoch: int, epochs: int,
                    semantic: gan.SemanticTerm | None, device: torch.device) -> dict[str, float]:
        """One epoch of ``steps`` batches, then one step of both schedules; returns mean losses."""
        stats = gan.train_one_epoch(self.nets, self.optimizers["g"], self.optimizers["d"], xs, ys, steps, self.pools,
                                semantic, device, epoch, epochs)
        for schedule in self.schedulers.values():
            schedule.step()
        return stats

    def generator_state(self) -> dict[str, Tensor]:
        """The state of G (X -> Y), the only network a standardizer checkpoint keeps."""
        return {k: v.detach().cpu() for k, v in self.nets["g_xy"].state_dict().items()}


def build_setup(*, architecture: str, generator_args: dict[str, Any], discriminator_args: dict[str, Any],
                epochs: int, generator_lr: float, discriminator_lr: float, seed: int, device: torch.device,
                memory_format: torch.memory_format = torch.contiguous_format) -> CycleGANSetup:
    """Networks on ``device``, optimizers, schedules (half constant, half linear decay) and pools."""
    build = cyclegan.GENERATORS[architecture]
    nets = {"g_xy": build(**generator_args), "g_yx": build(**generator_args),
            "d_x": cyclegan.build_discriminator(**discriminator_args),
            "d_y": cyclegan.build_discriminator(**discriminator_args)}
    for net in nets.values():
        net.to(device, memory_format=memory_format)
    optimizers = {
        "g": gan.make_optimizer(itertools.chain(nets["g_xy"].parameters(), nets["g_yx"].parameters()),
                                     lr=generator_lr),
        "d": gan.make_optimizer(itertools.chain(nets["d_x"].parameters(), nets["d_y"].parameters()),
                                     lr=discriminator_lr),
    }
    constant = (epochs + 1) // 2
    schedulers = {k: gan.make_scheduler(o, n_epochs=constant, n_epochs_decay=epochs - constant)
                  for k, o in optimizers.items()}
    pools = {"x": gan.ImagePool(50, rng=random.Random(seed)), "y": gan.ImagePool(50, rng=random.Random(seed + 1))}
    return CycleGANSetup(architecture, dict(generator_args), dict(discriminator_args), nets, optimizers, schedulers,
                         pools)


def standardizer_header(setup: CycleGANSetup, *, input_size: int, training_data: dict[str, Any],
                        history: list[dict[str, Any]], semantic_info: dict[str, Any] | None,
                        training_options: dict[str, Any], epochs: int, steps: int, batch_size: int, seed: int,
                        train_seconds: float) -> dict[str, Any]:
    """The contract a standardizer checkpoint carries (what ``models.inference.load_standardizer`` reads)."""
    return {
        "kind": "standardizer",
        "architecture": setup.architecture,
        "arch_args": setup.generator_args,
        "input_size": input_size,
        "value_range": [-1.0, 1.0],
        "direction": "source->reference",
        "training_data": {**training_data, "labels_used": False},
        "metrics": {"final": history[-1] if history else {}, "history": history},
        "discriminator_args": setup.discriminator_args,
        "semantic": semantic_info,
        "training_options": training_options,
        "epochs": epochs,
        "steps_per_epoch": steps,
        "batch_size": batch_size,
        "seed": seed,
        "train_seconds": round(train_seconds, 1),
        "code_version": checkpoint.code_version(),
    }


@torch.inference_mode()
def save_samples(g_xy: nn.Module, g_yx: nn.Module, batch: Tensor, path: Path, device: torch.device) -> None:
    """A PNG grid: row 1 real X, row 2 G(X) (standardized), row 3 F(G(X)) (reconstructed)."""
    g_xy.eval()
    g_yx.eval()
    real = batch.to(device) * 2 - 1
    fake = g_xy(real)
    rec = g_yx(fake)
    rows = torch.cat([real, fake, rec]).float().cpu()
    grid = make_grid((rows + 1) / 2, nrow=batch.shape[0], padding=2, pad_value=1.0)
    tmp = path.with_name(f".{path.name}.tmp.png")
    save_image(grid, tmp)
    tmp.replace(path)


def site_profile_fields(source: list[Path], reference: list[Path], classifier: str | None) -> dict[str, Any]:
    """{"site_profile": ...} estimated without labels from the source images (the reference scale from
    ``classifier``'s geometry header when given), or {"site_profile_error": why} when nothing could be
    measured: the service then uses magnification 1.0 unless [site] scale says otherwise."""
    geometry = checkpoint.load_checkpoint(classifier)[1].get("geometry") if classifier else None
    try:
        profile = site_geometry.training_site_profile(source, reference, classifier_geometry=geometry)
    except site_geometry.GeometryEstimateError as exc:
        print(f"site profile not estimated: {exc}", file=sys.stderr)
        return {"site_profile_error": str(exc)}
    print(json.dumps({"site_profile": profile}), file=sys.stderr)
    return {"site_profile": profile}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True, help="incoming-lab images (unlabeled, searched recursively)")
    parser.add_argument("--reference", required=True, help="reference-lab images (labels ignored)")
    parser.add_argument("--out", required=True, help="standardizer checkpoint to write (.safetensors)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                        help="tiny: ngf 16, 3 blocks, 64 px crops, CPU seconds; full: ngf 64, 9 blocks, 256 px, GPU; "
                             "colour: colour-only generator recipe (see --generator colour)")
    parser.add_argument("--generator", dest="generator_type", choices=("resnet", "colour"), default=None,
                        help="resnet (default): ResNet CycleGAN generator; colour: per-pixel colour-only generator "
                             "that cannot change morphology (use with --discriminator-pool 4)")
    parser.add_argument("--discriminator-pool", type=int, default=None,
                        help="average-pool factor in front of the discriminators (default 1; 4 with --generator colour)")
    parser.add_argument("--epochs", type=int, default=None, help="half constant lr, half linear decay")
    parser.add_argument("--size", type=int, default=None, help="training crop in pixels (multiple of 4)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps-per-epoch", type=int, default=None,
                        help="default: max(#source, #reference) / batch size")
    parser.add_argument("--source-scale", type=float, default=1.0,
                        help="zoom applied to source images first (the site's geometry scale)")
    parser.add_argument("--lr", type=float, default=2e-4, help="discriminator (and default generator) learning rate")
    parser.add_argument("--generator-lr", type=float, default=None, help="default: --lr (colour preset: 1e-3)")
    parser.add_argument("--semantic-classifier", default=None, help="frozen reference-lab classifier checkpoint")
    parser.add_argument("--semantic-weight", type=float, default=None, help="default 1 (colour preset: 5)")
    parser.add_argument("--semantic-teacher", choices=("reinhard", "raw"), default=None,
                        help="reinhard (default): KL to p(reinhard(x)) on x_to_y and y_cycle; raw: KL to the "
                             "8-view dihedral TTA p(x) of the untranslated source, x_to_y only (colour preset)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue from <out>.state")
    parser.add_argument("--init-from", default=None, metavar="STANDARDIZER",
                        help="fine-tune: start G from this standardizer checkpoint (same architecture)")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train a stainbridge CycleGAN standardizer", add_help=add_help)
    add_arguments(parser)
    return parser


def main(args: argparse.Namespace) -> str:
    """Train and write the standardizer checkpoint; returns its sha256."""
    started = time.monotonic()
    args = resolve_options(args)
    dist = tu.init_distributed()
    if dist.distributed:
        tu.cleanup_distributed(dist)
        raise TrainingError("train cyclegan runs in one process on one GPU; start it without torchrun")
    tu.seed_everything(args.seed)
    device = tu.select_device(args.device, dist)
    fmt = tu.memory_format(device)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    # data: unlabeled on both sides
    source_paths = data.list_unlabeled(args.source)
    reference_paths = data.list_unlabeled(args.reference)
    gen = torch.Generator().manual_seed(args.seed)

    def loader(paths: list[Path], scale: float) -> DataLoader:
        tf = transforms.train_transform(args.size, color_augment=False, scale_augment=(1.0, 1.15), base_scale=scale)
        return DataLoader(data.UnlabeledImages(paths, tf), batch_size=args.batch_size, shuffle=True,
                          drop_last=len(paths) >= args.batch_size, num_workers=args.workers, generator=gen,
                          pin_memory=device.type == "cuda")

    xs = gan.forever(loader(source_paths, args.source_scale))
    ys = gan.forever(loader(reference_paths, 1.0))
    steps = args.steps_per_epoch or max(1, max(len(source_paths), len(reference_paths)) // args.batch_size)
    eval_tf = transforms.eval_transform(args.size, scale=args.source_scale)
    every = max(1, len(source_paths) // SAMPLE_ROWS)
    sample_batch = torch.stack([eval_tf(data.load_rgb(p)) for p in source_paths[::every][:SAMPLE_ROWS]])

    # networks, optimizers, schedules
    architecture, g_args, d_args = generator_spec(args)
    setup = build_setup(architecture=architecture, generator_args=g_args, discriminator_args=d_args,
                        epochs=args.epochs, generator_lr=args.generator_lr, discriminator_lr=args.lr,
                        seed=args.seed, device=device, memory_format=fmt)
    init_from = init_generator(setup, args.init_from) if args.init_from else None
    semantic_term = None
    semantic_info: dict[str, Any] | None = None
    if args.semantic_classifier:
        consistency = semantic.ClassConsistency.from_checkpoint(args.semantic_classifier, device,
                                                                teacher=args.semantic_teacher)
        semantic_term = gan.SemanticTerm(fn=consistency, weight=args.semantic_weight,
                                              pairs=consistency.pairs)
        semantic_info = {**consistency.describe(), "weight": args.semantic_weight}

    # resume
    state_file = resume.state_path(out)
    start_epoch, history = 0, []
    if args.resume:
        header = resume.load_training_state(state_file, modules=setup.nets, optimizers=setup.optimizers,
                                        schedulers=setup.schedulers)
        start_epoch, history = header["epoch"], list(header["extra"].get("history", []))
        print(f"resumed from {state_file} after epoch {start_epoch}", file=sys.stderr)

    samples_png = Path(f"{out}.samples.png")
    for epoch in range(start_epoch, args.epochs):
        stats = setup.train_epoch(xs, ys, steps=steps, epoch=epoch, epochs=args.epochs, semantic=semantic_term,
                                  device=device)
        history.append({"epoch": epoch + 1, **stats})
        print(json.dumps(history[-1]), file=sys.stderr)
        resume.save_training_state(state_file, modules=setup.nets, optimizers=setup.optimizers,
                               schedulers=setup.schedulers, epoch=epoch + 1,
                               extra={"history": history, "out": str(out)})
        save_samples(setup.nets["g_xy"], setup.nets["g_yx"], sample_batch, samples_png, device)

    header = standardizer_header(
        setup, input_size=args.size, history=history, semantic_info=semantic_info,
        training_data={
            "source": {"root": str(Path(args.source).resolve()), "images": len(source_paths),
                       "scale": args.source_scale},
            "reference": {"root": str(Path(args.reference).resolve()), "images": len(reference_paths)},
        },
        training_options={"preset": args.preset, "generator": args.generator_type,
                          "discriminator_pool": args.discriminator_pool, "generator_lr": args.generator_lr,
                          "discriminator_lr": args.lr, "semantic_teacher": args.semantic_teacher,
                          "semantic_weight": args.semantic_weight if semantic_info else None,
                          "init_from": init_from},
        epochs=args.epochs, steps=steps, batch_size=args.batch_size, seed=args.seed,
        train_seconds=time.monotonic() - started)
    header.update(site_profile_fields(source_paths, reference_paths, args.semantic_classifier))
    sha = checkpoint.save_checkpoint(out, setup.generator_state(), tu.jsonable(header))
    if not samples_png.exists():
        save_samples(setup.nets["g_xy"], setup.nets["g_yx"], sample_batch, samples_png, device)
    print(json.dumps({"out": str(out), "sha256": sha, "samples": str(samples_png)}), file=sys.stderr)
    print(sha)
    return sha


def run(args: argparse.Namespace) -> int:
    try:
        main(args)
    except (TrainingError, semantic.TeacherError, resume.TrainingStateError, checkpoint.CheckpointError,
            data.DataError, classical.BaselineError) as exc:
        print(f"stainbridge train cyclegan: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run(get_args_parser().parse_args()))
