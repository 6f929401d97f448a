"""Free space on the volumes the service writes to, and the floor below which it takes no new files.

A full disk fails in the middle of a batch (SQLite cannot commit, a copy to the archive stops
half-way), and each file would be retried and counted against it. Checked before each batch
instead: below ``[paths] min_free_mb`` on any volume that holds the state folder (the SQLite
database), the archive or the quarantine, the service takes nothing, the files wait in the drop
folder, and the reason goes to the log, ``STATUS=`` and ``stainbridge status``; it goes on by
itself once space is freed. The nightly job skips its runs for the same reason (a checkpoint, a
run folder). One ``statvfs`` per folder: microseconds.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import make_url

from stainbridge.daemon.config import Settings

MIB = 1024 * 1024


@dataclass(frozen=True)
class Volume:
    role: str  # which of the service's folders lies on it (the first, when several share one)
    folder: Path
    free_bytes: int


def written_folders(settings: Settings) -> dict[str, Path]:
    """The folders the service writes to, by role; the SQLite database's own folder when it lies elsewhere."""
    folders = {"state": settings.state_dir, "archive": settings.archive_dir, "quarantine": settings.quarantine_dir}
    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        folders["database"] = Path(url.database).resolve().parent
    return folders


def free_bytes(folder: Path) -> float:
    """Free space for an unprivileged writer on `folder`'s volume; NaN when it cannot be measured."""
    try:
        return float(shutil.disk_usage(folder).free)
    except OSError:
        return float("nan")


def volumes(folders: dict[str, Path]) -> list[Volume]:
    """One entry per file system under `folders` (folders that cannot be measured are left out)."""
    seen: dict[int, Volume] = {}
    for role, folder in folders.items():
        existing = next((p for p in (folder, *folder.parents) if p.exists()), None)  # not created yet: its parent's
        try:
            device = os.stat(existing).st_dev
        except (OSError, TypeError):
            continue  # unreadable: the write itself will say why
        free = free_bytes(existing)
        if device not in seen and not math.isnan(free):
            seen[device] = Volume(role, folder, int(free))
    return list(seen.values())


def shortage(folders: dict[str, Path], min_free_mb: float) -> str | None:
    """Why nothing should be written now (a volume below the floor), or None; `min_free_mb` 0 checks nothing."""
    if min_free_mb <= 0:
        return None
    for volume in volumes(folders):
        if volume.free_bytes < min_free_mb * MIB:
            return (f"disk: the {volume.role} folder {volume.folder} has {volume.free_bytes / MIB:.0f} MiB free, "
                    f"below [paths] min_free_mb = {min_free_mb:g}")
    return None
