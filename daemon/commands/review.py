"""`stainbridge review import CSV | review export [--out CSV] [--thumbnails DIR]`: expert-confirmed labels.

``export`` writes the review queue, with an empty ``label`` column for the hematologist to fill in, as
UTF-8 with a byte-order mark for Excel and with names that would start a formula neutralized
(``commands.spreadsheet``), tier by tier (column ``tier``): first the cells where a site's shadowed candidate
disagrees with the active version (``candidate_disagrees``: the ``candidate_disagreements`` view, at most
``[retraining] min_gate_reviews`` per site; docs/retraining.md, "Shadow"), then each unvalidated site's validation sample
(``validation_sample``: the cells the service chose from its first ones, docs/sites.md; ``validation_rank``
1, 2, ... in review order; bounded by ``[site] validation_reviews``), then the cells the service flagged as
not one of the known classes, then those it flagged for a low calibrated confidence, then any other whose
latest prediction is less confident than ``[retraining] review_below`` (:data:`REVIEW_TIERS`,
:func:`review_tiers`); least confident first within a tier. ``--thumbnails DIR`` writes a picture of
each listed cell there (``<image id>.png``, decoded as the service decodes it) and names it in the
``thumbnail`` column. ``import`` reads such a file back (columns
``image`` = image id or sha256, ``label``, ``reviewer``, optional ``time`` (ISO 8601) and
``comment``; rows with an empty label are skipped; UTF-8, or Windows-1252 as Excel saves "CSV"). It is
all or nothing: a missing column, an unknown image or label, an oversized field are all reported and
nothing is written. One current review per image and reviewer: importing the same file again changes
nothing (and so starts no fine-tuning), a changed label supersedes the old one, which stays as history.
Reviews feed the promotion gate, ``status`` and the ``results`` view.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import ColumnElement, case, column, func, or_, select, table
from sqlalchemy.orm import Session

from stainbridge.daemon.commands.models import database
from stainbridge.daemon.commands.spreadsheet import EXCEL_BOM, safe_row
from stainbridge.daemon.config import ConfigError, load_settings
from stainbridge.daemon.schema import SchemaError
from stainbridge.daemon.store import (
    Image,
    ImageStatus,
    ModelKind,
    Prediction,
    Review,
    Site,
    SiteState,
    ValidationCell,
    utcnow,
)
from stainbridge.daemon.versions import registry

EXPORT_COLUMNS = ["image", "sha256", "source_name", "archive_path", "site", "specimen", "tier", "validation_rank", "predicted",
                  "confidence", "calibrated_confidence", "label", "reviewer", "time", "comment", "thumbnail"]
# The review queue's tiers, in the order a hematologist sees them: the candidate's disagreements, the validation
# samples, then REVIEW_TIERS (see review_tiers).
CANDIDATE_TIER = "candidate_disagrees"
VALIDATION_TIER = "validation_sample"
# The view that defines the first tier (daemon.lab.views): the report lists the same cells.
CANDIDATE_DISAGREEMENTS = table("candidate_disagreements", column("image_id"))
REVIEW_TIERS = ("not_a_known_class", "low_confidence", "below_threshold")
THUMBNAIL_PX = 192


class ReviewFileError(Exception):
    """The CSV cannot be imported; the message lists every problem."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    sub.add_parser("import", help="record reviewed labels from a CSV (all or nothing)").add_argument("csv", metavar="CSV")
    export = sub.add_parser("export", help="write the low-confidence review queue as CSV")
    export.add_argument("--out", default="-", metavar="CSV", help="file to write (default: standard output)")
    export.add_argument("--limit", type=int, default=500, help="at most this many images (default 500)")
    export.add_argument("--site", default=None, help="only this site's cells")
    export.add_argument("--thumbnails", default=None, metavar="DIR",
                        help="write a picture of each listed cell into DIR (<image id>.png)")


def known_labels(session: Session) -> set[str]:
    """The classes of every site's active classifier."""
    return {label for version in registry.active_versions(session) if version.kind is ModelKind.classifier
            for label in (version.header or {}).get("classes") or []}


