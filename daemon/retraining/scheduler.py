"""The nightly job inside `stainbridge run`: APScheduler 3, one job, run once per slot.

The job lives in this process's memory only. Its schedule comes from the configuration, so
nothing about it needs to be stored, and nothing is read back from the database to build it:
APScheduler's SQLAlchemy job store unpickled its table at every start, which let whoever could
write to the database run code on every worker (migration 0007 drops that table). The job has a
fixed id, ``max_instances=1``, ``coalesce`` and a misfire grace of an hour: a service that was
down at 02:00 and is back by 03:00 still runs that night's job (at start, the latest slot within
the grace that has no scheduled run in ``training_runs`` is due at once). The cron trigger reads
``[retraining] schedule`` in local time.

Several workers share one job (and one database): only one of them runs it. On PostgreSQL a
session advisory lock (``pg_try_advisory_lock``) decides, on SQLite a file lock in the state
folder; the winner then checks that no scheduled run started in this slot yet, so a worker
whose clock or wake-up lags does not run the same night twice.
"""

from __future__ import annotations

import fcntl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any

from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from sqlalchemy import select, text
from sqlalchemy.engine import Engine

from stainbridge.daemon.config import Settings
from stainbridge.daemon.config_values import schedule_trigger
from stainbridge.daemon.logs import get_logger
from stainbridge.daemon.store import TrainingRun, make_sessionmaker

log = get_logger(__name__)

JOB_ID = "stainbridge-retraining"
LOCK_KEY = 0x53_42_52_54  # "SBRT": the advisory lock every worker of one database contends for
MISFIRE_GRACE_SECONDS = 3600

# What `fire` runs in this process (set by RetrainingScheduler.start).
_runner: Callable[[], Any] | None = None


def fire() -> None:
    """The job's function."""
    if _runner is None:
        log.warning("retraining_job_without_service")
        return
    _runner()


def latest_slot(trigger: CronTrigger, now: datetime) -> datetime:
    """The most recent time at or before ``now`` that the schedule names.

    Searched in windows that end at ``now`` and grow: walking slot by slot from 400 days back took 14 s
    for ``* * * * *`` (half a million slots) at every start and every run, and hours for a seconds schedule."""
    for span in (timedelta(minutes=1), timedelta(hours=1), timedelta(days=1), timedelta(days=32), timedelta(days=400)):
        slot, fire_time = None, trigger.get_next_fire_time(None, now - span)
        while fire_time is not None and fire_time <= now:
            slot = fire_time
            fire_time = trigger.get_next_fire_time(fire_time, fire_time + timedelta(seconds=1))
        if slot is not None:
            return slot
    return now


@contextmanager
def job_lock(settings: Settings, engine: Engine) -> Iterator[bool]:
    """Yield True in the one worker that may run the job now, False in the others."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as connection:
            got = bool(connection.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": LOCK_KEY}).scalar())
            connection.commit()
            try:
                yield got
            finally:
                if got:
                    connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": LOCK_KEY})
                    connection.commit()
        return
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    with (settings.state_dir / "retraining.lock").open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_scheduled(settings: Settings, engine: Engine, *, now: datetime | None = None,
                  stop: threading.Event | None = None) -> Any:
    """The scheduled job: under the lock, once per schedule slot. Returns the RetrainResult or None."""
    from stainbridge.daemon.retraining.nightly import run_retraining

    trigger = schedule_trigger(settings.retraining.schedule)
    now = now or datetime.now(timezone.utc)
    sessions = make_sessionmaker(engine)
    with job_lock(settings, engine) as got:
        if not got:
            log.info("retraining_running_elsewhere")
            return None
        slot = latest_slot(trigger, now.astimezone(trigger.timezone))
        with sessions() as session:
            earlier = session.scalar(select(TrainingRun.id).where(TrainingRun.trigger == "schedule",
                                                                  TrainingRun.started_at >= slot).limit(1))
        if earlier is not None:
            log.info("retraining_already_ran", slot=slot.isoformat(), run=earlier)
            return None
        return run_retraining(settings, sessions, trigger="schedule", now=now.astimezone(timezone.utc), stop=stop)


class RetrainingScheduler:
    """APScheduler in the service's process; ``start()`` adds (or keeps) the one job."""

    def __init__(self, settings: Settings, engine: Engine, *,
                 clock: Callable[[], datetime] | None = None, runner: Callable[[], Any] | None = None) -> None:
        self.settings, self.engine = settings, engine
        self.clock = clock or (lambda: datetime.now(timezone.utc))
        self.trigger = schedule_trigger(settings.retraining.schedule)
        self.stop_event = threading.Event()
        self.runner = runner or self._run
        self.scheduler = BackgroundScheduler(
            jobstores={"default": MemoryJobStore()},
            executors={"default": {"type": "threadpool", "max_workers": 1}},
            timezone=self.trigger.timezone,
        )

    def _run(self) -> Any:
        return run_scheduled(self.settings, self.engine, now=self.clock(), stop=self.stop_event)

    def start(self) -> None:
        global _runner
        _runner = self.runner
        self.scheduler.start(paused=True)
        due = self._missed_slot()
        job = self.scheduler.add_job(fire, trigger=self.trigger, id=JOB_ID, name="nightly retraining",
                                     replace_existing=True, max_instances=1, coalesce=True,
                                     misfire_grace_time=MISFIRE_GRACE_SECONDS,
                                     **({"next_run_time": due} if due is not None else {}))
        self.scheduler.resume()
        log.info("retraining_scheduled", schedule=self.settings.retraining.schedule,
                 next_run=job.next_run_time.isoformat() if job.next_run_time else None,
                 missed_slot=due.isoformat() if due is not None else None)

    def _missed_slot(self) -> datetime | None:
        """Now, if the latest slot is within the misfire grace and no scheduled run started since it."""
        now = self.clock().astimezone(self.trigger.timezone)
        slot = latest_slot(self.trigger, now)
        if slot >= now or (now - slot).total_seconds() > MISFIRE_GRACE_SECONDS:
            return None
        with make_sessionmaker(self.engine)() as session:
            earlier = session.scalar(select(TrainingRun.id).where(TrainingRun.trigger == "schedule",
                                                                  TrainingRun.started_at >= slot).limit(1))
        return now if earlier is None else None

    def next_run_time(self) -> datetime | None:
        job = self.scheduler.get_job(JOB_ID)
        return job.next_run_time if job else None

    def shutdown(self) -> None:
        """Stop: a running job kills its training subprocess and records the run as failed."""
        global _runner
        self.stop_event.set()
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)
        _runner = None
