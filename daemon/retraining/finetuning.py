"""The classifier half of the nightly job: fine-tune the active classifier on expert reviews, gate it.

It runs after the standardizer half (``retraining.nightly``), behind whatever standardizer is active
then, when at least ``[retraining] min_reviews`` reviewed images exist and some review arrived
since the last classifier run (by review id). One run is one ``training_runs`` row of kind ``classifier``:

1. the reviewed images (latest label per image) are split by sha256: ``held_out_fraction`` of them
   never train and are the gate's reviewed check; the rest are decoded as the service decodes
   them into ``<state>/retraining/run-N/reviewed/<label>/`` (DICOM included);
2. the reference folder minus the gate's validation split is linked into ``run-N/reference/``;
3. ``stainbridge train finetune --init-from <active classifier> --standardizer <active>`` runs
   niced in a subprocess, as the standardizer training does (crash, kill, timeout -> ``failed``);
4. the checkpoint is registered as a ``candidate`` classifier and the gate (``promotion.gate_version``,
   on the site's reviewed cells minus those it was trained on, recorded as the run's ``params.trained_on``)
   promotes it (``succeeded``) or refuses it (``rejected``).
"""

from __future__ import annotations

import sys
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

from stainbridge.daemon import diskspace
from stainbridge.daemon.config import Settings
from stainbridge.daemon.intake import claims
from stainbridge.daemon.logs import get_logger
from stainbridge.daemon.retraining import promotion, runs
from stainbridge.daemon.store import ModelKind, ModelVersion, Review, RunStatus, TrainingRun, VersionState
from stainbridge.daemon.versions import registry

log = get_logger(__name__)


def _review_ids(sessions: sessionmaker) -> tuple[int, int | None]:
    """(newest review id now, newest one the last finished classifier run had seen, None if no run)."""
    with sessions() as session:
        newest = session.scalar(select(func.max(Review.id))) or 0
        last = session.scalars(
            select(TrainingRun.params).where(TrainingRun.kind == ModelKind.classifier,
                                             TrainingRun.status.in_([RunStatus.succeeded, RunStatus.rejected]))
            .order_by(TrainingRun.id.desc()).limit(1)
        ).first()
    return int(newest), (int((last or {}).get("reviews_up_to") or 0) if last is not None else None)

def run_classifier_finetune(settings: Settings, sessions: sessionmaker, *, trigger: str, now: datetime,
                            stop: threading.Event | None = None) -> dict[str, Any]:
    """Fine-tune and gate the classifier when reviews call for it; never raises for a failed run.

    Returns what ``retrain --json`` shows under ``metrics.classifier``: the run's id, status,
    candidate, promotion, reason and gate metrics, or ``{"status": "not run", "reason": ...}``."""
    cfg = settings.retraining
    reviewed = runs.reviewed_images(sessions, settings.site.name)
    if len(reviewed) < cfg.min_reviews:
        return {"status": "not run", "reason": f"{len(reviewed)} reviewed images, fewer than [retraining] "
                                               f"min_reviews ({cfg.min_reviews})"}
    newest, seen = _review_ids(sessions)
    if seen is not None and newest <= seen:
        return {"status": "not run", "reason": "no review imported since the last classifier fine-tuning"}
    with sessions.begin() as session:
        run = TrainingRun(kind=ModelKind.classifier, status=RunStatus.running, trigger=trigger,
                          worker=claims.claim_owner(), started_at=now,
                          params={"epochs": cfg.epochs, "reviewed": len(reviewed), "reviews_up_to": newest,
                                  "device": cfg.device,
                                  "held_out_fraction": cfg.held_out_fraction,
                                  "reference": str(cfg.reference) if cfg.reference else None})
        session.add(run)
        session.flush()
        run_id = run.id
    bound = log.bind(run=run_id, trigger=trigger, kind="classifier")
    bound.info("finetuning_started", reviewed=len(reviewed))
    try:
        result = _run(settings, sessions, run_id, reviewed, stop)
    except runs.TrainingFailed as exc:
        runs.finish_run(sessions, run_id, RunStatus.failed, str(exc), error=str(exc))
        result = {"run_id": run_id, "status": RunStatus.failed.value, "reason": str(exc)}
    except Exception as exc:  # noqa: BLE001 - a bug in one run must leave a row and a working service
        bound.exception("finetuning_crashed")
        reason = f"{type(exc).__name__}: {exc}"
        runs.finish_run(sessions, run_id, RunStatus.failed, reason, error=reason)
        result = {"run_id": run_id, "status": RunStatus.failed.value, "reason": reason}
    bound.info("finetuning_finished", **{k: v for k, v in result.items() if k != "metrics"})
    return result


