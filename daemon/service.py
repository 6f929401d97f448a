"""`stainbridge run`: the long-running worker that systemd supervises (Type=notify).

Start-up, in order: settings (by the caller), logging (by the CLI), the database (migrations on
SQLite; on PostgreSQL the schema must already be at head), the models (loaded, verified and
recorded with their sha256 in ``model_versions``), claims left by a crashed run released, the
drop-folder watcher started (it scans what is already there), then ``READY=1``.

The loop is ``run()`` repeating ``run_once()``, which takes one micro-batch of ready files
(up to ``[models] batch_size``, or what arrived within ``[watch] batch_wait_seconds``) through
the pipeline and returns how many files it handled. ``WATCHDOG=1`` is sent only while the
watcher thread, the loop and the database (``SELECT 1``) are healthy.

Shutdown like rq: the first SIGTERM/SIGINT sends ``STOPPING=1``, stops taking files and lets
the current batch finish, then exits 0; a second signal exits at once (128 + signal number).
Files not yet taken stay in the drop folder for the next start. ``finally`` stops the watcher
and disposes the engine. Exit codes: 0 after a signal, 1 when start-up fails (configuration,
database, models, folders; before READY=1), 2 when the watcher thread dies (systemd restarts).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from types import FrameType

from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from stainbridge.daemon import intake, sdnotify
from stainbridge.daemon.config import ConfigError, Settings, load_settings
from stainbridge.daemon.hotswap import ModelSwapper
from stainbridge.daemon.logs import get_logger
from stainbridge.daemon.pipeline import STALE_CLAIM_SECONDS, ModelConfigError, Pipeline, load_models
from stainbridge.daemon.retraining import recover_runs
from stainbridge.daemon.scheduler import RetrainingScheduler
from stainbridge.daemon.schema import SchemaError, prepare_database, safe_url
from stainbridge.daemon.store import make_engine, make_sessionmaker
from stainbridge.daemon.watcher import Candidate, DropFolderWatcher, WatcherError

log = get_logger(__name__)

IDLE_SECONDS = 0.25  # how often an idle loop asks the watcher for ready files
DB_RETRY_SECONDS = 5.0  # pause after a database error before trying again


class StartupError(Exception):
    """The service cannot start; the message says what to fix."""


class Service:
    """The worker: ``run()`` until a signal; ``run_once()`` handles one micro-batch."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.log = log.bind(site=settings.site.name, worker=intake.worker_id())
        self.engine: Engine | None = None
        self.pipeline: Pipeline | None = None
        self.watcher: DropFolderWatcher | None = None
        self._stop = threading.Event()
        self._signals = 0
        self._backlog: list[Candidate] = []
        self._heartbeat = time.monotonic()
        self._last_release = time.monotonic()
        self._db_ok = True
        self.handled = 0
        self.swapper: ModelSwapper | None = None
        self.scheduler: RetrainingScheduler | None = None

    # lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Everything before READY=1; raises StartupError with a one-line reason."""
        s = self.settings
        try:
            prepare_database(s.database_url)
            self.engine = make_engine(s.database_url)
            sessions = make_sessionmaker(self.engine)
            models = load_models(s, sessions)
            self.pipeline = Pipeline(s, sessions, models)
            self.pipeline.recover()
            self.swapper = ModelSwapper(s, sessions)
            for folder in (s.drop_dir, s.archive_dir, s.quarantine_dir):
                folder.mkdir(parents=True, exist_ok=True)
            self.watcher = DropFolderWatcher(s)
            self.watcher.start()  # includes the start-up scan
        except (SchemaError, ModelConfigError, WatcherError, ConfigError) as exc:
            raise StartupError(str(exc)) from None
        except OSError as exc:
            raise StartupError(f"cannot use {exc.filename}: {exc.strerror}; fix [paths] or the folder's owner "
                               "(under systemd: the stainbridge user, and ReadWritePaths= in the unit)") from None
        except SQLAlchemyError as exc:
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            raise StartupError(f"database {safe_url(s.database_url)}: {reason}") from None
        self.log.info("ready", drop=str(s.drop_dir), database=safe_url(s.database_url),
                      batch_size=s.models.batch_size, polling=s.watch.polling)
        sdnotify.notify(f"READY=1\nSTATUS=watching {s.drop_dir}")
        interval = sdnotify.watchdog_interval()
        if interval:
            threading.Thread(target=self._watchdog, args=(interval,), name="watchdog", daemon=True).start()
        self._start_scheduler()

    def run(self) -> int:
        """Start, loop until a signal, stop; returns the process exit code."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            try:
                self.start()
            except StartupError as exc:
                self.log.error("startup_failed", error=str(exc))
                print(f"stainbridge run: {exc}", file=sys.stderr)
                return 1
            while not self._stop.is_set():
                if not self.watcher.healthy():
                    # Exit non-zero so that systemd (Restart=on-failure) starts a fresh process.
                    self.log.error("watcher_died", drop=str(self.settings.drop_dir))
                    print("stainbridge run: the drop-folder watcher thread died; exiting to be restarted",
                          file=sys.stderr)
                    return 2
                if self.run_once() == 0:
                    self._stop.wait(IDLE_SECONDS if self._db_ok else DB_RETRY_SECONDS)
            self.log.info("stopped", handled=self.handled)
            return 0
        finally:
            self._stop.set()
            if self.scheduler is not None:
                self.scheduler.shutdown()
            if self.watcher is not None:
                self.watcher.stop()
            if self.engine is not None:
                self.engine.dispose()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def stop(self) -> None:
        """Stop taking files; the current batch finishes (what the first signal does)."""
        if not self._stop.is_set():
            sdnotify.notify("STOPPING=1\nSTATUS=finishing the current batch")
            self._stop.set()

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._signals += 1
        name = signal.Signals(signum).name
        if self._signals > 1:
            self.log.error("second_signal_exiting_now", signal=name)
            sys.stderr.flush()
            os._exit(128 + signum)
        self.log.info("stopping", signal=name)
        self.stop()

    # the tick --------------------------------------------------------------------------------

    def run_once(self) -> int:
        """Take one micro-batch of ready files through the pipeline; return how many were handled."""
        assert self.pipeline is not None and self.watcher is not None, "call start() first"
        self._heartbeat = time.monotonic()
        self._release_abandoned_claims()
        self._swap_models()
        batch = self._next_batch()
        if not batch:
            return 0
        try:
            report = self.pipeline.process(batch)
        except SQLAlchemyError as exc:
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            self.log.error("database_error", error=reason, batch=len(batch))
            self._db_ok = False
            for candidate in batch:  # offer them again once the database is back
                self.watcher.forget(candidate.path)
            return 0
        self._db_ok = True
        for path in report.left_in_place:
            self.watcher.forget(path)
        self._heartbeat = time.monotonic()
        self.handled += report.handled
        if report.handled:
            self.log.info("batch", done=report.done, failed=report.failed, duplicates=report.duplicates,
                          refiled=report.refiled, skipped=report.skipped)
        return report.handled

    def _next_batch(self) -> list[Candidate]:
        """Up to batch_size ready files, waiting at most batch_wait_seconds for a batch to fill."""
        size = self.settings.models.batch_size
        if len(self._backlog) < size:
            self._backlog += self.watcher.ready_files()
            deadline = time.monotonic() + self.settings.watch.batch_wait_seconds
            while self._backlog and len(self._backlog) < size and not self._stop.is_set():
                if time.monotonic() >= deadline:
                    break
                time.sleep(min(0.05, self.settings.watch.batch_wait_seconds))
                self._backlog += self.watcher.ready_files()
        if self._stop.is_set():
            return []  # stop accepting: what was not started stays in the drop folder
        batch, self._backlog = self._backlog[:size], self._backlog[size:]
        return batch

    def _release_abandoned_claims(self) -> None:
        """Now and then, free claims of workers that died (other processes, other hosts)."""
        if time.monotonic() - self._last_release < self.settings.watch.rescan_seconds:
            return
        self._last_release = time.monotonic()
        try:
            with self.pipeline.sessions.begin() as session:
                released = intake.release_stale_claims(session, STALE_CLAIM_SECONDS)
        except SQLAlchemyError:
            return  # run_once reports database errors
        if released:
            self.log.warning("claims_released", count=released)

    # retraining: model swaps between batches, the nightly job ------------------------------------

    def _swap_models(self) -> None:
        """At a batch boundary: switch to newly promoted registry versions (verified, or refused)."""
        if self.swapper is None:
            return
        try:
            new = self.swapper.check(self.pipeline.models)
        except SQLAlchemyError:
            return  # run_once reports database errors
        if new is not None:
            self.pipeline.models = new

    def _start_scheduler(self) -> None:
        """Mark runs of a dead process failed; start the nightly job. A failure here leaves inference running."""
        try:
            failed = recover_runs(self.pipeline.sessions)
            if failed:
                self.log.warning("training_runs_failed_at_startup", count=failed)
            if self.settings.retraining.enabled:
                self.scheduler = RetrainingScheduler(self.settings, self.engine)
                self.scheduler.start()
        except Exception as exc:  # noqa: BLE001 - classification must go on without the nightly job
            self.log.error("retraining_scheduler_failed", error=f"{type(exc).__name__}: {exc}",
                           action="retraining is off until the service restarts; see the error")
            self.scheduler = None

    # health ----------------------------------------------------------------------------------

    def healthy(self, max_loop_age: float = 60.0) -> dict[str, bool]:
        """Watcher thread alive, loop ticked within max_loop_age seconds, database answers."""
        checks = {
            "watcher": self.watcher is not None and self.watcher.healthy(),
            "loop": time.monotonic() - self._heartbeat < max_loop_age,
            "database": False,
        }
        if self.engine is not None:
            try:
                with self.engine.connect() as connection:
                    connection.execute(text("SELECT 1"))
                checks["database"] = True
            except SQLAlchemyError:
                pass
        return checks

    def _watchdog(self, interval: float) -> None:
        while not self._stop.wait(interval / 3):
            checks = self.healthy(max_loop_age=interval)
            if all(checks.values()):
                sdnotify.notify("WATCHDOG=1")
            else:
                self.log.warning("unhealthy", **{k: v for k, v in checks.items() if not v})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Run the service in the foreground: watch the drop folder, classify what "
                          "arrives, record results in SQL. systemd runs this (Type=notify).")


def run(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"stainbridge run: configuration error: {exc}", file=sys.stderr)
        return 1
    return Service(settings).run()

