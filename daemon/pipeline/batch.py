"""One batch's items and report, and the per-file work that runs in the pipeline's thread pool.

`open_and_hash` opens a file once (never following a link) and reads it once: the bytes it
hashed are the bytes `decode_item` decodes, and the bytes filed if the file is rewritten before
its move. A file gets no claim when it is refused (symlinks, hard links), too large or
unreadable. `PixelBudget` bounds the decoded pixels held at once, `byte_batches` the bytes. See
``pipeline.runner`` for the stages and the crash points.
"""

from __future__ import annotations

import io
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stainbridge.daemon.config import ConfigError
from stainbridge.daemon.intake import decoding, errors, reading
from stainbridge.daemon.intake.failures import storable_text
from stainbridge.daemon.intake.walking import Candidate
from stainbridge.daemon.logs import get_logger
from stainbridge.daemon.store import ImageStatus
from stainbridge.models.inference import stain_summary

log = get_logger(__name__)

MEMORY_SHORT = "memory: not enough memory to read or decode this file now"
BATCH_BYTES = 256 * 2**20  # file bytes one batch holds in memory at once (a larger file goes alone)


def byte_batches(candidates: Sequence[Candidate], cap: int = BATCH_BYTES) -> Iterator[list[Candidate]]:
    """`candidates` in order, in runs whose sizes add up to at most `cap` (at least one file each)."""
    run: list[Candidate] = []
    total = 0
    for candidate in candidates:
        if run and total + candidate.size > cap:
            yield run
            run, total = [], 0
        run.append(candidate)
        total += candidate.size
    if run:
        yield run
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
    unfiled: int = 0  # recorded, but could not be moved out of the drop folder (they stay, to be filed later)
    filing_error: str | None = None  # why, for the service's health and back-off
    failures: dict[str, int] = field(default_factory=dict)
    left_in_place: list[Path] = field(default_factory=list)  # to be offered again later
    # each classified cell: (label, calibrated confidence or else the plain one, flagged for review), for metrics
    predictions: list[tuple[str, float, bool]] = field(default_factory=list)
    # per step of `Pipeline.process` (STEPS), logged with the batch: wall seconds, and the process's CPU
    # seconds (all threads) meanwhile: where the service's time and its CPU go
    step_seconds: dict[str, float] = field(default_factory=dict)
    step_cpu_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def handled(self) -> int:
        return self.done + self.failed + self.duplicates + self.refiled

    def add(self, other: BatchReport) -> None:
        for name in ("done", "failed", "duplicates", "refiled", "refiled_failed", "skipped", "deferred", "unfiled"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for reason, n in other.failures.items():
            self.failures[reason] = self.failures.get(reason, 0) + n
        self.left_in_place += other.left_in_place
        self.predictions += other.predictions
        self.unavailable = self.unavailable or other.unavailable
        self.filing_error = self.filing_error or other.filing_error
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
    site: str = ""  # by the file's name, then (``[site] source = "institution"``) by its DICOM tag once decoded
    specimen: str | None = None  # its slide / sample once decoded (``intake.specimens``)
    models: Any = None  # the site's LoadedModels that classified it
    sha256: str | None = None
    image_id: int | None = None
    decoded: decoding.DecodedImage | None = None
    reason: str | None = None  # failure reason code
    detail: str = ""
    seconds: float = 0.0  # decode time
    result: Any = None  # BatchResult
    shadow: Any = None  # (candidate version id, BatchResult) when its site's shadowed candidate also scored it
    target: ImageStatus | None = None  # status to file by (done -> archive, failed -> quarantine)
    deferred: str | None = None  # a transient failure: release the claim, leave the file in place
    created_row: bool = False  # this batch created the (unclaimed, failed) row of a refused entry
    data: bytes | None = None  # the file as it was read once: hashed, decoded, filed if it changed since
    dir_fd: int | None = None  # its folder, reached without following links: the move starts there
    opened: os.stat_result | None = None  # its fstat once read
    skip: str | None = None  # not this worker's to handle now (vanished, changed while read)
    pixels: int = 0  # held in the batch's PixelBudget while decoded
    stain: dict[str, tuple[float, float, float]] = field(default_factory=dict)  # of the received image, once decoded

    def close(self) -> None:
        self.data = None
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
    """Open the candidate once and read it once (its bytes, sha256 and fstat, its folder kept open);
    or say why it is refused or skipped. A file that changed while it was read is skipped.

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
        handle, item.dir_fd = reading.open_beneath(candidate.path, root)
        with handle:
            before = os.fstat(handle.fileno())
            item.data, item.sha256 = reading.read_and_hash(handle, on_chunk=heartbeat)
            st = item.opened = os.fstat(handle.fileno())
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
    except MemoryError:  # not the file's fault: it stays in place, to be read again in a smaller batch
        item.close()
        item.sha256, item.skip, item.deferred = None, "memory", MEMORY_SHORT
        return
    except OSError as exc:  # EIO, ESTALE on a network share: this file, not the service
        item.close()
        item.reason = "unreadable"
        item.detail = f"{candidate.source_name} cannot be read ({exc.strerror or exc}); drop it again"
        return
    if (not reading.same_version(before, st) or len(item.data) != st.st_size or st.st_size != candidate.size
            or abs(st.st_mtime - candidate.mtime) > 1e-3):
        item.close()  # still being written, or replaced since it was seen: the watcher offers it again
        item.sha256, item.skip = None, "changed"


def decode_item(item: Item, *, max_pixels: int, max_bytes: int, pseudonym_secret: str, budget: PixelBudget) -> None:
    """Decode the claimed file from the bytes that were hashed; reserve its pixels in `budget` (worker thread)."""
    bound = log.bind(source=item.candidate.source_name, image=(item.sha256 or "-")[:12])
    started = time.perf_counter()

    def reserve(pixels: int) -> None:
        budget.reserve(pixels)
        item.pixels += pixels

    try:
        item.decoded = decoding.decode_open(io.BytesIO(item.data), Path(item.candidate.path).name,
                                            max_pixels=max_pixels, max_bytes=max_bytes,
                                            pseudonym_secret=pseudonym_secret, reserve=reserve)
        if not item.pixels:  # DICOM: counted once decoded
            reserve(item.decoded.width * item.decoded.height)
    except errors.IntakeError as exc:
        item.reason, item.detail = exc.reason, storable_text(str(exc), 1000)
    except MemoryError:  # not the file's fault: released, tried again in a smaller batch, then alone
        bound.error("decode_out_of_memory")
        item.deferred = MEMORY_SHORT
    except ConfigError as exc:  # e.g. a patient ID but no pseudonym secret: fix the settings, then it runs
        bound.error("configuration_missing", error=str(exc))
        item.deferred = f"configuration: {exc}"
    except Exception as exc:  # noqa: BLE001 - a decoder bug must not stop the other files
        bound.error("decode_crashed", error_type=type(exc).__name__)  # no text: it may quote the file
        item.reason, item.detail = "decode_error", f"the decoder failed ({type(exc).__name__})"
    if item.decoded is None and item.pixels:
        budget.release(item.pixels)
        item.pixels = 0
    if item.decoded is not None:
        try:  # the stain as received, for drift (docs/lab.md): a few milliseconds on a reduced copy
            item.stain = stain_summary(item.decoded.image)
        except Exception as exc:  # noqa: BLE001 - a measurement for drift must never fail the cell itself
            bound.error("stain_summary_failed", error_type=type(exc).__name__)
    item.seconds = time.perf_counter() - started
