"""What the nightly job's two halves share: run rows, the held-out split, reviewed images, the child process.

A run is one ``training_runs`` row (``running`` until ``finish_run``); training happens in a child
process that runs the same CLI an operator would (``CHILD``), ``nice``-d, its output in the run's log.
``mark_stage`` records where a run is (``params.stage``, read by ``status``) and writes a progress line
to its log; while the child trains, a line with the elapsed time follows every ``PROGRESS_SECONDS``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from stainbridge.daemon.config import Settings
from stainbridge.daemon.intake import claims
from stainbridge.daemon.logs import get_logger
from stainbridge.daemon.store import Image, ImageStatus, ModelVersion, Review, RunStatus, TrainingRun, utcnow

log = get_logger(__name__)
PROGRESS_SECONDS = 60.0

# The child lowers its own priority, then runs the same CLI an operator would.
CHILD = "import os, sys; os.nice(int(sys.argv[1])); from stainbridge.daemon.cli import main; sys.exit(main(sys.argv[2:]))"


class TrainingFailed(Exception):
    """The training subprocess did not produce a checkpoint; the message says why."""


def recover_runs(sessions: sessionmaker) -> int:
    """Runs left `running` by a dead process on this host become `failed` (call at start-up)."""
    count = 0
    with sessions.begin() as session:
        for run in session.scalars(select(TrainingRun).where(TrainingRun.status == RunStatus.running)):
            if run.worker and claims.owner_is_dead(run.worker):
                run.status, run.finished_at = RunStatus.failed, utcnow()
                run.reason = run.error = f"the process running it ({run.worker}) died"
                count += 1
    return count


def finish_run(sessions: sessionmaker, run_id: int, status: RunStatus, reason: str, **values: Any) -> None:
    """Close a run: its final status, reason and end time (and any other columns given)."""
    with sessions.begin() as session:
        run = session.get(TrainingRun, run_id)
        run.status, run.reason, run.finished_at = status, reason[:4000], utcnow()
        for key, value in values.items():
            setattr(run, key, value)


def progress_line(log_path: Path, stage: str, elapsed: float) -> None:
    """``[stainbridge <time>] stage: <stage>, <s> s elapsed`` appended to a run's log (the child appends there too)."""
    with log_path.open("a", encoding="utf-8") as out:
        out.write(f"[stainbridge {utcnow().isoformat(timespec='seconds')}] stage: {stage}, {elapsed:.0f} s elapsed\n")


def mark_stage(sessions: sessionmaker, run_id: int, stage: str, log_path: Path) -> None:
    """The run is now at ``stage``: recorded in ``params.stage`` (with the time) and as a line in its log.
    A new stage drops the training child's ``params.pid``: that process is gone."""
    with sessions.begin() as session:
        run = session.get(TrainingRun, run_id)
        params = {key: value for key, value in (run.params or {}).items() if key != "pid"}
        run.params = {**params, "stage": stage, "stage_at": utcnow().isoformat(timespec="seconds")}
        started = run.started_at
    if started.tzinfo is None:  # SQLite hands timestamps back without their zone; they are UTC
        started = started.replace(tzinfo=utcnow().tzinfo)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    progress_line(log_path, stage, (utcnow() - started).total_seconds())


def is_held_out(sha256: str, fraction: float) -> bool:
    """A stable share by sha256: a file is held out of training in every run or in none."""
    return int(sha256[:8], 16) % 1000 < int(fraction * 1000)


def split_held_out(images: list[tuple[str, Path]], fraction: float) -> tuple[list[Path], list[Path]]:
    """(train, held out) by :func:`is_held_out`."""
    train = [p for sha, p in images if not is_held_out(sha, fraction)]
    held = [p for sha, p in images if is_held_out(sha, fraction)]
    return train, held


