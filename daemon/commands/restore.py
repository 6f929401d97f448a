"""`stainbridge restore DIR`: put a `stainbridge backup` back, after checking every file's sha256.

Stop the service (every worker) first. Nothing is written until every file of the backup matches
its manifest (size and sha256): a damaged or tampered backup is refused whole. Then, in order:

1. the configuration goes back to the path it was read from if no file is there (one that is
   there and differs is left alone; the backup's copy is written beside it as ``.from-backup``);
2. the settings are loaded as for any command (``--config``, ``$STAINBRIDGE_CONFIG``, then
   ``/etc/stainbridge/stainbridge.toml``);
3. each checkpoint goes back to its path (a different file there is kept as
   ``<name>.before-restore-<time>``), written to a temporary name, fsynced and renamed;
4. the database: SQLite's file is replaced (the old one, with its ``-wal`` and ``-shm``, is kept
   as ``.before-restore-<time>``); PostgreSQL gets ``pg_restore --clean --if-exists`` into the
   configured database, which must exist.

Nothing is deleted. Then every active model's file is checked against the restored registry, and
the schema revision is compared with this code's (run `stainbridge db upgrade` if it is older).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from stainbridge.daemon.commands.backup import (
    FORMAT,
    MANIFEST,
    BackupError,
    file_digest,
    pg_command,
    registered_checkpoints,
    run_tool,
)
from stainbridge.daemon.config import ConfigError, Settings, load_settings
from stainbridge.daemon.schema import SchemaError, current_revision, head_revision, safe_url, sqlite_file
from stainbridge.daemon.store import VersionState


def read_verified(folder: Path) -> dict[str, Any]:
    """The manifest of the backup in `folder`, once every file it lists has its size and sha256."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BackupError(f"{folder} holds no readable {MANIFEST} ({exc}); is it a `stainbridge backup` folder?")
    if manifest.get("format") != FORMAT:
        raise BackupError(f"{folder}: backup format {manifest.get('format')!r}, this version reads {FORMAT}")
    damaged = []
    for entry in manifest["files"]:
        path = folder / entry["path"]
        if not path.is_file() or path.stat().st_size != entry["size"] or file_digest(path) != entry["sha256"]:
            damaged.append(entry["path"])
    if damaged:
        raise BackupError(f"{folder} is damaged: {', '.join(damaged)} do(es) not match the manifest's sha256; "
                          "nothing was restored. Use another backup")
    return manifest


def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def _put(source: Path, target: Path, sha256: str, done: list[str]) -> None:
    """Write `source` to `target` (temp, fsync, rename); a different file already there is kept aside."""
    if target.is_file() and file_digest(target) == sha256:
        done.append(f"{target}: already there")
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        kept = target.with_name(f"{target.name}.before-restore-{_stamp()}")
        os.replace(target, kept)
        done.append(f"{target}: the file that was there is kept as {kept.name}")
    temp = target.with_name(f".{target.name}.restore-{os.getpid()}")
    with source.open("rb") as src, temp.open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(temp, target)
    done.append(f"{target}: restored")


def restore_configuration(folder: Path, manifest: dict[str, Any], done: list[str]) -> None:
    for entry in manifest["files"]:
        if entry["role"] != "configuration":
            continue
        target, source = Path(entry["restore_to"]), folder / entry["path"]
        if not target.exists():
            _put(source, target, entry["sha256"], done)
        elif file_digest(target) != entry["sha256"]:
            beside = target.with_name(target.name + ".from-backup")
            shutil.copyfile(source, beside)
            done.append(f"{target} differs from the backup's and was left as it is; the backup's is {beside}")


def restore_database(settings: Settings, folder: Path, manifest: dict[str, Any], done: list[str]) -> None:
    entry = next(e for e in manifest["files"] if e["role"] == "database")
    url = settings.database_url
    path = sqlite_file(url)
    if (path is not None) != (manifest["database"]["kind"] == "sqlite"):
        raise BackupError(f"the backup holds a {manifest['database']['kind']} database and the configuration names "
                          f"{safe_url(url)}; restore with the configuration the backup was made with")
    if path is None:
        cmd, env = pg_command("pg_restore", url, "--clean", "--if-exists", "--no-owner", str(folder / entry["path"]))
        run_tool(cmd, env, f"restoring into {safe_url(url)}")
        done.append(f"{safe_url(url)}: restored with pg_restore")
        return
    stamp = _stamp()
    for suffix in ("", "-wal", "-shm"):
        old = Path(f"{path}{suffix}")
        if old.exists():
            os.replace(old, f"{path}.before-restore-{stamp}{suffix}")
            done.append(f"{old}: kept as {old.name}.before-restore-{stamp}" if suffix else
                        f"{path}: the database that was there is kept as {path.name}.before-restore-{stamp}")
    _put(folder / entry["path"], path, entry["sha256"], done)


def restore(folder: Path, config: str | None) -> list[str]:
    """Restore the backup in `folder`; what was done, one line each."""
    manifest = read_verified(folder)
    done: list[str] = []
    restore_configuration(folder, manifest, done)
    settings = load_settings(config)
    for entry in manifest["files"]:
        if entry["role"] == "checkpoint":
            _put(folder / entry["path"], Path(entry["restore_to"]), entry["sha256"], done)
    restore_database(settings, folder, manifest, done)
    for version in registered_checkpoints(settings):
        if version.state is VersionState.active and not (Path(version.path).is_file()
                                                         and file_digest(Path(version.path)) == version.sha256):
            raise BackupError(f"the restored registry's active {version.kind.value} {version.path} is missing or "
                              "differs from its sha256; the service would refuse to start")
    revision, head = current_revision(settings.database_url), head_revision()
    if revision != head:
        done.append(f"the database is at revision {revision}, this code needs {head}: run `stainbridge db upgrade`")
    return done


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Restore a `stainbridge backup` folder (database, checkpoints, configuration) after "
                          "checking every file's sha256; stop the service first.")
    parser.add_argument("dir", metavar="DIR", help="the backup folder")


def run(args: argparse.Namespace) -> int:
    try:
        done = restore(Path(args.dir).absolute(), args.config)
    except (ConfigError, SchemaError, BackupError) as exc:
        print(f"stainbridge restore: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"stainbridge restore: cannot write {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 1
    print("\n".join(done))
    print("restored; start the service (and copy the archive and quarantine back if they were lost)")
    return 0
