"""The pipeline: candidates -> claim -> decode -> standardize -> classify -> one commit -> file.

`Pipeline.process(candidates)` handles one micro-batch; the service calls it for files the
watcher found ready, `stainbridge ingest` for files and folders named on the command line.
Inference goes through ``models.inference`` only (geometry normalization, standardizer,
classifier, softmax). Per batch:

1. intake, per file, each in its own short transaction: sha256 -> ``intake.claim`` (committed
   at once, so that other workers see it); refused entries (symlinks, hard links) and files
   that cannot be hashed get no claim. Claimed files are decoded.
2. inference over the decoded images, in one call (one image at a time again if it fails, so
   that one poison image fails alone).
3. ONE transaction writes every prediction (label, confidence, all probabilities, standardizer
   and classifier version ids, latency = the image's decode time plus its share of the batch's
   inference time) and every image status (done / failed with "reason: detail").
4. only after that commit are the files moved: archive/YYYY/MM/DD/ or quarantine/ with a
   ``.error.txt``; a second small transaction records where each file went (``archive_path``).
   Input files are never deleted; `ingest` without ``--move`` leaves them where they are.

Crash points (process killed, power lost, database gone) and what happens next:

- before a claim commits: nothing is recorded; the file is still in the drop folder and the
  start-up scan or the next rescan offers it again.
- after the claim commits, before the results commit: the row stays ``processing`` under
  ``host:pid``. At start-up ``recover()`` releases claims of dead processes on this host (and
  claims older than STALE_CLAIM_SECONDS from any host) to ``pending``; the scan finds the
  file and ``claim`` takes the pending row over: it is classified once, not recorded twice.
  A failed results commit (database error while running) releases this worker's own claims
  before the next batch, for the same effect.
- after the results commit, before the move: the row is ``done`` (or ``failed``) with no
  ``archive_path`` and the file is still in the drop folder. ``claim`` reports it as
  ``unfiled``: the file is moved to the archive (or quarantine) without being classified again
  and without a duplicate row. Its standardized copy (``save_standardized``) is not re-made.
- a duplicate row commits inside ``claim``; a crash before its file is archived leaves the
  same (sha256, source name) duplicate row without ``archive_path``: it is reused, not
  recorded a second time. The same holds for refused entries (sha256 unknown).
- during the move: `daemon.filing` reserves a free name (an empty placeholder) and renames the
  file over it (atomic on one filesystem); across filesystems it copies, fsyncs, then unlinks.
  A crash leaves at worst an empty placeholder or a second copy in the archive, and the
  original in the drop folder, which the next pass files as ``unfiled``: never no copy.
- after the move, before ``archive_path`` commits: the file is filed and the result is
  recorded; only the ``archive_path`` column stays empty (the file is in the dated folder of
  the day it was processed). Nothing is lost or counted twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image as PILImage
from sqlalchemy import delete, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from stainbridge.daemon import filing, intake, registry
from stainbridge.daemon.config import ConfigError, Settings
from stainbridge.daemon.failures import error_summary, is_transient, storable_source_name, storable_text
from stainbridge.daemon.logs import get_logger
from stainbridge.daemon.store import Image, ImageStatus, ModelKind, ModelVersion, Prediction, VersionState, utcnow
from stainbridge.daemon.watcher import Candidate
from stainbridge.models.inference import (
    CheckpointError,
    Classifier,
    DeviceUnavailable,
    ModelMismatch,
    Standardizer,
    load_classifier,
    load_standardizer,
    run_batch,
)

log = get_logger(__name__)

STALE_CLAIM_SECONDS = 3600.0  # a claim older than this (any host) is considered abandoned


class ModelConfigError(Exception):
    """The configured models cannot be loaded; the message says which setting to fix."""


# --- models ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedModels:
    classifier: Classifier
    standardizer: Standardizer
    classifier_version_id: int
    standardizer_version_id: int


def builtin_sha256(header: dict[str, Any]) -> str:
    """Identity of a built-in standardizer (none, reinhard, ...): the hash of its parameters."""
    return hashlib.sha256(json.dumps(header, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def load_models(settings: Settings, sessions: sessionmaker) -> LoadedModels:
    """Load and verify the configured checkpoints; record them (sha256) as the active versions."""
    spec = settings.models.classifier
    if not spec:
        raise ModelConfigError("no classifier configured; set [models] classifier to a checkpoint "
                               "(train one with `stainbridge train classifier`)")
    if not Path(spec).is_file():
        raise ModelConfigError(f"classifier checkpoint {spec} does not exist; fix [models] classifier "
                               "(or STAINBRIDGE_MODELS_CLASSIFIER)")
    std_spec = settings.models.standardizer
    try:
        # A file at a registered path must still be the registered bytes: overwriting the checkpoint
        # in place is refused, not silently taken as a new version.
        with sessions() as session:
            c_expected = _registered_sha256(session, ModelKind.classifier, spec)
            s_expected = _registered_sha256(session, ModelKind.standardizer, std_spec)
        classifier = load_classifier(spec, device=settings.models.device, expected_sha256=c_expected)
        standardizer = load_standardizer(std_spec, device=settings.models.device, classifier=classifier,
                                         expected_sha256=s_expected)
    except (CheckpointError, ModelMismatch, DeviceUnavailable, FileNotFoundError, OSError, ValueError) as exc:
        raise ModelConfigError(f"cannot load the configured models: {exc}") from None
    s_path = std_spec if standardizer.sha256 is None else str(Path(std_spec).resolve())
    s_sha = standardizer.sha256 or builtin_sha256(standardizer.header)
    with sessions.begin() as session:
        # A new configured file becomes active; a known one defers to the registry (promotions stick).
        registry.register_configured(session, ModelKind.classifier, str(Path(spec).resolve()), classifier.sha256,
                                     classifier.header)
        registry.register_configured(session, ModelKind.standardizer, s_path, s_sha, standardizer.header)
        c_active = registry.active_version(session, ModelKind.classifier)
        s_active = registry.active_version(session, ModelKind.standardizer)
    if c_active is None or s_active is None:
        raise ModelConfigError("the registry has no active model to serve; fix [models] or run "
                               "`stainbridge models promote ID`")
    try:
        if c_active.sha256 != classifier.sha256:
            classifier = registry.load_version(c_active, device=settings.models.device)
        if s_active.sha256 != s_sha:
            standardizer = registry.load_version(s_active, device=settings.models.device, classifier=classifier)
    except (registry.RegistryError, ModelMismatch, DeviceUnavailable, OSError, ValueError) as exc:
        raise ModelConfigError(f"cannot load the active registry version: {exc}") from None
    log.info("models_loaded", classifier=classifier.name, classifier_sha256=classifier.sha256[:12],
             standardizer=standardizer.name, standardizer_sha256=s_active.sha256[:12], device=str(classifier.device),
             classifier_version=c_active.id, standardizer_version=s_active.id)
    return LoadedModels(classifier, standardizer, c_active.id, s_active.id)


def _registered_sha256(session: Session, kind: ModelKind, spec: str) -> str | None:
    """The sha256 the registry holds for the active checkpoint of `kind` at `spec`'s path, if any."""
    if not spec or not Path(spec).is_file():
        return None  # built-in standardizers (none, reinhard, ...) have no file
    return session.scalars(
        select(ModelVersion.sha256).where(ModelVersion.kind == kind, ModelVersion.path == str(Path(spec).resolve()),
                                          ModelVersion.state == VersionState.active).limit(1)
    ).first()


