"""`stainbridge reprocess [--since DATE] [--status failed] [--model-version ID] [--json]`.

Classifies stored images again with the registry's active models and adds prediction rows;
the old rows stay. Default: every classified (``done``) image in the archive; ``--status
failed``: quarantined images whose failure was transient (see ``retraining.reprocess``);
``--model-version ID``: only images whose latest prediction that version made.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from datetime import datetime, timezone

from stainbridge.daemon.config import ConfigError, load_settings
from stainbridge.daemon.retraining.reprocess import reprocess, select_images
from stainbridge.daemon.schema import SchemaError, prepare_database
from stainbridge.daemon.store import make_engine, make_sessionmaker
from stainbridge.daemon.versions.loading import ModelConfigError
from stainbridge.daemon.versions.site_models import SiteModels


def _date(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date; use YYYY-MM-DD or an ISO 8601 time") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--since", type=_date, default=None, help="images received on or after this date")
    parser.add_argument("--status", choices=("done", "failed"), default="done",
                        help="done (default): classified images; failed: transient failures in quarantine")
    parser.add_argument("--model-version", type=int, default=None, metavar="ID",
                        help="only images whose latest prediction this version made")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config)
        prepare_database(settings.database_url, default_site=settings.site.name)
    except (ConfigError, SchemaError) as exc:
        print(f"stainbridge reprocess: {exc}", file=sys.stderr)
        return 1
    engine = make_engine(settings.database_url)
    try:
        sessions = make_sessionmaker(engine)
        try:
            models = SiteModels.start(settings, sessions)
        except ModelConfigError as exc:
            print(f"stainbridge reprocess: {exc}", file=sys.stderr)
            return 1
        images = select_images(sessions, since=args.since, status=args.status, model_version=args.model_version)
        report = reprocess(settings, sessions, models, images)
    finally:
        engine.dispose()
    default = models.default
    summary = {**asdict(report), "classifier_version": default.classifier_version_id,
               "standardizer_version": default.standardizer_version_id,
               "sites": {site: {"classifier_version": m.classifier_version_id,
                                "standardizer_version": m.standardizer_version_id} for site, m in models.loaded.items()}}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        versions = "; ".join(f"site {site}: classifier version {m['classifier_version']}, standardizer version "
                             f"{m['standardizer_version']}" for site, m in summary["sites"].items())
        print(f"reprocessed {report.classified} of {report.selected} image(s) ({versions})"
              + (f"; unreadable: {report.unreadable}" if report.unreadable else ""))
    return 1 if report.unreadable else 0
