"""Filing: move a handled file out of the drop folder, into the archive or quarantine.

Inputs are never deleted except by a move. A destination name is reserved atomically
(``O_CREAT | O_EXCL``) and the file is renamed over the reservation, so two workers never
overwrite each other; across filesystems the move is copy + fsync + unlink. A symbolic link
is moved as a link (its target is never touched or read).

A file the pipeline read (`Read`: its fstat and its bytes) is moved only if its path still names
that version (inode, size, mtime, ctime: ``intake.reading.same_version``): replaced by a re-export
or rewritten in place since, the bytes that were read are written to the archive instead, and the
new version stays in the drop folder to be processed on its own.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import secrets
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from PIL import Image as PILImage

from stainbridge.daemon.intake.failures import storable_text, text_of_name
from stainbridge.daemon.intake.reading import same_version
from stainbridge.models.inference import fsync_dir

MAX_NAME_TRIES = 10_000


class FilingError(OSError):
    """A file could not be moved out of the drop folder; it is still where it was."""


def dated_folder(root: Path, when: datetime) -> Path:
    """`root/YYYY/MM/DD` for `when` (pass an aware UTC time for one calendar across sites)."""
    return Path(root) / f"{when:%Y}" / f"{when:%m}" / f"{when:%d}"


NAME_MAX_BYTES = 255 - len(".error.txt")  # room for the quarantine note beside the file


def _numbered(name: str, n: int) -> str:
    """`name` as text (``text_of_name``: what ``archive_path`` can hold and open), or `stem__n.ext` on a
    clash; shortened at a character boundary so that the name and its note fit NAME_MAX."""
    name = text_of_name(name)
    stem, suffix = os.path.splitext(name)
    if len(suffix.encode()) > 32:
        stem, suffix = name, ""
    tail = f"__{n}{suffix}" if n else suffix
    room = NAME_MAX_BYTES - len(tail.encode())
    encoded = stem.encode()
    if len(encoded) > room:
        stem = encoded[:room].decode("utf-8", "ignore")  # never half a character
    return f"{stem}{tail}"


def reserve_name(folder: Path, name: str, *, also_free: Callable[[Path], bool] = lambda p: True) -> Path:
    """Create an empty placeholder at the first free `name`, `name__1`, ... in `folder` and return it.

    The name is the file's name as text (undecodable bytes and control characters escaped)."""
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(MAX_NAME_TRIES):
        target = folder / _numbered(name, n)
        if not also_free(target):
            continue
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o640)
        except FileExistsError:
            continue
        os.close(fd)
        return target
    raise FilingError(f"no free name for {name} in {folder} after {MAX_NAME_TRIES} tries")


@dataclass(frozen=True)
class Read:
    """A file as the pipeline read it: its fstat then, and its bytes."""

    st: os.stat_result
    data: bytes


@dataclass(frozen=True)
class Source:
    """The entry to move: `path`, or (with `dir_fd`) its name inside that open folder, which was
    reached without following links: a folder swapped for a link afterwards changes nothing."""

    path: Path
    dir_fd: int | None = None

    @property
    def ref(self) -> str | Path:
        return self.path.name if self.dir_fd is not None else self.path

    def lstat(self) -> os.stat_result:
        return os.stat(self.ref, dir_fd=self.dir_fd, follow_symlinks=False)

    def names(self, st: os.stat_result, *, ctime: bool = True) -> bool:
        """This entry is still the version of the file `st` describes (see ``same_version``)."""
        try:
            now = self.lstat()
        except OSError:
            return False
        return same_version(st, now, ctime=ctime)

    def exists(self) -> bool:
        try:
            self.lstat()
        except FileNotFoundError:
            return False
        return True


def _copy_across(source: Source, target: Path, st: os.stat_result, read: Read | None) -> None:
    """Move between filesystems: copy into the reservation, fsync, then unlink the source.

    With `read`, the bytes come from it and the source is unlinked only if it is still that
    version of the file: a file replaced or rewritten meanwhile is left where it is."""
    if stat.S_ISLNK(st.st_mode):
        temp = target.with_name(f".{target.name}.link-{os.getpid()}")
        os.symlink(os.readlink(source.ref, dir_fd=source.dir_fd), temp)
        os.replace(temp, target)
    elif read is not None:
        _copy_bytes(io.BytesIO(read.data), target, st)
    else:
        with open(os.open(source.ref, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0), dir_fd=source.dir_fd), "rb") as src:
            _copy_bytes(src, target, st)
    fsync_dir(target.parent)
    if read is None or source.names(st):
        os.unlink(source.ref, dir_fd=source.dir_fd)


