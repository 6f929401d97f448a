"""Claims: the one place where "each file is processed once" is decided.

The first row holding a sha256 (``duplicate_of_id IS NULL``) is unique per content, enforced by
the partial unique index ``uq_images_sha256_original``; a claim is a ``processing`` row owned by
``host@boot.pidns:pid``, released when its owner is dead (``release_stale_claims``).

A claim released because its owner died adds one to the row's ``crashes``: the worker was killed
(out of memory, a decoder crash, the watchdog, kill -9) while the file was in flight. The pipeline
processes such a file alone, so that the files that shared its batch go on without it; at
``MAX_CRASHES`` the next claim says so (``ClaimResult.crashes``) and the file is quarantined
without being read again, instead of killing every restart until systemd gives up.
"""


from __future__ import annotations

import enum
import functools
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from sqlalchemy import delete, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from stainbridge.daemon.store import Image, ImageStatus, utcnow

MAX_CRASHES = 3  # workers that died holding a file's claim, in a row, before it is quarantined unread


def worker_id() -> str:
    """This process in logs and ``training_runs.worker``: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def claim_owner() -> str:
    """This process as it appears in ``images.claimed_by``: ``host@boot.pidns:pid``.

    A pid means something only in its PID namespace and until the next boot: the kernel's boot id
    (first 8 hex digits) and the PID namespace's inode say where `pid` can be checked."""
    return f"{socket.gethostname()}@{_pid_scope()}:{os.getpid()}"


