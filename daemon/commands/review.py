"""`stainbridge review import CSV | review export [--out CSV] [--thumbnails DIR]`: expert-confirmed labels.

``export`` writes the review queue, with an empty ``label`` column for the hematologist to fill in, as
UTF-8 with a byte-order mark for Excel and with names that would start a formula neutralized
(``commands.spreadsheet``): first each unvalidated site's validation sample (the cells the service
chose from its first ones, docs/sites.md; ``validation_rank`` 1, 2, ... in review order), then the
low-confidence queue: classified images without a review whose latest prediction is less confident
than ``[retraining] review_below``, least confident first. ``--thumbnails DIR`` writes a picture of
each listed cell there (``<image id>.png``, decoded as the service decodes it) and names it in the
``thumbnail`` column. ``import`` reads such a file back (columns
``image`` = image id or sha256, ``label``, ``reviewer``, optional ``time`` (ISO 8601) and
``comment``; rows with an empty label are skipped). It is all or nothing: unknown images and
labels the active classifier does not know are all reported and nothing is written.
Reviews feed the promotion gate, ``status`` and the ``results`` view.
"""

from __future__ import annotations

import argparse
import csv
import sys
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import func, select
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
)
from stainbridge.daemon.versions import registry

EXPORT_COLUMNS = ["image", "sha256", "source_name", "archive_path", "predicted", "confidence", "label", "reviewer",
                  "time", "comment", "site", "validation_rank", "thumbnail"]
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


def import_reviews(session: Session, path: Path) -> int:
    """Validate every row, then add them all; raise ReviewFileError listing the problems. Caller commits."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as exc:
        raise ReviewFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    if rows and not {"image", "label"} <= set(rows[0]):
        raise ReviewFileError(f"{path}: needs the columns image, label, reviewer (found {', '.join(rows[0])})")
    labels = known_labels(session)
    problems: list[str] = []
    reviews: list[Review] = []
    for line, row in enumerate(rows, start=2):
        key, label = (row.get("image") or "").strip(), (row.get("label") or "").strip()
        if not label:
            continue
        image = None
        if len(key) == 64 and all(c in "0123456789abcdef" for c in key.lower()):  # a sha256, even if all digits
            image = session.scalars(select(Image).where(Image.sha256 == key.lower(),
                                                        Image.duplicate_of_id.is_(None))).first()
        elif key.isdigit():
            image = session.get(Image, int(key))
        if image is None:
            problems.append(f"line {line}: unknown image {key!r}")
        if labels and label not in labels:
            problems.append(f"line {line}: unknown label {label!r} (the classifier knows {', '.join(sorted(labels))})")
        when = datetime.now(timezone.utc)
        if (row.get("time") or "").strip():
            try:
                when = datetime.fromisoformat(row["time"].strip())
                when = when if when.tzinfo else when.replace(tzinfo=timezone.utc)
            except ValueError:
                problems.append(f"line {line}: time {row['time']!r} is not ISO 8601 (2026-12-01T09:30)")
        if image is not None:
            reviews.append(Review(image_id=image.id, label=label, reviewer=(row.get("reviewer") or "unknown")[:128],
                                  comment=(row.get("comment") or None), created_at=when))
    if problems:
        raise ReviewFileError(f"{path}: nothing imported; fix these {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    session.add_all(reviews)
    return len(reviews)


def review_queue(session: Session, below: float, limit: int, site: str | None = None) -> list[dict[str, object]]:
    """Unreviewed cells: the validation samples of unvalidated sites (by site, in review order), then those less
    confident than ``below`` (least confident first); at most ``limit``."""
    latest = select(Prediction.image_id, func.max(Prediction.id).label("pid")).group_by(Prediction.image_id).subquery()
    unreviewed = (select(Image, Prediction, ValidationCell.rank)
                  .join(latest, latest.c.image_id == Image.id).join(Prediction, Prediction.id == latest.c.pid)
                  .outerjoin(Review, Review.image_id == Image.id)
                  .outerjoin(ValidationCell, ValidationCell.image_id == Image.id)
                  .where(Image.status == ImageStatus.done, Review.id.is_(None)))
    if site is not None:
        unreviewed = unreviewed.where(Image.site == site)
    sample = session.execute(
        unreviewed.join(Site, Site.id == ValidationCell.site_id).where(Site.state == SiteState.unvalidated)
        .order_by(Site.name, ValidationCell.rank).limit(limit)).all()
    shown = {i.id for i, _, _ in sample}
    rest = session.execute(
        unreviewed.where(Prediction.confidence < below).order_by(Prediction.confidence, Image.id)
        .limit(limit + len(shown))).all()
    rows = (sample + [row for row in rest if row[0].id not in shown])[:limit]
    return [{"image": i.id, "sha256": i.sha256, "source_name": i.source_name, "archive_path": i.archive_path or "",
             "predicted": p.label, "confidence": round(p.confidence, 4), "label": "", "reviewer": "", "time": "",
             "comment": "", "site": i.site, "validation_rank": rank if i.id in shown else "", "thumbnail": ""}
            for i, p, rank in rows]


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
                count = import_reviews(session, Path(args.csv))
                session.commit()
                print(f"imported {count} review(s)")
                return 0
            queue = review_queue(session, settings.retraining.review_below, args.limit, args.site)
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
    sample = sum(1 for row in queue if row["validation_rank"] != "")
    print(f"{len(queue)} image(s) written to {'standard output' if args.out == '-' else args.out}: {sample} of "
          f"validation samples, {len(queue) - sample} below confidence {settings.retraining.review_below}"
          + (f"; {pictures} thumbnail(s) in {args.thumbnails}" if args.thumbnails else ""), file=sys.stderr)
    return 0
