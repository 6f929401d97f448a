"""The pipeline: candidates -> claim -> decode -> standardize -> classify -> one commit -> file.

`Pipeline.process(candidates)` handles one micro-batch; the service calls it for files the
watcher found ready, `stainbridge ingest` for files and folders named on the command line.
Inference goes through ``models.inference`` only (geometry normalization, standardizer,
classifier, softmax). The stages live in ``daemon.batch`` (intake) and ``daemon.recording``
(the one transaction, then filing); ``daemon.loading`` loads and registers the models. Per batch:

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

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from PIL import Image as PILImage
from sqlalchemy import update
from sqlalchemy.orm import sessionmaker

from stainbridge.daemon import filing, intake
from stainbridge.daemon.batch import BatchReport, Item, take_in
from stainbridge.daemon.config import Settings
from stainbridge.daemon.failures import error_summary, storable_source_name, storable_text
from stainbridge.daemon.loading import LoadedModels, ModelConfigError, builtin_sha256, load_models
from stainbridge.daemon.logs import get_logger
from stainbridge.daemon.recording import file_items, record
from stainbridge.daemon.store import Image, ImageStatus, utcnow
from stainbridge.daemon.watcher import Candidate
from stainbridge.models.inference import run_batch

__all__ = ["Pipeline", "BatchReport", "LoadedModels", "ModelConfigError", "STALE_CLAIM_SECONDS", "absolute_candidates",
           "builtin_sha256", "load_models"]

log = get_logger(__name__)

STALE_CLAIM_SECONDS = 3600.0  # a claim older than this (any host) is considered abandoned


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
        items: list[Item] = []
        to_file: list[Item] = []
        try:
            for candidate in candidates:
                item = take_in(self, candidate, report)
                if item is not None:
                    (to_file if item.target is not None else items).append(item)
            self._infer([i for i in items if i.decoded is not None])
            to_file += record(self, items, report)
        except BaseException:
            # Claims this batch made are still `processing`: release them before the next one.
            self._needs_recovery = True
            raise
        if self.file_results:
            try:
                file_items(self, to_file, report)
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

    # inference -------------------------------------------------------------------------------

    def _infer(self, items: list[Item]) -> None:
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


def absolute_candidates(candidates: Sequence[Candidate], drop_dir: Path | None = None) -> list[Candidate]:
    """Candidates named as `ingest` records them: relative to the drop folder for files inside it
    (the name the service gives the same file, so that it is never recorded twice), else absolute."""
    def name(c: Candidate) -> str:
        path = Path(c.path).absolute()
        if drop_dir is not None and Path(drop_dir).absolute() in path.parents:
            return storable_source_name(path.relative_to(Path(drop_dir).absolute()).as_posix())
        return storable_source_name(str(path))

    return [replace(c, source_name=name(c)) for c in candidates]

