"""Walking the drop folder: which entries exist, and which are refused, never following a link.

Sub-folders are opened one component at a time with O_NOFOLLOW from their parent's descriptor,
so a sub-folder that is (or is swapped for) a symbolic link is never walked, and no path that
runs through one is observed. Hidden and temporary names are skipped. An entry that is a
symlink, a hard-linked file or not a regular file becomes a refused `Candidate` (recorded and
quarantined by the caller, never read). `watcher` (the live drop folder) and `stainbridge
ingest` (``iter_candidates``) both walk with this module.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from stainbridge.daemon.intake.failures import storable_source_name

TEMP_SUFFIXES = (".part", ".partial", ".tmp", ".temp", ".crdownload", ".download", ".filepart", ".swp", "~")
IGNORED_NAMES = frozenset({"thumbs.db", "desktop.ini"})
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


@dataclass(frozen=True)
class Candidate:
    """A file to take in, or (refusal set) an entry to record and quarantine without reading it."""

    path: Path
    source_name: str  # relative to the scanned folder, posix separators
    size: int
    mtime: float
    refusal: str | None = None  # "symlink" | "hard_link" | "not_regular_file"
    detail: str = ""


def is_ignored_name(name: str) -> bool:
    """Hidden and temporary names are left alone until they are renamed."""
    lower = name.lower()
    return name.startswith(".") or lower.endswith(TEMP_SUFFIXES) or lower in IGNORED_NAMES


def refusal_for(st: os.stat_result) -> tuple[str, str] | None:
    """Why an entry is refused without being read, from its lstat (None: a plain file)."""
    if stat.S_ISLNK(st.st_mode):
        return "symlink", "symbolic links are never followed; copy the file itself into the drop folder"
    if not stat.S_ISREG(st.st_mode):
        return "not_regular_file", "only regular files are taken in (not devices, pipes or sockets)"
    if st.st_nlink > 1:
        return "hard_link", f"the file has {st.st_nlink} hard links; copy it instead of linking it"
    return None


def candidate_for(path: Path, source_name: str, st: os.stat_result) -> Candidate:
    """The candidate for an entry as its lstat shows it: a file to take in, or a refusal with its reason."""
    why = refusal_for(st)
    refusal, detail = why if why is not None else (None, "")
    return Candidate(path, source_name, st.st_size, st.st_mtime_ns / 1e9, refusal=refusal, detail=detail)


def _open_folder(root: Path, folder: Path) -> int:
    """A descriptor of `folder`, opened from `root` one component at a time, never through a symlink.

    Raises OSError (ELOOP, ENOTDIR...) when a component below `root` is a symlink or not a folder.
    """
    parts = folder.relative_to(root).parts if folder != root else ()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    try:
        for part in parts:
            child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def lstat_inside(root: Path, path: Path) -> os.stat_result | None:
    """lstat of `path` reached from `root` without following a symlinked sub-folder (None: not there)."""
    try:
        parent = path.parent
        if parent == root:
            return os.lstat(path)
        fd = _open_folder(root, parent)
        try:
            return os.stat(path.name, dir_fd=fd, follow_symlinks=False)
        finally:
            os.close(fd)
    except (OSError, ValueError):
        return None


def walk(root: Path, folder: Path, skip: tuple[Path, ...]) -> Iterator[tuple[Path, os.stat_result]]:
    """Entries under `folder`, not following links, skipping hidden/temp names and `skip` folders.

    Folders are opened with O_NOFOLLOW from their parent's descriptor: a sub-folder swapped for a
    symlink while the walk runs is not entered (the next walk sees, and refuses, the link itself).
    """
    try:
        fd = _open_folder(root, folder)
    except (OSError, ValueError):
        return
    stack: list[tuple[int, Path, list[str]]] = []  # open folders above the current one, with what is left
    try:
        while fd >= 0:
            entries = []
            try:
                with os.scandir(fd) as listing:
                    for entry in listing:
                        if not is_ignored_name(entry.name):
                            try:
                                entries.append((entry.name, entry.stat(follow_symlinks=False)))
                            except OSError:
                                continue
            except OSError:
                pass
            subfolders = []
            for name, st in sorted(entries, key=lambda item: item[0]):
                if not stat.S_ISDIR(st.st_mode):
                    yield folder / name, st
                elif folder / name not in skip:
                    subfolders.append(name)
            stack.append((fd, folder, subfolders[::-1]))
            fd = -1
            while stack and fd < 0:
                parent_fd, parent, names = stack[-1]
                if not names:
                    os.close(parent_fd)
                    stack.pop()
                    continue
                name = names.pop()
                try:
                    fd, folder = os.open(name, _DIR_FLAGS, dir_fd=parent_fd), parent / name
                except OSError:  # became a symlink, or vanished, since the listing
                    continue
    finally:
        if fd >= 0:
            os.close(fd)
        for parent_fd, _, _ in stack:
            os.close(parent_fd)


def relative_source_name(path: Path, root: Path) -> str:
    """The source name recorded for `path`: relative to `root`, storable (see failures.storable_source_name)."""
    try:
        return storable_source_name(path.relative_to(root).as_posix())
    except ValueError:
        return storable_source_name(path.name)


def iter_candidates(paths: Iterable[str | os.PathLike[str]], *, skip: Iterable[Path] = ()) -> Iterator[Candidate]:
    """Every file under the given files/folders, ready now (for the one-shot `ingest`).

    Files named explicitly are taken even with a temporary-looking name; inside folders, hidden
    and temporary names are skipped. Raises FileNotFoundError for a path that does not exist.
    """
    roots = [Path(p).absolute() for p in paths]
    missing = [str(p) for p in roots if not os.path.lexists(p)]
    if missing:
        raise FileNotFoundError(f"no such file or folder: {', '.join(missing)}")
    skipped = tuple(Path(p).absolute() for p in skip)
    for root in roots:
        st = os.lstat(root)
        if stat.S_ISDIR(st.st_mode):
            for path, entry_st in walk(root, root, skipped):
                yield candidate_for(path, relative_source_name(path, root), entry_st)
        else:
            yield candidate_for(root, storable_source_name(root.name), st)
