"""Watch the drop folder and say which files are ready to take in.

Filesystem events are hints: a scan at start-up and a periodic rescan find whatever an event
missed (network shares lose events; the process may have been down). A file is ready after a
close-write or a move into the folder, or once its size and mtime have been stable for
``[watch] quiet_seconds``. Temporary and hidden names wait until they are renamed. Symlinks,
hard-linked files and other non-regular entries are never followed: they come back as refused
candidates for the caller to record and quarantine.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserverVFS

from stainbridge.daemon.config import Settings
from stainbridge.daemon.failures import storable_source_name

TEMP_SUFFIXES = (".part", ".partial", ".tmp", ".temp", ".crdownload", ".download", ".filepart", ".swp", "~")
IGNORED_NAMES = frozenset({"thumbs.db", "desktop.ini"})


class WatcherError(RuntimeError):
    """The drop folder cannot be watched (missing, not a folder, not readable)."""


@dataclass
class FileObservation:
    """What the watcher knows about one file; `last_change` and `now` use the same clock."""

    size: int
    mtime_ns: int
    inode: int
    last_change: float  # when size/mtime/inode were last seen to differ (or first seen)
    event_ready: bool = False  # a close-write or move-in event arrived since the last change


@dataclass(frozen=True)
class Candidate:
    """A file to take in, or (refusal set) an entry to record and quarantine without reading it."""

    path: Path
    source_name: str  # relative to the scanned folder, posix separators
    size: int
    mtime: float
    refusal: str | None = None  # "symlink" | "hard_link" | "not_regular_file"
    detail: str = ""


def is_ready(observed: FileObservation, now: float, quiet_seconds: float) -> bool:
    """Ready after a close-write/move-in event, or when unchanged for `quiet_seconds`."""
    return observed.event_ready or now - observed.last_change >= quiet_seconds


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


def _refused(path: Path, source_name: str, st: os.stat_result) -> Candidate | None:
    why = refusal_for(st)
    if why is None:
        return None
    return Candidate(path, source_name, st.st_size, st.st_mtime, refusal=why[0], detail=why[1])


def _walk(root: Path, folder: Path, skip: tuple[Path, ...]) -> Iterator[tuple[Path, os.stat_result]]:
    """Entries under `folder`, not following links, skipping hidden/temp names and `skip` folders."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        if is_ignored_name(entry.name):
            continue
        path = Path(entry.path)
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode):
            if path not in skip:
                yield from _walk(root, path, skip)
            continue
        yield path, st


