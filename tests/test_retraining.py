"""The retraining job: a run produces a candidate, the gate promotes or refuses it, failures are recorded."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import threading
from pathlib import Path

import pytest
from sqlalchemy import select

from stainbridge.daemon import cli
from stainbridge.daemon.intake import claims
from stainbridge.daemon.retraining import nightly as retraining
from stainbridge.daemon.retraining import runs
from stainbridge.daemon.store import (
    GateVerdict,
    Image,
    ModelKind,
    ModelVersion,
    Review,
    RunStatus,
    TrainingRun,
    VersionState,
)
from stainbridge.daemon.versions import registry
from stainbridge.models.imaging import synthetic
from tests.daemon_helpers import STAINBRIDGE, subprocess_env, wait_for
from tests.retraining_helpers import archive_incoming, open_world

# every test here runs on the session's lab (a classifier trained in a subprocess) or trains a candidate
pytestmark = pytest.mark.slow


def _settings(settings_factory, lab, standardizer, **overrides):
    values = dict(models_classifier=lab.classifier, models_standardizer=standardizer, models_device="cpu",
                  retraining_reference=lab.reference, retraining_min_new_images=5, retraining_epochs=1,
                  retraining_steps_per_epoch=2, retraining_device="cpu", retraining_held_out_fraction=0.3)
    values.update(overrides)
    return settings_factory(**values)


@pytest.fixture
def world(settings_factory, lab, request):
    """Settings, sessions and 20 archived incoming images; the active standardizer is the test's param."""
    standardizer = getattr(request, "param", "none")
    settings = _settings(settings_factory, lab, lab.broken if standardizer == "broken" else standardizer)
    engine, sessions = open_world(settings)
    archive_incoming(settings, sessions, lab)
    yield settings, sessions
    engine.dispose()


def _review_every_image(sessions) -> None:
    """Every archived image reviewed with its true class (the archive name starts with it)."""
    with sessions.begin() as session:
        for image in session.scalars(select(Image)):
            session.add(Review(image_id=image.id, label=image.source_name.split("-")[0], reviewer="dr a"))


@pytest.mark.parametrize("world", ["broken"], indirect=True)
def test_nightly_run_without_reviews_trains_a_candidate_but_does_not_promote_it(world, lab) -> None:
    """A run trains a standardizer in a subprocess and registers it, but with no reviewed cell the gate refuses it,
    even against a broken active version: agreement with the raw image is no evidence."""
    settings, sessions = world
    result = retraining.run_retraining(settings, sessions, trigger="schedule")
    assert result.status == "rejected" and not result.promoted and result.candidate_id
    assert result.reason.startswith("needs 50 reviewed cells, has 0")
    with sessions() as session:
        run = session.get(TrainingRun, result.run_id)
        assert run.status is RunStatus.rejected and run.images_used > 0 and run.held_out_images > 0
        assert run.finished_at is not None and Path(run.log_path).is_file() and run.model_version_id == result.candidate_id
        candidate = session.get(ModelVersion, result.candidate_id)
        assert candidate.state is VersionState.candidate
        assert candidate.gate_verdict is GateVerdict.awaiting_evidence  # so the service shadows it (issue 23)
        assert registry.active_version(session, ModelKind.standardizer, "default").path == str(lab.broken.resolve())


