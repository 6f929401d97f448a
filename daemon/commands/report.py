"""`stainbridge report [--since DATE] [--until DATE] --out FILE.html`: one self-contained HTML page.

Reads the database (aggregates, see daemon/report.py) and the archived images of the few it shows;
it never needs the models or a GPU, so it can run while the service works. On a new SQLite database it
first creates the schema (as `status` does); on PostgreSQL it asks for `stainbridge db upgrade`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import date
from pathlib import Path

from stainbridge.daemon.config import ConfigError, load_settings
from stainbridge.daemon.schema import SchemaError, prepare_database, safe_url
from stainbridge.daemon.store import make_engine


def parse_date(value: str) -> date:
    """argparse type for YYYY-MM-DD (a UTC calendar day)."""
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a date; write it as YYYY-MM-DD (UTC)") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--since", type=parse_date, metavar="DATE", help="first day included (YYYY-MM-DD, UTC)")
    parser.add_argument("--until", type=parse_date, metavar="DATE", help="last day included (YYYY-MM-DD, UTC)")
    parser.add_argument("--out", required=True, metavar="FILE.html", help="where to write the report")


def write_report(database_url: str, out: Path, since: date | None = None, until: date | None = None) -> Path:
    """Gather, render and write the report atomically; returns the path written."""
    from stainbridge.daemon.report import Period, gather
    from stainbridge.daemon.report_render import render

    period = Period.from_dates(since, until)
    engine = make_engine(database_url)
    try:
        data = gather(engine, period, safe_url(database_url))
    finally:
        engine.dispose()
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    temp.write_text(render(data), encoding="utf-8")
    os.replace(temp, out)
    return out


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    out = Path(args.out).absolute()
    try:
        settings = load_settings(args.config)
        prepare_database(settings.database_url)
        write_report(settings.database_url, out, args.since, args.until)
    except (ConfigError, SchemaError) as exc:
        print(f"stainbridge report: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # --until before --since
        print(f"stainbridge report: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"stainbridge report: cannot write {out}: {exc.strerror}; choose another --out", file=sys.stderr)
        return 1
    size_kb = out.stat().st_size / 1024
    print(f"report written to {out} ({size_kb:.0f} KiB, {time.monotonic() - started:.1f} s)")
    return 0
