"""The promotion gate decides on the site's reviewed cells a candidate was not trained on (issue 23: 1, 2, 5)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from sqlalchemy import select

from stainbridge.daemon import cli
from stainbridge.daemon.intake.reading import sha256_file
from stainbridge.daemon.retraining import promotion
from stainbridge.daemon.retraining.validation import validate_site
from stainbridge.daemon.store import (
    Image,
    ImageStatus,
    ModelKind,
    ModelVersion,
    Review,
    RunStatus,
    TrainingRun,
    VersionState,
    utcnow,
)
from stainbridge.daemon.versions import registry
from stainbridge.daemon.versions.site_state import ensure_site
from stainbridge.models.checkpoint import load_checkpoint, save_checkpoint
from stainbridge.models.imaging import synthetic
from tests.daemon_helpers import SIZE, STAINBRIDGE, subprocess_env
from tests.retraining_helpers import open_world

# the session's lab classifier is trained in a subprocess, and this module trains two more models
pytestmark = pytest.mark.slow

PER_CLASS = 11  # 55 cells: above [retraining] min_gate_reviews' default of 50


def _train_classifier(data: Path, out: Path, epochs: int) -> Path:
    done = subprocess.run([str(STAINBRIDGE), "train", "classifier", "--data", str(data), "--out", str(out),
                           "--preset", "tiny", "--size", str(SIZE), "--epochs", str(epochs), "--batch-size", "8",
                           "--device", "cpu"], env=subprocess_env(), capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def models(lab, tmp_path_factory) -> dict[str, Path]:
    """A classifier trained on shuffled labels, one that never predicts a class, a fitted colour standardizer."""
    root = tmp_path_factory.mktemp("gate-models")
    shuffled = root / "shuffled"
    for i, label in enumerate(synthetic.CLASSES):  # every class's images filed under the next class
        shutil.copytree(lab.reference / label, shuffled / synthetic.CLASSES[(i + 1) % len(synthetic.CLASSES)])
    state, header = load_checkpoint(lab.classifier)
    state["fc.bias"] = state["fc.bias"] - 50.0 * torch.nn.functional.one_hot(torch.tensor(0), state["fc.bias"].numel())
    save_checkpoint(root / "one-class-less.safetensors", state, {**header, "note": "never predicts the first class"})
    save_checkpoint(root / "one-class-less-copy.safetensors", state, {**header, "note": "the same network, retrained"})
    colour = root / "colour.safetensors"
    done = subprocess.run([str(STAINBRIDGE), "train", "cyclegan", "--source", str(lab.incoming), "--reference",
                           str(lab.reference), "--out", str(colour), "--preset", "colour", "--epochs", "1",
                           "--steps-per-epoch", "1", "--device", "cpu"],
                          env=subprocess_env(), capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"shuffled": _train_classifier(shuffled, root / "shuffled.safetensors", epochs=8),
            "one_class_less": root / "one-class-less.safetensors",
            "one_class_less_copy": root / "one-class-less-copy.safetensors", "colour": colour}


def _world(settings_factory, lab, tmp_path, monkeypatch, *, standardizer: str, reviewed: int):
    """A site whose 55 archived cells look like the reference's, ``reviewed`` of them reviewed; the CLI set up."""
    values = {"models_classifier": lab.classifier, "models_standardizer": standardizer, "models_device": "cpu",
                  "site_pseudonym_secret": "a-long-enough-test-secret-0123456789"}
    settings = settings_factory(**values)
    engine, sessions = open_world(settings)
    cells = tmp_path / "cells"
    synthetic.write_dataset(cells, protocol="reference", per_class=PER_CLASS, size=48, seed=5)
    with sessions.begin() as session:
        ensure_site(session, settings.site.name, settings.site.validation_reviews)
        for n, source in enumerate(sorted(cells.rglob("*.png"), key=lambda p: (p.stem, p.parent.name))):
            target = settings.archive_dir / "2026" / "12" / "07" / f"{source.parent.name}-{source.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, target)
            image = Image(sha256=sha256_file(target), source_name=target.name, site=settings.site.name,
                          status=ImageStatus.done, received_at=utcnow(), processed_at=utcnow(), archive_path=str(target))
            session.add(image)
            session.flush()
            if n < reviewed:
                session.add(Review(image_id=image.id, label=source.parent.name, reviewer="dr a"))
    environment = {"paths_state": settings.state_dir, "database_url": settings.database_url,
                   "paths_archive": settings.archive_dir, **values}
    for key, value in environment.items():
        monkeypatch.setenv(f"STAINBRIDGE_{key.upper()}", str(value))
    return settings, sessions, engine


