"""One batch's items and report, and its first stage: hash, claim and decode each file.

A file gets no claim when it is refused (symlinks, hard links), too large or unreadable; a
claimed file is decoded. See ``daemon.pipeline`` for the stages and the crash points.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from stainbridge.daemon import intake
from stainbridge.daemon.config import ConfigError
from stainbridge.daemon.failures import error_summary, is_transient, storable_text
from stainbridge.daemon.logs import get_logger
from stainbridge.daemon.store import Image, ImageStatus
from stainbridge.daemon.watcher import Candidate

if TYPE_CHECKING:
    from stainbridge.daemon.pipeline import Pipeline

log = get_logger(__name__)


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


@dataclass
class Item:
    candidate: Candidate
    sha256: str | None = None
    image_id: int | None = None
    decoded: intake.DecodedImage | None = None
    reason: str | None = None  # failure reason code
    detail: str = ""
    seconds: float = 0.0  # decode time
    result: Any = None  # BatchResult
    target: ImageStatus | None = None  # status to file by (done -> archive, failed -> quarantine)
    deferred: str | None = None  # a transient failure: release the claim, leave the file in place
    created_row: bool = False  # this batch created the (unclaimed, failed) row of a refused entry


class _Vanished(Exception):
    """The file left the drop folder between its hash and its claim."""


def _still_there(path: Path, hashed: os.stat_result) -> bool:
    """The same file (inode, size, mtime) is still at `path`."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return (st.st_ino, st.st_size, st.st_mtime_ns) == (hashed.st_ino, hashed.st_size, hashed.st_mtime_ns)


def take_in(p: Pipeline, candidate: Candidate, report: BatchReport) -> Item | None:
    """Hash, claim and decode one file; None when it is not this worker's to handle now."""
    item = Item(candidate)
    bound = log.bind(source=candidate.source_name)
    if candidate.refusal:
        item.reason, item.detail = candidate.refusal, f"{candidate.source_name}: {candidate.detail}"
        return item
    try:
        st = os.lstat(candidate.path)
        if st.st_size > p.max_bytes:  # before hashing: a huge file on a slow share is never read
            item.reason = "too_large"
            item.detail = (f"{candidate.source_name} is {st.st_size / 2**20:.1f} MiB, over the "
                           f"{p.max_bytes / 2**20:.1f} MiB limit ([watch] max_file_mb)")
            return item
        item.sha256 = intake.sha256_file(candidate.path, on_chunk=p.heartbeat)
        st = os.lstat(candidate.path)
    except intake.IntakeError as exc:
        if exc.reason == "missing":  # filed by another worker, or deleted: nothing to record
            report.skipped += 1
            return None
        item.reason, item.detail = exc.reason, str(exc)
        return item
    except FileNotFoundError:
        report.skipped += 1
        return None
    except OSError as exc:  # EIO, ESTALE on a network share: this file, not the service
        item.reason = "unreadable"
        item.detail = f"{candidate.source_name} cannot be read ({exc.strerror or exc}); drop it again"
        return item
    if st.st_size != candidate.size or abs(st.st_mtime - candidate.mtime) > 1e-3:
        bound.info("changed_while_reading")  # still being written: the watcher offers it again
        report.skipped += 1
        return None
    bound = bound.bind(image=item.sha256[:12])
    try:
        with p.sessions.begin() as session:
            previous = unfiled_twin(session, item.sha256, candidate.source_name, ImageStatus.duplicate)
            if previous is not None:
                item.image_id, item.target = previous.id, ImageStatus.duplicate
                report.refiled += 1
                return item
            claimed = intake.claim(session, sha256=item.sha256, source_name=candidate.source_name,
                                   site=p.settings.site.name, size_bytes=st.st_size)
            if claimed.outcome is intake.ClaimOutcome.duplicate and not _still_there(candidate.path, st):
                raise _Vanished  # another worker filed this very file after we hashed it: no duplicate row
    except _Vanished:
        bound.info("filed_elsewhere")
        report.skipped += 1
        return None
    except SQLAlchemyError as exc:
        if is_transient(exc):
            raise
        bound.warning("claim_refused", error=error_summary(exc))  # e.g. a value the database rejects
        item.reason, item.detail = "unrecordable", f"the database refused this file: {error_summary(exc)}"
        return item
    outcome = claimed.outcome
    item.image_id = claimed.image_id
    if outcome is intake.ClaimOutcome.in_progress:
        bound.info("in_progress_elsewhere")
        report.skipped += 1
        report.left_in_place.append(candidate.path)
        return None
    if outcome is intake.ClaimOutcome.duplicate:
        bound.info("duplicate", duplicate_of=claimed.duplicate_of_id)
        report.duplicates += 1
        item.target = ImageStatus.duplicate
        return item
    if outcome is intake.ClaimOutcome.unfiled:
        bound.info("already_recorded", status=claimed.original_status.value)
        report.refiled += 1
        report.refiled_failed += claimed.original_status is ImageStatus.failed
        item.target = claimed.original_status
        return item
    started = time.perf_counter()
    try:
        item.decoded = intake.decode_image(candidate.path, max_pixels=p.settings.watch.max_pixels,
                                           max_bytes=p.max_bytes,
                                           pseudonym_secret=p.settings.site.pseudonym_secret)
    except intake.IntakeError as exc:
        if exc.reason == "missing":  # deleted between the hash and the decode: forget the claim
            item.deferred = "vanished"
        item.reason, item.detail = exc.reason, storable_text(str(exc), 1000)
    except ConfigError as exc:  # e.g. a patient ID but no pseudonym secret: fix the settings, then it runs
        bound.error("configuration_missing", error=str(exc))
        item.deferred = f"configuration: {exc}"
    except Exception as exc:  # noqa: BLE001 - a decoder bug must not stop the other files
        bound.error("decode_crashed", error_type=type(exc).__name__)  # no text: it may quote the file
        item.reason, item.detail = "decode_error", f"the decoder failed ({type(exc).__name__})"
    item.seconds = time.perf_counter() - started
    return item

def unfiled_twin(session: Session, sha256: str | None, source_name: str, status: ImageStatus) -> Image | None:
    """A row this very file already produced before a crash, whose file was never filed."""
    sha_match = Image.sha256.is_(None) if sha256 is None else Image.sha256 == sha256
    return session.scalars(
        select(Image).where(sha_match, Image.source_name == source_name, Image.status == status,
                            Image.archive_path.is_(None)).order_by(Image.id).limit(1)
    ).first()
