"""Watch the drop folder and say which files are ready to take in.

Filesystem events are hints: a scan at start-up and a periodic rescan find whatever an event
missed (network shares lose events; the process may have been down). A file is ready after a
close-write or a move into the folder, or once its size and mtime have been stable for
``[watch] quiet_seconds``. Temporary and hidden names wait until they are renamed. Symlinks,
hard-linked files and other non-regular entries are never followed: after the same quiet time as
any file, and a fresh look, they come back as refused candidates for the caller to record and
quarantine (a publisher that links a file in and then unlinks its own name gets it processed).
Sub-folders that are symlinks are never walked, and no path that runs through one is observed
(walking.py: the walk, the link rules, `Candidate`; its names stay importable from here).

The drop folder itself is watched too: replaced (moved away and made again, a share remounted)
the observer is started again on the new folder with a log line, since its events were going to
the old one; gone, the watcher reports itself unhealthy (the service exits to be restarted,
and start-up says the folder is missing).

Cost (issue 13): readiness is kept incrementally. An event-ready file goes straight to a ready
queue and is handed out without another stat; only files waiting out their quiet time are
re-stat'ed, each once when it can next be ready (a heap keyed by that moment). Every map is
bounded by ``MAX_TRACKED``: what does not fit is found by a rescan once half the room is free.
"""

from __future__ import annotations

import heapq
import itertools
import os
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserverVFS

from stainbridge.daemon.config import Settings
from stainbridge.daemon.intake.walking import (
    IGNORED_NAMES,
    TEMP_SUFFIXES,
    Candidate,
    candidate_for,
    is_ignored_name,
    iter_candidates,
    lstat_inside,
    refusal_for,
    relative_source_name,
    walk,
)
from stainbridge.daemon.logs import get_logger

__all__ = [  # the walking names stay importable from here, where callers have always found them
    "IGNORED_NAMES", "MAX_TRACKED", "TEMP_SUFFIXES", "Candidate", "DropFolderWatcher", "FileObservation",
    "Identity", "WatcherError", "candidate_for", "is_ignored_name", "is_ready", "iter_candidates",
    "lstat_inside", "refusal_for",
]

log = get_logger(__name__)

MAX_TRACKED = 50_000  # files waiting or ready, and files delivered, each (a later rescan finds the rest)

Identity = tuple[int, int, int]  # (inode, size, mtime_ns)


class WatcherError(RuntimeError):
    """The drop folder cannot be watched (missing, not a folder, not readable)."""


@dataclass
class FileObservation:
    """What the watcher knows about one file; `last_change` and `now` use the same clock."""

    size: int
    mtime_ns: int
    inode: int
    last_change: float  # when size/mtime/inode (or the refusal) were last seen to differ (or first seen)
    event_ready: bool = False  # a close-write or move-in event arrived since the last change
    refusal: str | None = None  # seen as a link or a non-regular entry: waits the quiet time, then a fresh look
    seq: int = 0  # its live entry in the due heap


def is_ready(observed: FileObservation, now: float, quiet_seconds: float) -> bool:
    """Ready after a close-write/move-in event, or when unchanged for `quiet_seconds`.

    Refusals (links, non-regular entries) always wait the quiet time: no event makes them ready.
    """
    if observed.event_ready and observed.refusal is None:
        return True
    return now - observed.last_change >= quiet_seconds


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
        self.watcher._forget(event.src_path, tree=event.is_directory)
        if event.dest_path:
            self.watcher._hint(event.dest_path, ready=True, is_dir=event.is_directory)

    def on_deleted(self, event: FileSystemEvent) -> None:
        self.watcher._forget(event.src_path, tree=event.is_directory)