def recent_images(settings: Settings, sessions: sessionmaker, now: datetime,
                  site: str | None = None) -> list[tuple[str, Path]]:
    """(sha256, archived file) of ``site``'s (default ``[site] name``) newest classified images in the window,
    files that still exist."""
    cfg = settings.retraining
    with sessions() as session:
        rows = session.execute(
            select(Image.sha256, Image.archive_path)
            .where(Image.status == ImageStatus.done, Image.archive_path.is_not(None),
                   Image.site == (site or settings.site.name), Image.received_at >= now - timedelta(days=cfg.window_days))
            .order_by(Image.received_at.desc(), Image.id.desc()).limit(cfg.max_images)
        ).all()
    return [(sha, Path(p)) for sha, p in rows if sha and Path(p).is_file()]


def reviewed_images(sessions: sessionmaker, site: str) -> list[tuple[str, Path, str, datetime]]:
    """(sha256, archived file, latest reviewed label, review time) of ``site``'s reviewed images whose file exists."""
    with sessions() as session:
        latest = select(func.max(Review.id)).group_by(Review.image_id)
        rows = session.execute(
            select(Image.sha256, Image.archive_path, Review.label, Review.created_at)
            .join(Review, Review.image_id == Image.id)
            .where(Review.id.in_(latest), Image.archive_path.is_not(None), Image.site == site).order_by(Image.id)
        ).all()
    return [(sha, Path(p), label, at) for sha, p, label, at in rows if Path(p).is_file()]


def record_pid(sessions: sessionmaker, run_id: int, pid: int) -> None:
    """The training child's process id in ``params.pid`` while it trains (``status`` shows it: the process to
    watch, or to kill, on a shared machine)."""
    with sessions.begin() as session:
        run = session.get(TrainingRun, run_id)
        run.params = {**(run.params or {}), "pid": pid}


def run_training(cmd: list[str], log_path: Path, *, timeout: float, stop: threading.Event | None,
                 on_start: Callable[[int], None] | None = None) -> None:
    """Run the training subprocess to the end; raise TrainingFailed on any other outcome.
    ``on_start(pid)`` is called once the child exists (the jobs record it with :func:`record_pid`)."""
    env = dict(os.environ)
    with log_path.open("ab") as out:
        child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                 start_new_session=True)
    log.info("training_started", pid=child.pid, log=str(log_path))
    if on_start is not None:
        try:
            on_start(child.pid)
        except BaseException:
            child.kill()  # a child nobody waits for would train on unwatched
            child.wait()
            raise
    started = time.monotonic()
    deadline, next_line = started + timeout, started + PROGRESS_SECONDS
    while child.poll() is None:
        if time.monotonic() >= next_line:
            progress_line(log_path, "training", time.monotonic() - started)
            next_line += PROGRESS_SECONDS
        if stop is not None and stop.is_set():
            child.kill()
            child.wait()
            raise TrainingFailed("the service stopped during training; the run will be tried again on schedule")
        if time.monotonic() > deadline:
            child.kill()
            child.wait()
            raise TrainingFailed(f"training ran past [retraining] timeout_minutes ({timeout / 60:.0f}) and was killed")
        time.sleep(0.2)
    if child.returncode != 0:
        how = (f"was killed by {signal.Signals(-child.returncode).name}" if child.returncode < 0
               else f"exited with status {child.returncode}")
        tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] if log_path.exists() else []
        raise TrainingFailed(f"training {how}; see {log_path}" + (f" ({tail[0][:300]})" if tail else ""))


def trained_on(session: Session, version: ModelVersion) -> set[str]:
    """sha256 of the site's images whose reviewed labels ``version`` was fine-tuned on: those the nightly run
    that made it recorded, and the files of a hand-run `train finetune`'s --reviewed folder, when it is still there."""
    shas: set[str] = set()
    run = session.get(TrainingRun, version.training_run_id) if version.training_run_id is not None else None
    if run is not None:
        shas.update((run.params or {}).get("trained_on") or [])
    root = (((version.header or {}).get("finetune") or {}).get("reviewed") or {}).get("root")
    if root and Path(root).is_dir():
        from stainbridge.models.inference import file_sha256

        shas.update(file_sha256(p) for p in Path(root).rglob("*") if p.is_file() and not p.is_symlink())
    return shas
