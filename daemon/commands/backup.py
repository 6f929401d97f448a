"""`stainbridge backup DIR`: what a restore needs to bring the service back, verified by sha256.

Into a new folder DIR (refused if it exists and is not empty; written as ``DIR.partial`` and
renamed at the end, so that a DIR is always a complete backup):

- ``database.sqlite`` (SQLite's online backup API: safe while the service runs) or
  ``database.pgdump`` (``pg_dump --format=custom``; the client's major version must be at
  least the server's);
- ``checkpoints/<sha256>.safetensors``: every checkpoint the registry names (the configured ones,
  the nightly job's ``<state>/retraining/run-N/*.safetensors``, candidates and retired versions
  for ``models rollback``), each checked against its registered sha256 as it is copied;
- ``config/stainbridge.toml``: the configuration file read (it holds the pseudonym secret: DIR is
  made readable by its owner only);
- ``manifest.json``: every file with its sha256, size and where it goes back, the schema
  revision, the stainbridge version.

The archive and the quarantine are not included (they can be terabytes): copy them with rsync
after the backup (a file is moved into the archive only after its row commits, so every path in
this database copy exists in a later copy of the archive). `stainbridge restore DIR` verifies
every sha256 before it writes anything.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from stainbridge.daemon.config import ConfigError, Settings, load_settings
from stainbridge.daemon.schema import SchemaError, current_revision, require_existing, safe_url, sqlite_file
from stainbridge.daemon.store import ModelVersion, VersionState, make_engine, make_sessionmaker
from stainbridge.daemon.versions.registry import is_builtin, list_versions

MANIFEST = "manifest.json"
FORMAT = 1


class BackupError(Exception):
    """The backup cannot be made (or restored); the message says what to do."""


def file_digest(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def pg_command(tool: str, url: str, *args: str) -> tuple[list[str], dict[str, str]]:
    """`tool` (pg_dump, pg_restore) for the database at `url`: the arguments, and the environment holding the
    password (never on the command line, where `ps` shows it)."""
    if shutil.which(tool) is None:
        raise BackupError(f"{tool} is not installed; install the PostgreSQL client of the server's major version "
                          "(Debian: apt-get install postgresql-client-15)")
    parts = make_url(url)
    cmd = [tool, "--dbname", parts.database or "", *args]
    if parts.host:
        cmd += ["--host", parts.host]
    if parts.port:
        cmd += ["--port", str(parts.port)]
    if parts.username:
        cmd += ["--username", parts.username]
    env = {**os.environ, "PGPASSWORD": parts.password or ""} if parts.password else dict(os.environ)
    return cmd, env


def run_tool(cmd: list[str], env: dict[str, str], what: str) -> None:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BackupError(f"{what} failed ({cmd[0]} exit {done.returncode}): {done.stderr.strip()[-500:]}")


def snapshot_database(settings: Settings, folder: Path) -> str:
    """Write the database into `folder`; returns the file's name."""
    url = settings.database_url
    path = sqlite_file(url)
    if path is not None:
        target = folder / "database.sqlite"
        source = sqlite3.connect(path)  # it exists (checked): connecting creates nothing
        try:
            copy = sqlite3.connect(target)
            try:
                source.backup(copy)  # consistent even while the service writes (the WAL is included)
            finally:
                copy.close()
        finally:
            source.close()
        return target.name
    target = folder / "database.pgdump"
    cmd, env = pg_command("pg_dump", url, "--format=custom", "--file", str(target))
    run_tool(cmd, env, f"dumping {safe_url(url)}")
    return target.name


@dataclass
class Entry:
    path: str  # inside the backup
    role: str  # database | checkpoint | configuration
    restore_to: str | None  # absolute path it goes back to (None: the database, which goes where the config says)
    sha256: str = ""
    size: int = 0
    versions: list[int] | None = None  # model_versions ids using this checkpoint


def registered_checkpoints(settings: Settings) -> list[ModelVersion]:
    """Every version in the registry whose checkpoint is a file (built-in standardizers have none)."""
    engine = make_engine(settings.database_url)
    try:
        with make_sessionmaker(engine)() as session:
            return [v for v in list_versions(session) if not is_builtin(v)]
    finally:
        engine.dispose()