REQUIRED_COLUMNS = ("image", "label")
MAX_IMAGE_ID = 2**63 - 1  # the database's BIGINT; a longer number cannot name an image


def read_review_file(path: Path) -> tuple[list[dict[str, str]], str]:
    """The rows of a review CSV and the encoding it was read in: UTF-8 (with or without a byte-order mark),
    else Windows-1252, Excel's "CSV" format; raise ReviewFileError for anything else or a missing column."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ReviewFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    for encoding in ("utf-8-sig", "cp1252"):
        try:
            text = data.decode(encoding)
            break
        except UnicodeDecodeError:
            continue
    else:
        raise ReviewFileError(f"{path} is neither UTF-8 nor Windows-1252 text; save it from the spreadsheet as "
                              "\"CSV UTF-8\" and import it again; nothing imported")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        rows = list(reader)
    except csv.Error as exc:  # a field over csv.field_size_limit() (128 KiB), a NUL byte...
        raise ReviewFileError(f"{path}, line {reader.line_num + 1}: {exc}; a review field is a label, a name or a short "
                              "comment: fix that line; nothing imported") from None
    found = [name.strip() for name in reader.fieldnames or []]
    missing = [column for column in REQUIRED_COLUMNS if column not in found]
    if missing:
        raise ReviewFileError(f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(found) or 'none'}); "
                              "a review file needs the columns image, label and, optionally, reviewer, time, comment "
                              "(`stainbridge review export` writes one); nothing imported")
    return [{(k or "").strip(): v for k, v in row.items()} for row in rows], (
        "UTF-8" if encoding == "utf-8-sig" else "Windows-1252")


def _find_image(session: Session, key: str) -> Image | None:
    if len(key) == 64 and all(c in "0123456789abcdef" for c in key.lower()):  # a sha256, even if all digits
        return session.scalars(select(Image).where(Image.sha256 == key.lower(), Image.duplicate_of_id.is_(None))).first()
    if key.isdigit() and len(key) <= 19 and int(key) <= MAX_IMAGE_ID:
        return session.get(Image, int(key))
    return None


@dataclass
class ImportCounts:
    """What an import did: reviews added, changed (the old label kept as history) and already recorded."""

    added: int = 0
    changed: int = 0
    unchanged: int = 0
    encoding: str = "UTF-8"

    def summary(self) -> str:
        note = ("; read as Windows-1252 (Excel's \"CSV\" format; \"CSV UTF-8\" keeps every name)"
                if self.encoding != "UTF-8" else "")
        return (f"imported {self.added + self.changed} review(s): {self.added} new, {self.changed} changed, "
                f"{self.unchanged} already recorded{note}")


def import_reviews(session: Session, path: Path) -> ImportCounts:
    """Validate every row, then record them; raise ReviewFileError listing the problems. Caller commits.

    One current review per image and reviewer: the same label again changes nothing, another label
    supersedes the current one (kept, with ``superseded_at``)."""
    rows, encoding = read_review_file(path)
    labels = known_labels(session)
    problems: list[str] = []
    wanted: dict[tuple[int, str], tuple[int, Review]] = {}
    for line, row in enumerate(rows, start=2):
        key, label = (row.get("image") or "").strip(), (row.get("label") or "").strip()
        if not label:
            continue
        image = _find_image(session, key)
        if image is None:
            problems.append(f"line {line}: unknown image {key[:80]!r}" + ("..." if len(key) > 80 else ""))
        if (labels and label not in labels) or len(label) > 64:
            problems.append(f"line {line}: unknown label {label[:80]!r} (the classifier knows "
                            f"{', '.join(sorted(labels)) or 'no classes yet'})")
        when = datetime.now(timezone.utc)
        if (row.get("time") or "").strip():
            try:
                when = datetime.fromisoformat(row["time"].strip())
                when = when if when.tzinfo else when.replace(tzinfo=timezone.utc)
            except ValueError:
                problems.append(f"line {line}: time {row['time'][:80]!r} is not ISO 8601 (2026-12-01T09:30)")
        reviewer = (row.get("reviewer") or "").strip()[:128] or "unknown"
        if image is None:
            continue
        earlier = wanted.get((image.id, reviewer))
        if earlier is not None and earlier[1].label != label:
            problems.append(f"line {line}: image {key} is labelled {label!r} by {reviewer} here and "
                            f"{earlier[1].label!r} on line {earlier[0]}; keep one")
        wanted[(image.id, reviewer)] = (line, Review(image_id=image.id, label=label, reviewer=reviewer,
                                                     comment=(row.get("comment") or None), created_at=when))
    if problems:
        raise ReviewFileError(f"{path}: nothing imported; fix these {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    counts = ImportCounts(encoding=encoding)
    for (image_id, reviewer), (_, review) in wanted.items():
        current = session.scalars(select(Review).where(Review.image_id == image_id, Review.reviewer == reviewer,
                                                       Review.superseded_at.is_(None))).one_or_none()
        if current is not None and current.label == review.label:
            counts.unchanged += 1
            continue
        if current is not None:
            current.superseded_at = utcnow()
            session.flush()  # out of the one-current index before its successor goes in
            counts.changed += 1
        else:
            counts.added += 1
        session.add(review)
    session.flush()
    return counts


def review_tiers(below: float) -> list[tuple[str, ColumnElement[bool]]]:
    """(name, condition on the latest prediction) for each of REVIEW_TIERS, in queue order. An image is in the
    first tier whose condition it meets: flagged by the service (``needs_review`` with its reason), else less
    confident than ``below`` (``[retraining] review_below``)."""
    conditions = {
        "not_a_known_class": Prediction.review_reason == "not_a_known_class",
        "low_confidence": Prediction.review_reason == "low_confidence",
        "below_threshold": Prediction.confidence < below,
    }
    return [(name, conditions[name]) for name in REVIEW_TIERS]


def review_queue(session: Session, below: float, limit: int, site: str | None = None, *,
                 disagreements_per_site: int = 50) -> list[dict[str, object]]:
    """Unreviewed cells in review order: where a shadowed candidate disagrees with the active version (at most
    ``disagreements_per_site`` per site, ``[retraining] min_gate_reviews``: what its gate waits for), the validation
    samples of unvalidated sites (by site, in review order), then tier by tier (``review_tiers``); least confident
    first within a tier; at most ``limit``."""
    tiers = review_tiers(below)
    tier = case(*[(condition, rank) for rank, (_, condition) in enumerate(tiers)], else_=len(tiers))
    latest = select(Prediction.image_id, func.max(Prediction.id).label("pid")).group_by(Prediction.image_id).subquery()
    unreviewed = (select(Image, Prediction, ValidationCell.rank, tier.label("tier"))
                  .join(latest, latest.c.image_id == Image.id).join(Prediction, Prediction.id == latest.c.pid)
                  .outerjoin(Review, Review.image_id == Image.id)
                  .outerjoin(ValidationCell, ValidationCell.image_id == Image.id)
                  .where(Image.status == ImageStatus.done, Review.id.is_(None)))
    if site is not None:
        unreviewed = unreviewed.where(Image.site == site)
    least_confident = func.coalesce(Prediction.calibrated_confidence, Prediction.confidence)
    per_site: dict[str, int] = {}
    disagreeing = []
    for row in session.execute(unreviewed.where(Image.id.in_(select(CANDIDATE_DISAGREEMENTS.c.image_id)))
                               .order_by(Image.site, least_confident, Image.id)).all():
        per_site[row[0].site] = per_site.get(row[0].site, 0) + 1
        if per_site[row[0].site] <= disagreements_per_site:
            disagreeing.append(row)
    disagreeing = sorted(disagreeing, key=lambda row: (row[1].calibrated_confidence if row[1].calibrated_confidence
                                                       is not None else row[1].confidence, row[0].id))[:limit]
    first = {row[0].id for row in disagreeing}
    sample = [row for row in session.execute(
        unreviewed.join(Site, Site.id == ValidationCell.site_id).where(Site.state == SiteState.unvalidated)
        .order_by(Site.name, ValidationCell.rank).limit(limit + len(first))).all() if row[0].id not in first]
    shown = {row[0].id for row in sample}
    rest = session.execute(
        unreviewed.where(or_(*[c for _, c in tiers]))
        .order_by(tier, least_confident, Image.id)
        .limit(limit + len(shown) + len(first))).all()
    rows = (disagreeing + sample + [row for row in rest if row[0].id not in shown | first])[:limit]

    def tier_of(image_id: int, rank: int) -> str:
        return CANDIDATE_TIER if image_id in first else VALIDATION_TIER if image_id in shown else tiers[rank][0]

    return [{"image": i.id, "sha256": i.sha256, "source_name": i.source_name, "archive_path": i.archive_path or "",
             "site": i.site, "specimen": i.specimen or "", "tier": tier_of(i.id, rank),
             "validation_rank": vrank if i.id in shown else "", "predicted": p.label,
             "confidence": round(p.confidence, 4),
             "calibrated_confidence": "" if p.calibrated_confidence is None else round(p.calibrated_confidence, 4),
             "label": "", "reviewer": "", "time": "", "comment": "", "thumbnail": ""}
            for i, p, vrank, rank in rows]


def write_thumbnails(queue: list[dict[str, object]], folder: Path) -> int:
    """A picture of each listed cell in ``folder`` (``<image id>.png``), named in its ``thumbnail`` column."""
    from stainbridge.daemon.lab.render import read_picture

    folder.mkdir(parents=True, exist_ok=True)
    written = 0
    for row in queue:
        picture = read_picture(Path(str(row["archive_path"]))) if row["archive_path"] else None
        if picture is None:
            continue
        picture = picture.convert("RGB")
        picture.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        target = folder / f"{row['image']}.png"
        picture.save(target)
        row["thumbnail"] = str(target.absolute())
        written += 1
    return written


def run(args: argparse.Namespace) -> int:
    name = f"stainbridge review {args.action}"
    try:
        settings = load_settings(args.config)
        with database(settings) as sessions, sessions() as session:
            if args.action == "import":
                counts = import_reviews(session, Path(args.csv))
                session.commit()
                print(counts.summary())
                return 0
            queue = review_queue(session, settings.retraining.review_below, args.limit, args.site,
                                 disagreements_per_site=settings.retraining.min_gate_reviews)
    except (ConfigError, SchemaError, ReviewFileError) as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 1
    pictures = write_thumbnails(queue, Path(args.thumbnails)) if args.thumbnails else 0
    out = sys.stdout if args.out == "-" else open(args.out, "w", newline="", encoding="utf-8")  # noqa: SIM115
    try:
        out.write(EXCEL_BOM)  # hematologists open it in Excel, which needs the mark to read UTF-8 names
        writer = csv.DictWriter(out, fieldnames=EXPORT_COLUMNS)
        writer.writeheader()
        writer.writerows(safe_row(row) for row in queue)
    finally:
        if out is not sys.stdout:
            out.close()
    counts = {name: sum(1 for row in queue if row["tier"] == name)
              for name in (CANDIDATE_TIER, VALIDATION_TIER, *REVIEW_TIERS)}
    print(f"{len(queue)} image(s) written to {'standard output' if args.out == '-' else args.out}: "
          f"{counts[CANDIDATE_TIER]} where a candidate awaiting evidence disagrees, "
          f"{counts[VALIDATION_TIER]} of validation samples, {counts['not_a_known_class']} flagged as not a known "
          f"class, {counts['low_confidence']} flagged for low confidence, {counts['below_threshold']} more below "
          f"confidence {settings.retraining.review_below}"
          + (f"; {pictures} thumbnail(s) in {args.thumbnails}" if args.thumbnails else ""), file=sys.stderr)
    return 0
