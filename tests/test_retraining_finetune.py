"""The nightly job fine-tunes what serves: the active standardizer (warm start), the classifier on reviews."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from sqlalchemy import select

from tests.daemon_helpers import STAINBRIDGE, subprocess_env
from tests.retraining_helpers import archive_incoming, open_world
from stainbridge.daemon import registry, retraining
from stainbridge.daemon.store import ModelKind, ModelVersion, TrainingRun
from stainbridge.models.checkpoint import file_sha256, load_checkpoint


def _settings(settings_factory, lab, standardizer, **overrides):
    values = dict(models_classifier=lab.classifier, models_standardizer=standardizer, models_device="cpu",
                  retraining_reference=lab.reference, retraining_min_new_images=5, retraining_epochs=1,
                  retraining_steps_per_epoch=1, retraining_device="cpu", retraining_held_out_fraction=0.3)
    values.update(overrides)
    return settings_factory(**values)


@pytest.fixture(scope="module")
def colour_standardizer(lab, tmp_path_factory) -> Path:
    """A learned standardizer of the job's default recipe (--preset colour), trained for one step."""
    out = tmp_path_factory.mktemp("colour") / "active.safetensors"
    done = subprocess.run([str(STAINBRIDGE), "train", "cyclegan", "--source", str(lab.incoming), "--reference",
                           str(lab.reference), "--out", str(out), "--preset", "colour", "--epochs", "1",
                           "--steps-per-epoch", "1", "--device", "cpu"],
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_nightly_run_fine_tunes_the_active_learned_standardizer(settings_factory, lab, colour_standardizer) -> None:
    """With a learned active standardizer of the configured preset, the candidate is trained from its weights."""
    settings = _settings(settings_factory, lab, colour_standardizer)
    engine, sessions = open_world(settings)
    try:
        archive_incoming(settings, sessions, lab)
        result = retraining.run_retraining(settings, sessions)
        assert result.candidate_id, result.reason
        with sessions() as session:
            run = session.get(TrainingRun, result.run_id)
            active_id = session.scalar(select(ModelVersion.id).where(
                ModelVersion.path == str(colour_standardizer.resolve())))
            assert run.params["init_from"] == str(colour_standardizer.resolve())
            assert run.params["init_from_version"] == active_id and "fine-tuning" in run.params["start"]
            candidate = session.get(ModelVersion, result.candidate_id)
        _, header = load_checkpoint(candidate.path)
        assert header["training_options"]["init_from"]["sha256"] == file_sha256(colour_standardizer)
    finally:
        engine.dispose()


def test_without_a_learned_standardizer_the_job_trains_from_scratch_and_says_why(settings_factory, lab) -> None:
    """The built-in "none" standardizer cannot be fine-tuned: the run records that it trained from scratch."""
    settings = _settings(settings_factory, lab, "none")
    engine, sessions = open_world(settings)
    try:
        archive_incoming(settings, sessions, lab)
        result = retraining.run_retraining(settings, sessions)
        assert result.candidate_id, result.reason
        with sessions() as session:
            run = session.get(TrainingRun, result.run_id)
            assert run.params["init_from"] is None and "built-in 'none'" in run.params["start"]
            _, header = load_checkpoint(session.get(ModelVersion, result.candidate_id).path)
        assert header["training_options"]["init_from"] is None
    finally:
        engine.dispose()
