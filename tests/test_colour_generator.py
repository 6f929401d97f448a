"""The colour-only CycleGAN generator: identity at start, no morphology change, checkpoints, training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stainbridge.models import checkpoint, classifier, cyclegan, inference
from stainbridge.models.colour_generator import (
    PointwiseColourGenerator,
    build_colour_generator,
    dihedral_views,
)
from stainbridge.models.imaging import classical, data, synthetic
from stainbridge.models.training import cyclegan as tg

torch.set_num_threads(1)


def test_starts_as_near_identity() -> None:
    """An untrained generator changes no pixel by more than the 0.99 shrink allows."""
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert (build_colour_generator()(x) - x).abs().max() < 0.02


def test_output_pixel_depends_only_on_same_input_pixel() -> None:
    """Perturbing one input pixel changes that output pixel and no other: morphology cannot change."""
    torch.manual_seed(0)
    g = build_colour_generator()
    for p in g.parameters():  # leave the identity start so the test is not trivial
        torch.nn.init.normal_(p, 0.0, 0.5)
    x = torch.rand(1, 3, 12, 12) * 1.8 - 0.9
    y = g(x)
    x2 = x.clone()
    x2[0, :, 5, 7] = torch.tensor([0.8, -0.7, 0.1])
    changed = (g(x2) - y).abs().amax(1)[0] > 0
    assert changed[5, 7] and changed.sum() == 1


@pytest.mark.parametrize("size", [(1, 1), (7, 13), (64, 64)])
def test_any_size_works(size: tuple[int, int]) -> None:
    """Any height and width go through unchanged in shape, values stay in (-1, 1)."""
    y = build_colour_generator()(torch.rand(2, 3, *size) * 2 - 1)
    assert y.shape == (2, 3, *size) and y.abs().max() < 1


def test_registered_and_pooled_discriminator_keeps_default_parameter_count() -> None:
    """The generator is registered for checkpoints; pool only adds a parameter-free AvgPool2d."""
    assert cyclegan.GENERATORS["pointwise_colour"] is build_colour_generator
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(cyclegan.build_discriminator()) == count(cyclegan.build_discriminator(pool=4)) == 2_764_737
    assert isinstance(cyclegan.build_discriminator(pool=4)[0], torch.nn.AvgPool2d)


def test_dihedral_views_are_the_eight_symmetries() -> None:
    """dihedral_views yields 8 distinct views of an asymmetric image, the first being the image."""
    x = torch.arange(16.0).view(1, 1, 4, 4)
    views = dihedral_views(x)
    assert len(views) == 8 and torch.equal(views[0], x)
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8


def test_checkpoint_round_trip_through_inference(tmp_path: Path) -> None:
    """A saved colour generator is rebuilt by load_standardizer and gives the same images."""
    torch.manual_seed(1)
    g = PointwiseColourGenerator(hidden=8, layers=3).eval()
    torch.nn.init.normal_(g.out.weight, 0.0, 0.3)
    path = tmp_path / "colour.safetensors"
    checkpoint.save_checkpoint(path, g.state_dict(), {"kind": "standardizer", "architecture": "pointwise_colour",
                                                      "arch_args": {"hidden": 8, "layers": 3}, "input_size": 64})
    std = inference.load_standardizer(str(path))
    batch = torch.rand(2, 3, 30, 22)  # not a multiple of 4: inference pads, then crops back
    with torch.no_grad():
        expected = (g(batch * 2 - 1) + 1) / 2
    assert torch.allclose(std(batch), expected, atol=1e-5)


def _classifier(reference: Path, out: Path) -> Path:
    images = [data.load_rgb(p) for p, _ in data.list_labeled(reference)]
    model = classifier.build_classifier(arch="resnet18", num_classes=5)
    checkpoint.save_checkpoint(out, model.state_dict(), {
        "kind": "classifier", "architecture": "resnet18", "arch_args": {"num_classes": 5},
        "classes": list(synthetic.CLASSES), "input_size": 64,
        "normalization": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        "reference_stain": classical.fit_reference_stats(images)})
    return out


@pytest.mark.slow
def test_train_colour_generator_with_raw_teacher(tmp_path: Path) -> None:
    """`train cyclegan --generator colour --discriminator-pool 4 --semantic-teacher raw` writes a
    loadable pointwise_colour checkpoint whose header records the options."""
    synthetic.write_dataset(tmp_path / "reference", protocol="reference", per_class=8, size=64, seed=0)
    synthetic.write_dataset(tmp_path / "incoming", protocol="incoming", per_class=8, size=64, seed=1)
    clf = _classifier(tmp_path / "reference", tmp_path / "clf.safetensors")
    out = tmp_path / "std.safetensors"
    args = tg.get_args_parser().parse_args([
        "--source", str(tmp_path / "incoming"), "--reference", str(tmp_path / "reference"), "--out", str(out),
        "--generator", "colour", "--discriminator-pool", "4", "--generator-lr", "1e-3", "--semantic-classifier",
        str(clf), "--semantic-weight", "5", "--semantic-teacher", "raw", "--epochs", "1", "--steps-per-epoch", "2",
        "--batch-size", "4", "--device", "cpu"])
    tg.main(args)
    _, header = checkpoint.load_checkpoint(out)
    assert header["architecture"] == "pointwise_colour" and header["arch_args"] == {"hidden": 32, "layers": 2}
    assert header["training_options"]["generator"] == "colour"
    assert header["training_options"]["discriminator_pool"] == 4
    assert header["training_options"]["generator_lr"] == 1e-3
    assert header["semantic"]["teacher"] == "raw" and header["semantic"]["pairs"] == ["x_to_y"]
    assert "semantic_x_to_y" in header["metrics"]["final"] and "semantic_y_cycle" not in header["metrics"]["final"]
    std = inference.load_standardizer(str(out))
    assert std(torch.rand(1, 3, 64, 64)).shape == (1, 3, 64, 64)


def test_colour_preset_sets_the_recipe() -> None:
    """--preset colour resolves to the colour generator, pool 4, generator lr 1e-3, weight 5, raw teacher."""
    args = tg.resolve_options(tg.get_args_parser().parse_args(
        ["--source", "s", "--reference", "r", "--out", "o", "--preset", "colour"]))
    assert (args.generator_type, args.discriminator, args.discriminator_pool, args.generator_lr, args.lr) == \
        ("colour", "tiny", 4, 1e-3, 2e-4)
    assert (args.semantic_weight, args.semantic_teacher, args.size, args.batch_size) == (5.0, "raw", 64, 8)
    tiny = tg.resolve_options(tg.get_args_parser().parse_args(["--source", "s", "--reference", "r", "--out", "o"]))
    assert (tiny.generator_type, tiny.discriminator_pool, tiny.generator_lr, tiny.semantic_teacher) == \
        ("resnet", 1, 2e-4, "reinhard")