def _cli_json(capsys, *args: str) -> dict:
    capsys.readouterr()
    assert cli.main(list(args)) == 0
    return json.loads(capsys.readouterr().out)


def _register(capsys, path: str) -> int:
    capsys.readouterr()
    assert cli.main(["models", "register", path]) == 0
    return int(capsys.readouterr().out.split("version ")[1].split()[0])


@pytest.mark.parametrize("fitted", ["colour", "macenko"])
def test_none_is_refused_against_a_fitted_standardizer_without_reviews(settings_factory, lab, models, tmp_path,
                                                                       monkeypatch, capsys, restore_logging,
                                                                       fitted) -> None:
    """`models gate --json` refuses the built-in `none` against a fitted standardizer when no cell is reviewed."""
    active = str(models["colour"]) if fitted == "colour" else fitted
    _settings, sessions, engine = _world(settings_factory, lab, tmp_path, monkeypatch, standardizer=active, reviewed=0)
    candidate = _register(capsys, "none")
    verdict = _cli_json(capsys, "models", "gate", str(candidate), "--json")
    assert verdict == {"passed": False, "checks": [], "reason": verdict["reason"]}
    assert verdict["reason"].startswith("needs 50 reviewed cells, has 0")
    with sessions() as session:
        assert session.get(ModelVersion, candidate).state is VersionState.candidate  # the gate never promotes
        assert registry.active_version(session, ModelKind.standardizer, "default").path == active
    engine.dispose()


def test_a_classifier_is_not_promoted_on_two_reviews(settings_factory, lab, models, tmp_path, monkeypatch,
                                                     capsys, restore_logging) -> None:
    """A clearly better classifier candidate with only 2 reviewed cells is refused: too little evidence."""
    settings, sessions, engine = _world(settings_factory, lab, tmp_path, monkeypatch, standardizer="none", reviewed=2)
    with sessions.begin() as session:
        worse = registry.register_model(session, ModelKind.classifier, str(models["shuffled"]),
                                        sha256_file(models["shuffled"]), load_checkpoint(models["shuffled"])[1],
                                        site="default")
        good = session.scalars(select(ModelVersion).where(ModelVersion.path == str(lab.classifier.resolve()))).one()
        assert worse.state is VersionState.active and good.state is VersionState.retired
        good_id = good.id
    result = promotion.gate_version(settings, sessions, good_id)
    assert not result.passed and result.reason.startswith("needs 50 reviewed cells, has 2")
    engine.dispose()


def test_cells_the_candidate_was_fine_tuned_on_are_not_evidence(settings_factory, lab, models, tmp_path,
                                                                monkeypatch, capsys, restore_logging) -> None:
    """Reviewed cells recorded as a candidate's training images (its run's params.trained_on) leave its evidence."""
    settings, sessions, engine = _world(settings_factory, lab, tmp_path, monkeypatch, standardizer="none",
                                        reviewed=5 * PER_CLASS)
    with sessions.begin() as session:
        trained = sorted(session.scalars(select(Image.sha256)))[:10]
        run = TrainingRun(kind=ModelKind.classifier, status=RunStatus.succeeded, started_at=utcnow(), params={"trained_on": trained})
        session.add(run)
        session.flush()
        candidate = registry.register_model(session, ModelKind.classifier, str(models["shuffled"]),
                                            sha256_file(models["shuffled"]), load_checkpoint(models["shuffled"])[1],
                                            site="default", state=VersionState.candidate, training_run_id=run.id)
        candidate_id = candidate.id
    result = promotion.gate_version(settings, sessions, candidate_id)
    assert result.reason.startswith(f"needs 50 reviewed cells, has {5 * PER_CLASS - 10}")
    engine.dispose()


