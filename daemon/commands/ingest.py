"""`stainbridge ingest PATH...`: the service's pipeline, once, over files and folders (backfills).

The same `Pipeline` as `stainbridge run`, fed by ``watcher.iter_candidates`` instead of the
drop-folder watcher. Files are usually an existing archive being back-filled, so by default
they are recorded and LEFT WHERE THEY ARE: nothing outside the drop folder is moved unless
``--move`` is given (then they go to the archive/quarantine like dropped files). Source names
are absolute paths, which makes a repeated ingest of the same folder idempotent: files already
recorded are acknowledged, not classified or counted again.

Exit status: 0 when every file was processed (classified, or already recorded, or a duplicate),
1 when some failed, now or in an earlier run of the same files (reasons are printed and stored),
2 when a path does not exist.
"""

from __future__ import annotations

import argparse
import json
import sys

from sqlalchemy.exc import SQLAlchemyError

from stainbridge.daemon.config import ConfigError, load_settings
from stainbridge.daemon.intake.walking import iter_candidates
from stainbridge.daemon.logs import get_logger
from stainbridge.daemon.pipeline.batch import BatchReport
from stainbridge.daemon.pipeline.runner import Pipeline, absolute_candidates
from stainbridge.daemon.schema import SchemaError, prepare_database, safe_url
from stainbridge.daemon.store import make_engine, make_sessionmaker
from stainbridge.daemon.versions.loading import ModelConfigError
from stainbridge.daemon.versions.site_models import SiteModels

log = get_logger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (searched recursively)")
    parser.add_argument("--move", action="store_true",
                        help="move each file to the archive (or quarantine) afterwards, as the service does; "
                             "by default files stay where they are")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def summarize(report: BatchReport, total: int) -> str:
    lines = [
        f"files               {total}",
        f"classified          {report.done}",
        f"already recorded    {report.refiled}"
        + (f" ({report.refiled_failed} of them failed before)" if report.refiled_failed else ""),
        f"duplicates          {report.duplicates}",
        f"failed              {report.failed}",
    ]
    lines += [f"  {reason:<18}{n}" for reason, n in sorted(report.failures.items())]
    if report.skipped:
        lines.append(f"skipped             {report.skipped} (changed while read, or being processed elsewhere)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config)
        candidates = absolute_candidates(list(iter_candidates(args.paths, skip=(settings.quarantine_dir,))),
                                         settings.drop_dir)
    except ConfigError as exc:
        print(f"stainbridge ingest: configuration error: {exc}", file=sys.stderr)
        return 1
    except FileNotFoundError as exc:
        print(f"stainbridge ingest: {exc}", file=sys.stderr)
        return 2
    engine = None
    report = BatchReport()
    try:
        prepare_database(settings.database_url, default_site=settings.site.name)
        engine = make_engine(settings.database_url)
        sessions = make_sessionmaker(engine)
        pipeline = Pipeline(settings, sessions, SiteModels.start(settings, sessions), file_results=args.move)
        pipeline.recover(startup=True)
        size = settings.models.batch_size
        for start in range(0, len(candidates), size):
            report.add(pipeline.process(candidates[start:start + size]))
    except (SchemaError, ModelConfigError) as exc:
        print(f"stainbridge ingest: {exc}", file=sys.stderr)
        return 1
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        print(f"stainbridge ingest: database {safe_url(settings.database_url)}: {reason}", file=sys.stderr)
        return 1
    finally:
        if engine is not None:
            engine.dispose()
    log.info("ingested", files=len(candidates), done=report.done, failed=report.failed,
             duplicates=report.duplicates, already_recorded=report.refiled, moved=args.move)
    if args.json:
        print(json.dumps({"files": len(candidates), "classified": report.done, "already_recorded": report.refiled,
                          "already_recorded_failed": report.refiled_failed, "duplicates": report.duplicates,
                          "failed": report.failed, "failures": report.failures,
                          "skipped": report.skipped, "moved": args.move}, indent=2))
    else:
        print(summarize(report, len(candidates)))
    return 1 if report.failed or report.refiled_failed else 0

