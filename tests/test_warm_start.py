"""`stainbridge train cyclegan --init-from`: the nightly job fine-tunes the active standardizer, not a new one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stainbridge.models import checkpoint
from stainbridge.models.imaging import synthetic
from stainbridge.models.training import cyclegan as tg

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("warm")
    synthetic.write_dataset(base / "reference", protocol="reference", per_class=2, size=48, seed=0)
    synthetic.write_dataset(base / "incoming", protocol="incoming", per_class=2, size=48, seed=1)
    return base / "incoming", base / "reference"


def train(folders: tuple[Path, Path], out: Path, *extra: str) -> str:
    source, reference = folders
    return tg.main(tg.get_args_parser().parse_args(
        ["--source", str(source), "--reference", str(reference), "--out", str(out), "--preset", "tiny",
         "--size", "32", "--epochs", "1", "--steps-per-epoch", "1", "--device", "cpu", *extra]))


@pytest.fixture(scope="module")
def start(folders: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("start") / "start.safetensors"
    train(folders, out)
    return out


@pytest.mark.slow
def test_init_from_starts_the_generator_from_the_checkpoint(folders, start, tmp_path) -> None:
    """With learning rates 0, a warm-started run writes exactly the weights it started from, and says where from."""
    out = tmp_path / "warm.safetensors"
    train(folders, out, "--init-from", str(start), "--lr", "0", "--generator-lr", "0")
    before, _ = checkpoint.load_checkpoint(start)
    after, header = checkpoint.load_checkpoint(out)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert header["training_options"]["init_from"] == {"path": str(start.resolve()),
                                                      "sha256": checkpoint.file_sha256(start)}


@pytest.mark.slow
def test_init_from_a_different_architecture_is_a_clear_error(folders, start, tmp_path) -> None:
    """A ResNet-generator checkpoint cannot warm-start the colour generator: the error names both and the fix."""
    with pytest.raises(tg.TrainingError, match=r"--init-from .*resnet_generator.*pointwise_colour.*from scratch"):
        train(folders, tmp_path / "x.safetensors", "--generator", "colour", "--init-from", str(start))
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.slow
def test_init_from_a_classifier_is_refused(folders, start, tmp_path) -> None:
    """A checkpoint of another kind is refused before any training."""
    header = dict(checkpoint.load_checkpoint(start)[1], kind="classifier")
    other = tmp_path / "clf.safetensors"
    checkpoint.save_checkpoint(other, checkpoint.load_checkpoint(start)[0], header)
    with pytest.raises(tg.TrainingError, match="it is a classifier"):
        train(folders, tmp_path / "y.safetensors", "--init-from", str(other))
