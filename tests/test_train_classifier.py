"""`stainbridge train classifier` and the loop helpers it shares (models.training_utils)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from stainbridge.models import checkpoint, classifier
from stainbridge.models.imaging import synthetic
from stainbridge.models.training import classifier as tc
from stainbridge.models.training import resume

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("reference")
    synthetic.write_dataset(root, protocol="reference", per_class=12, size=64, seed=0)
    return root


def train(data: Path, out: Path, *extra: str) -> str:
    args = tc.get_args_parser().parse_args(["--data", str(data), "--out", str(out), "--preset", "tiny", *extra])
    return tc.main(args)


@pytest.fixture(scope="module")
def trained(reference_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("clf") / "clf.safetensors"
    return out, train(reference_dir, out, "--epochs", "1")


@pytest.mark.slow
def test_tiny_run_writes_checkpoint_with_contract_header(trained: tuple[Path, str], reference_dir: Path) -> None:
    """A tiny run writes a safetensors checkpoint whose header carries the full classifier contract."""
    out, sha = trained
    assert sha == checkpoint.file_sha256(out)
    state, header = checkpoint.load_checkpoint(out)
    assert header["kind"] == "classifier" and header["architecture"] == "resnet18"
    assert header["classes"] == list(synthetic.CLASSES)
    assert header["input_size"] == 64 and header["arch_args"] == {"num_classes": 5}
    assert set(header["normalization"]) == {"mean", "std"}
    assert header["geometry"]["reference_cell_fraction"] > 0
    # the reference scale that site profiles are measured against (None when red cells are not measurable)
    assert {"reference_red_cell_diameter_px", "reference_nucleus_area_px"} <= set(header["geometry"])
    assert header["geometry"]["reference_nucleus_area_px"] > 0
    assert {"reinhard", "macenko"} <= set(header["reference_stain"])
    assert header["loss"] == "focal" and header["gamma"] == 2.0 and header["epochs"] == 1 and header["seed"] == 0
    assert header["code_version"] and header["created"]
    training = header["training_data"]
    assert training["root"] == str(reference_dir.resolve())
    split_file = Path(f"{out}.split.json")
    assert training["split_manifest_sha256"] == hashlib.sha256(split_file.read_bytes()).hexdigest()
    assert sum(training["counts"].values()) == training["split_counts"]["train"]
    for key in ("val_accuracy", "val_balanced_accuracy", "test_accuracy", "test_balanced_accuracy"):
        assert key in header["metrics"]
    assert state["fc.weight"].shape == (5, 512)


@pytest.mark.slow
def test_split_manifest_keeps_test_images_out_of_training(trained: tuple[Path, str]) -> None:
    """The split written next to the checkpoint is stratified and its test images are disjoint from training."""
    out, _ = trained
    manifest = json.loads(Path(f"{out}.split.json").read_text())
    assert not set(manifest["train"]) & set(manifest["test"])
    assert not set(manifest["val"]) & set(manifest["test"])
    assert {Path(p).parts[0] for p in manifest["test"]} == set(synthetic.CLASSES)


@pytest.mark.slow
def test_resume_continues_from_saved_state(reference_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--resume restarts after the last saved epoch instead of training from scratch."""
    out = tmp_path / "clf.safetensors"
    train(reference_dir, out, "--epochs", "1")
    _, state_header = checkpoint.load_checkpoint(resume.state_path(out))
    assert state_header["kind"] == resume.STATE_KIND and state_header["epoch"] == 1

    epochs_run: list[int] = []
    real_epoch = tc.train_one_epoch
    monkeypatch.setattr(tc, "train_one_epoch", lambda *a, **k: (epochs_run.append(a[5]), real_epoch(*a, **k))[1])
    train(reference_dir, out, "--epochs", "2", "--resume")
    assert epochs_run == [1]  # only the second epoch (0-based index 1) ran
    _, header = checkpoint.load_checkpoint(out)
    assert [h["epoch"] for h in header["metrics"]["history"]] == [1, 2]


@pytest.mark.slow
def test_training_uses_the_focal_loss(reference_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every training step goes through models.classifier.FocalLoss with the requested gamma."""
    gammas: list[float] = []
    real_forward = classifier.FocalLoss.forward

    def spy(self: classifier.FocalLoss, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        gammas.append(self.gamma)
        return real_forward(self, logits, target)

    monkeypatch.setattr(classifier.FocalLoss, "forward", spy)
    train(reference_dir, tmp_path / "clf.safetensors", "--epochs", "1", "--gamma", "1.5")
    assert gammas and set(gammas) == {1.5}


def test_ce_option_uses_plain_cross_entropy() -> None:
    """--loss ce trains with unsmoothed cross-entropy, not the focal loss."""
    args = tc.get_args_parser().parse_args(["--data", "d", "--out", "o", "--loss", "ce"])
    criterion = tc.make_criterion(args)
    assert isinstance(criterion, nn.CrossEntropyLoss) and criterion.label_smoothing == 0.0


def test_empty_data_folder_is_reported_not_raised(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A folder without class sub-folders exits with code 2 and says what is expected."""
    (tmp_path / "empty").mkdir()
    args = tc.get_args_parser().parse_args(["--data", str(tmp_path / "empty"), "--out", str(tmp_path / "c.safetensors")])
    assert tc.run(args) == 2
    assert "sub-folder" in capsys.readouterr().err


def test_training_state_round_trips_optimizer_and_scheduler(tmp_path: Path) -> None:
    """Model, AdamW moments and the cosine schedule come back exactly from the safetensors state."""
    torch.manual_seed(0)

    def make() -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        model = nn.Linear(4, 3)
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
        return model, opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5)

    model, opt, sched = make()
    for _ in range(3):
        model(torch.randn(8, 4)).sum().backward()
        opt.step()
        sched.step()
    path = tmp_path / "run.state"
    resume.save_training_state(path, modules={"m": model}, optimizers={"o": opt}, schedulers={"s": sched},
                           epoch=3, extra={"note": "x"})
    model2, opt2, sched2 = make()
    header = resume.load_training_state(path, modules={"m": model2}, optimizers={"o": opt2}, schedulers={"s": sched2})
    assert header["epoch"] == 3 and header["extra"] == {"note": "x"}
    assert torch.equal(model.weight, model2.weight)
    for p, p2 in zip(model.parameters(), model2.parameters(), strict=True):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], opt2.state[p2][key])
    assert opt2.param_groups[0]["betas"] == (0.9, 0.999)
    assert sched2.get_last_lr() == sched.get_last_lr() and sched2.last_epoch == 3


def test_resume_refuses_a_state_for_other_modules(tmp_path: Path) -> None:
    """A state file written for different modules is refused with an instruction, not half-loaded."""
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "run.state"
    resume.save_training_state(path, modules={"a": model}, optimizers={"o": opt}, epoch=1)
    with pytest.raises(resume.TrainingStateError, match="delete the state file"):
        resume.load_training_state(path, modules={"b": model}, optimizers={"o": opt})


@pytest.mark.slow
def test_torchrun_two_processes_train_one_checkpoint(reference_dir: Path, tmp_path: Path) -> None:
    """Under torchrun (2 CPU processes, gloo, DistributedSampler) rank 0 alone writes the checkpoint."""
    out = tmp_path / "clf.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "stainbridge.models.training.classifier", "--data", str(reference_dir), "--out", str(out), "--epochs", "1"],
        capture_output=True, text=True, timeout=300, env=env, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [checkpoint.file_sha256(out)]
    _, header = checkpoint.load_checkpoint(out)
    assert [h["epoch"] for h in header["metrics"]["history"]] == [1]