def _copy_bytes(src: Any, target: Path, st: os.stat_result) -> None:
    """Copy `src` from its start into the reserved `target`, fsynced, with `st`'s times."""
    src.seek(0)
    with open(target, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
        dst.flush()
        os.fsync(dst.fileno())
    if target.stat().st_size != st.st_size:
        raise FilingError(f"copy to {target} is incomplete; the original was kept")
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))


def move_into(path: Path, folder: Path, *, also_free: Callable[[Path], bool] = lambda p: True,
              fsync: bool = True, read: Read | None = None, dir_fd: int | None = None) -> Path:
    """Move `path` (a file or a symlink, never followed) into `folder` under a free name.

    ``fsync=False``: the caller fsyncs `folder` itself (once for a whole batch) before it records
    the move; a copy across filesystems is always made durable before its source is unlinked.
    `dir_fd`: `path`'s folder, opened without following links (``intake.open_folder``): the move
    starts there. `read`: the file as the pipeline read it. Only that version is moved: if `path`
    names another file now, or the same one rewritten, the bytes that were read are written into
    `folder` and the file at `path` is left in place, to be processed on its own.
    """
    source = Source(Path(path), dir_fd)
    st = read.st if read is not None else source.lstat()
    if read is not None and not source.names(st):
        return _file_read_copy(source.path, folder, read, also_free)
    target = reserve_name(folder, source.path.name, also_free=also_free)
    try:
        if stat.S_ISLNK(st.st_mode):
            os.unlink(target)  # rename(2) of a link over a regular file is allowed, but keep it explicit
        os.rename(source.ref, target, src_dir_fd=dir_fd)
        # Changed between the check and the rename (the rename itself changes the ctime: not compared)
        if read is not None and not Source(target).names(st, ctime=False):
            _put_back(target, source)
            return _file_read_copy(source.path, folder, read, also_free)
        if fsync:
            fsync_dir(target.parent)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            _discard(target)
            raise FilingError(f"cannot move {path} to {target}: {exc.strerror}") from exc
        try:
            _copy_across(source, target, st, read)
        except OSError as copy_exc:
            _discard(target)
            raise FilingError(f"cannot copy {path} to {target}: {copy_exc}") from copy_exc
    return target


def _file_read_copy(path: Path, folder: Path, read: Read, also_free: Callable[[Path], bool]) -> Path:
    """File the bytes that were read when the path now names another file (or another version of it)."""
    target = reserve_name(folder, path.name, also_free=also_free)
    try:
        _copy_bytes(io.BytesIO(read.data), target, read.st)
    except OSError as exc:
        _discard(target)
        raise FilingError(f"cannot copy the version of {path} that was read to {target}: {exc}") from exc
    fsync_dir(target.parent)
    return target


def _put_back(moved: Path, source: Source) -> None:
    """Return a file renamed by mistake to where it was, never replacing whatever is there now."""
    try:
        os.link(moved, source.ref, dst_dir_fd=source.dir_fd)
    except OSError:
        return  # the name was taken again: the file stays filed under `moved` rather than be lost
    os.unlink(moved)


def _discard(target: Path) -> None:
    """Remove a reservation or partial copy after a failed move (the source is still in place)."""
    try:
        os.unlink(target)
    except OSError:
        pass


def archive_file(path: Path, archive_root: Path, when: datetime, *, fsync: bool = True,
                 read: Read | None = None, dir_fd: int | None = None) -> Path:
    """Move a handled file to `archive_root/YYYY/MM/DD/<name>` (``name__1.ext`` on a clash)."""
    return move_into(Path(path), dated_folder(archive_root, when), fsync=fsync, read=read, dir_fd=dir_fd)


def quarantine_file(path: Path, quarantine_root: Path, reason: str, detail: str, when: datetime | None = None, *,
                    read: Read | None = None, dir_fd: int | None = None) -> Path:
    """Move a refused or broken file to `quarantine_root/YYYY/MM/DD/` with `<name>.error.txt` beside it."""
    when = when or datetime.now(UTC)
    source = Path(path)
    target = move_into(source, dated_folder(quarantine_root, when),
                       also_free=lambda p: not os.path.lexists(error_note_path(p)), read=read, dir_fd=dir_fd)
    text = f"reason: {reason}\ndetail: {detail}\ntime: {when.isoformat()}\nsource: {os.fsencode(source)!r}\n"
    try:
        write_error_note(target, storable_text(text, 20_000))
    except OSError:
        pass  # the file is filed; the reason is also in images.error
    return target


