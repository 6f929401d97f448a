"""The nightly job fine-tunes what serves: the active standardizer (warm start), the classifier on reviews."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from sqlalchemy import select

from stainbridge.daemon import cli
from stainbridge.daemon.retraining import nightly as retraining
from stainbridge.daemon.retraining import runs
from stainbridge.daemon.store import Image, ModelKind, ModelVersion, RunStatus, TrainingRun, VersionState
from stainbridge.daemon.versions import registry
from stainbridge.daemon.versions.hotswap import ModelSwapper
from stainbridge.daemon.versions.loading import load_models
from stainbridge.models.checkpoint import file_sha256, load_checkpoint, save_checkpoint
from tests.daemon_helpers import STAINBRIDGE, subprocess_env
from tests.retraining_helpers import archive_incoming, open_world

# every test here runs on the session's lab (a classifier trained in a subprocess) and trains a candidate
pytestmark = pytest.mark.slow


def _settings_values(lab, standardizer, **overrides):
    values = dict(models_classifier=lab.classifier, models_standardizer=standardizer, models_device="cpu",
                  retraining_reference=lab.reference, retraining_min_new_images=5, retraining_epochs=1,
                  retraining_steps_per_epoch=1, retraining_device="cpu", retraining_held_out_fraction=0.3)
    values.update(overrides)
    return values


def _settings(settings_factory, lab, standardizer, **overrides):
    return settings_factory(**_settings_values(lab, standardizer, **overrides))


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


def broken_classifier(lab, path: Path) -> Path:
    """The lab's classifier with its last layer replaced: every image is called the first class."""
    state, header = load_checkpoint(lab.classifier)
    state["fc.weight"] = torch.zeros_like(state["fc.weight"])
    state["fc.bias"] = torch.tensor([10.0] + [0.0] * (state["fc.bias"].numel() - 1))
    save_checkpoint(path, state, {**header, "metrics": {"note": "deliberately broken: one class for all"}})
    return path


@pytest.fixture
def reviewed_world(settings_factory, lab, tmp_path, monkeypatch, restore_logging):
    """20 archived incoming images, every one reviewed with its true class through `review import`."""
    overrides = dict(retraining_min_new_images=1000, retraining_min_reviews=10, retraining_epochs=2,
                     retraining_min_gate_reviews=5)
    settings = _settings(settings_factory, lab, "none", **overrides)
    engine, sessions = open_world(settings)
    archive_incoming(settings, sessions, lab)
    with sessions() as session:
        rows = session.execute(select(Image.sha256, Image.source_name)).all()
    csv = tmp_path / "reviews.csv"
    csv.write_text("image,label,reviewer\n" + "".join(f"{sha},{name.split('-')[0]},dr a\n" for sha, name in rows))
    environment = {"paths_state": settings.state_dir, "database_url": settings.database_url,
                   "paths_archive": settings.archive_dir, **_settings_values(lab, "none", **overrides)}
    for key, value in environment.items():
        monkeypatch.setenv(f"STAINBRIDGE_{key.upper()}", str(value))
    assert cli.main(["review", "import", str(csv)]) == 0
    yield settings, sessions
    engine.dispose()


