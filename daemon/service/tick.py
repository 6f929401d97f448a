"""One step of `stainbridge run`'s loop: take a micro-batch of ready files, book what happened.

``Tick.run_once`` is what the service loop repeats and what tests drive: it frees claims of dead
workers now and then, swaps in each site's newly promoted models between batches, chooses new
sites' validation samples, waits while a volume is below ``[paths] min_free_mb``, takes up to a
batch of ready files through the pipeline and books the report (``service.pacing`` decides the pause and the health after failures). A batch that
fails as a whole is retried file by file; a file that fails alone ``MAX_ATTEMPTS`` times (or runs
out of memory alone that often) is quarantined. ``service.lifecycle.Service`` builds on it.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from structlog.stdlib import BoundLogger

from stainbridge.daemon import diskspace
from stainbridge.daemon.config import Settings
from stainbridge.daemon.intake import claims
from stainbridge.daemon.intake.failures import MAX_ATTEMPTS, error_summary, is_transient
from stainbridge.daemon.intake.watcher import Candidate, DropFolderWatcher
from stainbridge.daemon.lab.drift import DriftAlert, gather_drift
from stainbridge.daemon.lab.metrics import ServiceMetrics
from stainbridge.daemon.pipeline.batch import BatchReport
from stainbridge.daemon.pipeline.runner import STALE_CLAIM_SECONDS, Pipeline
from stainbridge.daemon.retraining.validation import SampleChooser
from stainbridge.daemon.service import sdnotify
from stainbridge.daemon.service.health import database_answers
from stainbridge.daemon.service.pacing import Pacing
from stainbridge.daemon.store import utcnow

MAX_BACKLOG = 1_000  # ready files held in memory between batches
DRIFT_CHECK_SECONDS = 3600.0  # how often the loop looks for drift (docs/lab.md, "Drift per site")


class Tick:
    """``run_once()`` and how its outcomes are booked; the attributes are set up by ``Service``."""

    settings: Settings
    log: BoundLogger
    engine: Engine | None
    pipeline: Pipeline | None
    watcher: DropFolderWatcher | None
    samples: SampleChooser | None
    metrics: ServiceMetrics | None
    pace: Pacing
    handled: int
    last_processed_at: datetime | None
    _stop: threading.Event
    _backlog: list[Candidate]
    _heartbeat: float
    _last_release: float
    _last_drift_check: float
    _drift_said: set[tuple[str, str]]
    _space_short: str | None

    def run_once(self) -> int:
        """Take one micro-batch of ready files through the pipeline; return how many were handled."""
        assert self.pipeline is not None and self.watcher is not None, "call start() first"
        self._heartbeat = tick = time.monotonic()
        self._release_abandoned_claims()
        self.check_drift()
        self._swap_models()
        if self.samples is not None:
            self.samples.tick()  # new sites' validation samples (docs/sites.md)
        if self._short_of_space():
            self.pace.progressed()  # waiting on purpose, not stuck: no restart by the watchdog
            return 0
        batch = self._next_batch()
        if not batch:
            if not self._backlog:
                self.pace.idle(self.pace.trouble is None or database_answers(self.engine))
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
        went_through = self._account(report)
        if len(batch) == 1 and report.deferred and (report.unavailable or "").startswith("memory"):
            return self._out_of_memory_alone(batch[0], report.unavailable)
        return went_through

    def _account(self, report: BatchReport) -> int:
        """Book a report: forget files left in place, note progress or the trouble; how many went through."""
        for path in report.left_in_place:
            self.watcher.forget(path)
        self._heartbeat = time.monotonic()
        went_through = report.handled - report.unfiled
        if went_through or report.skipped:
            self.pace.progressed()
        if report.deferred:
            self.pace.failed(report.unavailable or "transient failure", report.left_in_place)
        elif report.unfiled:
            self.pace.failed(f"filing: {report.filing_error}", report.left_in_place)
        elif report.handled:
            self.pace.went_through()
        self.handled += went_through
        if went_through:
            self.last_processed_at = utcnow()
        if self.metrics is not None:
            self.metrics.record(report)
        if report.handled:
            self.log.info("batch", done=report.done, failed=report.failed, duplicates=report.duplicates,
                          refiled=report.refiled, skipped=report.skipped, unfiled=report.unfiled,
                          **report.step_milliseconds())
        return went_through

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
        attempts = self.pace.attempt_alone(candidate)
        self.log.warning("file_failed", source=candidate.source_name, attempt=attempts, error=error_summary(exc))
        if attempts < MAX_ATTEMPTS:
            self.watcher.forget(candidate.path)
            return 0
        try:
            self.pipeline.quarantine_poison(candidate, f"failed {attempts} times: {error_summary(exc)}")
        except Exception as again:  # noqa: BLE001 - e.g. the database went away just now
            self.log.error("quarantine_failed", source=candidate.source_name, error=error_summary(again))
            self.watcher.forget(candidate.path)
            return 0
        self.pace.progressed()
        self.handled += 1
        if self.metrics is not None:
            self.metrics.record_poison()
        return 1

    def _out_of_memory_alone(self, candidate: Candidate, reason: str) -> int:
        """A file that ran out of memory on its own: after MAX_ATTEMPTS (each after a back-off), quarantined
        as ``memory`` (``reprocess --status failed`` tries it again, e.g. on a machine with more memory)."""
        attempts = self.pace.attempt_alone(candidate)
        if attempts < MAX_ATTEMPTS:
            return 0
        try:
            self.pipeline.quarantine_poison(candidate, f"ran out of memory {attempts} times on its own; {reason}",
                                            code="memory")
        except Exception as exc:  # noqa: BLE001 - e.g. the database went away just now
            self.log.error("quarantine_failed", source=candidate.source_name, error=error_summary(exc))
            return 0
        self.handled += 1
        if self.metrics is not None:
            self.metrics.record_poison("memory")
        return 1

    def _transient_failure(self, reason: str, batch: list[Candidate]) -> None:
        """Leave `batch` in place and pause with back-off; health and STATUS= say why."""
        self.pace.failed(reason, [candidate.path for candidate in batch])
        for candidate in batch:  # offered again after the pause
            self.watcher.forget(candidate.path)

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

    def check_drift(self) -> list[DriftAlert]:
        """Now and then (DRIFT_CHECK_SECONDS), log each site's new drift alert of its latest week once; returns them."""
        if time.monotonic() - self._last_drift_check < DRIFT_CHECK_SECONDS:
            return []
        self._last_drift_check = time.monotonic()
        try:
            with self.pipeline.sessions() as session:
                drifts = gather_drift(lambda sql: session.execute(text(sql)).all(), self.settings.lab)
        except SQLAlchemyError:
            return []  # run_once reports database errors
        new = [d.latest_alert for d in drifts if d.latest_alert and (d.site, d.latest_alert.week) not in self._drift_said]
        for alert in new:
            self._drift_said.add((alert.site, alert.week))
            self.log.warning("drift_alert", site=alert.site, week=alert.week, reasons=alert.reasons)
        return new

    def _beat(self) -> None:
        """The loop is alive (also called while hashing a large file)."""
        self._heartbeat = time.monotonic()

    def _next_batch(self) -> list[Candidate]:
        """Up to batch_size ready files, waiting at most batch_wait_seconds for a batch to fill."""
        size = self.pace.batch_size  # [models] batch_size, smaller while memory runs short
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

    def _swap_models(self) -> None:
        """At a batch boundary: switch each site to its newly promoted registry versions (verified, or refused)."""
        try:
            self.pipeline.models.check()
        except SQLAlchemyError:
            return  # run_once reports database errors
