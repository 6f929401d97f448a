"""The service's heartbeat: one ``workers`` row per `stainbridge run` process, rewritten every few seconds.

Why a database row rather than a file in the state folder: with PostgreSQL several workers on several machines
share one database, and `stainbridge status` on any of them (or a lab's SQL dashboard) must see them all; the
state folder is one machine's. A database that does not answer cannot take the row, but then `status` cannot
read anything either, and says so. The row carries the state (``ready``, ``paused`` (disk space), ``retrying``
(a transient failure being waited out), ``unhealthy`` (a health check fails), ``stopped`` after a clean exit),
why, the files handled since start and when the last one finished. A thread writes it, so a long batch does not
look like a dead service; the thread stops with the process, so a killed service's row goes stale: older than
``STALE_AFTER_INTERVALS`` intervals, `status` says "not running". The states are ``lab.metrics.STATES``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import sessionmaker
from structlog.stdlib import BoundLogger

from stainbridge.daemon.intake.failures import error_summary
from stainbridge.daemon.lab.metrics import build_version
from stainbridge.daemon.store import Worker, utcnow

HEARTBEAT_SECONDS = 10.0
STALE_AFTER_INTERVALS = 3  # a row older than this many intervals is a process that no longer runs
FORGET_AFTER = timedelta(days=7)  # rows of processes gone this long are deleted at the next start


def is_stale(row: Worker, now: datetime) -> bool:
    """The process behind `row` no longer beats (or stopped cleanly)."""
    beat = row.heartbeat_at if row.heartbeat_at.tzinfo else row.heartbeat_at.replace(tzinfo=now.tzinfo)
    return row.state == "stopped" or (now - beat).total_seconds() > STALE_AFTER_INTERVALS * row.interval_seconds


class Heartbeat:
    """Writes this process's ``workers`` row: ``beat()`` now, ``start()`` a thread that beats every interval."""

    def __init__(self, sessions: sessionmaker, worker: str, state: Callable[[], tuple[str, str | None]],
                 handled: Callable[[], int], last_processed: Callable[[], datetime | None], log: BoundLogger,
                 interval: float = HEARTBEAT_SECONDS, on_beat: Callable[[str], None] | None = None) -> None:
        self.sessions, self.worker, self.log, self.interval = sessions, worker, log, interval
        self._state, self._handled, self._last_processed, self._on_beat = state, handled, last_processed, on_beat
        self.started_at = utcnow()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def beat(self, state: str | None = None, reason: str | None = None) -> bool:
        """Write the row now (`state`/`reason`: instead of asking the service); False when the database refused."""
        if state is None:
            state, reason = self._state()
        now = utcnow()
        values = {"version": build_version(), "state": state, "reason": reason, "interval_seconds": self.interval,
                  "handled": self._handled(), "started_at": self.started_at, "heartbeat_at": now,
                  "last_processed_at": self._last_processed()}
        try:
            with self.sessions.begin() as session:
                row = session.scalar(select(Worker).where(Worker.worker == self.worker))
                if row is None:
                    session.add(Worker(worker=self.worker, **values))
                else:
                    for key, value in values.items():
                        setattr(row, key, value)
        except SQLAlchemyError as exc:
            if not self._failing:  # once per outage, not every interval
                self.log.warning("heartbeat_failed", error=error_summary(exc))
            self._failing = True
            return False
        self._failing = False
        if self._on_beat is not None:
            self._on_beat(state)
        return True

    def forget_gone(self) -> int:
        """Delete the rows of processes that stopped or went silent more than FORGET_AFTER ago."""
        cutoff = utcnow() - FORGET_AFTER
        with self.sessions.begin() as session:
            return session.execute(delete(Worker).where(Worker.worker != self.worker,
                                                        Worker.heartbeat_at < cutoff)).rowcount or 0

    def start(self) -> None:
        self.beat()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except Exception as exc:  # noqa: BLE001 - the heartbeat thread must outlive any one failure
                self.log.warning("heartbeat_failed", error=error_summary(exc))

    def stop(self) -> None:
        """Stop the thread and say ``stopped`` (a clean exit: `status` says so at once)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.beat("stopped", None)
