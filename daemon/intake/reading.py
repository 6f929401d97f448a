"""Reading a file from the drop folder safely: no link followed at any component, one open file.

`open_beneath` opens every folder below the drop folder with O_NOFOLLOW relative to the one
before it (so a sub-folder swapped for a symbolic link is refused, never read through) and
returns the file with a descriptor of its folder. The pipeline reads the file once
(`read_and_hash`): the bytes it hashed are the bytes it decodes, and the bytes it files if the
file changed meanwhile (`same_version` compares what fstat said then with what lstat says now).
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from stainbridge.daemon.intake.errors import RefusedFile, UnreadableImage

CHUNK = 1 << 20


def open_regular(path: str | os.PathLike[str]) -> BinaryIO:
    """Open a regular, singly-linked file for reading without following a symlink."""
    handle, dir_fd = open_beneath(path)
    os.close(dir_fd)
    return handle


def open_folder(folder: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> int:
    """A descriptor of `folder`, every component below `root` opened with O_NOFOLLOW relative to the
    one before it: a sub-folder that is (or was swapped for) a symbolic link is refused, never followed.

    Without `root` (or with `folder` outside it), only `folder` itself is opened, as named."""
    folder = Path(folder)
    start, parts = folder, ()
    if root is not None and (folder == Path(root) or Path(root) in folder.parents):
        start, parts = Path(root), folder.relative_to(root).parts
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        dir_fd = os.open(start, flags)
    except FileNotFoundError:
        raise UnreadableImage(f"{folder} disappeared before it could be read", reason="missing") from None
    except OSError as exc:
        raise UnreadableImage(f"cannot open {start}: {exc.strerror}; check the folder's permissions",
                              reason="unreadable") from None
    for part in parts:
        try:
            fd = os.open(part, flags | getattr(os, "O_NOFOLLOW", 0), dir_fd=dir_fd)
        except OSError as exc:
            os.close(dir_fd)
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise RefusedFile(f"{folder}: the sub-folder {part!r} is a symbolic link (or no longer a folder); "
                                  "links are never followed, copy the files themselves",
                                  reason="linked_folder") from None
            if isinstance(exc, FileNotFoundError):
                raise UnreadableImage(f"{folder} disappeared before it could be read", reason="missing") from None
            raise UnreadableImage(f"cannot open {folder}: {exc.strerror}", reason="unreadable") from None
        os.close(dir_fd)
        dir_fd = fd
    return dir_fd


def open_beneath(path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> tuple[BinaryIO, int]:
    """Open a regular, singly-linked file, no component below `root` followed if it is a link
    (see `open_folder`); returns the file and a descriptor of its folder (close both)."""
    path = Path(path)
    dir_fd = open_folder(path.parent, root)
    try:
        try:
            fd = os.open(path.name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0),
                         dir_fd=dir_fd)
        except FileNotFoundError:
            raise UnreadableImage(f"{path} disappeared before it could be read", reason="missing") from None
        except OSError as exc:
            try:
                is_link = stat.S_ISLNK(os.stat(path.name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
            except OSError:
                is_link = False
            if is_link:
                raise RefusedFile(f"{path} is a symbolic link; links are never followed", reason="symlink") from None
            raise UnreadableImage(f"cannot open {path}: {exc.strerror}; check the file's permissions",
                                  reason="unreadable") from None
        handle = os.fdopen(fd, "rb")
        handle.raw.name = os.fspath(path)  # for messages (and tests): the path it was opened by
        st = os.fstat(handle.fileno())
        if not stat.S_ISREG(st.st_mode):
            handle.close()
            raise RefusedFile(f"{path} is not a regular file", reason="not_regular_file")
        if st.st_nlink > 1:
            handle.close()
            raise RefusedFile(f"{path} has {st.st_nlink} hard links; copy the file instead of linking it",
                              reason="hard_link")
    except BaseException:
        os.close(dir_fd)
        raise
    return handle, dir_fd


def sha256_file(path: str | os.PathLike[str], *, on_chunk: Callable[[], None] | None = None) -> str:
    """The sha256 of a file's bytes (hex), read in 1 MiB chunks; `on_chunk()` after each (a liveness ping)."""
    with open_regular(path) as handle:
        return sha256_open(handle, on_chunk=on_chunk)


def read_and_hash(handle: BinaryIO, *, on_chunk: Callable[[], None] | None = None) -> tuple[bytes, str]:
    """The whole file from its start and its sha256: read once, so that what is hashed is what is decoded."""
    digest = hashlib.sha256()
    chunks = []
    handle.seek(0)
    while chunk := handle.read(CHUNK):
        digest.update(chunk)
        chunks.append(chunk)
        if on_chunk is not None:
            on_chunk()
    return b"".join(chunks), digest.hexdigest()


def same_version(then: os.stat_result, now: os.stat_result, *, ctime: bool = True) -> bool:
    """`now` is the file `then` described, unchanged: same inode, size, mtime and (with `ctime`) ctime.

    A rewrite in place (``cp`` over an existing name) keeps the inode; it changes the size or the
    mtime, and always the ctime (``cp -p`` and ``touch -d`` set the mtime back, never the ctime).
    A rename changes the ctime of the file it moves: compare without it after a move."""
    keys = ("st_dev", "st_ino", "st_size", "st_mtime_ns") + (("st_ctime_ns",) if ctime else ())
    return all(getattr(then, key) == getattr(now, key) for key in keys)


def sha256_open(handle: BinaryIO, *, on_chunk: Callable[[], None] | None = None) -> str:
    """The sha256 of an open file's bytes from its start (the same inode is then decoded and moved)."""
    digest = hashlib.sha256()
    handle.seek(0)
    while chunk := handle.read(CHUNK):
        digest.update(chunk)
        if on_chunk is not None:
            on_chunk()
    return digest.hexdigest()
