"""Reprocess: classify stored images again with their site's active models, adding prediction rows.

Old prediction rows stay (the ``results`` view shows the newest), so every result remains
auditable: which versions said what, and when. Images are read from where they were filed:
the archive, or the quarantine for failures with a transient reason (``TRANSIENT_REASONS``:
the models, the configuration or memory failed, not the file). Each file is read once and its
sha256 checked against the row's: a file changed or replaced in the archive since it was filed is
counted (``changed_since_filed``) and not classified under a row that names other bytes. A
reprocessed failure becomes ``done``. Scoring goes through the one inference path
(``run_batch``), in micro-batches.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy import func, or_, select
from sqlalchemy.orm import sessionmaker

from stainbridge.daemon.config import Settings
from stainbridge.daemon.intake import decoding, reading
from stainbridge.daemon.intake.errors import UnreadableImage
from stainbridge.daemon.logs import get_logger
from stainbridge.daemon.store import Image, ImageStatus, Prediction, utcnow
from stainbridge.daemon.versions.loading import LoadedModels
from stainbridge.daemon.versions.site_models import SiteModels
from stainbridge.models.inference import run_batch

log = get_logger(__name__)

# Failure reasons that say nothing about the file itself: worth another try with other models.
TRANSIENT_REASONS = ("inference", "configuration", "decode_error", "database", "memory")


@dataclass
class ReprocessReport:
    selected: int = 0
    classified: int = 0
    unreadable: dict[str, int] = field(default_factory=dict)


def select_images(sessions: sessionmaker, *, since: datetime | None = None, status: str = "done",
                  model_version: int | None = None) -> list[tuple[int, str, str, str | None, str]]:
    """(id, status, filed path, sha256, site) of the images to reprocess, oldest first."""
    query = select(Image.id, Image.status, Image.archive_path, Image.sha256, Image.site).where(
        Image.archive_path.is_not(None))
    if status == "failed":
        query = query.where(Image.status == ImageStatus.failed,
                            or_(*[Image.error.like(f"{reason}:%") for reason in TRANSIENT_REASONS]))
    else:
        query = query.where(Image.status == ImageStatus.done)
    if since is not None:
        query = query.where(Image.received_at >= since)
    if model_version is not None:
        latest = select(func.max(Prediction.id)).group_by(Prediction.image_id)
        made_by = select(Prediction.image_id).where(
            Prediction.id.in_(latest),
            or_(Prediction.classifier_version_id == model_version, Prediction.standardizer_version_id == model_version))
        query = query.where(Image.id.in_(made_by))
    with sessions() as session:
        return [(i, s.value, p, h, site) for i, s, p, h, site in session.execute(query.order_by(Image.id)).all()]


def read_filed(path: Path, sha256: str | None) -> bytes:
    """The filed file's bytes, read once; UnreadableImage (``changed_since_filed``) if they are not the row's."""
    with reading.open_regular(path) as handle:
        data, digest = reading.read_and_hash(handle)
    if sha256 is not None and digest != sha256:
        raise UnreadableImage(f"{path} no longer holds the bytes that were classified (sha256 {digest[:12]}, the "
                              f"row says {sha256[:12]}); it was changed or replaced after it was filed",
                              reason="changed_since_filed")
    return data


def reprocess(settings: Settings, sessions: sessionmaker, models: SiteModels,
              images: list[tuple[int, str, str, str | None, str]]) -> ReprocessReport:
    """Each image through its site's active models, in micro-batches of one site each."""
    report = ReprocessReport(selected=len(images))
    by_site: dict[str, list[tuple[int, str, str, str | None, str]]] = {}
    for image in images:
        by_site.setdefault(image[4], []).append(image)
    for site, chosen in by_site.items():
        _reprocess_site(settings, sessions, models.for_site(site), chosen, report)
    return report


def _reprocess_site(settings: Settings, sessions: sessionmaker, models: LoadedModels,
                    images: list[tuple[int, str, str, str | None, str]], report: ReprocessReport) -> None:
    size = settings.models.batch_size
    for start in range(0, len(images), size):
        chunk, decoded = images[start:start + size], []
        began = time.perf_counter()
        for image_id, _status, path, sha256, _site in chunk:
            try:
                picture = decoding.decode_open(io.BytesIO(read_filed(Path(path), sha256)), Path(path).name,
                                               max_pixels=settings.watch.max_pixels,
                                               max_bytes=int(settings.watch.max_file_mb * 2**20),
                                               pseudonym_secret=settings.site.pseudonym_secret)
            except Exception as exc:  # noqa: BLE001 - a missing or unreadable file is counted, not fatal
                reason = getattr(exc, "reason", type(exc).__name__)
                report.unreadable[reason] = report.unreadable.get(reason, 0) + 1
                log.warning("reprocess_unreadable", image_id=image_id, path=path, error=str(exc))
                continue
            decoded.append((image_id, picture.image))
        if not decoded:
            continue
        results = run_batch([img for _, img in decoded], models.standardizer, models.classifier,
                            scale=settings.site.scale, tta=settings.models.tta)
        latency = (time.perf_counter() - began) * 1000 / len(decoded)
        now = utcnow()
        with sessions.begin() as session:
            for (image_id, _), result in zip(decoded, results, strict=True):
                session.add(Prediction(image_id=image_id, label=result.label, confidence=result.confidence,
                                       probabilities=result.probabilities,
                                       standardizer_version_id=models.standardizer_version_id,
                                       classifier_version_id=models.classifier_version_id,
                                       latency_ms=round(latency, 3), tta=result.tta,
                                       magnification=result.magnification, created_at=now))
                image = session.get(Image, image_id)
                if image.status is ImageStatus.failed:
                    image.status, image.error, image.processed_at = ImageStatus.done, None, now
        report.classified += len(decoded)