def _run(settings: Settings, sessions: sessionmaker, run_id: int, reviewed: list[tuple[str, Path, str, datetime]],
         stop: threading.Event | None) -> dict[str, Any]:
    cfg = settings.retraining

    def skipped(reason: str) -> dict[str, Any]:
        runs.finish_run(sessions, run_id, RunStatus.skipped, reason)
        return {"run_id": run_id, "status": RunStatus.skipped.value, "reason": reason}

    if cfg.reference is None or not cfg.reference.is_dir():
        return skipped("no reference images to mix in: set [retraining] reference")
    if (short := diskspace.shortage(diskspace.written_folders(settings), settings.paths.min_free_mb)) is not None:
        return skipped(f"{short}; no training until space is freed")
    held, train, trained_on = [], [], []
    for sha, path, label, _ in reviewed:
        if runs.is_held_out(sha, cfg.held_out_fraction):
            held.append((path, label))
        else:
            train.append((path, label))
            trained_on.append(sha)
    if not held or not train:
        return skipped(f"{len(train)} reviewed images to train on and {len(held)} held out for the gate; "
                       "both are needed: import more reviews or change [retraining] held_out_fraction")
    with sessions() as session:
        c_active = registry.active_version(session, ModelKind.classifier, settings.site.name)
        s_active = registry.active_version(session, ModelKind.standardizer, settings.site.name)
    if c_active is None or s_active is None:
        raise runs.TrainingFailed("no active classifier or standardizer in the registry; start the service "
                                        "once or run `stainbridge models promote ID`")
    registry.verify_file(c_active)
    registry.verify_file(s_active)
    device = settings.models.device
    classifier = registry.load_version(c_active, device=device)

    run_dir = settings.state_dir / "retraining" / f"run-{run_id}"
    reviewed_dir, reference_dir = run_dir / "reviewed", run_dir / "reference"
    images, kept = promotion.load_images(settings, [path for path, _ in train])
    for n, (image, i) in enumerate(zip(images, kept)):
        folder = reviewed_dir / train[i][1]
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{n:06d}.png")
    reference = promotion.reference_items(cfg.reference, classifier.classes, validation=False)
    for n, (path, label) in enumerate(reference):
        (reference_dir / label).mkdir(parents=True, exist_ok=True)
        (reference_dir / label / f"{n:06d}{path.suffix.lower()}").symlink_to(path.resolve())
    out, log_path = run_dir / "classifier.safetensors", run_dir / "finetune.log"
    with sessions.begin() as session:
        run = session.get(TrainingRun, run_id)
        run.images_used, run.held_out_images, run.log_path = len(images), len(held), str(log_path)
        run.reference_images = len(reference)
        # the gate leaves these cells out of the candidate's evidence (promotion.trained_on)
        run.params = {**(run.params or {}), "init_from_version": c_active.id, "standardizer_version": s_active.id,
                      "trained_on": sorted(trained_on)}
    cmd = [sys.executable, "-c", runs.CHILD, str(cfg.nice), "train", "finetune", "--init-from", c_active.path,
           "--reviewed", str(reviewed_dir), "--reference", str(reference_dir), "--out", str(out),
           "--standardizer", s_active.path, "--scale", settings.site.scale, "--epochs", str(cfg.epochs),
           "--device", cfg.device]
    runs.mark_stage(sessions, run_id, "training (train finetune)", log_path)
    runs.run_training(cmd, log_path, timeout=cfg.timeout_minutes * 60, stop=stop,
                      on_start=lambda pid: runs.record_pid(sessions, run_id, pid))
    runs.mark_stage(sessions, run_id, "gate", log_path)

    from stainbridge.models.inference import load_classifier

    candidate = load_classifier(out, device=device)
    with sessions.begin() as session:
        version = registry.register_model(session, ModelKind.classifier, str(out), candidate.sha256, candidate.header,
                                          site=settings.site.name, state=VersionState.candidate,
                                          training_run_id=run_id)
        candidate_id = version.id
        session.get(TrainingRun, run_id).model_version_id = candidate_id
    gate = promotion.gate_version(settings, sessions, candidate_id)
    metrics = {"gate": gate.metrics(), "training": (candidate.header.get("metrics") or {}).get("final", {})}
    with sessions.begin() as session:
        version = session.get(ModelVersion, candidate_id)
        promotion.record_verdict(version, gate)
        if gate.passed:
            registry.activate(session, version, reason=gate.reason, actor=f"nightly job, run {run_id}")
        session.get(TrainingRun, run_id).metrics = metrics
    status = RunStatus.succeeded if gate.passed else RunStatus.rejected
    runs.finish_run(sessions, run_id, status, gate.reason)
    return {"run_id": run_id, "status": status.value, "candidate_id": candidate_id, "promoted": gate.passed,
            "reason": gate.reason, "metrics": metrics}
