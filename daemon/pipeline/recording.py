"""The last two stages of a batch: one transaction records every result, then the files are filed.

`record` writes every prediction and image status of a batch in ONE transaction (file by file
only if the database refuses the batch, so that one unstorable value fails alone); `file_results`
moves the files only after that commit, then records where each one went (``archive_path``).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from sqlalchemy import bindparam, delete, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import sessionmaker

from stainbridge.daemon import folders
from stainbridge.daemon.config import Settings
from stainbridge.daemon.intake import claims
from stainbridge.daemon.intake.failures import error_summary, is_transient, storable_text
from stainbridge.daemon.logs import get_logger
from stainbridge.daemon.pipeline import filing
from stainbridge.daemon.pipeline.batch import BatchReport, Item
from stainbridge.daemon.store import Image, ImageStatus, Prediction, ShadowPrediction, stain_columns, utcnow
from stainbridge.daemon.versions.loading import LoadedModels
from stainbridge.models.inference import BatchResult, fsync_dir

log = get_logger(__name__)


def record(sessions: sessionmaker, items: list[Item], report: BatchReport) -> list[Item]:
    """Record the batch in one transaction; if the database refuses it, file by file.

    Each prediction names the versions of its own site's models (``item.models``); each row is
    recorded under ``item.site``.

    A file whose results the database refuses (a value it cannot store) is recorded as
    failed (``unrecordable``) instead, so that it never holds back the others.
    """
    try:
        return _record_together(sessions, items, report)
    except SQLAlchemyError as exc:
        if is_transient(exc):
            raise
    recorded: list[Item] = []
    for item in items:
        try:
            recorded += _record_together(sessions, [item], report)
        except SQLAlchemyError as exc:
            if is_transient(exc):
                raise
            log.warning("results_refused", source=item.candidate.source_name, error=error_summary(exc))
            item.result, item.decoded = None, None
            item.reason, item.detail = "unrecordable", f"the database refused this file's results: {error_summary(exc)}"
            recorded += _record_together(sessions, [item], report)
    return recorded


def prediction_row(result: BatchResult, *, image_id: int, models: LoadedModels, latency_ms: float,
                   created_at: datetime) -> Prediction:
    """The stored form of one image's result (the service's batches and ``reprocess`` alike): the best guess,
    how it was computed, and whether it needs review and why."""
    return Prediction(
        image_id=image_id, label=result.label, confidence=result.confidence, probabilities=result.probabilities,
        standardizer_version_id=models.standardizer_version_id, classifier_version_id=models.classifier_version_id,
        latency_ms=round(latency_ms, 3), tta=result.tta, magnification=result.magnification,
        calibrated_confidence=result.calibrated_confidence, ood_score=result.ood_score,
        needs_review=result.needs_review, review_reason=result.review_reason, created_at=created_at)


def shadow_row(shadow: tuple[int, BatchResult], *, image_id: int, created_at: datetime) -> ShadowPrediction:
    """The stored form of a shadowed candidate's answer for one image (``versions.shadow``)."""
    version_id, result = shadow
    return ShadowPrediction(image_id=image_id, model_version_id=version_id, label=result.label,
                            confidence=result.confidence, calibrated_confidence=result.calibrated_confidence,
                            created_at=created_at)


def _record_together(sessions: sessionmaker, items: list[Item], report: BatchReport) -> list[Item]:
    now = utcnow()
    me = claims.claim_owner()
    recorded: list[Item] = []
    counts = BatchReport()
    with sessions.begin() as session:
        ids = [i.image_id for i in items if i.image_id is not None]
        claimed = {row.id: row for row in session.scalars(
            select(Image).where(Image.id.in_(ids)).with_for_update())} if ids else {}
        rows: list[tuple[Item, Image]] = []
        for item in items:
            source = item.candidate.source_name
            if item.image_id is None:  # refused or unhashable: no claim, a failed row
                row = claims.unfiled_twin(session, item.sha256, source, ImageStatus.failed)
                if row is None and not filing.Source(item.candidate.path, item.dir_fd).exists():
                    counts.skipped += 1  # a stale candidate (filed by another worker, deleted): no row
                    continue
                if row is None:
                    row = Image(sha256=None, source_name=source, site=item.site,
                                status=ImageStatus.failed, size_bytes=item.candidate.size, received_at=now)
                    session.add(row)
                    item.created_row = True
            else:
                row = claimed.get(item.image_id)
                if row is None or row.status is not ImageStatus.processing or row.claimed_by != me:
                    log.warning("claim_lost", source=source, image_id=item.image_id)
                    counts.left_in_place.append(item.candidate.path)
                    continue
                if item.deferred is not None:  # transient: give the claim back, try again later
                    row.status, row.claimed_by, row.claimed_at = ImageStatus.pending, None, None
                    row.crashes = 0  # this worker lived through it
                    counts.deferred += 1
                    counts.unavailable = counts.unavailable or item.deferred
                    counts.left_in_place.append(item.candidate.path)
                    continue
            row.processed_at, row.claimed_by = now, None
            if item.reason != "crashed":
                row.crashes = 0
            if item.result is not None:
                decoded, result, m = item.decoded, item.result, item.models
                row.status, row.error, row.site = ImageStatus.done, None, item.site
                row.format, row.width, row.height = decoded.format, decoded.width, decoded.height
                for key, value in decoded.metadata.items():
                    setattr(row, key, value)
                row.specimen = item.specimen  # DICOM's own, else by name or folder (intake.specimens)
                for column, value in stain_columns(item.stain).items():
                    setattr(row, column, value)
                session.add(prediction_row(result, image_id=row.id, models=m, latency_ms=item.seconds * 1000,
                                           created_at=now))
                if item.shadow is not None:  # beside the result, in its transaction; never a result itself
                    session.add(shadow_row(item.shadow, image_id=row.id, created_at=now))
                item.target = ImageStatus.done
                counts.done += 1
                confidence = result.calibrated_confidence if result.calibrated_confidence is not None else result.confidence
                counts.predictions.append((result.label, float(confidence), bool(result.needs_review)))
            else:
                reason = item.reason or "unknown"
                row.status, row.error = ImageStatus.failed, storable_text(f"{reason}: {item.detail}")
                item.target = ImageStatus.failed
                counts.failed += 1
                counts.failures[reason] = counts.failures.get(reason, 0) + 1
            rows.append((item, row))
        session.flush()  # one UPDATE per kind of change and one INSERT of the predictions, not one per file
        for item, row in rows:
            item.image_id = row.id
            recorded.append(item)
    report.add(counts)  # only once the transaction committed
    for item in recorded:
        bound = log.bind(source=item.candidate.source_name, image=(item.sha256 or "-")[:12])
        if item.target is ImageStatus.done:
            bound.info("classified", label=item.result.label, confidence=round(item.result.confidence, 4),
                       latency_ms=round(item.seconds * 1000, 1), **_review_fields(item.result))
        else:
            bound.warning("failed", reason=item.reason, detail=item.detail)
    return recorded


