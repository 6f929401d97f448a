"""Claims for a whole batch: new content in one transaction, everything else file by file.

In the steady state every file of a batch is content the database has never seen. Those are
claimed together: ONE transaction reads what the database holds for the batch's sha256s (and
released claims under its names), inserts a `processing` row for each new content with
``ON CONFLICT DO NOTHING ... RETURNING`` and commits, so one commit (one fsync on SQLite) claims
the batch. A sha256 the database already knows (a duplicate, a released claim, a crash before
filing), a sha256 twice in the batch, or a row another worker inserted first goes through
``claims.claim`` in its own short transaction, as before. If the database refuses the batch
(a value it cannot store), each file is claimed alone so that the refusal stays with its file.

With ``isolate_crashed``, content whose last claim was held by a worker that died (a released
claim with ``crashes > 0``) is not claimed with the batch: the caller takes it in alone afterwards.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from sqlalchemy import and_, delete, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from stainbridge.daemon.intake import claims
from stainbridge.daemon.intake.failures import error_summary, is_transient
from stainbridge.daemon.logs import get_logger
from stainbridge.daemon.pipeline.batch import BatchReport, Item
from stainbridge.daemon.store import Image, ImageStatus, utcnow

log = get_logger(__name__)


class _Vanished(Exception):
    """The file left the drop folder between its hash and its claim."""


def claim_items(sessions: sessionmaker, items: Sequence[Item], report: BatchReport, *,
                isolate_crashed: bool = False) -> list[Item]:
    """Claim every hashed item (under its ``site``): sets `image_id`, and `target` for what is only to be filed.

    Returns the items not claimed because a worker died holding their claim (``isolate_crashed``)."""
    rest, suspects = list(items), []
    try:
        with sessions.begin() as session:
            rest, suspects = claim_new_content(session, items, isolate_crashed=isolate_crashed)
    except SQLAlchemyError as exc:
        if is_transient(exc):
            raise
        log.warning("batch_claim_refused", error=error_summary(exc), batch=len(items))  # claimed one by one below
        for item in items:
            item.image_id = None
    for item in rest:
        _claim_one(sessions, item, report)
    return suspects


def claim_new_content(session: Session, items: Sequence[Item], *,
                      isolate_crashed: bool = False) -> tuple[list[Item], list[Item]]:
    """Claim the items whose sha256 the database has never seen; return the others (to claim one
    by one) and, with `isolate_crashed`, the items a dead worker held (to take in alone, later)."""
    shas = {i.sha256 for i in items}
    names = {i.candidate.source_name for i in items}
    known = session.execute(
        select(Image.sha256, Image.status, Image.source_name, Image.crashes, Image.duplicate_of_id).where(or_(
            Image.sha256.in_(shas), and_(Image.status == ImageStatus.pending, Image.source_name.in_(names))))
    ).all()
    known_shas = {row.sha256 for row in known}
    crashed = {row.sha256 for row in known if isolate_crashed and row.status is ImageStatus.pending
               and row.crashes and row.duplicate_of_id is None}
    replaced = {row.source_name for row in known if row.status is ImageStatus.pending and row.sha256 not in shas}
    fresh: dict[str, Item] = {}
    rest: list[Item] = []
    suspects: list[Item] = []
    for item in items:
        if item.sha256 in crashed:
            suspects.append(item)
        elif item.sha256 in known_shas or item.sha256 in fresh:
            rest.append(item)
        else:
            fresh[item.sha256] = item
    if not fresh:
        return rest, suspects
    replaced &= {item.candidate.source_name for item in fresh.values()}
    if replaced:  # released claims of earlier content under these names: that content is gone
        session.execute(delete(Image).where(Image.source_name.in_(replaced), Image.status == ImageStatus.pending,
                                            Image.duplicate_of_id.is_(None))
                        .execution_options(synchronize_session=False))
    now, me = utcnow(), claims.claim_owner()
    values = [{"sha256": sha, "source_name": item.candidate.source_name, "site": item.site,
               "size_bytes": item.opened.st_size if item.opened else item.candidate.size,
               "status": ImageStatus.processing, "claimed_by": me, "claimed_at": now, "received_at": now}
              for sha, item in fresh.items()]
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    inserted = session.execute(
        dialect.insert(Image).values(values).on_conflict_do_nothing().returning(Image.id, Image.sha256)
    ).all()
    ids = {row.sha256: row.id for row in inserted}
    for sha, item in fresh.items():
        if sha in ids:
            item.image_id = ids[sha]
            log.debug("claimed", source=item.candidate.source_name, image=sha[:12])
        else:  # another worker inserted it between our read and our insert
            rest.append(item)
    return rest, suspects


def _claim_one(sessions: sessionmaker, item: Item, report: BatchReport) -> None:
    """Claim one file in its own transaction (duplicates, take-overs, crash leftovers, refusals)."""
    candidate = item.candidate
    bound = log.bind(source=candidate.source_name, image=item.sha256[:12])
    size = item.opened.st_size if item.opened else candidate.size
    try:
        with sessions.begin() as session:
            claimed = claims.claim(session, sha256=item.sha256, source_name=candidate.source_name,
                                   site=item.site, size_bytes=size)
            if claimed.outcome is claims.ClaimOutcome.duplicate and not _still_there(item):
                raise _Vanished  # another worker filed this very file after we hashed it: no duplicate row
    except _Vanished:
        bound.info("filed_elsewhere")
        item.skip = "filed_elsewhere"
        return
    except SQLAlchemyError as exc:
        if is_transient(exc):
            raise
        bound.warning("claim_refused", error=error_summary(exc))  # e.g. a value the database rejects
        item.reason, item.detail = "unrecordable", f"the database refused this file: {error_summary(exc)}"
        return
    outcome = claimed.outcome
    item.image_id = claimed.image_id
    if outcome is claims.ClaimOutcome.claimed and claimed.crashes >= claims.MAX_CRASHES:
        bound.error("quarantined_after_crashes", crashes=claimed.crashes)
        item.reason = "crashed"
        item.detail = (f"the service died {claimed.crashes} times in a row while this file was being processed "
                       "(killed: out of memory, a decoder crash or the watchdog); it was not read again. Check "
                       "the file and the service's memory limit, then drop it again to retry")
    if outcome is claims.ClaimOutcome.in_progress:
        bound.info("in_progress_elsewhere")
        item.image_id, item.skip = None, "in_progress"
        report.left_in_place.append(candidate.path)
    elif outcome is claims.ClaimOutcome.duplicate:
        bound.info("duplicate", duplicate_of=claimed.duplicate_of_id)
        report.duplicates += 1
        item.target = ImageStatus.duplicate
    elif outcome is claims.ClaimOutcome.unfiled:
        bound.info("already_recorded", status=claimed.original_status.value)
        report.refiled += 1
        report.refiled_failed += claimed.original_status is ImageStatus.failed
        item.target = claimed.original_status


def _still_there(item: Item) -> bool:
    """The very inode that was hashed is still at the file's path."""
    try:
        st = os.lstat(item.candidate.path)
    except OSError:
        return False
    hashed = item.opened
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) == (hashed.st_dev, hashed.st_ino, hashed.st_size,
                                                                  hashed.st_mtime_ns)