def _relative(path: Path, root: Path) -> str:
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
            for path, entry_st in _walk(root, root, skipped):
                yield _refused(path, _relative(path, root), entry_st) or Candidate(
                    path, _relative(path, root), entry_st.st_size, entry_st.st_mtime)
        else:
            name = storable_source_name(root.name)
            yield _refused(root, name, st) or Candidate(root, name, st.st_size, st.st_mtime)


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: DropFolderWatcher) -> None:
        self.watcher = watcher

    def on_created(self, event: FileSystemEvent) -> None:
        self.watcher._hint(event.src_path, ready=False, is_dir=event.is_directory)

    def on_modified(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self.watcher._hint(event.src_path, ready=False)

    def on_closed(self, event: FileSystemEvent) -> None:  # close after write (inotify)
        self.watcher._hint(event.src_path, ready=True)

    def on_moved(self, event: FileSystemEvent) -> None:
        self.watcher._forget_tree(event.src_path)
        if event.dest_path:
            self.watcher._hint(event.dest_path, ready=True, is_dir=event.is_directory)

    def on_deleted(self, event: FileSystemEvent) -> None:
        self.watcher._forget_tree(event.src_path)


class DropFolderWatcher:
    """Observer + rescans over ``settings.drop_dir``; ``ready_files()`` is polled by the service loop."""

    def __init__(self, settings: Settings) -> None:
        self.root = Path(settings.drop_dir).absolute()
        self.quiet_seconds = settings.watch.quiet_seconds
        self.rescan_seconds = settings.watch.rescan_seconds
        self.polling = settings.watch.polling
        self.skip = tuple(Path(p).absolute() for p in (settings.archive_dir, settings.quarantine_dir))
        self._lock = threading.Lock()
        self._seen: dict[Path, FileObservation] = {}
        self._refused: dict[Path, tuple[Candidate, tuple[int, int, int]]] = {}
        self._delivered: dict[Path, tuple[int, int, int]] = {}  # path -> (inode, size, mtime_ns)
        self._observer: BaseObserver | None = None
        self._last_scan = float("-inf")

    # lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the observer thread, then scan what is already there."""
        if not self.root.is_dir():
            raise WatcherError(f"drop folder {self.root} does not exist or is not a folder; create it or set [paths] drop")
        if self.polling:  # network shares: inotify sees only local writes
            interval = max(1.0, min(self.quiet_seconds, self.rescan_seconds))
            observer: BaseObserver = PollingObserverVFS(os.lstat, os.scandir, polling_interval=interval)
        else:
            observer = Observer()
        observer.schedule(_Handler(self), str(self.root), recursive=True)
        observer.daemon = True
        observer.start()
        self._observer = observer
        self.rescan()

    def stop(self) -> None:
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            observer.join(timeout=10)

    def healthy(self) -> bool:
        """The observer thread is running (False before start, after stop, or if it died)."""
        return self._observer is not None and self._observer.is_alive()

    # what the service loop calls ---------------------------------------------------------

    def ready_files(self, now: float | None = None) -> list[Candidate]:
        """Files ready now, and refused entries, each handed out once (thread-safe).

        `now` is a ``time.monotonic()`` reading (tests pass a later one to skip the quiet time).
        A rescan runs here when ``rescan_seconds`` have passed. A delivered file is not handed
        out again until it changes, disappears, or ``forget(path)`` is called.
        """
        now = time.monotonic() if now is None else now
        if now - self._last_scan >= self.rescan_seconds:
            self.rescan(now)
        ready: list[Candidate] = []
        with self._lock:
            for path, (candidate, identity) in list(self._refused.items()):
                ready.append(candidate)
                del self._refused[path]
                self._delivered[path] = identity
            for path, observed in list(self._seen.items()):
                st = self._restat(path, now)
                if st is None:
                    continue
                if isinstance(st, Candidate):
                    ready.append(st)
                    continue
                observed = self._seen[path]
                if is_ready(observed, now, self.quiet_seconds):
                    del self._seen[path]
                    self._delivered[path] = (observed.inode, observed.size, observed.mtime_ns)
                    ready.append(Candidate(path, _relative(path, self.root), observed.size, observed.mtime_ns / 1e9))
        return sorted(ready, key=lambda c: c.source_name)

    def forget(self, path: str | os.PathLike[str]) -> None:
        """Let a delivered file be handed out again (call it when you leave a file in place)."""
        with self._lock:
            self._delivered.pop(Path(path), None)

    def rescan(self, now: float | None = None) -> None:
        """Walk the drop folder and observe every file an event may have missed."""
        now = time.monotonic() if now is None else now
        found = list(_walk(self.root, self.root, self.skip)) if self.root.is_dir() else []
        present = {path for path, _ in found}
        with self._lock:
            for path in [p for p in self._delivered if p not in present]:
                del self._delivered[path]
            for path in [p for p in self._seen if p not in present]:
                del self._seen[path]
            for path, st in found:
                self._observe(path, st, now, ready=False)
            self._last_scan = now

    def scan_once(self, paths: Iterable[str | os.PathLike[str]] | None = None) -> list[Candidate]:
        """Everything under the drop folder (or `paths`), ready now: for one-shot ingest."""
        return list(iter_candidates([self.root] if paths is None else paths, skip=self.skip))

    # internals (called under the observer thread or the loop) ----------------------------

    def _inside(self, path: Path) -> bool:
        """In the drop folder, not in archive/quarantine, no hidden or temporary component."""
        try:
            parts = path.relative_to(self.root).parts
        except ValueError:
            return False
        if not parts or any(is_ignored_name(part) for part in parts):
            return False
        return not any(path == s or s in path.parents for s in self.skip)

    def _hint(self, raw: str | bytes, *, ready: bool, is_dir: bool = False) -> None:
        path = Path(os.fsdecode(raw))
        if not self._inside(path):
            return
        if is_dir:  # a folder moved or created: observe what it already holds
            found = list(_walk(self.root, path, self.skip))
            with self._lock:
                for file_path, st in found:
                    self._observe(file_path, st, time.monotonic(), ready=ready)
            return
        try:
            st = os.lstat(path)
        except OSError:
            return
        with self._lock:
            self._observe(path, st, time.monotonic(), ready=ready)

    def _forget_tree(self, raw: str | bytes) -> None:
        path = Path(os.fsdecode(raw))
        with self._lock:
            for table in (self._seen, self._refused, self._delivered):
                for known in [p for p in table if p == path or path in p.parents]:
                    del table[known]

    def _observe(self, path: Path, st: os.stat_result, now: float, *, ready: bool) -> None:
        """Record a sighting (lock held). Changed files restart their quiet time."""
        if stat.S_ISDIR(st.st_mode):
            return
        identity = (st.st_ino, st.st_size, st.st_mtime_ns)
        delivered = self._delivered.get(path)
        if delivered is not None:
            if delivered == identity:
                return
            del self._delivered[path]  # a new file under a delivered name
        refused = _refused(path, _relative(path, self.root), st)
        if refused is not None:
            self._seen.pop(path, None)
            self._refused[path] = (refused, identity)
            return
        observed = self._seen.get(path)
        if observed is None or (observed.inode, observed.size, observed.mtime_ns) != identity:
            observed = FileObservation(st.st_size, st.st_mtime_ns, st.st_ino, last_change=now)
            self._seen[path] = observed
        if ready:
            observed.event_ready = True

    def _restat(self, path: Path, now: float) -> FileObservation | Candidate | None:
        """Refresh one observation before judging it (lock held)."""
        try:
            st = os.lstat(path)
        except OSError:
            del self._seen[path]
            return None
        refused = _refused(path, _relative(path, self.root), st)
        if refused is not None:
            del self._seen[path]
            self._delivered[path] = (st.st_ino, st.st_size, st.st_mtime_ns)
            return refused
        self._observe(path, st, now, ready=False)
        return self._seen[path]