def _review_fields(result: BatchResult) -> dict[str, object]:
    return {"needs_review": result.review_reason} if result.needs_review else {}


def file_items(sessions: sessionmaker, settings: Settings, items: list[Item], report: BatchReport) -> None:
    """Move each recorded file to the archive or quarantine, then record where it went."""
    filed: dict[int, str] = {}
    errors: dict[int, str] = {}
    if any(i.target is ImageStatus.failed and i.reason is None for i in items):
        with sessions() as session:  # unfiled failures from before a crash: their stored reason
            ids = [i.image_id for i in items if i.target is ImageStatus.failed and i.reason is None]
            errors = dict(session.execute(select(Image.id, Image.error).where(Image.id.in_(ids))).all())
    vanished: list[int] = []
    unsynced: set[Path] = set()  # archive folders with new entries: fsynced once each, before archive_path commits
    roots = {ImageStatus.failed: ("quarantine", settings.quarantine_dir)}
    unprepared: dict[str, str | None] = {}  # root -> why it may not be written to now (checked once per batch)
    for item in items:
        path = item.candidate.path
        when = utcnow()
        read = filing.Read(item.opened, item.data) if item.data is not None else None
        role, root = roots.get(item.target, ("archive", settings.archive_dir))
        if role not in unprepared:
            try:
                folders.require(root, role)  # an unmounted share: never re-created on the disk below it
                unprepared[role] = None
            except folders.FolderError as exc:
                unprepared[role] = str(exc)
        if unprepared[role] is not None:
            log.error("filing_failed", source=item.candidate.source_name, error=unprepared[role])
            _unfiled(report, path, unprepared[role])
            continue
        try:
            if item.target is ImageStatus.failed:
                if item.reason is None:
                    stored = errors.get(item.image_id) or "unknown: no reason recorded"
                    item.reason, item.detail = stored.split(":", 1)[0], stored.split(":", 1)[-1].strip()
                target = filing.quarantine_file(path, settings.quarantine_dir, item.reason, item.detail, when,
                                                read=read, dir_fd=item.dir_fd)
            else:
                target = filing.archive_file(path, settings.archive_dir, when, fsync=False, read=read,
                                             dir_fd=item.dir_fd)
                unsynced.add(target.parent)
            if read is not None and filing.Source(path, item.dir_fd).exists():  # replaced or rewritten: the
                log.warning("replaced_while_processing", source=item.candidate.source_name)  # bytes read were filed
                report.left_in_place.append(path)  # the new version is offered again, on its own
        except FileNotFoundError:
            if item.created_row:  # a refused entry another worker quarantined first: no second row
                vanished.append(item.image_id)
            else:
                report.left_in_place.append(path)
            continue
        except Exception as exc:  # noqa: BLE001 - this file stays in place; the others are filed
            log.error("filing_failed", source=item.candidate.source_name, error=error_summary(exc))
            _unfiled(report, path, error_summary(exc))
            continue
        filed[item.image_id] = str(target)
        if item.result is not None and item.target is ImageStatus.done and settings.watch.save_standardized:
            try:
                filing.save_standardized(item.result.standardized, target)
            except Exception as exc:  # noqa: BLE001 - the original is archived and recorded all the same
                log.error("standardized_copy_failed", source=item.candidate.source_name, error=error_summary(exc))
    if vanished:
        with sessions.begin() as session:
            session.execute(delete(Image).where(Image.id.in_(vanished), Image.archive_path.is_(None),
                                                Image.sha256.is_(None)))
    for folder in unsynced:
        fsync_dir(folder)
    if filed:
        with sessions.begin() as session:
            table = Image.__table__
            session.execute(table.update().where(table.c.id == bindparam("image_id"))
                            .values(archive_path=bindparam("archive_path")),
                            [{"image_id": image_id, "archive_path": storable_text(target, 1024)}
                             for image_id, target in filed.items()])


def _unfiled(report: BatchReport, path: Path, why: str) -> None:
    """A recorded file that could not be filed: it stays where it is; the service reports and retries it."""
    report.unfiled += 1
    report.filing_error = report.filing_error or why
    report.left_in_place.append(path)
