"""The configured folders: made once by `stainbridge init`, checked at every start, never made again.

A folder that is missing at start is an installation fault, not something to paper over: an
archive on a network share that is not mounted would be re-created on the root disk, filled
there, and hidden once the share came back. So the service creates none of them: `stainbridge
init` (``prepare``) creates the state, drop, archive and quarantine folders and writes a marker
file (``MARKER``) in each. At start the service requires every folder to exist, to hold its
marker (an empty mount point of an unmounted share has none) and to be writable by this process
(a file is created and removed: permissions, read-only mounts, ACLs all answer). Before each
batch is filed, the archive and quarantine are checked for their marker again (``require``): a
share unmounted while the service runs stops the filing, not the classification, and says so.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from stainbridge.daemon.config import Settings
from stainbridge.daemon.schema import sqlite_file

MARKER = ".stainbridge-folder"  # hidden: the watcher and `status` never count it as a waiting file
MARKER_TEXT = ("This folder was prepared by `stainbridge init`. The service checks that this file is here\n"
               "before it writes to the folder: if it is missing, the folder is not the one that was\n"
               "prepared (for instance an unmounted share). Do not delete it.\n")


class FolderError(OSError):
    """A configured folder is missing, unprepared or not writable; the message says what to do."""


def configured(settings: Settings) -> dict[str, Path]:
    """The folders the service reads and writes, by role (a SQLite database's own folder as `database`)."""
    folders = {"state": settings.state_dir, "drop": settings.drop_dir, "archive": settings.archive_dir,
               "quarantine": settings.quarantine_dir}
    database = sqlite_file(settings.database_url)
    if database is not None and database.parent not in folders.values():
        folders["database"] = database.parent
    return folders


def prepare(settings: Settings) -> list[str]:
    """Create each configured folder and its marker (`stainbridge init`); what was done, one line each."""
    done = []
    for role, folder in configured(settings).items():
        if not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            done.append(f"created the {role} folder {folder}")
        if not (folder / MARKER).exists():
            temp = folder / f".{MARKER}.{secrets.token_hex(4)}.tmp"
            temp.write_text(MARKER_TEXT, encoding="utf-8")
            os.replace(temp, folder / MARKER)
            done.append(f"marked the {role} folder {folder} as prepared ({MARKER})")
    return done


def problems(settings: Settings, *, probe: bool = True) -> list[str]:
    """What is wrong with the configured folders (empty: all fine). `probe` writes and removes a file in each
    (the only test that every reason for "cannot write" answers); without it, os.access is asked."""
    found = []
    for role, folder in configured(settings).items():
        try:
            require(folder, role, probe=probe)
        except FolderError as exc:
            found.append(str(exc))
    return found


def require(folder: Path, role: str, *, probe: bool = False) -> None:
    """Raise FolderError unless `folder` exists, holds its marker and (with `probe`) can be written to."""
    if not folder.is_dir():
        raise FolderError(f"the {role} folder {folder} does not exist; create the folders with `stainbridge init` "
                          "(with the same --config), or fix [paths]")
    if not (folder / MARKER).is_file():
        raise FolderError(f"the {role} folder {folder} is not the one `stainbridge init` prepared (no {MARKER} in it): "
                          "if it is a mount point, is the share mounted? Otherwise run `stainbridge init`")
    if probe:
        test = folder / f".stainbridge-write-test.{os.getpid()}.{secrets.token_hex(4)}"
        try:
            test.write_bytes(b"")
            test.unlink()
        except OSError as exc:
            raise FolderError(f"the {role} folder {folder} cannot be written to ({exc.strerror}); the service "
                              "moves files out of the drop folder and into the archive and quarantine: fix its "
                              "owner or mount (under systemd: the stainbridge user, and ReadWritePaths=)") from None
    elif not os.access(folder, os.W_OK):
        raise FolderError(f"the {role} folder {folder} is not writable by this user")
