"""`stainbridge init [--config FILE]`: prepare the configured folders and the database, once, at install.

Creates the state, drop, archive and quarantine folders (and a SQLite database's folder) where
they are missing, writes the marker the service looks for in each (``daemon.folders``), checks
that each can be written to, and brings the database to the newest schema (as `stainbridge db
upgrade`). Run it as the user the service runs as (under systemd: ``sudo -u stainbridge``), with
the service's configuration, and again whenever ``[paths]`` changes. It is safe to run twice; it
never deletes anything. The service itself creates none of these folders (a missing archive
share must not be re-created on the root disk), so it refuses to start until they are prepared.
"""

from __future__ import annotations

import argparse
import sys

from stainbridge.daemon import folders
from stainbridge.daemon.config import ConfigError, load_settings
from stainbridge.daemon.schema import SchemaError, current_revision, safe_url, upgrade_database


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Create and check the configured folders (state, drop, archive, quarantine) and bring "
                          "the database to the newest schema; run once at install, as the service's user.")


def run(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"stainbridge init: configuration error: {exc}", file=sys.stderr)
        return 1
    print(f"configuration: {settings.source}")
    try:
        for line in folders.prepare(settings):
            print(line)
    except OSError as exc:
        print(f"stainbridge init: cannot create {exc.filename}: {exc.strerror}; create it yourself (owned by the "
              "service's user) or run this as a user that may", file=sys.stderr)
        return 1
    wrong = folders.problems(settings)
    if wrong:
        print("stainbridge init: " + "\nstainbridge init: ".join(wrong), file=sys.stderr)
        return 1
    for role, folder in folders.configured(settings).items():
        print(f"{role:<11}{folder}  (exists, prepared, writable)")
    try:
        upgrade_database(settings.database_url, default_site=settings.site.name)
        revision = current_revision(settings.database_url)
    except SchemaError as exc:
        print(f"stainbridge init: database error: {exc}", file=sys.stderr)
        return 1
    print(f"database   {safe_url(settings.database_url)} at revision {revision} (head)")
    print("ready: start the service (`systemctl start stainbridge`, or `stainbridge run` with this configuration)")
    return 0
