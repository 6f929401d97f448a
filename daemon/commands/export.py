"""`stainbridge export --format csv|json [--since DATE] [--until DATE] [--out FILE]`: the `results` view, streamed.

One row per received image (its latest prediction, models and review, and its site's validation state),
oldest first. Rows are
fetched in chunks (``yield_per``; a server-side cursor on PostgreSQL) and written as they come,
so memory stays constant however many years of results there are. CSV text cells that a
spreadsheet would read as a formula (a file named ``=HYPERLINK(...).png``) get a leading ``'``
(``commands.spreadsheet``); JSON is written as it is. It creates no database: it
reads the one the configuration names (as `status` does).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Iterator
from datetime import date, datetime, timezone
from functools import partial
from typing import IO, Any

from sqlalchemy import Boolean, DateTime, bindparam, select, text

from stainbridge.daemon.commands.report import parse_date
from stainbridge.daemon.commands.spreadsheet import safe_row
from stainbridge.daemon.config import ConfigError, load_settings
from stainbridge.daemon.lab.report import Period
from stainbridge.daemon.lab.views import ROW_VALIDATION_SQL
from stainbridge.daemon.schema import SchemaError, require_database
from stainbridge.daemon.store import ModelKind, ModelVersion, make_engine

CHUNK_ROWS = 1000
RESULTS_COLUMNS = ("image_id", "source_name", "site", "specimen", "status", "error", "received_at", "processed_at", "label",
                   "confidence", "probabilities", "standardizer", "classifier", "reviewed_label", "reviewer",
                   "patient_pseudonym", "study_uid", "series_uid", "sop_instance_uid", "sha256", "archive_path", "tta",
                   "magnification", "calibrated_confidence", "ood_score", "needs_review", "review_reason")
DECIMALS = 4  # probabilities and confidences: what a spreadsheet needs, not float noise
PROBABILITY_PREFIX = "probability_"  # CSV: one column per class (classes of every registered classifier)
# ... and what the row rests on (daemon.lab.views.ROW_VALIDATION_SQL): "unvalidated (12 of 50 reviews)",
# "validated: 0.91 [0.86-0.95] on 50 cells" or "not the validated recipe (site validated: ...)"
COLUMNS = (*RESULTS_COLUMNS, "validation")
QUERY = (f"SELECT {', '.join('r.' + c for c in RESULTS_COLUMNS)}, {ROW_VALIDATION_SQL} AS validation FROM results r "
         "LEFT JOIN site_validation v ON v.site = r.site "
         "WHERE r.received_at >= :since AND r.received_at < :until ORDER BY r.received_at, r.image_id")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=("csv", "json"), default="csv", help="csv (default) or json (an array)")
    parser.add_argument("--since", type=parse_date, metavar="DATE", help="first day included (YYYY-MM-DD, UTC)")
    parser.add_argument("--until", type=parse_date, metavar="DATE", help="last day included (YYYY-MM-DD, UTC)")
    parser.add_argument("--out", metavar="FILE", help="write here instead of standard output")


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):  # stored in UTC; SQLite hands it back without its zone
        return (value.astimezone(timezone.utc) if value.tzinfo else value.replace(tzinfo=timezone.utc)).isoformat()
    if hasattr(value, "value"):  # enums read through the ORM types
        return value.value
    return value


def stream_rows(database_url: str, since: date | None = None, until: date | None = None) -> Iterator[dict[str, Any]]:
    """The results rows of the period, one dict at a time, fetched CHUNK_ROWS at a time."""
    period = Period.from_dates(since, until)
    stamp = DateTime(timezone=True)
    query = text(QUERY).bindparams(bindparam("since", type_=stamp), bindparam("until", type_=stamp)).columns(
        received_at=stamp, processed_at=stamp, tta=Boolean(), needs_review=Boolean())  # typed: SQLite stores 0/1
    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            result = connection.execution_options(stream_results=True, yield_per=CHUNK_ROWS).execute(
                query, {"since": period.since, "until": period.until})
            for row in result:
                record = {k: _plain(v) for k, v in row._mapping.items()}
                if isinstance(record["probabilities"], str):  # SQLite hands JSON back as text
                    record["probabilities"] = json.loads(record["probabilities"])
                if record["probabilities"] is not None:
                    record["probabilities"] = {k: round(float(v), DECIMALS) for k, v in record["probabilities"].items()}
                for key in ("confidence", "calibrated_confidence", "ood_score"):
                    if record[key] is not None:
                        record[key] = round(float(record[key]), DECIMALS)
                yield record
    finally:
        engine.dispose()


def known_classes(database_url: str) -> list[str]:
    """Every class a registered classifier knows (the CSV's probability columns), sorted."""
    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            headers = connection.execute(select(ModelVersion.header).where(ModelVersion.kind == ModelKind.classifier))
            return sorted({str(name) for (header,) in headers for name in (header or {}).get("classes", [])})
    finally:
        engine.dispose()


def write_csv(rows: Iterator[dict[str, Any]], out: IO[str], classes: list[str]) -> int:
    """CSV with one ``probability_<class>`` column per class instead of the probabilities object."""
    columns = [c for c in COLUMNS if c != "probabilities"]
    at = columns.index("confidence")
    columns[at:at] = [PROBABILITY_PREFIX + name for name in classes]
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    n = 0
    for n, row in enumerate(rows, 1):
        for name, value in (row.pop("probabilities") or {}).items():
            row[PROBABILITY_PREFIX + name] = value  # a class no classifier header names is left out
        writer.writerow(safe_row(row))  # names from another hospital never become spreadsheet formulas
    return n


def write_json(rows: Iterator[dict[str, Any]], out: IO[str]) -> int:
    out.write("[")
    n = 0
    for n, row in enumerate(rows, 1):
        out.write(("\n" if n == 1 else ",\n") + json.dumps(row, ensure_ascii=False))
    out.write("\n]\n")
    return n


def run(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config)
        require_database(settings.database_url, settings.source)
        Period.from_dates(args.since, args.until)
    except (ConfigError, SchemaError) as exc:
        print(f"stainbridge export: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"stainbridge export: {exc}", file=sys.stderr)
        return 2
    writer = partial(write_csv, classes=known_classes(settings.database_url)) if args.format == "csv" else write_json
    rows = stream_rows(settings.database_url, args.since, args.until)
    if args.out is None:
        n = writer(rows, sys.stdout)
    else:
        try:
            with open(args.out, "w", encoding="utf-8", newline="") as handle:
                n = writer(rows, handle)
        except OSError as exc:
            print(f"stainbridge export: cannot write {args.out}: {exc.strerror}; choose another --out", file=sys.stderr)
            return 1
    print(f"stainbridge export: {n} rows", file=sys.stderr)
    return 0