class DropFolderWatcher:
    """Observer + rescans over ``settings.drop_dir``; ``ready_files()`` is polled by the service loop."""

    def __init__(self, settings: Settings) -> None:
        self.root = Path(settings.drop_dir).absolute()
        self.quiet_seconds = settings.watch.quiet_seconds
        self.rescan_seconds = settings.watch.rescan_seconds
        self.polling = settings.watch.polling
        self.skip = tuple(Path(p).absolute() for p in (settings.archive_dir, settings.quarantine_dir))
        self._lock = threading.Lock()
        self._seen: dict[Path, FileObservation] = {}  # waiting: still changing, or found without an event
        self._due: list[tuple[float, int, Path]] = []  # heap: when a waiting file can next be ready
        self._ready: dict[Path, tuple[Candidate, Identity]] = {}  # ready, not yet handed out (oldest first)
        self._delivered: dict[Path, Identity] = {}  # handed out, as it was then
        self._seq = itertools.count(1)
        self._observer: BaseObserver | None = None
        self._last_scan = float("-inf")
        self.overflowed = 0  # sightings not tracked because MAX_TRACKED files were waiting or ready
        self._missed = False  # some were not tracked: rescan as soon as half the room is free again
        self._root_identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the folder being observed
        self.root_missing = False

    # lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the observer thread, then scan what is already there."""
        self._root_identity = self._identity_of_root()
        if self._root_identity is None:
            raise WatcherError(f"drop folder {self.root} does not exist or is not a folder; create it with "
                               "`stainbridge init` or set [paths] drop")
        self._observer = self._observe_root()
        self.rescan()

    def _observe_root(self) -> BaseObserver:
        if self.polling:  # network shares: inotify sees only local writes
            interval = max(1.0, min(self.quiet_seconds, self.rescan_seconds))
            observer: BaseObserver = PollingObserverVFS(os.lstat, os.scandir, polling_interval=interval)
        else:
            observer = Observer()
        observer.schedule(_Handler(self), str(self.root), recursive=True)
        observer.daemon = True
        observer.start()
        return observer

    def _identity_of_root(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.root)
        except OSError:
            return None
        return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None

    def _check_root(self) -> None:
        """At each rescan: the drop folder replaced since it was watched gets a new observer; gone, it is said."""
        identity = self._identity_of_root()
        if identity == self._root_identity or self._observer is None:
            return
        if identity is None:
            if not self.root_missing:
                log.error("drop_folder_missing", drop=str(self.root),
                          action="recreate it with `stainbridge init`, or mount it again")
            self.root_missing = True
            return
        log.warning("drop_folder_replaced", drop=str(self.root), action="watching the new folder")
        old, self._observer = self._observer, self._observe_root()
        old.stop()
        self._root_identity, self.root_missing = identity, False

    def stop(self) -> None:
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            observer.join(timeout=10)

    def healthy(self) -> bool:
        """The observer thread is running on the drop folder (False before start, after stop, if it died or if
        the folder is gone)."""
        return self._observer is not None and self._observer.is_alive() and not self.root_missing

    # what the service loop calls ---------------------------------------------------------

    def ready_files(self, now: float | None = None, *, limit: int | None = None) -> list[Candidate]:
        """Files ready now, and refused entries, each handed out once (thread-safe), oldest first.

        `now` is a ``time.monotonic()`` reading (tests pass a later one to skip the quiet time).
        A rescan runs here when ``rescan_seconds`` have passed. Only files whose quiet time has
        run out are stat'ed again; at most `limit` are handed out, the rest stay ready for the
        next call. A delivered file is not handed out again until it changes, disappears, or
        ``forget(path)`` is called.
        """
        now = time.monotonic() if now is None else now
        room_again = self._missed and len(self._seen) + len(self._ready) <= MAX_TRACKED // 2
        if room_again or now - self._last_scan >= self.rescan_seconds:
            self.rescan(now)
        taken: list[Candidate] = []
        with self._lock:
            self._promote_due(now)
            while self._ready and (limit is None or len(taken) < limit):
                path = next(iter(self._ready))
                candidate, identity = self._ready.pop(path)
                self._deliver(path, identity)
                taken.append(candidate)
        return sorted(taken, key=lambda c: c.source_name)

    def ready_count(self, now: float | None = None) -> int:
        """Files ready to be handed out now (files whose quiet time has run out are looked at first)."""
        with self._lock:
            self._promote_due(time.monotonic() if now is None else now)
            return len(self._ready)

    def waiting(self) -> int:
        """Files seen in the drop folder and not yet handed out: still changing, or ready (the queue)."""
        with self._lock:
            return len(self._seen) + len(self._ready)

    def forget(self, path: str | os.PathLike[str]) -> None:
        """Let a delivered file be handed out again (call it when you leave a file in place)."""
        with self._lock:
            self._delivered.pop(Path(path), None)

    def rescan(self, now: float | None = None) -> None:
        """Walk the drop folder and observe every file an event may have missed."""
        now = time.monotonic() if now is None else now
        self._check_root()
        found = list(walk(self.root, self.root, self.skip)) if self.root.is_dir() else []
        present = {path for path, _ in found}
        with self._lock:
            self._missed = False
            for table in (self._delivered, self._seen, self._ready):
                for path in [p for p in table if p not in present]:
                    del table[path]
            if len(self._due) > 2 * len(self._seen) + 1024:  # drop entries of files no longer waiting
                self._due = [entry for entry in self._due if self._live(entry)]
                heapq.heapify(self._due)
            for path, st in found:
                self._observe(path, st, now, ready=False)
            self._last_scan = now

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
            found = list(walk(self.root, path, self.skip))
            with self._lock:
                for file_path, st in found:
                    self._observe(file_path, st, time.monotonic(), ready=ready)
            return
        st = lstat_inside(self.root, path)  # None when gone, or reached through a symlinked sub-folder
        if st is None:
            return
        with self._lock:
            self._observe(path, st, time.monotonic(), ready=ready)

    def _forget(self, raw: str | bytes, *, tree: bool) -> None:
        """A file (or, with `tree`, a folder and all below it) left the drop folder."""
        path = Path(os.fsdecode(raw))
        with self._lock:
            for table in (self._seen, self._ready, self._delivered):
                table.pop(path, None)
                if tree:
                    for known in [p for p in table if path in p.parents]:
                        del table[known]

    def _deliver(self, path: Path, identity: Identity) -> None:
        self._delivered[path] = identity
        while len(self._delivered) > MAX_TRACKED:  # the oldest delivery is long filed (or left to a rescan)
            del self._delivered[next(iter(self._delivered))]

    def _schedule(self, path: Path, observed: FileObservation, due: float) -> None:
        observed.seq = next(self._seq)
        heapq.heappush(self._due, (due, observed.seq, path))

    def _live(self, entry: tuple[float, int, Path]) -> bool:
        observed = self._seen.get(entry[2])
        return observed is not None and observed.seq == entry[1]

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
        why = refusal_for(st)
        refusal = why[0] if why else None
        queued = self._ready.get(path)
        if queued is not None:
            if queued[1] == identity and queued[0].refusal == refusal:
                return
            del self._ready[path]  # changed after it was ready: it waits again
        observed = self._seen.get(path)
        if observed is None:
            if len(self._seen) + len(self._ready) >= MAX_TRACKED:
                self.overflowed += 1  # a later rescan finds it
                self._missed = True
                return
            observed = FileObservation(st.st_size, st.st_mtime_ns, st.st_ino, last_change=now, refusal=refusal)
            self._seen[path] = observed
            self._schedule(path, observed, now + self.quiet_seconds)
        elif (observed.inode, observed.size, observed.mtime_ns) != identity:
            observed.inode, observed.size, observed.mtime_ns = identity
            observed.last_change, observed.event_ready = now, False
        observed.refusal = refusal  # a link count going 2 -> 1 is no change of content: the quiet time runs on
        if ready and refusal is None:  # no event makes a link ready: it waits the quiet time, then a fresh look
            observed.event_ready = True
            if is_ready(observed, now, self.quiet_seconds):  # close-write or move-in: ready now, no stat later
                del self._seen[path]
                self._ready[path] = (candidate_for(path, relative_source_name(path, self.root), st), identity)

    def _promote_due(self, now: float) -> None:
        """Look again at each waiting file whose quiet time has run out (lock held)."""
        while self._due and self._due[0][0] <= now:
            entry = heapq.heappop(self._due)
            if not self._live(entry):
                continue
            path = entry[2]
            observed = self._seen[path]
            st = lstat_inside(self.root, path)
            if st is None or stat.S_ISDIR(st.st_mode):  # gone, or now reached through a symlinked folder
                del self._seen[path]
                continue
            self._observe(path, st, now, ready=False)  # a change seen now restarts the quiet time
            if not is_ready(observed, now, self.quiet_seconds):
                self._schedule(path, observed, observed.last_change + self.quiet_seconds)
                continue
            del self._seen[path]
            identity = (st.st_ino, st.st_size, st.st_mtime_ns)
            self._ready[path] = (candidate_for(path, relative_source_name(path, self.root), st), identity)
