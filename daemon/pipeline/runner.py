"""The pipeline: candidates -> claim -> decode -> standardize -> classify -> one commit -> file.

`Pipeline.process(candidates)` handles one micro-batch; the service calls it for files the
watcher found ready, `stainbridge ingest` for files and folders named on the command line.
Inference goes through ``models.inference`` only (geometry normalization, standardizer,
classifier, softmax). The stages live in ``pipeline.batch`` (intake) and ``pipeline.recording``
(the one transaction, then filing); ``versions.loading`` loads and registers the models. Per batch:

1. intake: each file is opened and read ONCE (no link followed) and hashed in the thread pool; the batch's
   new content is claimed in one transaction (``pipeline.claiming``; anything the database already
   knows goes through ``claims.claim`` on its own, committed at once so other workers see it).
   Refused entries (symlinks, hard links) and files that cannot be hashed get no claim.
2. claimed files are decoded from those same bytes in the pool while the models run on the
   images already decoded (``[models] max_inflight_pixels`` bounds the decoded pixels held);
   inference is one call per part (one image at a time again if it fails, so that one poison
   image fails alone).
3. ONE transaction writes every prediction (label, confidence, all probabilities, standardizer
   and classifier version ids, latency = the image's decode time plus its share of the batch's
   inference time) and every image status (done / failed with "reason: detail").
4. only after that commit are the files moved: archive/YYYY/MM/DD/ or quarantine/ with a
   ``.error.txt``; the archive folders are fsynced once each, then a second small transaction
   records where each file went (``archive_path``). Only the version that was read is moved: if
   its path now names another file (a re-export by temp file + rename) or the same one rewritten
   in place (``cp`` over it: size, mtime or ctime differ), the bytes that were read are written
   to the archive and the new version is left in place, to be processed on its own. Input files
   are never deleted; `ingest` without ``--move`` leaves them where they are.

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
- during the move: `pipeline.filing` reserves a free name (an empty placeholder) and renames the
  file over it (atomic on one filesystem); across filesystems it copies, fsyncs, then unlinks.
  A crash leaves at worst an empty placeholder or a second copy in the archive, and the
  original in the drop folder, which the next pass files as ``unfiled``: never no copy.
- after the move, before ``archive_path`` commits: the file is filed and the result is
  recorded; only the ``archive_path`` column stays empty (the file is in the dated folder of
  the day it was processed). Nothing is lost or counted twice.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import replace
from functools import partial
from pathlib import Path

from PIL import Image as PILImage
from sqlalchemy import update
from sqlalchemy.orm import sessionmaker

from stainbridge.daemon.config import Settings
from stainbridge.daemon.intake import claims
from stainbridge.daemon.intake.failures import error_summary, storable_source_name, storable_text
from stainbridge.daemon.intake.sites import site_of_decoded, site_of_file
from stainbridge.daemon.intake.specimens import specimen_of
from stainbridge.daemon.intake.walking import Candidate
from stainbridge.daemon.logs import get_logger
from stainbridge.daemon.pipeline import filing
from stainbridge.daemon.pipeline.batch import (
    BatchReport,
    Item,
    PixelBudget,
    byte_batches,
    decode_item,
    open_and_hash,
)
from stainbridge.daemon.pipeline.claiming import claim_items
from stainbridge.daemon.pipeline.recording import file_items, record
from stainbridge.daemon.store import Image, ImageStatus, utcnow
from stainbridge.daemon.versions.shadow import in_shadow_sample
from stainbridge.daemon.versions.site_models import SiteModels
from stainbridge.models.inference import run_batch

log = get_logger(__name__)

STALE_CLAIM_SECONDS = 3600.0  # a claim older than this (any host) is considered abandoned


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, which containers and systemd narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def use_all_cores() -> int:
    """Let the networks' math use every core this process may run on (torch's default counts the
    machine's cores, not the process's affinity); returns the count."""
    import torch

    cores = usable_cores()
    torch.set_num_threads(cores)
    return cores


def decode_threads() -> int:
    """Intake threads (hash, decode): the cores, at least 2 so that one slow read does not stall the batch."""
    return max(2, min(8, usable_cores()))


class Pipeline:
    """One code path for the service and `ingest`: ``process(candidates) -> BatchReport``.

    A batch may hold files of several sites (``[site] source``): each is classified by its own site's
    models (``SiteModels``), one ``run_batch`` per site."""

    def __init__(self, settings: Settings, sessions: sessionmaker, models: SiteModels, *,
                 file_results: bool = True) -> None:
        self.settings, self.sessions, self.models = settings, sessions, models
        self.file_results = file_results
        self.max_bytes = int(settings.watch.max_file_mb * 2**20)
        self._needs_recovery = False
        self.heartbeat: Callable[[], None] = lambda: None  # called while hashing (the service's watchdog)
        # Hashing and decoding overlap the models (PIL and hashlib release the GIL while they work).
        self._pool = ThreadPoolExecutor(max_workers=decode_threads(), thread_name_prefix="intake")

    def close(self) -> None:
        """Stop the intake threads (the service's `finally`)."""
        self._pool.shutdown(wait=True)

    def recover(self, *, startup: bool = False) -> int:
        """Release claims left `processing` by dead processes, and this one's own; call before work.

        ``startup=True``: claims under this process's owner name are an earlier life's (a crash)."""
        with self.sessions.begin() as session:
            released = claims.release_stale_claims(session, STALE_CLAIM_SECONDS, startup=startup, own=True)
        if released:
            log.warning("claims_released", count=released)
        self._needs_recovery = False
        if self.file_results:
            filing.record_moved_files(self.sessions, self.settings)
        return released

    def process(self, candidates: Sequence[Candidate]) -> BatchReport:
        """Take one micro-batch from ready files to recorded, filed results.

        A file whose claim a dead worker held (``images.crashes``) is taken in alone, after the rest
        of the batch is recorded and filed: if it kills this process too, only it was in flight.
        Files are read into memory: a batch holds at most ``BATCH_BYTES`` of them (runs in turn)."""
        report = BatchReport()
        for run in byte_batches(candidates):
            report.add(self._process(run))
        return report

    def _process(self, candidates: Sequence[Candidate]) -> BatchReport:
        if self._needs_recovery:
            self.recover()
        report = BatchReport()
        items = [Item(candidate, site=site_of_file(self.settings.site, candidate.source_name))
                 for candidate in candidates]
        try:
            try:
                with report.timing("hash"):
                    opening = [self._pool.submit(open_and_hash, item, max_bytes=self.max_bytes,
                                                 heartbeat=self.heartbeat, root=self.settings.drop_dir) for item in items]
                    wait(opening)  # all of them, so that no thread opens a file after the `finally` below
                for future in opening:
                    future.result()
                for item in items:
                    if item.skip == "memory":  # read again later, in a smaller batch
                        report.deferred += 1
                        report.unavailable = report.unavailable or item.deferred
                        report.left_in_place.append(item.candidate.path)
                    elif item.skip:
                        log.info("changed_while_reading" if item.skip == "changed" else "vanished",
                                 source=item.candidate.source_name)
            except BaseException:
                self._needs_recovery = True
                raise
            suspects = self._take_in(items, report, isolate_crashed=len(items) > 1)
            for suspect in suspects:
                log.warning("taken_alone_after_a_crash", source=suspect.candidate.source_name,
                            image=suspect.sha256[:12])
                self._take_in([suspect], report, isolate_crashed=False)
        finally:
            for item in items:
                item.close()
        return report

    def _take_in(self, items: list[Item], report: BatchReport, *, isolate_crashed: bool) -> list[Item]:
        """Claim, decode, classify, record and file `items` (already opened and hashed).

        Returns the items left out because a worker died holding their claim (``isolate_crashed``)."""
        suspects: list[Item] = []
        try:
            hashed = [i for i in items if i.sha256 is not None and i.reason is None and not i.skip]
            if hashed:
                with report.timing("claim"):
                    suspects = claim_items(self.sessions, hashed, report, isolate_crashed=isolate_crashed)
            with report.timing("decode_and_inference"):
                self._decode_and_infer([i for i in hashed if i.image_id is not None and i.target is None
                                        and not i.skip and i.reason is None], report)
            left_out = {id(i) for i in suspects}
            waiting = [i for i in items if not i.skip and i.target is None and id(i) not in left_out]
            known = [i for i in items if not i.skip and i.target is not None]  # before record() sets targets
            with report.timing("record"):
                to_file = known + record(self.sessions, waiting, report)
        except BaseException:
            # Claims this batch made are still `processing`: release them before the next one.
            self._needs_recovery = True
            raise
        report.skipped += sum(1 for i in items if i.skip and i.skip != "memory")
        if self.file_results:
            try:
                with report.timing("file"):
                    file_items(self.sessions, self.settings, to_file, report)
            except BaseException:
                self._needs_recovery = True  # moved files whose archive_path did not commit are found again
                raise
        return suspects

    def _decode_and_infer(self, items: list[Item], report: BatchReport) -> None:
        """Decode in the thread pool while the models run on what is already decoded.

        Inference starts once half of the images are decoded (or the pixel budget is full), so the
        second half is decoded during the first half's inference; decoded pixels stay under
        ``[models] max_inflight_pixels``."""
        if not items:
            return
        w = self.settings.watch
        budget = PixelBudget(self.settings.models.max_inflight_pixels)
        decode = partial(decode_item, max_pixels=w.max_pixels, max_bytes=self.max_bytes,
                         pseudonym_secret=self.settings.site.pseudonym_secret, budget=budget)
        running = {self._pool.submit(decode, item): item for item in items}
        try:
            self._infer_as_decoded(running, budget, report, first_part=max(1, (len(items) + 1) // 2))
        except BaseException:
            budget.close()  # no decoder waits for pixels that will never be released
            wait(running)
            raise

    def _infer_as_decoded(self, running: dict[Future[None], Item], budget: PixelBudget, report: BatchReport, *,
                          first_part: int) -> None:
        ready: list[Item] = []
        while running or ready:
            if running:
                done, _ = wait(running, timeout=0.05, return_when=FIRST_COMPLETED)
                for future in done:
                    future.result()
                    item = running.pop(future)
                    if item.decoded is not None:
                        ready.append(item)
            if ready and (not running or len(ready) >= first_part or budget.waiting):
                try:
                    with report.timing("inference"):
                        self._infer(ready)
                finally:
                    for item in ready:
                        budget.release(item.pixels)
                        item.pixels = 0
                        if item.decoded is not None:
                            item.decoded.image = None  # the pixels are no longer needed
                ready = []

    def quarantine_poison(self, candidate: Candidate, reason: str, *, code: str = "poison") -> Path:
        """Quarantine a file that broke its batch again and again, alone; record it as failed (`code`:
        ``poison``, or ``memory`` for a file that ran out of memory on its own).

        Its claim from the failed attempts (released to ``pending``) becomes the failed row; a file
        that never got that far gets a new failed row. The file moves first: it leaves the drop folder
        even when the database refuses anything about it.
        """
        self.recover()
        now = utcnow()
        detail = storable_text(reason, 1000)
        target = filing.quarantine_file(candidate.path, self.settings.quarantine_dir, code, detail, now)
        values = {"status": ImageStatus.failed, "error": f"{code}: {detail}", "processed_at": now, "claimed_by": None,
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
                session.add(Image(sha256=None, source_name=candidate.source_name,
                                  site=site_of_file(self.settings.site, candidate.source_name),
                                  size_bytes=candidate.size, received_at=now, **values))
        log.error("quarantined_poison", source=candidate.source_name, code=code, reason=detail)
        return target

    # inference -------------------------------------------------------------------------------

    def _infer(self, items: list[Item]) -> None:
        """Classify decoded items, each site's by its own models (one run_batch per site)."""
        by_site: dict[str, list[Item]] = {}
        for item in items:
            if item.deferred is None:
                item.site = site_of_decoded(self.settings.site, item.candidate.source_name, item.decoded.metadata)
                item.specimen = specimen_of(self.settings.site, self.settings.lab, item.candidate.source_name,
                                            item.decoded.metadata)
                by_site.setdefault(item.site, []).append(item)
        for site, group in by_site.items():
            try:
                models = self.models.for_site(site)
            except Exception as exc:  # noqa: BLE001 - this site's models, not its files: try again later
                log.error("site_models_unavailable", site=site, error=error_summary(exc), batch=len(group))
                for item in group:
                    item.deferred = f"models of site {site}: {error_summary(exc)}"
                continue
            for item in group:
                item.models = models
            self._infer_site(group)

    def _infer_site(self, items: list[Item]) -> None:
        m = items[0].models
        started = time.perf_counter()
        try:
            results = run_batch([i.decoded.image for i in items], m.standardizer, m.classifier,
                                scale=self.settings.site.scale, tta=self.settings.models.tta)
        except Exception as exc:
            if not self._models_work():  # CUDA out of memory, a driver error: not the files' fault
                log.error("inference_unavailable", error=error_summary(exc), batch=len(items))
                for item in items:
                    item.deferred = f"inference: {error_summary(exc)}"
                return
            if len(items) > 1:
                log.warning("batch_failed_retrying_one_by_one", size=len(items), error=error_summary(exc))
                for item in items:
                    self._infer_site([item])
                return
            log.error("inference_failed", source=items[0].candidate.source_name, error=error_summary(exc))
            items[0].reason, items[0].detail = "inference", "the models fail on this image and work on others"
            return
        share = (time.perf_counter() - started) / len(items)
        for item, result in zip(items, results, strict=True):
            item.result, item.seconds = result, item.seconds + share
        self._shadow(items)

    def _shadow(self, items: list[Item]) -> None:
        """Score the shadowed share of the items with their site's candidate awaiting evidence (versions.shadow).
        Its answers are recorded apart and never become results; a failure costs the shadow rows, nothing else."""
        shadow = self.models.shadow(items[0].site)
        share = self.settings.retraining.shadow_share
        chosen = [i for i in items if shadow is not None and i.sha256 and in_shadow_sample(i.sha256, share)]
        if not chosen:
            return
        try:
            results = run_batch([i.decoded.image for i in chosen], shadow.standardizer, shadow.classifier,
                                scale=self.settings.site.scale, tta=self.settings.models.tta)
        except Exception as exc:  # noqa: BLE001 - the results are already there; only the shadow is lost
            log.warning("shadow_failed", site=items[0].site, candidate_version=shadow.version_id, cells=len(chosen),
                        error=error_summary(exc))
            return
        for item, result in zip(chosen, results, strict=True):
            item.shadow = (shadow.version_id, result)

    def warm_up(self) -> None:
        """Run the models once on a probe image before READY=1: the first batch's one-time costs
        (allocator, kernels, lazy initialisation) are paid at start-up, not by the first files."""
        started = time.perf_counter()
        works = self._models_work()
        log.info("models_warmed_up", seconds=round(time.perf_counter() - started, 3), works=works)

    def _models_work(self) -> bool:
        """Do the models run on a plain probe image? (No: the failure is the GPU's, not the file's.)"""
        probe = PILImage.new("RGB", (64, 64), (200, 160, 190))
        try:
            default = self.models.default
            run_batch([probe], default.standardizer, default.classifier, scale=self.settings.site.scale)
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

