"""One batch's items and report, and the per-file work that runs in the pipeline's thread pool.

`open_and_hash` opens a file once (never following a link), hashes it and keeps it open: the
same inode is decoded (`decode_item`) and, later, moved. A file gets no claim when it is refused
(symlinks, hard links), too large or unreadable. `PixelBudget` bounds the decoded pixels held
at once. See ``pipeline.runner`` for the stages and the crash points.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from stainbridge.daemon.config import ConfigError
from stainbridge.daemon.intake import decoding, errors, reading
from stainbridge.daemon.intake.failures import storable_text
from stainbridge.daemon.intake.walking import Candidate
from stainbridge.daemon.logs import get_logger
from stainbridge.daemon.store import ImageStatus

log = get_logger(__name__)

# The steps of one batch, in order, as `BatchReport.step_seconds` names them: open + hash (thread pool),
# the claim transaction(s), decode overlapped with inference, the results transaction (with its log
# lines), filing (moves, folder fsyncs, the archive_path transaction). `inference` is the part of
# `decode_and_inference` spent in the networks.
STEPS = ("hash", "claim", "decode_and_inference", "inference", "record", "file")


@dataclass
class BatchReport:
    """What one call of `process` did; `handled` is what the service loop counts."""

    done: int = 0
    failed: int = 0
    duplicates: int = 0
    refiled: int = 0  # recorded before, filed (or acknowledged) now
    refiled_failed: int = 0  # of those, how many had failed
    skipped: int = 0  # changed while being read, or being processed by another live worker
    deferred: int = 0  # left in place for a transient reason (models unavailable, configuration)
    unavailable: str | None = None  # that reason, for the service's health and back-off
    failures: dict[str, int] = field(default_factory=dict)
    left_in_place: list[Path] = field(default_factory=list)  # to be offered again later
    # per step of `Pipeline.process` (STEPS), logged with the batch: wall seconds, and the process's CPU
    # seconds (all threads) meanwhile: where the service's time and its CPU go
    step_seconds: dict[str, float] = field(default_factory=dict)
    step_cpu_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def handled(self) -> int:
        return self.done + self.failed + self.duplicates + self.refiled

    def add(self, other: BatchReport) -> None:
        for name in ("done", "failed", "duplicates", "refiled", "refiled_failed", "skipped", "deferred"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for reason, n in other.failures.items():
            self.failures[reason] = self.failures.get(reason, 0) + n
        self.left_in_place += other.left_in_place
        self.unavailable = self.unavailable or other.unavailable
        for mine, theirs in ((self.step_seconds, other.step_seconds), (self.step_cpu_seconds, other.step_cpu_seconds)):
            for step, seconds in theirs.items():
                mine[step] = mine.get(step, 0.0) + seconds

    def step_milliseconds(self) -> dict[str, dict[str, float]]:
        """The step times for the batch's log line: ``steps_ms`` (wall) and ``steps_cpu_ms``."""
        return {key: {step: round(1000 * seconds, 2) for step, seconds in times.items()}
                for key, times in (("steps_ms", self.step_seconds), ("steps_cpu_ms", self.step_cpu_seconds))}

    @contextmanager
    def timing(self, step: str) -> Iterator[None]:
        """Add the block's wall time to `step_seconds[step]` and the process's CPU time meanwhile to
        `step_cpu_seconds[step]` (also when it raises)."""
        started, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.step_seconds[step] = self.step_seconds.get(step, 0.0) + time.perf_counter() - started
            self.step_cpu_seconds[step] = self.step_cpu_seconds.get(step, 0.0) + time.process_time() - cpu


@dataclass
class Item:
    candidate: Candidate
    sha256: str | None = None
    image_id: int | None = None
    decoded: decoding.DecodedImage | None = None
    reason: str | None = None  # failure reason code
    detail: str = ""
    seconds: float = 0.0  # decode time
    result: Any = None  # BatchResult
    target: ImageStatus | None = None  # status to file by (done -> archive, failed -> quarantine)
    deferred: str | None = None  # a transient failure: release the claim, leave the file in place
    created_row: bool = False  # this batch created the (unclaimed, failed) row of a refused entry
    handle: BinaryIO | None = None  # the one open file: hashed, decoded, checked before the move
    dir_fd: int | None = None  # its folder, reached without following links: the move starts there
    opened: os.stat_result | None = None  # its fstat once hashed
    skip: str | None = None  # not this worker's to handle now (vanished, changed while read)
    pixels: int = 0  # held in the batch's PixelBudget while decoded

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None
        if self.dir_fd is not None:
            os.close(self.dir_fd)
            self.dir_fd = None


