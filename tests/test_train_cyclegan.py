"""`stainbridge train cyclegan`: unpaired standardizer training, its checkpoint, samples and resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from stainbridge.models import checkpoint, classifier, inference
from stainbridge.models.imaging import classical, data, synthetic
from stainbridge.models.training import cyclegan as tg
from stainbridge.models.training import resume

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("gan")
    synthetic.write_dataset(base / "reference", protocol="reference", per_class=4, size=64, seed=0)
    # the incoming lab's images arrive without class folders; nested folders are searched
    synthetic.write_dataset(base / "incoming" / "batch1", protocol="incoming", per_class=4, size=64, seed=1)
    return base / "incoming", base / "reference"


def train(folders: tuple[Path, Path], out: Path, *extra: str) -> str:
    source, reference = folders
    args = tg.get_args_parser().parse_args(
        ["--source", str(source), "--reference", str(reference), "--out", str(out), "--preset", "tiny",
         "--steps-per-epoch", "2", *extra])
    return tg.main(args)


@pytest.fixture(scope="module")
def trained(folders: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("std") / "std.safetensors"
    return out, train(folders, out, "--epochs", "1")


@pytest.mark.slow
def test_tiny_run_writes_generator_checkpoint_and_sample_grid(trained: tuple[Path, str]) -> None:
    """A few tiny iterations write a loadable G-only standardizer checkpoint and a 3-row sample grid."""
    out, sha = trained
    state, header = checkpoint.load_checkpoint(out)
    assert sha == checkpoint.file_sha256(out)
    assert header["kind"] == "standardizer" and header["architecture"] == "resnet_generator"
    assert header["arch_args"] == {"ngf": 16, "n_blocks": 3, "upsample": "resize_conv"}
    assert header["input_size"] == 64
    assert header["training_data"]["source"]["images"] == 20 and header["training_data"]["labels_used"] is False
    assert {"cycle_x", "adv_xy", "d_y"} <= set(header["metrics"]["final"])
    assert all(not k.startswith(("d_", "g_yx")) for k in state)  # only G_XY is kept

    standardizer = inference.load_standardizer(str(out))
    batch = torch.rand(2, 3, 64, 64)
    result = standardizer(batch)
    assert result.shape == batch.shape and 0.0 <= result.min() and result.max() <= 1.0

    with Image.open(Path(f"{out}.samples.png")) as grid:
        assert grid.height == 3 * 64 + 4 * 2  # real / standardized / reconstructed rows, 2 px padding


@pytest.mark.slow
def test_resume_continues_the_gan_from_its_state(folders: tuple[Path, Path], tmp_path: Path) -> None:
    """--resume restores G, F, both discriminators and optimizers and runs only the remaining epochs."""
    out = tmp_path / "std.safetensors"
    train(folders, out, "--epochs", "1")
    _, state = checkpoint.load_checkpoint(resume.state_path(out))
    assert state["epoch"] == 1 and state["modules"] == ["d_x", "d_y", "g_xy", "g_yx"]
    train(folders, out, "--epochs", "2", "--resume")
    _, header = checkpoint.load_checkpoint(out)
    assert [h["epoch"] for h in header["metrics"]["history"]] == [1, 2]


@pytest.mark.slow
def test_semantic_classifier_adds_a_kl_term(folders: tuple[Path, Path], tmp_path: Path) -> None:
    """With --semantic-classifier the generator loss carries the KL class-preservation terms."""
    reference = folders[1]
    images = [data.load_rgb(p) for p, _ in data.list_labeled(reference)]
    model = classifier.build_classifier(arch="resnet18", num_classes=5)
    clf = tmp_path / "clf.safetensors"
    checkpoint.save_checkpoint(clf, model.state_dict(), {
        "kind": "classifier", "architecture": "resnet18", "arch_args": {"num_classes": 5},
        "classes": list(synthetic.CLASSES), "input_size": 64,
        "normalization": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        "reference_stain": classical.fit_reference_stats(images)})
    out = tmp_path / "std.safetensors"
    train(folders, out, "--epochs", "1", "--semantic-classifier", str(clf), "--semantic-weight", "0.5")
    _, header = checkpoint.load_checkpoint(out)
    assert header["semantic"]["weight"] == 0.5 and header["semantic"]["sha256"] == checkpoint.file_sha256(clf)
    assert {"semantic_x_to_y", "semantic_y_cycle"} <= set(header["metrics"]["final"])


@pytest.mark.slow
def test_standardizer_checkpoint_is_refused_as_semantic_classifier(
        folders: tuple[Path, Path], trained: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Passing a standardizer where the frozen classifier belongs exits 2 and names the problem."""
    out, _ = trained
    source, reference = folders
    args = tg.get_args_parser().parse_args(["--source", str(source), "--reference", str(reference),
                                            "--out", str(tmp_path / "b.safetensors"), "--semantic-classifier", str(out)])
    assert tg.run(args) == 2
    assert "not a classifier" in capsys.readouterr().err


def test_size_must_suit_the_generator(folders: tuple[Path, Path], tmp_path: Path) -> None:
    """A crop size the ResNet generator cannot take is rejected before any training."""
    source, reference = folders
    args = tg.get_args_parser().parse_args(["--source", str(source), "--reference", str(reference),
                                            "--out", str(tmp_path / "s.safetensors"), "--size", "62"])
    assert tg.run(args) == 2


@pytest.mark.slow
def test_checkpoint_carries_a_site_profile_from_unlabeled_red_cells(tmp_path: Path) -> None:
    """train cyclegan measures the source lab's red cells (none of its labels) and writes the site profile
    that the service's geometry then uses: red cells drawn 24 px (reference) vs 40 px (source) give k = 0.6."""
    import dataclasses

    from stainbridge.models.classifier import build_classifier

    for name, protocol, fraction in (("ref", "reference", 0.3), ("src", "incoming", 0.5)):
        p = dataclasses.replace(synthetic.get_protocol(protocol), cell_fraction=fraction, red_cell_gap=0.1)
        (tmp_path / name).mkdir()
        for i in range(25):
            label = synthetic.CLASSES[i % 5]
            synthetic.render_cell(label, protocol=p, size=128, rng=synthetic.image_rng(5, name, label, i)).save(
                tmp_path / name / f"{i}.png")
    out = tmp_path / "std.safetensors"
    train((tmp_path / "src", tmp_path / "ref"), out, "--epochs", "1", "--steps-per-epoch", "1")
    _, header = checkpoint.load_checkpoint(out)
    profile = header["site_profile"]
    assert profile["method"] == "red_cell_diameter" and profile["red_cells"] >= 20
    assert profile["magnification"] == pytest.approx(0.6, rel=0.08)
    assert profile["reference_window_px"] == 128

    clf_path = tmp_path / "clf.safetensors"
    checkpoint.save_checkpoint(clf_path, build_classifier(arch="resnet18", num_classes=5).state_dict(), {
        "kind": "classifier", "architecture": "resnet18", "arch_args": {"num_classes": 5},
        "classes": list(synthetic.CLASSES), "input_size": 32,
        "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}, "geometry": {"reference_window_px": 128.0}})
    geometry = inference.resolve_geometry(inference.load_classifier(clf_path), inference.load_standardizer(str(out)))
    assert geometry.magnification == pytest.approx(profile["magnification"])
    assert geometry.window_px == pytest.approx(128 / profile["magnification"])
    assert "red_cell_diameter" in geometry.source
