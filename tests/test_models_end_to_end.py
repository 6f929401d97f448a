"""The model pipeline through the installed `stainbridge` command: synth -> train -> standardize -> eval."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from stainbridge.models import checkpoint

EVAL_KEYS = {"classes", "n", "accuracy", "balanced_accuracy", "per_class_recall", "confusion_matrix"}
Runner = Callable[..., subprocess.CompletedProcess[str]]


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_reference_classifier_cyclegan_and_eval_on_held_out_incoming(run_stainbridge: Runner, tmp_path: Path) -> None:
    """A tiny classifier (reference lab) and a tiny CycleGAN (incoming -> reference) train and score held-out incoming images raw and standardized."""
    env = {"OMP_NUM_THREADS": "1"}
    ref, gan_in, held_out = tmp_path / "reference", tmp_path / "incoming_unlabeled", tmp_path / "incoming_test"
    ok(run_stainbridge("synth", "--out", str(ref), "--protocol", "reference", "--per-class", "20", "--size", "64", env=env))
    ok(run_stainbridge("synth", "--out", str(gan_in), "--protocol", "incoming", "--per-class", "8", "--size", "64",
                       "--seed", "1", env=env))
    ok(run_stainbridge("synth", "--out", str(held_out), "--protocol", "incoming", "--per-class", "6", "--size", "64",
                       "--seed", "2", env=env))

    clf = tmp_path / "models" / "classifier.safetensors"
    trained = ok(run_stainbridge("train", "classifier", "--data", str(ref), "--out", str(clf), "--preset", "tiny",
                                 env=env, timeout=180))
    assert trained.stdout.split()[-1] == checkpoint.file_sha256(clf)
    _, header = checkpoint.load_checkpoint(clf)
    assert header["kind"] == "classifier" and header["loss"] == "focal"
    assert Path(f"{clf}.split.json").exists()

    std = tmp_path / "models" / "standardizer.safetensors"
    ok(run_stainbridge("train", "cyclegan", "--source", str(gan_in), "--reference", str(ref), "--out", str(std),
                       "--preset", "tiny", "--epochs", "1", "--steps-per-epoch", "8", env=env, timeout=180))
    assert Path(f"{std}.samples.png").exists()

    results = {}
    for name, spec in (("raw", "none"), ("cyclegan", str(std))):
        out = tmp_path / "metrics" / f"{name}.json"
        ok(run_stainbridge("eval", "--classifier", str(clf), "--data", str(held_out), "--standardizer", spec,
                           "--scale", "auto", "--json", str(out), env=env))
        results[name] = json.loads(out.read_text())
        assert EVAL_KEYS <= set(results[name])
        assert results[name]["n"] == 30 and sum(map(sum, results[name]["confusion_matrix"])) == 30
        assert out.with_suffix(".confusion.png").exists()
    assert results["cyclegan"]["standardizer"]["sha256"] == checkpoint.file_sha256(std)

    in_lab = ok(run_stainbridge("eval", "--classifier", str(clf), "--data", str(ref), "--split", "test", env=env))
    assert json.loads(in_lab.stdout)["n"] == 20  # 20 % of 20 images in each of 5 classes