def test_nightly_run_promotes_a_candidate_shown_better_on_the_reviewed_cells(settings_factory, lab, tmp_path) -> None:
    """With 20 reviewed cells the classifier can read (and [retraining] min_gate_reviews at 20), the trained
    candidate beats the broken active version on balanced accuracy and is promoted; the broken one is retired."""
    settings = _settings(settings_factory, lab, lab.broken, retraining_min_gate_reviews=20)
    engine, sessions = open_world(settings)
    readable = tmp_path / "readable"  # the lab's classifier is at chance on its incoming protocol: no evidence there
    synthetic.write_dataset(readable, protocol="reference", per_class=4, size=48, seed=9)
    archive_incoming(settings, sessions, dataclasses.replace(lab, incoming=readable))
    _review_every_image(sessions)
    result = retraining.run_retraining(settings, sessions, trigger="schedule")
    assert result.status == "succeeded", result.reason
    evidence = result.metrics["gate"]["checks"]["balanced_accuracy"]
    assert evidence["images"] == 20 and evidence["candidate"] > evidence["active"] and evidence["ci_low"] > -0.02
    with sessions() as session:
        active = registry.active_version(session, ModelKind.standardizer, "default")
        assert active.id == result.candidate_id and active.training_run_id == result.run_id
        broken = session.scalars(select(ModelVersion).where(ModelVersion.path == str(lab.broken.resolve()))).one()
        assert broken.state is VersionState.retired
    engine.dispose()


@pytest.mark.parametrize("method", ["colour_map", "reinhard"])
def test_a_site_profile_standardizer_is_re_fitted_not_replaced_by_a_cyclegan(settings_factory, lab, tmp_path,
                                                                             method) -> None:
    """A `train site-profile` checkpoint in front of the classifier (the colour map of the default recipe, or
    Reinhard): the job runs `train site-profile` with that method on the recent images instead of training a
    CycleGAN, so the standardizer stays the method the classifier was (perhaps) adapted behind; the
    candidate goes through the gate."""
    smears = tmp_path / "smears"
    protocol = dataclasses.replace(synthetic.get_protocol("incoming"), cell_fraction=0.5, red_cell_gap=0.1)
    for i in range(20):
        label = synthetic.CLASSES[i % 5]
        (smears / label).mkdir(parents=True, exist_ok=True)
        synthetic.render_cell(label, protocol=protocol, size=128,
                              rng=synthetic.image_rng(7, "incoming", label, i)).save(smears / label / f"{i}.png")
    active = tmp_path / f"{method}-site.safetensors"
    done = subprocess.run([str(STAINBRIDGE), "train", "site-profile", "--method", method, "--source", str(smears),
                           "--classifier", str(lab.classifier), "--reference", str(lab.reference), "--out", str(active)],
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    settings = _settings(settings_factory, lab, str(active))
    engine, sessions = open_world(settings)
    try:
        archive_incoming(settings, sessions, dataclasses.replace(lab, incoming=smears))
        result = retraining.run_retraining(settings, sessions)
        assert result.status in ("succeeded", "rejected"), result.reason
        with sessions() as session:
            run = session.get(TrainingRun, result.run_id)
            candidate = session.get(ModelVersion, result.candidate_id)
            assert run.params["command"] == "train site-profile" and "site profile" in run.params["start"]
            assert candidate.header["architecture"] == method and "arch_args" not in candidate.header
            if method == "colour_map":  # re-fitted on the recent images (the run's training folder)
                assert candidate.header["colour_map"]["source_images"] == run.images_used
            profile = candidate.header["site_profile"]
            assert profile["source_images"] == run.images_used and profile["method"] in ("red_cell_diameter", "nucleus_area")
            assert result.metrics["site_profile"]["candidate"] == profile
            assert registry.active_version(session, ModelKind.standardizer, "default").header["architecture"] == method
    finally:
        engine.dispose()


def test_broken_candidate_is_refused_and_stays_a_candidate(world, lab, monkeypatch, settings_factory) -> None:
    """A candidate that paints cells black is refused on the reviewed cells, with the reason; the active version stays."""
    settings, sessions = world
    copy = f"import shutil, sys; a = sys.argv; shutil.copy({str(lab.broken)!r}, a[a.index('--out') + 1])"
    monkeypatch.setattr(runs, "CHILD", copy)
    settings = _settings(settings_factory, lab, "none", retraining_min_gate_reviews=20)
    _review_every_image(sessions)
    result = retraining.run_retraining(settings, sessions)
    assert result.status == "rejected" and not result.promoted
    assert "predictions collapse" in result.reason, result.reason
    with sessions() as session:
        candidate = session.get(ModelVersion, result.candidate_id)
        assert candidate.state is VersionState.candidate and candidate.reason == result.reason
        assert registry.active_version(session, ModelKind.standardizer, "default").path == "none"


def test_killed_training_is_recorded_as_failed(world, monkeypatch, tmp_path) -> None:
    """SIGKILL to the (niced) training subprocess leaves a failed run naming the signal, and no candidate."""
    settings, sessions = world
    pidfile = tmp_path / "child.pid"
    monkeypatch.setattr(runs, "CHILD", "import os, sys, time; os.nice(int(sys.argv[1])); "
                        f"open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(120)")
    results = []
    worker = threading.Thread(target=lambda: results.append(retraining.run_retraining(settings, sessions)))
    worker.start()
    pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text(), 60, "the training child's pid"))
    # niceness stops at 19: a suite run under `nice -n 10` or more cannot see the full step
    assert os.getpriority(os.PRIO_PROCESS, pid) >= min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10)
    os.kill(pid, signal.SIGKILL)
    worker.join(60)
    (result,) = results
    assert result.status == "failed" and "SIGKILL" in result.reason and result.candidate_id is None
    with sessions() as session:
        run = session.get(TrainingRun, result.run_id)
        assert run.status is RunStatus.failed and run.finished_at is not None and "SIGKILL" in run.error
        assert session.scalar(select(ModelVersion.id).where(ModelVersion.state == VersionState.candidate)) is None