def write_error_note(target: Path, text: str) -> Path:
    """Write `<target>.error.txt` without ever replacing an existing file of that name."""
    note = error_note_path(target)
    temp = note.with_name(f".note.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    temp.write_text(text, encoding="utf-8")
    try:
        for n in range(MAX_NAME_TRIES):
            candidate = note if n == 0 else note.with_name(f"{target.name}.error__{n}.txt")
            try:
                os.link(temp, candidate)  # fails if the name exists: an input is never overwritten
            except FileExistsError:
                continue
            fsync_dir(candidate.parent)
            return candidate
        raise FilingError(f"no free name for the error note of {target}")
    finally:
        os.unlink(temp)


def _matches(name: str, expected: str, *, loose: bool) -> bool:
    """`name` (as stored) is `expected` or one of its collision-numbered forms (``stem__N.ext``);
    `loose` (the caller checks the sha256) also accepts the shortened forms of long names."""
    if name == expected:
        return True
    stem, suffix = os.path.splitext(expected)
    head, sep, rest = name.rpartition("__")
    if not sep:
        return loose and len(name) < len(expected) and stem.startswith(os.path.splitext(name)[0])
    number, dot, tail = rest.partition(".")
    if not number.isdigit() or (dot + tail) != suffix:
        return False
    return head == stem or (loose and bool(head) and stem.startswith(head))


def record_moved_files(sessions: Any, settings: Any, page: int = 1000) -> int:
    """Fill ``archive_path`` of rows whose file was moved just before a crash (move done, path not recorded).

    Looks only in the dated folders of the day the row was processed (and the next), only for rows
    whose file is no longer in the drop folder; matches by name and, where the row has one, sha256.
    Every such row is looked at, `page` at a time in id order (rows whose file still waits in the
    drop folder no longer hide the others). Returns how many rows were completed.
    """
    from sqlalchemy import select

    from stainbridge.daemon.intake.failures import storable_source_name
    from stainbridge.daemon.store import Image, ImageStatus

    done, after = 0, 0
    taken: set[str] | None = None
    while True:
        with sessions.begin() as session:
            rows = session.scalars(
                select(Image).where(Image.status.in_([ImageStatus.done, ImageStatus.failed, ImageStatus.duplicate]),
                                    Image.archive_path.is_(None), Image.processed_at.is_not(None), Image.id > after)
                .order_by(Image.id).limit(page)
            ).all()
            for row in rows:
                if (settings.drop_dir / row.source_name).exists():
                    continue  # still in the drop folder: the next pass files it
                root = settings.quarantine_dir if row.status is ImageStatus.failed else settings.archive_dir
                expected = row.source_name.rsplit("/", 1)[-1]
                if taken is None:
                    taken = set(session.scalars(select(Image.archive_path)
                                                .where(Image.archive_path.is_not(None))).all())
                for day in (row.processed_at, row.processed_at + timedelta(days=1)):
                    found = _find_moved(dated_folder(root, day), expected, row.sha256, taken, storable_source_name)
                    if found is not None:
                        row.archive_path = storable_text(str(found), 1024)
                        taken.add(row.archive_path)
                        done += 1
                        break
        if len(rows) < page:
            return done
        after = rows[-1].id


def _find_moved(folder: Path, expected: str, sha256: str | None, taken: set[str], storable) -> Path | None:
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return None
    for entry in entries:
        path = Path(entry.path)
        if entry.name.endswith(".error.txt") or not _matches(storable(entry.name), expected, loose=sha256 is not None):
            continue
        if storable_text(str(path), 1024) in taken:
            continue
        if sha256 is not None:
            try:
                with open(os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)), "rb") as handle:
                    digest = hashlib.file_digest(handle, "sha256").hexdigest()
            except OSError:
                continue
            if digest != sha256:
                continue
        return path
    return None


def error_note_path(quarantined: Path) -> Path:
    return quarantined.with_name(quarantined.name + ".error.txt")


def save_standardized(image: PILImage.Image, archived_path: Path) -> Path:
    """Write the standardized picture as `<stem>.standardized.png` next to the archived original."""
    archived_path = Path(archived_path)
    target = reserve_name(archived_path.parent, f"{archived_path.stem}.standardized.png")
    temp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        image.convert("RGB").save(temp, format="PNG")
        os.replace(temp, target)
    except BaseException:
        for leftover in (temp, target):
            try:
                os.unlink(leftover)
            except OSError:
                pass
        raise
    return target
