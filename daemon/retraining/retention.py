"""Retention: retraining run folders and unused candidate checkpoints go after ``[retraining] keep_days``.

A run folder (``<state>/retraining/run-N``) holds the training log, links to the archived images a
standardizer trained on, the PNG copies of reviewed patient images a classifier fine-tuning trained on
(``reviewed/``) and the checkpoint the run produced. Once the run finished more than ``keep_days`` ago,
the folder is removed, except the checkpoint of a version that must stay loadable: an active version,
the version ``models rollback`` would bring back (``registry.rollback_target``), and a version a live
worker still serves. Such a checkpoint is kept alone in its folder (the patient images go all the same).
A version whose file was removed stays in the registry (its predictions point at it) with
``metrics.pruned_at``. Only folders under the state folder are touched, never a file registered by hand.
``stainbridge models prune [--dry-run]`` runs it; so does the nightly job, after its runs.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from stainbridge.daemon.config import Settings
from stainbridge.daemon.logs import get_logger
from stainbridge.daemon.store import ModelVersion, RunStatus, TrainingRun, utcnow
from stainbridge.daemon.versions import registry
from stainbridge.daemon.versions.serving import served

log = get_logger(__name__)
RUN_FOLDER = re.compile(r"run-(\d+)")


@dataclass
class Pruned:
    """What a prune removed (or, dry, would remove)."""

    keep_days: int
    folders: list[str] = field(default_factory=list)  # run folders removed whole
    emptied: list[str] = field(default_factory=list)  # run folders kept for a protected checkpoint, the rest removed
    versions: list[int] = field(default_factory=list)  # versions whose checkpoint file was removed
    protected: list[int] = field(default_factory=list)  # versions whose checkpoints were kept on purpose
    bytes: int = 0

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self, *, dry_run: bool) -> str:
        verb = "would remove" if dry_run else "removed"
        lines = [(f"{verb} {len(self.folders)} run folder(s) and the rest of {len(self.emptied)} (older than "
                  f"{self.keep_days} days, {self.bytes / 2**20:.1f} MiB); checkpoints of version(s) "
                  f"{', '.join(map(str, self.versions)) or 'none'} {'would go' if dry_run else 'gone'}; kept "
                  f"the checkpoints of active, rollback and served version(s) "
                  f"{', '.join(map(str, self.protected)) or 'none'}")]
        lines += [f"  {path}" for path in self.folders + self.emptied]
        return "\n".join(lines)


def protected_versions(session: Session) -> set[int]:
    """Versions whose checkpoint must stay: active ones, their rollback targets, and what live workers serve."""
    keep = set()
    for version in registry.active_versions(session):
        keep.add(version.id)
        target = registry.rollback_target(session, version)
        if target is not None:
            keep.add(target.id)
    for row in served(session):
        keep |= {row[kind]["id"] for kind in ("classifier", "standardizer") if row[kind]}
    return keep


def _size(path: Path) -> int:
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*"))


def _finished_before(session: Session, folder: Path, cutoff: datetime) -> bool:
    """A run folder whose run ended before ``cutoff`` (a folder without a row: by its modification time)."""
    run = session.get(TrainingRun, int(RUN_FOLDER.fullmatch(folder.name).group(1)))  # type: ignore[union-attr]
    if run is None:
        return datetime.fromtimestamp(folder.lstat().st_mtime, cutoff.tzinfo) < cutoff
    if run.status is RunStatus.running:
        return False
    ended = run.finished_at or run.started_at
    if ended.tzinfo is None:  # SQLite hands timestamps back without their zone; they are UTC
        ended = ended.replace(tzinfo=cutoff.tzinfo)
    return ended < cutoff


def prune(settings: Settings, session: Session, *, dry_run: bool = False, now: datetime | None = None) -> Pruned:
    """Remove the run folders and candidate checkpoints older than ``keep_days`` (see the module). Caller commits."""
    keep_days = settings.retraining.keep_days
    cutoff = (now or utcnow()) - timedelta(days=keep_days)
    result = Pruned(keep_days)
    root = settings.state_dir / "retraining"
    if not root.is_dir():
        return result
    keep = protected_versions(session)
    versions = session.scalars(select(ModelVersion)).all()
    by_path = {str(Path(v.path).resolve()): v for v in versions if not registry.is_builtin(v)}
    for folder in sorted(root.iterdir()):
        if folder.is_symlink() or not folder.is_dir() or not RUN_FOLDER.fullmatch(folder.name):
            continue
        if not _finished_before(session, folder, cutoff):
            continue
        inside = {path: v for path, v in by_path.items() if Path(path).parent == folder.resolve()}
        kept = [Path(path) for path, v in inside.items() if v.id in keep]
        result.protected += [v.id for v in inside.values() if v.id in keep]
        gone = [v for v in inside.values() if v.id not in keep and Path(v.path).exists()]
        entries = [folder] if not kept else [p for p in folder.iterdir() if p not in kept]
        if not entries:  # emptied by an earlier prune: only the protected checkpoint is left
            continue
        result.bytes += sum(_size(p) for p in entries)
        (result.emptied if kept else result.folders).append(str(folder))
        result.versions += [v.id for v in gone]
        if dry_run:
            continue
        for path in entries:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)  # symlinks inside (a standardizer run's source/) are removed, never followed
            else:
                path.unlink()
        for version in gone:
            version.metrics = {**(version.metrics or {}), "pruned_at": utcnow().isoformat(timespec="seconds")}
    result.protected = sorted(set(result.protected))
    return result


def prune_after_run(settings: Settings, sessions: sessionmaker) -> dict[str, Any]:
    """The nightly job's prune: never raises (a failed clean-up must not fail the night); returns what it did."""
    try:
        with sessions.begin() as session:
            result = prune(settings, session)
    except Exception as exc:  # a failed clean-up must not fail the night
        log.exception("prune_failed")
        return {"error": f"{type(exc).__name__}: {exc}"}
    if result.folders or result.emptied:
        log.info("pruned", folders=len(result.folders), emptied=len(result.emptied), versions=result.versions,
                 mib=round(result.bytes / 2**20, 1))
    return result.as_json()