@pytest.mark.parametrize("overrides, reason", [
    ({"retraining_min_new_images": 1000}, "20 new images since the last run, fewer than [retraining] min_new_images"),
    ({"paths_min_free_mb": 1e12}, "disk: the "),
], ids=["too_few_new_images", "volume_below_the_disk_floor"])
def test_a_run_that_cannot_train_is_skipped_with_its_reason_before_writing(settings_factory, lab, overrides,
                                                                             reason) -> None:
    """Too few new images, or a volume below [paths] min_free_mb: `skipped`, the reason recorded, no run folder."""
    settings = _settings(settings_factory, lab, "none", **overrides)
    engine, sessions = open_world(settings)
    try:
        archive_incoming(settings, sessions, lab)
        result = retraining.run_retraining(settings, sessions)
        assert result.status == "skipped" and reason in result.reason
        assert not (settings.state_dir / "retraining" / f"run-{result.run_id}").exists()
        with sessions() as session:
            assert session.get(TrainingRun, result.run_id).reason == result.reason
    finally:
        engine.dispose()


def test_a_run_left_running_by_a_dead_process_becomes_failed(world) -> None:
    """At start-up, runs of a dead process on this host are marked failed (a crash mid-run leaves no `running` row)."""
    settings, sessions = world
    with sessions.begin() as session:
        session.add(TrainingRun(kind=ModelKind.standardizer, status=RunStatus.running, worker=f"{os.uname().nodename}:999999"))
    assert runs.recover_runs(sessions) == 1
    with sessions() as session:
        assert session.scalars(select(TrainingRun.status)).all() == [RunStatus.failed]


def test_run_owners_are_judged_like_claim_owners(world) -> None:
    """A run records the claim owner of its process; at start-up only runs of a gone process of this host and
    PID namespace are failed: a live one, one in another PID namespace of this host (a container sharing the
    hostname) and one on another host are left running."""
    settings, sessions = world
    host, scope = claims.claim_owner().rsplit(":", 1)[0].split("@")
    boot = scope.split(".")[0]
    owners = {
        "gone": f"{host}@{scope}:999999",
        "alive": claims.claim_owner(),
        "other namespace": f"{host}@{boot}.1:999999",
        "other host": f"not-{host}@{scope}:999999",
    }
    with sessions.begin() as session:
        for owner in owners.values():
            session.add(TrainingRun(kind=ModelKind.standardizer, status=RunStatus.running, worker=owner))
    assert runs.recover_runs(sessions) == 1
    with sessions() as session:
        states = dict(session.execute(select(TrainingRun.worker, TrainingRun.status)).all())
    assert states == {owners["gone"]: RunStatus.failed, owners["alive"]: RunStatus.running,
                      owners["other namespace"]: RunStatus.running, owners["other host"]: RunStatus.running}


