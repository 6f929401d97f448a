"""`stainbridge retrain --now [--json]`: run the nightly job in the foreground, once.

Same job as the scheduler's (training subprocess, candidate, gate), under the same lock, so it
never runs alongside a scheduled run of another worker. Exit 0 when the run finished (promoted,
refused or skipped: see ``status``), 1 when it (or the classifier fine-tuning after it) failed or
another worker is running it. With ``--json`` the output is JSON in every case: no run at all is
``{"status": "locked" | "error", "reason": ..., "run_id": null, ...}``.
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


def _refused(args: argparse.Namespace, status: str, reason: str) -> int:
    """No run: the reason on standard error, and with --json the same as JSON (a script always gets JSON)."""
    print(f"stainbridge retrain: {reason}", file=sys.stderr)
    if args.json:
        print(json.dumps({"run_id": None, "status": status, "candidate_id": None, "promoted": False,
                          "reason": reason, "metrics": {}}, indent=2))
    return 1


def run(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config)
        prepare_database(settings.database_url, default_site=settings.site.name)
    except (ConfigError, SchemaError) as exc:
        return _refused(args, "error", str(exc))
    engine = make_engine(settings.database_url)
    try:
        with job_lock(settings, engine) as got:
            if not got:
                return _refused(args, "locked", "another worker is running the retraining job (it holds the "
                                "retraining lock); `stainbridge status` shows its stage; try again when it ends")
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
