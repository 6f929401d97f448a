"""The retraining job: train a candidate standardizer on recent images, gate it, promote it or not.

One run, in order (each run is a ``training_runs`` row; every outcome is one of its states):

1. ``running`` row with the worker (``claims.claim_owner``: host@boot.pidns:pid) and the options;
2. data: archived incoming images received in the last ``window_days`` (newest first, at most
   ``max_images``); fewer than ``min_new_images`` new ones since the last run -> ``skipped`` with
   the reason. A stable share (by sha256) is held out for the gate and never trained on;
3. ``stainbridge train cyclegan`` in a subprocess (``train site-profile`` when the active standardizer
   is a site-profile checkpoint: see ``site_profile_method``), ``nice``-d in the child, its output in the
   run's log file (``<state>/retraining/run-N/train.log``). A crash, a kill, a timeout or the
   service stopping -> ``failed`` with the reason; the service is another process and goes on;
4. the checkpoint registered as a ``candidate`` (sha256, header, training run); its site profile
   (``header["site_profile"]``, re-estimated by the training from the recent images) is recorded
   next to the active one's in the run's and the candidate's metrics;
5. the gate (``retraining.promotion``: the site's reviewed cells, the held-out recent images for its
   guards): passed -> promoted (``succeeded``), refused -> it stays a candidate with the reason (``rejected``);
6. then the classifier half (``retraining.finetuning``): with enough expert reviews, a second run
   fine-tunes the active classifier; its outcome is in the result's ``metrics.classifier``;
7. then every unvalidated site with enough reviews is validated (``retraining.validation``):
   its recipe is chosen on its reviewed cells (``metrics.sites``);
8. last, run folders and unused candidates older than ``[retraining] keep_days`` are removed
   (``retraining.retention``, ``metrics.pruned``).

Both training halves serve the site ``[site] name``: they train on its images and reviews and promote
for it; the other sites of a multi-site service keep their recipes (chosen by validation).
"""

from __future__ import annotations

import sys
import threading
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

from stainbridge.daemon import diskspace
from stainbridge.daemon.config import Settings
from stainbridge.daemon.intake import claims
from stainbridge.daemon.logs import get_logger
from stainbridge.daemon.retraining import finetuning, promotion, retention, runs, validation
from stainbridge.daemon.store import (
    Image,
    ImageStatus,
    ModelKind,
    ModelVersion,
    RunStatus,
    TrainingRun,
    VersionState,
    utcnow,
)
from stainbridge.daemon.versions import registry

log = get_logger(__name__)

@dataclass
class RetrainResult:
    """What `stainbridge retrain --now --json` prints."""

    run_id: int
    status: str
    candidate_id: int | None = None
    promoted: bool = False
    reason: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def _new_since_last_run(sessions: sessionmaker, run_id: int, site: str) -> int:
    with sessions() as session:
        last = session.scalar(
            select(func.max(TrainingRun.started_at))
            .where(TrainingRun.id != run_id, TrainingRun.kind == ModelKind.standardizer,
                   TrainingRun.status.in_([RunStatus.succeeded, RunStatus.rejected]))
        )
        query = select(func.count(Image.id)).where(Image.status == ImageStatus.done, Image.site == site)
        if last is not None:
            query = query.where(Image.received_at > last)
        return int(session.scalar(query) or 0)


def warm_start(settings: Settings, active: ModelVersion) -> tuple[str | None, str]:
    """(checkpoint to fine-tune, why): the active standardizer when it is a learned one trained with the
    configured preset, else None (train from scratch) and the reason."""
    preset = ((active.header or {}).get("training_options") or {}).get("preset")
    if registry.is_builtin(active):
        return None, (f"the active standardizer is the built-in {active.path!r}, not a learned one: "
                      "training from scratch")
    if preset != settings.retraining.preset:
        return None, (f"the active standardizer (version {active.id}) was trained with preset {preset!r}, "
                      f"[retraining] preset is {settings.retraining.preset!r}: training from scratch")
    registry.verify_file(active)
    return active.path, f"fine-tuning the active standardizer (version {active.id})"