@functools.cache
def _pid_scope() -> str:
    """``boot.pidns`` of this process (``0`` for what the platform does not expose)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:8]
    except OSError:
        boot = "0"
    try:
        namespace = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        namespace = "0"
    return f"{boot}.{namespace}"


class ClaimOutcome(str, enum.Enum):
    claimed = "claimed"  # this worker owns the row: decode, classify, file it
    duplicate = "duplicate"  # same bytes already recorded: a duplicate row was added; archive the file
    in_progress = "in_progress"  # this very file is being processed by a live claim: leave it alone
    unfiled = "unfiled"  # already processed but never moved (crash after commit): just file it


@dataclass(frozen=True)
class ClaimResult:
    outcome: ClaimOutcome
    image_id: int  # the row to update (for `duplicate`: the new duplicate row)
    duplicate_of_id: int | None = None
    reclaimed: bool = False  # a pending (released) row was taken over
    crashes: int = 0  # workers that died holding this content's claim, in a row (see MAX_CRASHES)
    original_status: ImageStatus | None = None  # for `unfiled`: done or failed, i.e. archive or quarantine

    @property
    def is_duplicate(self) -> bool:
        return self.outcome is ClaimOutcome.duplicate


def claim(session: Session, *, sha256: str, source_name: str, site: str, size_bytes: int | None) -> ClaimResult:
    """Claim the content `sha256` for this worker, or record the arrival as a duplicate.

    Does not commit: commit right after, so that other workers see the claim. `source_name`
    is the path relative to the drop folder (posix separators).
    """
    now = utcnow()
    row = Image(sha256=sha256, source_name=source_name, site=site, size_bytes=size_bytes,
                status=ImageStatus.processing, claimed_by=claim_owner(), claimed_at=now, received_at=now)
    try:
        with session.begin_nested():
            session.add(row)
            session.flush()
        _forget_replaced_content(session, source_name, sha256)
        return ClaimResult(ClaimOutcome.claimed, row.id)
    except IntegrityError as exc:
        conflict = exc  # the savepoint was rolled back; the outer transaction is still usable

    # SKIP LOCKED (PostgreSQL; SQLite has one writer): a row another worker is claiming right now is
    # left to it instead of blocking this worker's whole batch behind its transaction.
    original = session.scalars(
        select(Image).where(Image.sha256 == sha256, Image.duplicate_of_id.is_(None)).with_for_update(skip_locked=True)
    ).one_or_none()
    if original is None:
        held = session.scalars(select(Image.id).where(Image.sha256 == sha256, Image.duplicate_of_id.is_(None))).first()
        if held is None:  # not the sha256 index: a genuine schema error
            raise conflict
        return ClaimResult(ClaimOutcome.in_progress, held)
    # Checked under the original's lock, which a worker recording this file as a duplicate holds
    # until it commits: a check before the lock could miss a twin committed in between (two workers
    # seeing one file would then both record it).
    twin = unfiled_twin(session, sha256, source_name, ImageStatus.duplicate)
    if twin is not None:  # recorded as a duplicate already (by another worker, or before a crash): file it only
        return ClaimResult(ClaimOutcome.unfiled, twin.id, original_status=ImageStatus.duplicate)
    if original.status is ImageStatus.pending:
        crashes = original.crashes
        taken = session.execute(
            update(Image)
            .where(Image.id == original.id, Image.status == ImageStatus.pending)
            .values(status=ImageStatus.processing, claimed_by=claim_owner(), claimed_at=now, error=None,
                    source_name=source_name, size_bytes=size_bytes)
            .execution_options(synchronize_session=False)
        ).rowcount
        session.expire(original)
        if taken == 1:
            _forget_replaced_content(session, source_name, sha256)
            return ClaimResult(ClaimOutcome.claimed, original.id, reclaimed=True, crashes=crashes)
        session.refresh(original)
    if original.status is ImageStatus.failed and original.archive_path is not None:
        # Dropped again after a failure (a corrected configuration, a fixed GPU): another chance.
        taken = session.execute(
            update(Image)
            .where(Image.id == original.id, Image.status == ImageStatus.failed, Image.archive_path.is_not(None))
            .values(status=ImageStatus.processing, claimed_by=claim_owner(), claimed_at=now, error=None,
                    source_name=source_name, size_bytes=size_bytes, archive_path=None, received_at=now, crashes=0)
            .execution_options(synchronize_session=False)
        ).rowcount
        session.expire(original)
        if taken == 1:
            return ClaimResult(ClaimOutcome.claimed, original.id, reclaimed=True)
        session.refresh(original)
    same_file = original.source_name == source_name
    if same_file and original.status is ImageStatus.processing:
        return ClaimResult(ClaimOutcome.in_progress, original.id)
    if same_file and original.status in (ImageStatus.done, ImageStatus.failed) and original.archive_path is None:
        return ClaimResult(ClaimOutcome.unfiled, original.id, original_status=original.status)

    duplicate = Image(sha256=sha256, duplicate_of_id=original.id, source_name=source_name, site=site,
                      size_bytes=size_bytes, status=ImageStatus.duplicate, received_at=now, processed_at=now)
    session.add(duplicate)
    session.flush()
    return ClaimResult(ClaimOutcome.duplicate, duplicate.id, duplicate_of_id=original.id)


def unfiled_twin(session: Session, sha256: str | None, source_name: str, status: ImageStatus) -> Image | None:
    """A row this very file already produced (before a crash, or by another worker), whose file was never filed."""
    sha_match = Image.sha256.is_(None) if sha256 is None else Image.sha256 == sha256
    return session.scalars(
        select(Image).where(sha_match, Image.source_name == source_name, Image.status == status,
                            Image.archive_path.is_(None)).order_by(Image.id).limit(1)
    ).first()


def _forget_replaced_content(session: Session, source_name: str, sha256: str) -> None:
    """Drop released claims (`pending`) of earlier content under this name: that content was replaced
    (a file still being written when a worker died, a re-export) and no longer exists to be processed."""
    session.execute(
        delete(Image)
        .where(Image.source_name == source_name, Image.status == ImageStatus.pending, Image.sha256 != sha256,
               Image.duplicate_of_id.is_(None))
        .execution_options(synchronize_session=False)
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_is_dead(owner: str) -> bool:
    """Is `owner` (a `claim_owner`, or a legacy ``host:pid``) a process of this host known to be gone?
    Owners on other hosts are never called dead from here."""
    host = socket.gethostname()
    place = owner.rpartition(":")[0]
    if place != host and not place.startswith(f"{host}@"):
        return False
    return _owner_dead(owner, host, _pid_scope())


def _owner_dead(owner: str, host: str, scope: str) -> bool:
    """Is the claim owner `owner` (see `claim_owner`) a process of this host known to be gone?

    Same boot and PID namespace: its pid is checked. Another boot of this host: gone. Another PID
    namespace on this host (containers sharing a hostname): its pid cannot be checked from here,
    so it is not called dead; the age cutoff frees its claims. ``host:pid`` (written before the
    scope was recorded): its pid is checked, as then."""
    place, _, pid = owner.rpartition(":")
    if not pid.isdigit():
        return True
    if place == host:
        return not _pid_alive(int(pid))
    other = place[len(host) + 1:]
    if other == scope:
        return not _pid_alive(int(pid))
    return other.split(".", 1)[0] != scope.split(".", 1)[0]  # rebooted since: every process of then is gone


def release_stale_claims(session: Session, older_than_s: float, *, startup: bool = False, own: bool = False) -> int:
    """Reset stale `processing` claims to `pending` so that the file can be claimed again.

    Stale means: claimed more than `older_than_s` seconds ago, or claimed on this host by a
    process that no longer exists (see `_owner_dead`), or (``startup=True``, before this worker
    holds anything) claimed under this very `claim_owner` by an earlier life (pid 1 in containers).
    Each of those was in flight when its worker died (or hung): its ``crashes`` goes up by one.
    ``own=True`` also releases this worker's own claims (a batch that failed), which is no crash.
    Returns how many rows were released; does not commit.
    """
    host, me, scope = socket.gethostname(), claim_owner(), _pid_scope()
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    dead: list[str] = []
    rows = session.execute(
        select(Image.claimed_by).where(Image.status == ImageStatus.processing,
                                       or_(Image.claimed_by.like(f"{host}:%"), Image.claimed_by.like(f"{host}@%")))
        .distinct()
    ).scalars()
    for owner in rows:
        if owner == me:
            if startup:
                dead.append(owner)
        elif _owner_dead(owner, host, scope):
            dead.append(owner)
    released = 0
    for condition, crashed in ((or_(Image.claimed_at < cutoff, Image.claimed_at.is_(None),
                                    Image.claimed_by.in_(dead)), True),
                               (Image.claimed_by == me, False)):
        if not crashed and (startup or not own):
            continue
        values = {"status": ImageStatus.pending, "claimed_by": None, "claimed_at": None}
        if crashed:
            values["crashes"] = Image.crashes + 1
        result = session.execute(
            update(Image)
            .where(Image.status == ImageStatus.processing, Image.duplicate_of_id.is_(None), condition)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        released += result.rowcount or 0
    return released
