"""`stainbridge run`: the long-running worker that systemd supervises (Type=notify).

Start-up, in order: settings (by the caller), logging (by the CLI), the database (migrations on
SQLite; on PostgreSQL the schema must already be at head), the models (loaded, verified and
recorded with their sha256 in ``model_versions``), claims left by a crashed run released, the
drop-folder watcher started (it scans what is already there), the heartbeat started (``service.heartbeat``: the
``workers`` row `stainbridge status` reads; ``stopped`` at a clean exit), then ``READY=1``. The database
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
models, configuration, memory) leaves the files in place, releases their claims and pauses with a
growing back-off while ``STATUS=`` says why (``service.pacing``); so does a file that cannot be
filed (a read-only drop folder, an archive share that went away). Any other error is retried with
each file alone, and a file that fails alone ``MAX_ATTEMPTS`` times is quarantined with its
reason. At start-up an unreachable database is waited for, with back-off and ``STATUS=``, instead
of exiting; the configured folders must exist, be prepared by `stainbridge init` and be writable.

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
from datetime import datetime
from types import FrameType

from sqlalchemy.engine import Engine

from stainbridge.daemon import folders
from stainbridge.daemon.config import ConfigError, Settings, load_settings
from stainbridge.daemon.intake import claims
from stainbridge.daemon.intake.failures import error_summary
from stainbridge.daemon.intake.watcher import Candidate, DropFolderWatcher
from stainbridge.daemon.lab.metrics import ServiceMetrics, start_metrics
from stainbridge.daemon.logs import get_logger
from stainbridge.daemon.pipeline.runner import Pipeline, use_all_cores
from stainbridge.daemon.retraining.runs import recover_runs
from stainbridge.daemon.retraining.scheduler import RetrainingScheduler
from stainbridge.daemon.retraining.validation import SampleChooser
from stainbridge.daemon.schema import safe_url
from stainbridge.daemon.service import sdnotify
from stainbridge.daemon.service.health import database_answers, watchdog_loop
from stainbridge.daemon.service.heartbeat import Heartbeat
from stainbridge.daemon.service.pacing import Pacing
from stainbridge.daemon.service.startup import (
    STARTUP_BACKOFF_MAX_SECONDS,
    StartupError,
    StoppedDuringStartup,
    connect_and_load,
    startup_errors,
)
from stainbridge.daemon.service.tick import DRIFT_CHECK_SECONDS, MAX_BACKLOG, Tick

__all__ = [  # start-up's names stay importable from here
    "IDLE_SECONDS", "MAX_BACKLOG", "STARTUP_BACKOFF_MAX_SECONDS", "Service", "StartupError",
    "StoppedDuringStartup", "add_arguments", "run",
]

log = get_logger(__name__)

IDLE_SECONDS = 0.25  # how often an idle loop asks the watcher for ready files


class Service(Tick):
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
        self._last_drift_check = -DRIFT_CHECK_SECONDS  # the first batch looks at once
        self._drift_said: set[tuple[str, str]] = set()  # (site, week) alerts already logged
        self.pace = Pacing(settings.models.batch_size, f"watching {settings.drop_dir}", self.log)
        self._space_short: str | None = None  # why no files are taken (a volume below [paths] min_free_mb)
        self.handled = 0
        self.scheduler: RetrainingScheduler | None = None
        self.samples: SampleChooser | None = None  # new sites' validation samples (docs/sites.md)
        self.metrics: ServiceMetrics | None = None  # [metrics] port
        self.last_processed_at: datetime | None = None  # when a file last went through (the heartbeat says it)
        self.heartbeat: Heartbeat | None = None  # the `workers` row `stainbridge status` reads

    # lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Everything before READY=1; raises StartupError with a one-line reason."""
        s = self.settings
        with startup_errors(s):
            wrong = folders.problems(s)  # before the database: on SQLite it lives in one of them
            if wrong:
                raise StartupError("; ".join(wrong))
            self.engine, sessions, models = connect_and_load(s, self._stop, self.log)
            self.pipeline = Pipeline(s, sessions, models)
            use_all_cores()
            self.pipeline.warm_up()
            self.pipeline.heartbeat = self._beat
            self.pipeline.recover(startup=True)
            self.samples = SampleChooser(s, sessions, models)
            self.watcher = DropFolderWatcher(s)
            self.watcher.start()  # includes the start-up scan
            self.metrics = start_metrics(s, sessions, self.watcher.waiting)
            self.heartbeat = Heartbeat(sessions, claims.worker_id(), self.state, lambda: self.handled,
                                       lambda: self.last_processed_at, self.log,
                                       on_beat=self.metrics.set_state if self.metrics else None)
            self.heartbeat.forget_gone()
            self.heartbeat.start()
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
                    gone = self.watcher.root_missing
                    self.log.error("drop_folder_missing" if gone else "watcher_died", drop=str(self.settings.drop_dir))
                    print(f"stainbridge run: the drop folder {self.settings.drop_dir} is gone" if gone else
                          "stainbridge run: the drop-folder watcher thread died", "; exiting to be restarted",
                          sep="", file=sys.stderr)
                    return 2
                try:
                    handled = self.run_once()
                except Exception as exc:  # the last guard: the loop never dies of one error
                    self.log.exception("loop_error", error=error_summary(exc))
                    handled = 0
                    self._transient_failure(error_summary(exc), [])
                if handled == 0:
                    self._stop.wait(self.pace.pause or IDLE_SECONDS)
            self.log.info("stopped", handled=self.handled)
            return 0
        finally:
            self._stop.set()
            if self.scheduler is not None:
                self.scheduler.shutdown()
            if self.heartbeat is not None:
                self.heartbeat.stop()  # "stopped": `status` says so at once
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

    # retraining: the nightly job -----------------------------------------------------------------

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
            "moving": self.pace.moving(max_loop_age),
        }

    def state(self) -> tuple[str, str | None]:
        """What the heartbeat says: paused (disk space), retrying (a transient failure), unhealthy (a check
        fails) or ready, and why."""
        if self._space_short is not None:
            return "paused", self._space_short
        if self.pace.trouble is not None:
            return "retrying", f"retrying in {self.pace.pause:.0f} s: {self.pace.trouble}"
        failing = [name for name, ok in self.healthy().items() if not ok]
        if failing:
            return "unhealthy", "failing: " + ", ".join(failing)
        return "ready", None

    def _watchdog(self, interval: float) -> None:
        watchdog_loop(self._stop, interval, lambda age: self.healthy(max_loop_age=age), lambda: self.pace.trouble,
                      self.log)


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