def site_profile_method(active: ModelVersion) -> str | None:
    """The method of an active `train site-profile` checkpoint (a classical method, or the site colour
    map), else None. What it learned from the site is the site profile (and the colour map), so the
    job re-fits that on the recent images instead of training a CycleGAN: a new kind of standardizer
    would also leave a classifier adapted behind it (`train adapt`) reading images it was not adapted to."""
    from stainbridge.models.inference import SITE_PROFILE_METHODS

    method = (active.header or {}).get("architecture")
    return method if not registry.is_builtin(active) and method in SITE_PROFILE_METHODS else None


def site_profile_command(settings: Settings, source: Path, out: Path, method: str, classifier: str) -> list[str]:
    cfg = settings.retraining
    return [sys.executable, "-c", runs.CHILD, str(cfg.nice), "train", "site-profile", "--method", method,
            "--source", str(source), "--classifier", classifier, "--reference", str(cfg.reference), "--out", str(out)]


def train_command(settings: Settings, source: Path, out: Path, semantic_classifier: str | None,
                  init_from: str | None = None) -> list[str]:
    cfg = settings.retraining
    cmd = [sys.executable, "-c", runs.CHILD, str(cfg.nice), "train", "cyclegan", "--source", str(source),
           "--reference", str(cfg.reference), "--out", str(out), "--preset", cfg.preset,
           "--epochs", str(cfg.epochs), "--device", cfg.device]
    if cfg.steps_per_epoch:
        cmd += ["--steps-per-epoch", str(cfg.steps_per_epoch)]
    if semantic_classifier:
        cmd += ["--semantic-classifier", semantic_classifier]
    if init_from:
        cmd += ["--init-from", init_from]
    return cmd


def run_retraining(settings: Settings, sessions: sessionmaker, *, trigger: str = "manual",
                   now: datetime | None = None, stop: threading.Event | None = None) -> RetrainResult:
    """One retraining run, start to finish; never raises for a failed run (it is recorded)."""
    now = now or utcnow()
    cfg = settings.retraining
    with sessions.begin() as session:
        run = TrainingRun(kind=ModelKind.standardizer, status=RunStatus.running, trigger=trigger,
                          worker=claims.claim_owner(), started_at=now,
                          params={"preset": cfg.preset, "epochs": cfg.epochs, "steps_per_epoch": cfg.steps_per_epoch,
                                  "window_days": cfg.window_days, "max_images": cfg.max_images,
                                  "reference": str(cfg.reference) if cfg.reference else None})
        session.add(run)
        session.flush()
        run_id = run.id
    bound = log.bind(run=run_id, trigger=trigger)
    bound.info("retraining_started")
    try:
        result = _run(settings, sessions, run_id, now, stop)
    except runs.TrainingFailed as exc:
        runs.finish_run(sessions, run_id, RunStatus.failed, str(exc), error=str(exc))
        result = RetrainResult(run_id, RunStatus.failed.value, reason=str(exc))
    except Exception as exc:  # noqa: BLE001 - a bug in one run must leave a row and a working service
        bound.exception("retraining_crashed")
        reason = f"{type(exc).__name__}: {exc}"
        runs.finish_run(sessions, run_id, RunStatus.failed, reason, error=reason)
        result = RetrainResult(run_id, RunStatus.failed.value, reason=reason)
    bound.info("retraining_finished", status=result.status, candidate=result.candidate_id,
               promoted=result.promoted, reason=result.reason)
    if stop is None or not stop.is_set():
        result.metrics["classifier"] = finetuning.run_classifier_finetune(settings, sessions, trigger=trigger,
                                                                          now=utcnow(), stop=stop)
    if stop is None or not stop.is_set():
        result.metrics["sites"] = validation.validate_ready_sites(settings, sessions)
    result.metrics["pruned"] = retention.prune_after_run(settings, sessions)  # [retraining] keep_days
    return result


