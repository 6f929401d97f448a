"""`stainbridge train finetune`: a classifier adapted to reviewed incoming images keeps its contract."""

from __future__ import annotations

import shutil

import pytest
import torch

from stainbridge.models import checkpoint, inference
from stainbridge.models.training import finetune

torch.set_num_threads(1)


def _args(lab, out, *extra: str):
    return finetune.get_args_parser().parse_args(
        ["--init-from", str(lab.classifier), "--reviewed", str(lab.incoming), "--reference", str(lab.reference),
         "--out", str(out), "--epochs", "1", "--batch-size", "8", "--device", "cpu", *extra])


@pytest.mark.slow
def test_finetune_writes_a_loadable_classifier_with_the_same_contract(lab, tmp_path) -> None:
    """The fine-tuned checkpoint keeps classes, size, normalization and geometry, records its data, and moved."""
    out = tmp_path / "tuned.safetensors"
    sha = finetune.main(_args(lab, out, "--standardizer", "reinhard", "--lr", "1e-3"))
    before_state, before = checkpoint.load_checkpoint(lab.classifier)
    after_state, after = checkpoint.load_checkpoint(out)
    for key in ("architecture", "classes", "input_size", "normalization", "geometry", "reference_stain", "gamma"):
        assert after[key] == before[key], key
    tuning = after["finetune"]
    assert tuning["init_from"]["sha256"] == checkpoint.file_sha256(lab.classifier)
    assert tuning["standardizer"]["name"] == "reinhard" and tuning["reviewed"]["images"] == 20
    assert tuning["reference"]["images"] == 20 and len(after["metrics"]["history"]) == 1
    assert any(not torch.equal(before_state[k], after_state[k]) for k in before_state)
    loaded = inference.load_classifier(out)
    assert loaded.sha256 == sha and loaded.classes == before["classes"]


@pytest.mark.slow
def test_a_reviewed_class_the_classifier_does_not_know_is_refused(lab, tmp_path) -> None:
    """Reviewed images of an unknown class stop the run before training, naming the class and the fix."""
    reviewed = tmp_path / "reviewed"
    shutil.copytree(lab.incoming, reviewed)
    (reviewed / "blast").mkdir()
    shutil.copy(next(lab.incoming.rglob("*.png")), reviewed / "blast" / "x.png")
    args = finetune.get_args_parser().parse_args(
        ["--init-from", str(lab.classifier), "--reviewed", str(reviewed), "--reference", str(lab.reference),
         "--out", str(tmp_path / "x.safetensors"), "--device", "cpu"])
    with pytest.raises(finetune.FinetuneError, match=r"\['blast'\].*rename or remove"):
        finetune.main(args)
    assert finetune.run(args) == 2 and not (tmp_path / "x.safetensors").exists()
