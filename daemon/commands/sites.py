"""`stainbridge sites [--json] | sites validate SITE [--json]`: each site's validation state (docs/sites.md).

``sites`` only reads the database (the ``site_validation`` view; like ``status`` it creates nothing
and needs the schema at head): one line per site saying what its results rest on. ``--json`` prints ``[{"site", "validated", "reviews", "reviews_needed", "recipe",
"balanced_accuracy", "ci_low", "ci_high"}]`` (``recipe``: the standardizer + classifier serving the
site now). ``validate`` loads the recipes (on ``[models] device``), scores each on the site's
reviewed cells and makes the best one the site's recipe; a running service switches at its next
batch.
"""

from __future__ import annotations

import argparse
import json
import sys

from sqlalchemy.orm import sessionmaker

from stainbridge.daemon.commands.models import database
from stainbridge.daemon.config import ConfigError, Settings, load_settings
from stainbridge.daemon.schema import SchemaError, require_database
from stainbridge.daemon.store import make_engine, make_sessionmaker
from stainbridge.daemon.versions.site_state import site_summaries


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="a JSON list, one object per site")
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    validate = sub.add_parser("validate", help="choose a site's recipe on its reviewed cells; the site becomes "
                                               "validated")
    validate.add_argument("site", metavar="SITE")
    validate.add_argument("--json", action="store_true", help="print the result (every recipe's score) as JSON")


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def run(args: argparse.Namespace) -> int:
    name = "stainbridge sites" + (f" {args.action}" if args.action else "")
    try:
        settings = load_settings(args.config)
        if args.action == "validate":
            with database(settings) as sessions:
                return _validate(settings, sessions, args)
        require_database(settings.database_url, settings.source)  # listing only reads: nothing is created
        engine = make_engine(settings.database_url)
        try:
            with make_sessionmaker(engine)() as session:
                summaries = site_summaries(session)
        finally:
            engine.dispose()
    except (ConfigError, SchemaError) as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([s.as_json() for s in summaries], indent=2))
        return 0
    if not summaries:
        print("no site yet: a site appears when the service classifies its first file")
    for summary in summaries:
        print(f"{summary.describe()}  (recipe: {summary.recipe or 'none registered'})")
    return 0


def _validate(settings: Settings, sessions: sessionmaker, args: argparse.Namespace) -> int:
    from stainbridge.daemon.retraining.validation import ValidationError, validate_site
    from stainbridge.daemon.versions.loading import ModelConfigError

    try:
        result = validate_site(settings, sessions, args.site)
    except (ValidationError, ModelConfigError) as exc:
        print(f"stainbridge sites validate: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for recipe in result["recipes"]:
        mark = "*" if recipe["recipe"] == result["recipe"] else " "
        print(f"{mark} {_score(recipe['balanced_accuracy'])} [{_score(recipe['ci_low'])}-{_score(recipe['ci_high'])}]"
              f"  {recipe['recipe']}")
    print(f"site {args.site}: validated: {_score(result['balanced_accuracy'])} [{_score(result['ci_low'])}-"
          f"{_score(result['ci_high'])}] on {result['cells']} cells with {result['recipe']}; "
          "a running service switches at its next batch")
    return 0
