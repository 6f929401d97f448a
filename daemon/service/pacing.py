"""How `stainbridge run` paces itself while work does not go through: back-off, "moving", batch size.

A transient failure (``intake.failures.is_transient``; files left in place by a batch for such a
reason; files that could not be filed) sets the *trouble*: ``STATUS=`` says why, the loop pauses
with a growing back-off, and health's ``moving`` turns false once files have waited longer than
the watchdog interval. Work that goes through clears it, and so does an idle loop once none of
the files it was waiting on is left in the drop folder and the database answers (a file taken by
another worker while the database was down must not leave a healthy, idle worker unhealthy until
the watchdog kills it). Memory running out halves the batch, down to one file; batches grow back
after work goes through. `attempt_alone` counts the failures of a file on its own, for the caller
to give up on it (quarantine) after ``MAX_ATTEMPTS``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from structlog.stdlib import BoundLogger

from stainbridge.daemon.intake.failures import MAX_ATTEMPTS, Backoff
from stainbridge.daemon.intake.walking import Candidate
from stainbridge.daemon.service import sdnotify

MAX_TRACKED_ATTEMPTS = 10_000  # files remembered with failed attempts (oldest forgotten first)
MAX_WAITED_ON = 10_000  # files left in place by the trouble, remembered to know when none is left


class Pacing:
    """The trouble being waited out, the back-off, the last progress and the current batch size."""

    def __init__(self, batch_size: int, watching: str, log: BoundLogger) -> None:
        self.full_batch = self.batch_size = batch_size
        self.watching = watching  # the STATUS= text of a service at work
        self.log = log
        self.trouble: str | None = None
        self.delay = 0.0
        self.last_progress = time.monotonic()  # files moved, or nothing was waiting
        self._backoff = Backoff()
        self._waited_on: set[Path] = set()
        self._attempts: dict[tuple[Path, int, float], int] = {}

    def failed(self, reason: str, left_in_place: list[Path] | tuple[()] = ()) -> None:
        """A transient failure: pause with back-off and say why; memory short: smaller batches."""
        self.delay = self._backoff.failed()
        self.trouble = reason
        if len(self._waited_on) < MAX_WAITED_ON:
            self._waited_on.update(left_in_place)
        if reason.startswith(("memory", "MemoryError")) and self.batch_size > 1:
            self.batch_size = max(1, self.batch_size // 2)
            self.log.warning("batch_size_reduced", batch_size=self.batch_size, reason=reason)
        self.log.error("transient_failure", error=reason, retry_in_s=self.delay, batch_size=self.batch_size)
        sdnotify.notify(f"STATUS=retrying in {self.delay:.0f} s: {reason}")

    def went_through(self) -> None:
        """Files went through: the trouble (if any) is over, batches grow back."""
        self.last_progress = time.monotonic()
        if self.trouble is not None:
            self.log.info("recovered", after=self.trouble)
            sdnotify.notify(f"STATUS={self.watching}")
        self.trouble = None
        self._waited_on.clear()
        self._backoff.succeeded()
        self.batch_size = min(self.full_batch, self.batch_size * 2)

    def progressed(self) -> None:
        """Nothing is stuck now (files moved, nothing is waiting, or waiting on purpose)."""
        self.last_progress = time.monotonic()

    def idle(self, database_answers: bool) -> None:
        """Nothing ready to take: clear the trouble once none of its files is left and the database answers."""
        if any(os.path.lexists(path) for path in self._waited_on):
            return
        self.progressed()
        if self.trouble is not None and database_answers:
            self.went_through()

    def moving(self, max_age: float) -> bool:
        return self.trouble is None or time.monotonic() - self.last_progress < max_age

    @property
    def failures(self) -> int:
        """Transient failures in a row (the back-off's count)."""
        return self._backoff.failures

    @property
    def pause(self) -> float:
        """How long an idle loop waits before it looks again (the back-off while in trouble)."""
        return self.delay if self.trouble is not None else 0.0

    def attempt_alone(self, candidate: Candidate) -> int:
        """Count one more failure of `candidate` on its own; returns the count (reset at MAX_ATTEMPTS)."""
        key = (candidate.path, candidate.size, candidate.mtime)
        attempts = self._attempts.get(key, 0) + 1
        self._attempts[key] = attempts
        while len(self._attempts) > MAX_TRACKED_ATTEMPTS:
            self._attempts.pop(next(iter(self._attempts)))
        if attempts >= MAX_ATTEMPTS:
            self._attempts.pop(key, None)
        return attempts
