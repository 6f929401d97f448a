"""`stainbridge retrain --now [--json]`: run the nightly job in the foreground, once.

Same job as the scheduler's (training subprocess, candidate, gate), under the same lock, so it
never runs alongside a scheduled run of another worker. Exit 0 when the run finished (promoted,
refused or skipped: see ``status``), 1 when it (or the classifier fine-tuning after it) failed or
another worker is running it.
"""

from __future__ import annotations

import argparse
import json
import sys

from stainbridge.daemon.config import ConfigError, load_settings
from stainbridge.daemon.retraining.nightly import run_retraining
from stainbridge.daemon.retraining.scheduler import job_lock
from stainbridge.daemon.schema import SchemaError, prepare_database
from stainbridge.daemon.store import make_engine, make_sessionmaker


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--now", action="store_true", required=True, help="run the job now, in the foreground")
    parser.add_argument("--json", action="store_true",
                        help="print {run_id, status, candidate_id, promoted, reason, metrics}")


def run(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config)
        prepare_database(settings.database_url, default_site=settings.site.name)
    except (ConfigError, SchemaError) as exc:
        print(f"stainbridge retrain: {exc}", file=sys.stderr)
        return 1
    engine = make_engine(settings.database_url)
    try:
        with job_lock(settings, engine) as got:
            if not got:
                print("stainbridge retrain: another worker is running the retraining job; try again later",
                      file=sys.stderr)
                return 1
            result = run_retraining(settings, make_sessionmaker(engine), trigger="manual")
    finally:
        engine.dispose()
    if args.json:
        print(json.dumps(result.as_json(), indent=2, default=str))
    else:
        verdict = "promoted" if result.promoted else result.status
        print(f"run {result.run_id}: {verdict}" + (f", candidate {result.candidate_id}" if result.candidate_id else "")
              + f": {result.reason}")
        tuned = result.metrics.get("classifier") or {}
        if tuned:
            verdict = "promoted" if tuned.get("promoted") else tuned["status"]
            print(f"classifier{' run ' + str(tuned['run_id']) if tuned.get('run_id') else ''}: {verdict}"
                  + (f", candidate {tuned['candidate_id']}" if tuned.get("candidate_id") else "")
                  + f": {tuned.get('reason', '')}")
    failed = result.status == "failed" or (result.metrics.get("classifier") or {}).get("status") == "failed"
    return 1 if failed else 0