# --- one batch ------------------------------------------------------------------------------


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
class _Item:
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


class Pipeline:
    """One code path for the service and `ingest`: ``process(candidates) -> BatchReport``."""

    def __init__(self, settings: Settings, sessions: sessionmaker, models: LoadedModels, *,
                 file_results: bool = True) -> None:
        self.settings, self.sessions, self.models = settings, sessions, models
        self.file_results = file_results
        self.max_bytes = int(settings.watch.max_file_mb * 2**20)
        self._needs_recovery = False
        self.heartbeat: Callable[[], None] = lambda: None  # called while hashing (the service's watchdog)

    def recover(self) -> int:
        """Release claims left `processing` by dead (or this very) processes; call before work."""
        with self.sessions.begin() as session:
            released = intake.release_stale_claims(session, STALE_CLAIM_SECONDS, startup=True)
        if released:
            log.warning("claims_released", count=released)
        self._needs_recovery = False
        if self.file_results:
            filing.record_moved_files(self.sessions, self.settings)
        return released

    def process(self, candidates: Sequence[Candidate]) -> BatchReport:
        """Take one micro-batch from ready files to recorded, filed results."""
        if self._needs_recovery:
            self.recover()
        report = BatchReport()
        items: list[_Item] = []
        to_file: list[_Item] = []
        try:
            for candidate in candidates:
                item = self._intake(candidate, report)
                if item is not None:
                    (to_file if item.target is not None else items).append(item)
            self._infer([i for i in items if i.decoded is not None])
            to_file += self._record(items, report)
        except BaseException:
            # Claims this batch made are still `processing`: release them before the next one.
            self._needs_recovery = True
            raise
        if self.file_results:
            try:
                self._file(to_file, report)
            except BaseException:
                self._needs_recovery = True  # moved files whose archive_path did not commit are found again
                raise
        return report

    def quarantine_poison(self, candidate: Candidate, reason: str) -> Path:
        """Quarantine a file that broke its batch again and again, alone; record it as failed (``poison``).

        Its claim from the failed attempts (released to ``pending``) becomes the failed row; a file
        that never got that far gets a new failed row. The file moves first: it leaves the drop folder
        even when the database refuses anything about it.
        """
        self.recover()
        now = utcnow()
        detail = storable_text(reason, 1000)
        target = filing.quarantine_file(candidate.path, self.settings.quarantine_dir, "poison", detail, now)
        values = {"status": ImageStatus.failed, "error": f"poison: {detail}", "processed_at": now, "claimed_by": None,
                  "archive_path": storable_text(str(target), 1024)}
        with self.sessions.begin() as session:
            updated = session.execute(
                update(Image)
                .where(Image.source_name == candidate.source_name, Image.status == ImageStatus.pending,
                       Image.duplicate_of_id.is_(None))
                .values(**values)
                .execution_options(synchronize_session=False)
            ).rowcount
            if not updated:
                session.add(Image(sha256=None, source_name=candidate.source_name, site=self.settings.site.name,
                                  size_bytes=candidate.size, received_at=now, **values))
        log.error("quarantined_poison", source=candidate.source_name, reason=detail)
        return target

    # intake ----------------------------------------------------------------------------------

    def _intake(self, candidate: Candidate, report: BatchReport) -> _Item | None:
        item = _Item(candidate)
        bound = log.bind(source=candidate.source_name)
        if candidate.refusal:
            item.reason, item.detail = candidate.refusal, f"{candidate.source_name}: {candidate.detail}"
            return item
        try:
            st = os.lstat(candidate.path)
            if st.st_size > self.max_bytes:  # before hashing: a huge file on a slow share is never read
                item.reason = "too_large"
                item.detail = (f"{candidate.source_name} is {st.st_size / 2**20:.1f} MiB, over the "
                               f"{self.max_bytes / 2**20:.1f} MiB limit ([watch] max_file_mb)")
                return item
            item.sha256 = intake.sha256_file(candidate.path, on_chunk=self.heartbeat)
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
            with self.sessions.begin() as session:
                previous = self._unfiled_twin(session, item.sha256, candidate.source_name, ImageStatus.duplicate)
                if previous is not None:
                    item.image_id, item.target = previous.id, ImageStatus.duplicate
                    report.refiled += 1
                    return item
                claimed = intake.claim(session, sha256=item.sha256, source_name=candidate.source_name,
                                       site=self.settings.site.name, size_bytes=st.st_size)
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
            item.decoded = intake.decode_image(candidate.path, max_pixels=self.settings.watch.max_pixels,
                                               max_bytes=self.max_bytes,
                                               pseudonym_secret=self.settings.site.pseudonym_secret)
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

    @staticmethod
    def _unfiled_twin(session: Session, sha256: str | None, source_name: str, status: ImageStatus) -> Image | None:
        """A row this very file already produced before a crash, whose file was never filed."""
        sha_match = Image.sha256.is_(None) if sha256 is None else Image.sha256 == sha256
        return session.scalars(
            select(Image).where(sha_match, Image.source_name == source_name, Image.status == status,
                                Image.archive_path.is_(None)).order_by(Image.id).limit(1)
        ).first()

    # inference -------------------------------------------------------------------------------

    def _infer(self, items: list[_Item]) -> None:
        items = [i for i in items if i.deferred is None]
        if not items:
            return
        m = self.models
        started = time.perf_counter()
        try:
            results = run_batch([i.decoded.image for i in items], m.standardizer, m.classifier,
                                scale=self.settings.site.scale)
        except Exception as exc:
            if not self._models_work():  # CUDA out of memory, a driver error: not the files' fault
                log.error("inference_unavailable", error=error_summary(exc), batch=len(items))
                for item in items:
                    item.deferred = f"inference: {error_summary(exc)}"
                return
            if len(items) > 1:
                log.warning("batch_failed_retrying_one_by_one", size=len(items), error=error_summary(exc))
                for item in items:
                    self._infer([item])
                return
            log.error("inference_failed", source=items[0].candidate.source_name, error=error_summary(exc))
            items[0].reason, items[0].detail = "inference", "the models fail on this image and work on others"
            return
        share = (time.perf_counter() - started) / len(items)
        for item, result in zip(items, results, strict=True):
            item.result, item.seconds = result, item.seconds + share

    def _models_work(self) -> bool:
        """Do the models run on a plain probe image? (No: the failure is the GPU's, not the file's.)"""
        probe = PILImage.new("RGB", (64, 64), (200, 160, 190))
        try:
            run_batch([probe], self.models.standardizer, self.models.classifier, scale=self.settings.site.scale)
        except Exception:  # noqa: BLE001 - any failure here means "the models are unavailable"
            return False
        return True

    # the one transaction ---------------------------------------------------------------------

    def _record(self, items: list[_Item], report: BatchReport) -> list[_Item]:
        """Record the batch in one transaction; if the database refuses it, file by file.

        A file whose results the database refuses (a value it cannot store) is recorded as
        failed (``unrecordable``) instead, so that it never holds back the others.
        """
        try:
            return self._record_together(items, report)
        except SQLAlchemyError as exc:
            if is_transient(exc):
                raise
        recorded: list[_Item] = []
        for item in items:
            try:
                recorded += self._record_together([item], report)
            except SQLAlchemyError as exc:
                if is_transient(exc):
                    raise
                log.warning("results_refused", source=item.candidate.source_name, error=error_summary(exc))
                item.result, item.decoded = None, None
                item.reason, item.detail = "unrecordable", f"the database refused this file's results: {error_summary(exc)}"
                recorded += self._record_together([item], report)
        return recorded

    def _record_together(self, items: list[_Item], report: BatchReport) -> list[_Item]:
        now = utcnow()
        me = intake.worker_id()
        recorded: list[_Item] = []
        counts = BatchReport()
        m = self.models
        with self.sessions.begin() as session:
            for item in items:
                source = item.candidate.source_name
                if item.image_id is None:  # refused or unhashable: no claim, a failed row
                    row = self._unfiled_twin(session, item.sha256, source, ImageStatus.failed)
                    if row is None:
                        row = Image(sha256=None, source_name=source, site=self.settings.site.name,
                                    status=ImageStatus.failed, size_bytes=item.candidate.size, received_at=now)
                        session.add(row)
                        item.created_row = True
                else:
                    row = session.get(Image, item.image_id, with_for_update=True)
                    if row is None or row.status is not ImageStatus.processing or row.claimed_by != me:
                        log.warning("claim_lost", source=source, image_id=item.image_id)
                        counts.left_in_place.append(item.candidate.path)
                        continue
                    if item.deferred == "vanished":  # nothing left to process or file: no row at all
                        session.delete(row)
                        continue
                    if item.deferred is not None:  # transient: give the claim back, try again later
                        row.status, row.claimed_by, row.claimed_at = ImageStatus.pending, None, None
                        counts.deferred += 1
                        counts.unavailable = counts.unavailable or item.deferred
                        counts.left_in_place.append(item.candidate.path)
                        continue
                row.processed_at, row.claimed_by = now, None
                if item.result is not None:
                    decoded, result = item.decoded, item.result
                    row.status, row.error = ImageStatus.done, None
                    row.format, row.width, row.height = decoded.format, decoded.width, decoded.height
                    for key, value in decoded.metadata.items():
                        setattr(row, key, value)
                    session.add(Prediction(
                        image_id=row.id, label=result.label, confidence=result.confidence,
                        probabilities=result.probabilities, standardizer_version_id=m.standardizer_version_id,
                        classifier_version_id=m.classifier_version_id, latency_ms=round(item.seconds * 1000, 3),
                        created_at=now))
                    item.target = ImageStatus.done
                    counts.done += 1
                else:
                    reason = item.reason or "unknown"
                    row.status, row.error = ImageStatus.failed, storable_text(f"{reason}: {item.detail}")
                    item.target = ImageStatus.failed
                    counts.failed += 1
                    counts.failures[reason] = counts.failures.get(reason, 0) + 1
                session.flush()
                item.image_id = row.id
                recorded.append(item)
        report.add(counts)  # only once the transaction committed
        for item in recorded:
            bound = log.bind(source=item.candidate.source_name, image=(item.sha256 or "-")[:12])
            if item.target is ImageStatus.done:
                bound.info("classified", label=item.result.label, confidence=round(item.result.confidence, 4),
                           latency_ms=round(item.seconds * 1000, 1))
            else:
                bound.warning("failed", reason=item.reason, detail=item.detail)
        return recorded

    # filing ----------------------------------------------------------------------------------

    def _file(self, items: list[_Item], report: BatchReport) -> None:
        filed: dict[int, str] = {}
        errors: dict[int, str] = {}
        if any(i.target is ImageStatus.failed and i.reason is None for i in items):
            with self.sessions() as session:  # unfiled failures from before a crash: their stored reason
                ids = [i.image_id for i in items if i.target is ImageStatus.failed and i.reason is None]
                errors = dict(session.execute(select(Image.id, Image.error).where(Image.id.in_(ids))).all())
        vanished: list[int] = []
        for item in items:
            path = item.candidate.path
            when = utcnow()
            try:
                if item.target is ImageStatus.failed:
                    if item.reason is None:
                        stored = errors.get(item.image_id) or "unknown: no reason recorded"
                        item.reason, item.detail = stored.split(":", 1)[0], stored.split(":", 1)[-1].strip()
                    target = filing.quarantine_file(path, self.settings.quarantine_dir, item.reason, item.detail, when)
                else:
                    target = filing.archive_file(path, self.settings.archive_dir, when)
            except FileNotFoundError:
                if item.created_row:  # a refused entry another worker quarantined first: no second row
                    vanished.append(item.image_id)
                else:
                    report.left_in_place.append(path)
                continue
            except Exception as exc:  # noqa: BLE001 - this file stays in place; the others are filed
                log.error("filing_failed", source=item.candidate.source_name, error=error_summary(exc))
                report.left_in_place.append(path)
                continue
            filed[item.image_id] = str(target)
            if item.result is not None and item.target is ImageStatus.done and self.settings.watch.save_standardized:
                try:
                    filing.save_standardized(item.result.standardized, target)
                except Exception as exc:  # noqa: BLE001 - the original is archived and recorded all the same
                    log.error("standardized_copy_failed", source=item.candidate.source_name, error=error_summary(exc))
        if vanished:
            with self.sessions.begin() as session:
                session.execute(delete(Image).where(Image.id.in_(vanished), Image.archive_path.is_(None),
                                                    Image.sha256.is_(None)))
        if filed:
            with self.sessions.begin() as session:
                for image_id, target in filed.items():
                    row = session.get(Image, image_id)
                    if row is not None:
                        row.archive_path = storable_text(target, 1024)


def absolute_candidates(candidates: Sequence[Candidate], drop_dir: Path | None = None) -> list[Candidate]:
    """Candidates named as `ingest` records them: relative to the drop folder for files inside it
    (the name the service gives the same file, so that it is never recorded twice), else absolute."""
    def name(c: Candidate) -> str:
        path = Path(c.path).absolute()
        if drop_dir is not None and Path(drop_dir).absolute() in path.parents:
            return storable_source_name(path.relative_to(Path(drop_dir).absolute()).as_posix())
        return storable_source_name(str(path))

    return [replace(c, source_name=name(c)) for c in candidates]