def copy_checkpoints(versions: list[ModelVersion], folder: Path) -> tuple[list[Entry], list[str]]:
    """Copy each registered checkpoint once (by sha256); returns the entries and the warnings. A missing or changed
    file of an active version is an error; of a candidate or retired one, a warning (it is left out). A version whose
    file `models prune` removed on purpose (``metrics.pruned_at``) is left out without one."""
    (folder / "checkpoints").mkdir()
    entries: dict[str, Entry] = {}
    warnings: list[str] = []
    for v in versions:
        if v.sha256 in entries:
            entries[v.sha256].versions.append(v.id)
            continue
        if (v.metrics or {}).get("pruned_at") and v.state is not VersionState.active:
            continue
        source = Path(v.path)
        target = folder / "checkpoints" / f"{v.sha256}.safetensors"
        problem = None
        try:
            shutil.copyfile(source, target)
            if file_digest(target) != v.sha256:
                problem = f"{source} has changed since version {v.id} was registered"
        except OSError as exc:
            problem = f"cannot read {source} (version {v.id}): {exc.strerror}"
        if problem is not None:
            target.unlink(missing_ok=True)
            if v.state is VersionState.active:
                raise BackupError(f"{problem}; the active {v.kind.value} must be backed up: restore the file, or "
                                  f"roll back with `stainbridge models rollback {v.kind.value}`")
            warnings.append(f"left out: {problem} ({v.state.value} version)")
            continue
        entries[v.sha256] = Entry(f"checkpoints/{target.name}", "checkpoint", str(source.absolute()), v.sha256,
                                  target.stat().st_size, [v.id])
    return list(entries.values()), warnings


def make_backup(settings: Settings, destination: Path) -> dict[str, Any]:
    """Write a complete backup into `destination` (a new folder); returns the manifest."""
    if destination.exists() and any(destination.iterdir()):
        raise BackupError(f"{destination} is not empty; back up into a new folder (e.g. one per date)")
    require_existing(settings.database_url, settings.source)
    partial = destination.with_name(destination.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(mode=0o700, parents=True)
    versions = registered_checkpoints(settings)
    revision = current_revision(settings.database_url)
    entries = [Entry(snapshot_database(settings, partial), "database", None)]
    copied, warnings = copy_checkpoints(versions, partial)
    entries += copied
    if settings.config_file is not None:
        (partial / "config").mkdir()
        shutil.copyfile(settings.config_file, partial / "config" / "stainbridge.toml")
        entries.append(Entry("config/stainbridge.toml", "configuration", str(settings.config_file)))
    for entry in entries:
        file = partial / entry.path
        entry.sha256, entry.size = file_digest(file), file.stat().st_size
    manifest = {
        "format": FORMAT,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "stainbridge_version": _version(),
        "database": {"kind": "sqlite" if sqlite_file(settings.database_url) else "postgresql",
                     "url": safe_url(settings.database_url), "revision": revision},
        "files": [vars(entry) for entry in entries],
        "warnings": warnings,
    }
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    if destination.exists():
        destination.rmdir()  # empty (checked above)
    os.rename(partial, destination)
    return manifest


def _version() -> str:
    try:
        return version("stainbridge")
    except PackageNotFoundError:
        return "unknown"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Back up the database, every registered checkpoint and the configuration into a new "
                          "folder, with a manifest of sha256 sums (`stainbridge restore DIR` checks them).")
    parser.add_argument("dir", metavar="DIR", help="a new (or empty) folder to write the backup into")


def run(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config)
        manifest = make_backup(settings, Path(args.dir).absolute())
    except (ConfigError, SchemaError, BackupError) as exc:
        print(f"stainbridge backup: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"stainbridge backup: cannot write {exc.filename}: {exc.strerror}; choose another DIR", file=sys.stderr)
        return 1
    for warning in manifest["warnings"]:
        print(f"stainbridge backup: {warning}", file=sys.stderr)
    files = manifest["files"]
    checkpoints = sum(1 for f in files if f["role"] == "checkpoint")
    print(f"backed up {manifest['database']['url']} (revision {manifest['database']['revision']}), {checkpoints} "
          f"checkpoint(s) and {'the configuration' if settings.config_file else 'no configuration file'} into "
          f"{args.dir} ({sum(f['size'] for f in files) / 2**20:.1f} MiB); copy the archive and quarantine "
          "folders with rsync now")
    return 0