def test_retrain_now_json(world, lab, monkeypatch, capsys, restore_logging) -> None:
    """`retrain --now --json` prints run_id, status, candidate_id, promoted, reason and metrics."""
    settings, _ = world
    for key, value in {"PATHS_STATE": settings.state_dir, "DATABASE_URL": settings.database_url,
                       "MODELS_CLASSIFIER": lab.classifier, "MODELS_DEVICE": "cpu",
                       "RETRAINING_REFERENCE": lab.reference, "RETRAINING_MIN_NEW_IMAGES": 1000}.items():
        monkeypatch.setenv(f"STAINBRIDGE_{key}", str(value))
    assert cli.main(["retrain", "--now", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"run_id", "status", "candidate_id", "promoted", "reason", "metrics"}
    assert out["status"] == "skipped" and out["promoted"] is False
    assert cli.main(["status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["last_retraining"]["standardizer"]["status"] == "skipped" and status["reviews_total"] == 0
    assert status["last_retraining"]["classifier"] is None


def test_a_changed_active_checkpoint_fails_the_run_before_training(settings_factory, lab, tmp_path) -> None:
    """The active classifier's bytes changed after registration: the run fails at once, naming it, and never trains."""
    classifier = tmp_path / "classifier.safetensors"
    classifier.write_bytes(lab.classifier.read_bytes())
    settings = _settings(settings_factory, lab, "none", models_classifier=classifier)
    engine, sessions = open_world(settings)
    try:
        archive_incoming(settings, sessions, lab)
        classifier.write_bytes(classifier.read_bytes()[:-10] + b"0123456789")
        result = retraining.run_retraining(settings, sessions)
        assert result.status == "failed" and result.reason.startswith("not trained: ")
        assert "has changed since it was registered" in result.reason
        assert not (settings.state_dir / "retraining" / f"run-{result.run_id}" / "train.log").exists()
    finally:
        engine.dispose()


def test_status_shows_the_running_run_s_stage_pid_and_log(world, monkeypatch, tmp_path, capsys, restore_logging) -> None:
    """While the training child runs, `status` names the run's stage, the child's pid and the log, and the log has a
    progress line."""
    settings, sessions = world
    pidfile = tmp_path / "child.pid"
    monkeypatch.setattr(runs, "CHILD", "import os, sys, time; os.nice(int(sys.argv[1])); "
                        f"open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(120)")
    monkeypatch.setenv("STAINBRIDGE_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("STAINBRIDGE_PATHS_STATE", str(settings.state_dir))
    results = []
    worker = threading.Thread(target=lambda: results.append(retraining.run_retraining(settings, sessions)))
    worker.start()
    pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text(), 60, "the training child's pid"))
    try:
        capsys.readouterr()  # the job's log lines so far (structlog prints to stdout until logging is configured)
        assert cli.main(["status", "--json"]) == 0
        running = json.loads(capsys.readouterr().out)["last_retraining"]["standardizer"]
        assert running["status"] == "running" and running["stage"].startswith("training (train cyclegan)")
        assert running["pid"] == pid
        assert "stage: training (train cyclegan)" in Path(running["log_path"]).read_text()
        assert cli.main(["status"]) == 0
        assert f"stage training (train cyclegan), pid {pid}, log {running['log_path']}" in capsys.readouterr().out
    finally:
        os.kill(pid, signal.SIGKILL)
        worker.join(60)
    assert results[0].status == "failed"
