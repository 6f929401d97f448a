"""`stainbridge bench throughput` times each inference stage and prints images per second."""

import json

import pytest
import torch

from stainbridge.daemon.cli import main
from stainbridge.models.checkpoint import save_checkpoint
from stainbridge.models.classifier import build_classifier
from stainbridge.models.imaging.synthetic import CLASSES


def test_prints_and_writes_images_per_second_for_each_stage(tmp_path, capsys):
    """A tiny CPU run reports a positive rate for the standardizer, the classifier and the whole path."""
    out = tmp_path / "throughput.json"
    assert main(["bench", "throughput", "--device", "cpu", "--images", "4", "--batch-size", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["images_per_second"]) == {"standardizer", "classifier", "end_to_end"}
    assert all(rate > 0 for rate in result["images_per_second"].values())
    assert result["device"] == "cpu" and result["batch_size"] == 2
    assert "images/s" in capsys.readouterr().out


def test_uses_given_checkpoints(tmp_path, capsys):
    """With --classifier the numbers are for that checkpoint, not a random preset network."""
    model = build_classifier(arch="resnet18", num_classes=len(CLASSES))
    header = {"kind": "classifier", "architecture": "resnet18", "arch_args": {"num_classes": len(CLASSES)},
              "classes": list(CLASSES), "input_size": 32, "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}}
    path = tmp_path / "clf.safetensors"
    save_checkpoint(path, {k: v.detach().clone() for k, v in model.state_dict().items()}, header)
    out = tmp_path / "t.json"
    assert main(["bench", "throughput", "--device", "cpu", "--images", "2", "--batch-size", "2",
                 "--classifier", str(path), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["classifier"] == "clf" and result["input_size"] == 32 and result["standardizer"] == "none"


def test_cuda_requested_without_a_gpu_is_a_clear_error(capsys):
    """Asking for cuda where there is none exits 2 with a message instead of a traceback."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["bench", "throughput", "--device", "cuda", "--images", "1"]) == 2
    assert "cuda" in capsys.readouterr().err.lower()
