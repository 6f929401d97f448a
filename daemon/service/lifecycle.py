"""`stainbridge run`: the long-running worker that systemd supervises (Type=notify).

Start-up, in order: settings (by the caller), logging (by the CLI), the database (migrations on
SQLite; on PostgreSQL the schema must already be at head), the models (loaded, verified and
recorded with their sha256 in ``model_versions``), claims left by a crashed run released, the
drop-folder watcher started (it scans what is already there), then ``READY=1``. The database
wait lives in ``service.startup``, the health checks and the watchdog thread in ``service.health``.

The loop is ``run()`` repeating ``run_once()``, which takes one micro-batch of ready files
(up to ``[models] batch_size``, or what arrived within ``[watch] batch_wait_seconds``) through
the pipeline and returns how many files it handled. ``WATCHDOG=1`` is sent only while the
watcher thread, the loop and the database (``SELECT 1``) are healthy and files are moving: no
file has waited longer than the watchdog interval while the service kept failing on it.

While a volume the service writes to has less free space than ``[paths] min_free_mb``
(``daemon.diskspace``), no file is taken: they wait in the drop folder, ``STATUS=`` says why, and
the loop goes on by itself once space is freed.

No error of one file stops the service (see ``intake.failures``): a transient failure (database,
models, configuration) leaves the files in place, releases their claims and pauses with a
growing back-off while ``STATUS=`` says why; any other error is retried with each file alone,
and a file that fails alone ``MAX_ATTEMPTS`` times is quarantined with its reason. At start-up
an unreachable database is waited for, with back-off and ``STATUS=``, instead of exiting.

Shutdown like rq: the first SIGTERM/SIGINT sends ``STOPPING=1``, stops taking files and lets
the current batch finish, then exits 0; a second signal exits at once (128 + signal number).
Files not yet taken stay in the drop folder for the next start. ``finally`` stops the watcher
and disposes the engine. Exit codes: 0 after a signal, 1 when start-up fails (configuration,
database, models, folders; before READY=1), 2 when the watcher thread dies (systemd restarts).
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType

from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from stainbridge.daemon import diskspace
from stainbridge.daemon.config import ConfigError, Settings, load_settings
from stainbridge.daemon.intake import claims
from stainbridge.daemon.intake.failures import MAX_ATTEMPTS, Backoff, error_summary, is_transient
from stainbridge.daemon.intake.watcher import Candidate, DropFolderWatcher
from stainbridge.daemon.lab.metrics import ServiceMetrics, start_metrics
from stainbridge.daemon.logs import get_logger
from stainbridge.daemon.pipeline.batch import BatchReport
from stainbridge.daemon.pipeline.runner import STALE_CLAIM_SECONDS, Pipeline, use_all_cores
from stainbridge.daemon.retraining.runs import recover_runs
from stainbridge.daemon.retraining.scheduler import RetrainingScheduler
from stainbridge.daemon.schema import safe_url
from stainbridge.daemon.service import sdnotify
from stainbridge.daemon.service.health import database_answers, watchdog_loop
from stainbridge.daemon.service.startup import (
    STARTUP_BACKOFF_MAX_SECONDS,
    StartupError,
    StoppedDuringStartup,
    connect_and_load,
    startup_errors,
)
from stainbridge.daemon.versions.hotswap import ModelSwapper

__all__ = [  # start-up's names stay importable from here
    "IDLE_SECONDS", "MAX_BACKLOG", "MAX_TRACKED_ATTEMPTS", "STARTUP_BACKOFF_MAX_SECONDS", "Service",
    "StartupError", "StoppedDuringStartup", "add_arguments", "run",
]

log = get_logger(__name__)

IDLE_SECONDS = 0.25  # how often an idle loop asks the watcher for ready files
MAX_BACKLOG = 1_000  # ready files held in memory between batches
MAX_TRACKED_ATTEMPTS = 10_000  # files remembered with failed attempts (oldest forgotten first)


class Service:
    """The worker: ``run()`` until a signal; ``run_once()`` handles one micro-batch."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.log = log.bind(site=settings.site.name, worker=claims.worker_id())
        self.engine: Engine | None = None
        self.pipeline: Pipeline | None = None
        self.watcher: DropFolderWatcher | None = None
        self._stop = threading.Event()
        self._signals = 0
        self._backlog: list[Candidate] = []
        self._heartbeat = time.monotonic()
        self._last_release = time.monotonic()
        self._last_progress = time.monotonic()  # files moved, or nothing was waiting
        self._backoff = Backoff()
        self._backoff_delay = 0.0
        self._trouble: str | None = None  # the transient failure being waited out, for STATUS= and health
        self._space_short: str | None = None  # why no files are taken (a volume below [paths] min_free_mb)
        self._attempts: dict[tuple[Path, int, float], int] = {}  # failed attempts of a file, alone
        self.handled = 0
        self.swapper: ModelSwapper | None = None
        self.scheduler: RetrainingScheduler | None = None
        self.metrics: ServiceMetrics | None = None  # [metrics] port

    # lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Everything before READY=1; raises StartupError with a one-line reason."""
        s = self.settings
        with startup_errors(s):
            self.engine, sessions, models = connect_and_load(s, self._stop, self.log)
            self.pipeline = Pipeline(s, sessions, models)
            use_all_cores()
            self.pipeline.warm_up()
            self.pipeline.heartbeat = self._beat
            self.pipeline.recover()
            self.swapper = ModelSwapper(s, sessions)
            for folder in (s.drop_dir, s.archive_dir, s.quarantine_dir):
                folder.mkdir(parents=True, exist_ok=True)
            self.watcher = DropFolderWatcher(s)
            self.watcher.start()  # includes the start-up scan
            self.metrics = start_metrics(s, sessions, self.watcher.waiting)
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
            except StoppedDuringStartup:
                self.log.info("stopped", handled=0)
                return 0
            except StartupError as exc:
                self.log.error("startup_failed", error=str(exc))
                print(f"stainbridge run: {exc}", file=sys.stderr)
                return 1
            gc.freeze()  # start-up's ~400k objects (modules, models) leave the collector's full passes: 0.1-1 s each
            while not self._stop.is_set():
                if not self.watcher.healthy():
                    # Exit non-zero so that systemd (Restart=on-failure) starts a fresh process.
                    self.log.error("watcher_died", drop=str(self.settings.drop_dir))
                    print("stainbridge run: the drop-folder watcher thread died; exiting to be restarted",
                          file=sys.stderr)
                    return 2
                try:
                    handled = self.run_once()
                except Exception as exc:  # the last guard: the loop never dies of one error
                    self.log.exception("loop_error", error=error_summary(exc))
                    handled = 0
                    self._transient_failure(error_summary(exc), [])
                if handled == 0:
                    self._stop.wait(self._backoff_delay if self._trouble else IDLE_SECONDS)
            self.log.info("stopped", handled=self.handled)
            return 0
        finally:
            self._stop.set()
            if self.scheduler is not None:
                self.scheduler.shutdown()
            if self.metrics is not None:
                self.metrics.close()
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
        self._heartbeat = tick = time.monotonic()
        self._release_abandoned_claims()
        self._swap_models()
        if self._short_of_space():
            self._last_progress = time.monotonic()  # waiting on purpose, not stuck: no restart by the watchdog
            return 0
        batch = self._next_batch()
        if not batch:
            if not self._backlog and self._trouble is None:
                self._last_progress = time.monotonic()  # nothing waiting: nothing is stuck
            return 0
        started = time.monotonic()
        try:
            report = self.pipeline.process(batch)
            report.step_seconds["next_batch"] = started - tick  # claims release, model swap, disk space, watcher
        except Exception as exc:  # noqa: BLE001 - sorted below: transient, or find the file that breaks
            if is_transient(exc):
                self._transient_failure(error_summary(exc), batch)
                return 0
            if len(batch) == 1:
                return self._failed_alone(batch[0], exc)
            self.log.warning("batch_failed_retrying_each_file", error=error_summary(exc), batch=len(batch))
            return sum(self._process_alone(candidate) for candidate in batch)
        if self.metrics is not None:
            self.metrics.observe_batch(time.monotonic() - started)
        return self._account(report)

    def _account(self, report: BatchReport) -> int:
        """Book a report: forget files left in place, note progress or the transient trouble."""
        for path in report.left_in_place:
            self.watcher.forget(path)
        now = self._heartbeat = time.monotonic()
        if report.handled or report.skipped:
            self._last_progress = now
        if report.deferred:
            self._transient_failure(report.unavailable or "transient failure", [])
        elif report.handled:
            self._recovered()
        self.handled += report.handled
        if self.metrics is not None:
            self.metrics.record(report)
        if report.handled:
            self.log.info("batch", done=report.done, failed=report.failed, duplicates=report.duplicates,
                          refiled=report.refiled, skipped=report.skipped, **report.step_milliseconds())
        return report.handled

    def _process_alone(self, candidate: Candidate) -> int:
        """One file of a batch that failed as a whole; after MAX_ATTEMPTS failures alone it is quarantined."""
        try:
            return self._account(self.pipeline.process([candidate]))
        except Exception as exc:  # noqa: BLE001
            if is_transient(exc):
                self._transient_failure(error_summary(exc), [candidate])
                return 0
            return self._failed_alone(candidate, exc)

    def _failed_alone(self, candidate: Candidate, exc: Exception) -> int:
        """Count a failure of `candidate` on its own; quarantine it at MAX_ATTEMPTS."""
        key = (candidate.path, candidate.size, candidate.mtime)
        attempts = self._attempts.get(key, 0) + 1
        self._attempts[key] = attempts
        while len(self._attempts) > MAX_TRACKED_ATTEMPTS:
            self._attempts.pop(next(iter(self._attempts)))
        self.log.warning("file_failed", source=candidate.source_name, attempt=attempts, error=error_summary(exc))
        if attempts < MAX_ATTEMPTS:
            self.watcher.forget(candidate.path)
            return 0
        self._attempts.pop(key, None)
        try:
            self.pipeline.quarantine_poison(candidate, f"failed {attempts} times: {error_summary(exc)}")
        except Exception as again:  # noqa: BLE001 - e.g. the database went away just now
            self.log.error("quarantine_failed", source=candidate.source_name, error=error_summary(again))
            self.watcher.forget(candidate.path)
            return 0
        self._last_progress = time.monotonic()
        self.handled += 1
        if self.metrics is not None:
            self.metrics.record_poison()
        return 1

    def _transient_failure(self, reason: str, batch: list[Candidate]) -> None:
        """Leave `batch` in place and pause with back-off; health and STATUS= say why."""
        self._backoff_delay = self._backoff.failed()
        self._trouble = reason
        self.log.error("transient_failure", error=reason, batch=len(batch), retry_in_s=self._backoff_delay)
        sdnotify.notify(f"STATUS=retrying in {self._backoff_delay:.0f} s: {reason}")
        for candidate in batch:  # offered again after the pause
            self.watcher.forget(candidate.path)

    def _recovered(self) -> None:
        if self._trouble is not None:
            self.log.info("recovered", after=self._trouble)
            sdnotify.notify(f"STATUS=watching {self.settings.drop_dir}")
        self._trouble = None
        self._backoff.succeeded()

    def _short_of_space(self) -> bool:
        """A volume written to is below [paths] min_free_mb: say so when that starts and ends (log, STATUS=)."""
        short = diskspace.shortage(diskspace.written_folders(self.settings), self.settings.paths.min_free_mb)
        if short is not None:
            short += "; files wait in the drop folder until space is freed"
        before, self._space_short = self._space_short, short  # the MiB in the text change; the state is what counts
        if short is not None and before is None:
            self.log.error("disk_space_low", error=short)
            sdnotify.notify(f"STATUS=paused: {short}")
        elif short is None and before is not None:
            self.log.info("disk_space_recovered", after=before)
            sdnotify.notify(f"STATUS=watching {self.settings.drop_dir}")
        return short is not None

    def _beat(self) -> None:
        """The loop is alive (also called while hashing a large file)."""
        self._heartbeat = time.monotonic()

    def _next_batch(self) -> list[Candidate]:
        """Up to batch_size ready files, waiting at most batch_wait_seconds for a batch to fill."""
        size = self.settings.models.batch_size
        if len(self._backlog) < size:
            self._backlog += self.watcher.ready_files(limit=MAX_BACKLOG - len(self._backlog))  # the rest stay ready
            deadline = time.monotonic() + self.settings.watch.batch_wait_seconds
            while self._backlog and len(self._backlog) < size and not self._stop.is_set():
                if time.monotonic() >= deadline:
                    break
                time.sleep(min(0.05, self.settings.watch.batch_wait_seconds))
                self._backlog += self.watcher.ready_files(limit=MAX_BACKLOG - len(self._backlog))
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
                released = claims.release_stale_claims(session, STALE_CLAIM_SECONDS)
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
        """Watcher thread alive, loop ticked within max_loop_age seconds, database answers, files move.

        "moving": within max_loop_age seconds files were handled or none were waiting; a service
        that keeps failing on what is there (database refusing writes, models unavailable) is not.
        """
        now = time.monotonic()
        return {
            "watcher": self.watcher is not None and self.watcher.healthy(),
            "loop": now - self._heartbeat < max_loop_age,
            "database": database_answers(self.engine),
            "moving": self._trouble is None or now - self._last_progress < max_loop_age,
        }

    def _watchdog(self, interval: float) -> None:
        watchdog_loop(self._stop, interval, lambda age: self.healthy(max_loop_age=age), lambda: self._trouble, self.log)


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