def test_reviews_fine_tune_the_classifier_gated_on_the_reviews_it_did_not_see(reviewed_world, lab, capsys,
                                                                             monkeypatch) -> None:
    """Imported reviews -> `retrain --now` -> a classifier candidate tuned on some of them, gated on the others only
    (with [retraining] margin 1, so that 6 cells are enough to promote), and the service's next check switches to it."""
    settings, sessions = reviewed_world
    monkeypatch.setenv("STAINBRIDGE_RETRAINING_MARGIN", "1")
    serving = load_models(settings, sessions)
    capsys.readouterr()
    assert cli.main(["retrain", "--now", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["status"] == "skipped"  # the standardizer half: too few new images; the classifier half runs
    tuned = result["metrics"]["classifier"]
    assert tuned["status"] == "succeeded" and tuned["promoted"], tuned["reason"]
    checks = tuned["metrics"]["gate"]["checks"]
    with sessions() as session:
        run = session.get(TrainingRun, tuned["run_id"])
        assert run.kind is ModelKind.classifier and run.status is RunStatus.succeeded
        assert checks["balanced_accuracy"]["images"] == run.held_out_images  # not the cells it trained on
        assert len(run.params["trained_on"]) == run.images_used
        assert run.images_used + run.held_out_images == 20 and run.held_out_images > 0 and run.reference_images > 0
        active = registry.active_version(session, ModelKind.classifier, "default")
        assert active.id == tuned["candidate_id"] and active.training_run_id == run.id
        assert active.header["finetune"]["reviewed"]["images"] == run.images_used
        assert session.scalar(select(ModelVersion.state).where(
            ModelVersion.path == str(lab.classifier.resolve()))) is VersionState.retired
    swapped = ModelSwapper(settings, sessions).check(serving, force=True)
    assert swapped.classifier_version_id == tuned["candidate_id"] and swapped.classifier.sha256 == active.sha256
    again = retraining.run_retraining(settings, sessions)
    assert again.metrics["classifier"] == {"status": "not run",
                                           "reason": "no review imported since the last classifier fine-tuning"}


def test_a_broken_classifier_candidate_is_refused_and_stays_a_candidate(reviewed_world, lab, monkeypatch,
                                                                       tmp_path) -> None:
    """A fine-tune that calls every cell one class is refused by the gate; the active classifier stays."""
    settings, sessions = reviewed_world
    broken = broken_classifier(lab, tmp_path / "broken-classifier.safetensors")
    monkeypatch.setattr(runs, "CHILD", f"import shutil, sys; a = sys.argv; shutil.copy({str(broken)!r}, "
                                             "a[a.index('--out') + 1])")
    tuned = retraining.run_retraining(settings, sessions).metrics["classifier"]
    assert tuned["status"] == "rejected" and not tuned["promoted"]
    assert "predictions collapse" in tuned["reason"] or "not shown to be at most" in tuned["reason"], tuned["reason"]
    with sessions() as session:
        candidate = session.get(ModelVersion, tuned["candidate_id"])
        assert candidate.kind is ModelKind.classifier and candidate.state is VersionState.candidate
        assert candidate.reason == tuned["reason"]
        assert registry.active_version(session, ModelKind.classifier, "default").path == str(lab.classifier.resolve())
        assert session.get(TrainingRun, tuned["run_id"]).status is RunStatus.rejected



def test_candidate_site_profile_is_recorded_next_to_the_active_one(settings_factory, lab, colour_standardizer,
                                                                  monkeypatch, tmp_path, capsys,
                                                                  restore_logging) -> None:
    """The candidate's re-estimated site profile (its header) shows in the run, the gate and `models list`."""
    state, header = load_checkpoint(colour_standardizer)
    profile = {"magnification": 1.25, "method": "nucleus_area", "images": 14}
    save_checkpoint(tmp_path / "profiled.safetensors", state, {**header, "site_profile": profile})
    monkeypatch.setattr(runs, "CHILD", "import shutil, sys; a = sys.argv; "
                        f"shutil.copy({str(tmp_path / 'profiled.safetensors')!r}, a[a.index('--out') + 1])")
    settings = _settings(settings_factory, lab, "none")
    engine, sessions = open_world(settings)
    try:
        archive_incoming(settings, sessions, lab)
        result = retraining.run_retraining(settings, sessions)
        assert result.candidate_id, result.reason
        expected = {"active": None, "candidate": profile}
        assert result.metrics["site_profile"] == expected and result.metrics["gate"]["site_profile"] == expected
        tuned = result.metrics["classifier"]
        assert tuned["status"] == "not run" and "min_reviews" in tuned["reason"]
        with sessions() as session:
            assert session.get(TrainingRun, result.run_id).metrics["site_profile"] == expected
            assert session.get(ModelVersion, result.candidate_id).metrics["site_profile"] == expected
        for key, value in {"PATHS_STATE": settings.state_dir, "DATABASE_URL": settings.database_url}.items():
            monkeypatch.setenv(f"STAINBRIDGE_{key}", str(value))
        capsys.readouterr()
        assert cli.main(["models", "list", "--json"]) == 0
        listed = {v["id"]: v for v in json.loads(capsys.readouterr().out)}
        assert listed[result.candidate_id]["site_profile"] == profile
        assert listed[result.candidate_id]["metrics"]["site_profile"] == expected
        assert cli.main(["models", "list"]) == 0
        assert "[site x1.25, nucleus_area]" in capsys.readouterr().out
    finally:
        engine.dispose()


def test_a_crashed_fine_tuning_is_a_failed_classifier_run(reviewed_world, lab, monkeypatch, capsys) -> None:
    """A fine-tuning child that dies leaves a failed classifier run with its exit status; `retrain --now` exits 1."""
    settings, sessions = reviewed_world
    monkeypatch.setattr(runs, "CHILD", "import sys; print('out of memory'); sys.exit(3)")
    assert cli.main(["retrain", "--now"]) == 1
    assert "classifier run" in capsys.readouterr().out
    with sessions() as session:
        run = session.scalars(select(TrainingRun).where(TrainingRun.kind == ModelKind.classifier)).one()
        assert run.status is RunStatus.failed and "exited with status 3" in run.reason and "out of memory" in run.reason
        assert registry.active_version(session, ModelKind.classifier, "default").path == str(lab.classifier.resolve())


def test_below_the_disk_floor_the_classifier_half_is_skipped_too(reviewed_world, monkeypatch, capsys) -> None:
    """With enough reviews but a volume below [paths] min_free_mb, the fine-tuning run is skipped and says why."""
    settings, sessions = reviewed_world
    monkeypatch.setenv("STAINBRIDGE_PATHS_MIN_FREE_MB", "1e12")
    capsys.readouterr()
    assert cli.main(["retrain", "--now", "--json"]) == 0
    tuned = json.loads(capsys.readouterr().out)["metrics"]["classifier"]
    assert tuned["status"] == "skipped" and tuned["reason"].startswith("disk: the ") and "min_free_mb" in tuned["reason"]
    with sessions() as session:
        assert session.scalar(select(ModelVersion.id).where(ModelVersion.state == VersionState.candidate)) is None