def test_models_gate_refuses_a_truly_worse_classifier_on_50_reviews(settings_factory, lab, models, tmp_path,
                                                                   monkeypatch, capsys, restore_logging) -> None:
    """With 55 reviewed cells, a classifier trained on shuffled labels is refused against the active one."""
    _settings, _sessions, engine = _world(settings_factory, lab, tmp_path, monkeypatch, standardizer="none",
                                        reviewed=5 * PER_CLASS)
    candidate = _register(capsys, str(models["shuffled"]))
    verdict = _cli_json(capsys, "models", "gate", str(candidate), "--json")
    assert not verdict["passed"], verdict
    evidence = verdict["checks"][0]
    assert evidence["name"] == "balanced_accuracy" and evidence["images"] == 5 * PER_CLASS
    assert evidence["candidate"] < evidence["active"] and evidence["ci_high"] < 0
    assert "site default is unvalidated" in verdict["reason"]
    engine.dispose()


def test_models_gate_passes_a_truly_better_classifier_on_50_reviews(settings_factory, lab, models, tmp_path,
                                                                   monkeypatch, capsys, restore_logging) -> None:
    """With 55 reviewed cells, the properly trained classifier passes against an active one trained on shuffled labels."""
    _settings, sessions, engine = _world(settings_factory, lab, tmp_path, monkeypatch, standardizer="none",
                                        reviewed=5 * PER_CLASS)
    worse = _register(capsys, str(models["shuffled"]))
    assert cli.main(["models", "promote", str(worse)]) == 0
    with sessions() as session:
        good = session.scalars(select(ModelVersion.id).where(ModelVersion.path == str(lab.classifier.resolve()))).one()
    verdict = _cli_json(capsys, "models", "gate", str(good), "--json")
    assert verdict["passed"], verdict
    assert [c["name"] for c in verdict["checks"]] == ["balanced_accuracy", "predicted_classes", "changed_class"]
    assert verdict["checks"][0]["ci_low"] > -0.02
    engine.dispose()


def test_a_candidate_below_the_validated_baseline_is_refused_even_within_margin_of_the_active(
        settings_factory, lab, models, tmp_path, monkeypatch, capsys, restore_logging) -> None:
    """After the site validated on the good classifier, a drifted active one and a candidate equal to it: the
    candidate is within margin of the active version but below the validated recipe, so it is refused."""
    settings, sessions, engine = _world(settings_factory, lab, tmp_path, monkeypatch, standardizer="none",
                                        reviewed=5 * PER_CLASS)
    validated = validate_site(settings, sessions, "default")
    drifted = _register(capsys, str(models["one_class_less"]))
    assert cli.main(["models", "promote", str(drifted)]) == 0
    candidate = _register(capsys, str(models["one_class_less_copy"]))
    verdict = _cli_json(capsys, "models", "gate", str(candidate), "--json")
    checks = {c["name"]: c for c in verdict["checks"]}
    assert checks["balanced_accuracy"]["ci_low"] == checks["balanced_accuracy"]["ci_high"] == 0  # same predictions
    assert checks["validated_baseline"]["ci_low"] < -0.02 and not verdict["passed"]
    assert "site's validated recipe" in verdict["reason"] and f"{validated['balanced_accuracy']:.3f}" in verdict["reason"]
    engine.dispose()


def test_models_gate_on_an_unknown_version_exits_non_zero_with_a_message(settings_factory, lab, tmp_path,
                                                                       monkeypatch, capsys, restore_logging) -> None:
    """`models gate 999` says there is no such version and exits 1."""
    _, _, engine = _world(settings_factory, lab, tmp_path, monkeypatch, standardizer="none", reviewed=0)
    capsys.readouterr()
    assert cli.main(["models", "gate", "999", "--json"]) == 1
    assert "no model version 999" in capsys.readouterr().err
    engine.dispose()