def _run(settings: Settings, sessions: sessionmaker, run_id: int, now: datetime,
         stop: threading.Event | None) -> RetrainResult:
    cfg = settings.retraining

    def skipped(reason: str, **values: Any) -> RetrainResult:
        runs.finish_run(sessions, run_id, RunStatus.skipped, reason, **values)
        return RetrainResult(run_id, RunStatus.skipped.value, reason=reason)

    if cfg.reference is None or not cfg.reference.is_dir():
        return skipped(f"no reference images: set [retraining] reference to the reference hospital's labeled "
                       f"folder (now {cfg.reference or 'unset'})")
    if (short := diskspace.shortage(diskspace.written_folders(settings), settings.paths.min_free_mb)) is not None:
        return skipped(f"{short}; no training until space is freed")
    new = _new_since_last_run(sessions, run_id, settings.site.name)
    if new < cfg.min_new_images:
        return skipped(f"{new} new images since the last run, fewer than [retraining] min_new_images "
                       f"({cfg.min_new_images})", images_used=0)
    train, held_out = runs.split_held_out(runs.recent_images(settings, sessions, now), cfg.held_out_fraction)
    if not train:
        return skipped("no archived images in the window to train on", images_used=0)

    run_dir = settings.state_dir / "retraining" / f"run-{run_id}"
    source = run_dir / "source"
    source.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(train):
        (source / f"{i:06d}{path.suffix.lower()}").symlink_to(path.resolve())
    out, log_path = run_dir / "standardizer.safetensors", run_dir / "train.log"
    with sessions.begin() as session:
        run = session.get(TrainingRun, run_id)
        run.images_used, run.held_out_images, run.log_path = len(train), len(held_out), str(log_path)
        c_active = registry.active_version(session, ModelKind.classifier, settings.site.name)
        s_active = registry.active_version(session, ModelKind.standardizer, settings.site.name)
    if c_active is None or s_active is None:
        raise runs.TrainingFailed("no active classifier or standardizer in the registry; start the service once "
                             "or run `stainbridge models promote ID`")
    try:  # before training: a changed checkpoint fails the run now, not after an hour of training
        for version in (c_active, s_active):
            registry.verify_file(version)
    except registry.RegistryError as exc:
        raise runs.TrainingFailed(f"not trained: {exc}") from None
    method = site_profile_method(s_active)
    if method is not None:
        init_from, start = None, (f"re-fitting the active {method} standardizer's site profile (version "
                                  f"{s_active.id}) on the recent images")
        command, event = "train site-profile", "retraining_site_profile"
        cmd = site_profile_command(settings, source, out, method, c_active.path)
    else:
        semantic = None if registry.is_builtin(c_active) else c_active.path
        init_from, start = warm_start(settings, s_active)
        command, event = "train cyclegan", "retraining_warm_start" if init_from else "retraining_from_scratch"
        cmd = train_command(settings, source, out, semantic, init_from)
    log.info(event, run=run_id, reason=start)
    with sessions.begin() as session:
        run = session.get(TrainingRun, run_id)
        run.params = {**(run.params or {}), "init_from": init_from, "init_from_version": s_active.id if init_from
                      else None, "start": start, "command": command}
    runs.mark_stage(sessions, run_id, f"training ({command})", log_path)
    runs.run_training(cmd, log_path, timeout=cfg.timeout_minutes * 60, stop=stop,
                      on_start=lambda pid: runs.record_pid(sessions, run_id, pid))
    runs.mark_stage(sessions, run_id, "gate", log_path)

    device = settings.models.device
    classifier = registry.load_version(c_active, device=device)
    from stainbridge.models.inference import load_standardizer

    candidate = load_standardizer(str(out), device=device, classifier=classifier)
    with sessions.begin() as session:
        version = registry.register_model(session, ModelKind.standardizer, str(out), candidate.sha256,
                                          candidate.header, site=settings.site.name, state=VersionState.candidate,
                                          training_run_id=run_id)
        candidate_id = version.id
        session.get(TrainingRun, run_id).model_version_id = candidate_id
    gate = promotion.gate_version(settings, sessions, candidate_id, recent=held_out)
    metrics = {"gate": gate.metrics(), "training": (candidate.header.get("metrics") or {}).get("final", {}),
               "site_profile": gate.site_profile}
    with sessions.begin() as session:
        version = session.get(ModelVersion, candidate_id)
        promotion.record_verdict(version, gate)
        version.metrics = {**version.metrics, "site_profile": gate.site_profile}
        if gate.passed:
            registry.activate(session, version, reason=gate.reason, actor=f"nightly job, run {run_id}")
        run = session.get(TrainingRun, run_id)
        run.metrics = metrics
    status = RunStatus.succeeded if gate.passed else RunStatus.rejected
    runs.finish_run(sessions, run_id, status, gate.reason)
    return RetrainResult(run_id, status.value, candidate_id, gate.passed, gate.reason, metrics)