class PixelBudget:
    """Decoded pixels held at once by a batch: `reserve` waits while the cap would be passed
    (one image alone is always let through: `[watch] max_pixels` bounds it)."""

    def __init__(self, cap: int) -> None:
        self.cap, self.used, self.waiting = cap, 0, 0
        self.closed = False
        self._cond = threading.Condition()

    def reserve(self, pixels: int) -> None:
        with self._cond:
            self.waiting += 1
            try:
                while self.used and self.used + pixels > self.cap and not self.closed:
                    self._cond.wait()
            finally:
                self.waiting -= 1
            if self.closed:
                raise RuntimeError("the batch was abandoned")  # its decoders must not wait forever
            self.used += pixels

    def close(self) -> None:
        """Abandon the batch: every waiting and later `reserve` returns at once (with an error)."""
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def release(self, pixels: int) -> None:
        with self._cond:
            self.used -= pixels
            self._cond.notify_all()


def open_and_hash(item: Item, *, max_bytes: int, heartbeat: Callable[[], None], root: Path | None) -> None:
    """Open the candidate once, fstat and hash it, keep it open; or say why it is refused or skipped.

    Every folder below `root` (the drop folder) is opened without following links, so a sub-folder
    swapped for a link is refused, never read through. Runs in a worker thread: it only fills
    `item` (the caller counts)."""
    candidate = item.candidate
    try:
        if candidate.refusal:  # filed as it is (a link is moved as a link), from its real folder
            item.reason, item.detail = candidate.refusal, f"{candidate.source_name}: {candidate.detail}"
            item.dir_fd = reading.open_folder(Path(candidate.path).parent, root)
            return
        st = os.lstat(candidate.path)
        if st.st_size > max_bytes:  # before hashing: a huge file on a slow share is never read
            item.reason = "too_large"
            item.detail = (f"{candidate.source_name} is {st.st_size / 2**20:.1f} MiB, over the "
                           f"{max_bytes / 2**20:.1f} MiB limit ([watch] max_file_mb)")
            item.dir_fd = reading.open_folder(Path(candidate.path).parent, root)
            return
        item.handle, item.dir_fd = reading.open_beneath(candidate.path, root)
        item.sha256 = reading.sha256_open(item.handle, on_chunk=heartbeat)
        st = item.opened = os.fstat(item.handle.fileno())
    except errors.IntakeError as exc:
        item.close()
        if exc.reason in ("missing", "linked_folder"):  # filed elsewhere, deleted, or not ours to touch
            item.skip, item.reason = exc.reason, None
            if exc.reason == "linked_folder":
                log.warning("linked_folder_refused", source=candidate.source_name)
            return
        item.reason, item.detail = exc.reason, str(exc)
        return
    except FileNotFoundError:
        item.close()
        item.skip = "missing"
        return
    except OSError as exc:  # EIO, ESTALE on a network share: this file, not the service
        item.close()
        item.reason = "unreadable"
        item.detail = f"{candidate.source_name} cannot be read ({exc.strerror or exc}); drop it again"
        return
    if st.st_size != candidate.size or abs(st.st_mtime - candidate.mtime) > 1e-3:
        item.close()  # still being written, or replaced since it was seen: the watcher offers it again
        item.sha256, item.skip = None, "changed"


def decode_item(item: Item, *, max_pixels: int, max_bytes: int, pseudonym_secret: str, budget: PixelBudget) -> None:
    """Decode the claimed file from its open handle; reserve its pixels in `budget` (worker thread)."""
    bound = log.bind(source=item.candidate.source_name, image=(item.sha256 or "-")[:12])
    started = time.perf_counter()

    def reserve(pixels: int) -> None:
        budget.reserve(pixels)
        item.pixels += pixels

    try:
        item.decoded = decoding.decode_open(item.handle, Path(item.candidate.path).name, max_pixels=max_pixels,
                                          max_bytes=max_bytes, pseudonym_secret=pseudonym_secret, reserve=reserve)
        if not item.pixels:  # DICOM: counted once decoded
            reserve(item.decoded.width * item.decoded.height)
    except errors.IntakeError as exc:
        item.reason, item.detail = exc.reason, storable_text(str(exc), 1000)
    except ConfigError as exc:  # e.g. a patient ID but no pseudonym secret: fix the settings, then it runs
        bound.error("configuration_missing", error=str(exc))
        item.deferred = f"configuration: {exc}"
    except Exception as exc:  # noqa: BLE001 - a decoder bug must not stop the other files
        bound.error("decode_crashed", error_type=type(exc).__name__)  # no text: it may quote the file
        item.reason, item.detail = "decode_error", f"the decoder failed ({type(exc).__name__})"
    if item.decoded is None and item.pixels:
        budget.release(item.pixels)
        item.pixels = 0
    item.seconds = time.perf_counter() - started
