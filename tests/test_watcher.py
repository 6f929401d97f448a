"""Drop-folder watcher: readiness, events as hints, rescans, and refusals of links."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from stainbridge.daemon.config import load_settings
from stainbridge.daemon.intake.watcher import (
    Candidate,
    DropFolderWatcher,
    FileObservation,
    is_ignored_name,
    is_ready,
    iter_candidates,
)

QUIET = 30.0  # long, so that only events (or an explicit later `now`) make a file ready


def settings_for(tmp_path: Path, *, polling: bool = False, quiet: float = QUIET, rescan: float = 3600.0):
    env = {
        "STAINBRIDGE_PATHS_STATE": str(tmp_path / "state"),
        "STAINBRIDGE_PATHS_DROP": str(tmp_path / "drop"),
        "STAINBRIDGE_PATHS_ARCHIVE": str(tmp_path / "drop" / "archive"),
        "STAINBRIDGE_WATCH_POLLING": str(polling).lower(),
        "STAINBRIDGE_WATCH_QUIET_SECONDS": str(quiet),
        "STAINBRIDGE_WATCH_RESCAN_SECONDS": str(rescan),
    }
    (tmp_path / "drop").mkdir(exist_ok=True)
    return load_settings(environ=env)


@pytest.fixture
def watcher(tmp_path):
    w = DropFolderWatcher(settings_for(tmp_path))
    w.start()
    yield w
    w.stop()


def wait_for(watcher: DropFolderWatcher, name: str, timeout: float = 5.0) -> list[Candidate]:
    """Poll ready_files() with the real clock until `name` shows up (events only, no quiet time)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = watcher.ready_files()
        if any(c.source_name == name for c in ready):
            return ready
        time.sleep(0.05)
    return []


@pytest.mark.parametrize(
    "event_ready,last_change,now,expected",
    [
        (False, 100.0, 100.5, False),  # still inside the quiet time
        (False, 100.0, 102.0, True),  # quiet for exactly quiet_seconds
        (False, 100.0, 150.0, True),
        (True, 100.0, 100.0, True),  # close-write or move-in: ready at once
        (True, 100.0, 100.1, True),
    ],
)
def test_is_ready_table(event_ready, last_change, now, expected):
    """A file is ready after a close/move event, or once unchanged for quiet_seconds."""
    observed = FileObservation(size=10, mtime_ns=1, inode=1, last_change=last_change, event_ready=event_ready)
    assert is_ready(observed, now, quiet_seconds=2.0) is expected


@pytest.mark.parametrize("name,ignored", [("a.png", False), ("a.png.part", True), ("a.tmp", True), ("a.crdownload", True),
                                          ("a.png~", True), (".hidden.png", True), ("Thumbs.db", True), ("IM0001", False)])
def test_ignored_names(name, ignored):
    """Temporary, hidden and desktop-clutter names are ignored; extension-less DICOM names are not."""
    assert is_ignored_name(name) is ignored


def test_close_write_makes_file_ready(watcher, tmp_path):
    """A file written and closed is ready at once, without waiting the quiet time."""
    (tmp_path / "drop" / "a.png").write_bytes(b"x" * 100)
    ready = wait_for(watcher, "a.png")
    assert [(c.source_name, c.size, c.refusal) for c in ready] == [("a.png", 100, None)]
    assert watcher.healthy()


def test_atomic_rename_makes_file_ready(watcher, tmp_path):
    """A .part file is ignored until it is renamed, then it is ready at once."""
    part = tmp_path / "drop" / "b.png.part"
    part.write_bytes(b"y" * 10)
    time.sleep(0.3)
    assert watcher.ready_files(now=time.monotonic() + 10 * QUIET) == []
    os.rename(part, tmp_path / "drop" / "b.png")
    assert [c.source_name for c in wait_for(watcher, "b.png")] == ["b.png"]


def test_folder_moved_in_is_seen_without_rescan(watcher, tmp_path):
    """Files of a folder moved into the drop folder are observed from the event, ready after the quiet time."""
    batch = tmp_path / "batch"
    batch.mkdir()
    (batch / "i.png").write_bytes(b"i")
    moved_at = time.monotonic()
    os.rename(batch, tmp_path / "drop" / "batch")
    deadline = time.monotonic() + 10
    while Path(tmp_path / "drop" / "batch" / "i.png") not in watcher._seen and time.monotonic() < deadline:
        time.sleep(0.02)  # wait for the move event to be observed, not for a fixed time
    assert watcher.ready_files(now=moved_at) == []  # a new folder's files may still be being written
    assert [c.source_name for c in watcher.ready_files(now=time.monotonic() + QUIET)] == ["batch/i.png"]


def test_quiet_time_makes_unevented_file_ready(tmp_path):
    """Without events (found by a scan), a file is ready once stable for quiet_seconds."""
    (tmp_path / "drop").mkdir()
    (tmp_path / "drop" / "c.png").write_bytes(b"z")
    w = DropFolderWatcher(settings_for(tmp_path))
    w.rescan(now=1000.0)
    assert w.ready_files(now=1000.0 + QUIET / 2) == []
    assert [c.source_name for c in w.ready_files(now=1000.0 + QUIET)] == ["c.png"]
    assert w.ready_files(now=1000.0 + 2 * QUIET) == []  # handed out once


def test_growing_file_restarts_quiet_time(tmp_path):
    """A file that changed during its quiet time is not ready until it has been stable for a whole one."""
    path = tmp_path / "drop" / "d.png"
    w = DropFolderWatcher(settings_for(tmp_path))
    (tmp_path / "drop").mkdir(exist_ok=True)
    path.write_bytes(b"1")
    w.rescan(now=0.0)
    path.write_bytes(b"12")
    assert w.ready_files(now=QUIET - 1) == []
    assert w.ready_files(now=QUIET) == []  # looked at again when due: changed, so the quiet time restarts
    assert w.ready_files(now=2 * QUIET - 1) == []
    assert [c.size for c in w.ready_files(now=2 * QUIET)] == [2]


def test_event_ready_files_are_not_stated_again(tmp_path, monkeypatch):
    """A closed file is handed out from the event alone; waiting files are stat'ed only when due (issue 13)."""
    (tmp_path / "drop").mkdir()
    (tmp_path / "drop" / "scanned.png").write_bytes(b"s")  # there before start: found by the scan, no event
    w = DropFolderWatcher(settings_for(tmp_path))
    w.start()
    try:
        (tmp_path / "drop" / "closed.png").write_bytes(b"c")
        deadline = time.monotonic() + 5
        while tmp_path / "drop" / "closed.png" not in w._ready and time.monotonic() < deadline:
            time.sleep(0.02)  # the close-write event, seen by the observer thread
        stats: list[str] = []
        real_lstat = os.lstat
        monkeypatch.setattr(os, "lstat", lambda p, *a, **k: stats.append(os.fspath(p)) or real_lstat(p, *a, **k))
        assert [c.source_name for c in w.ready_files()] == ["closed.png"]
        for _ in range(20):
            assert w.ready_files() == []
        assert stats == []  # neither the ready file nor the waiting one was looked at again
        assert [c.source_name for c in w.ready_files(now=time.monotonic() + QUIET)] == ["scanned.png"]
        assert stats == [str(tmp_path / "drop" / "scanned.png")]  # one stat, when its quiet time ran out
    finally:
        monkeypatch.undo()
        w.stop()


def test_ready_files_hands_out_at_most_limit(tmp_path):
    """With `limit`, the rest stay ready for the next call (the service's backlog stays bounded)."""
    for i in range(5):
        (tmp_path / "drop").mkdir(exist_ok=True)
        (tmp_path / "drop" / f"{i}.png").write_bytes(b"x" * (i + 1))
    w = DropFolderWatcher(settings_for(tmp_path))
    w.rescan(now=0.0)
    first = w.ready_files(now=QUIET, limit=2)
    rest = w.ready_files(now=QUIET, limit=10)
    assert len(first) == 2 and len(rest) == 3
    assert sorted(c.source_name for c in first + rest) == [f"{i}.png" for i in range(5)]
    assert w.ready_files(now=2 * QUIET) == []


def test_tracked_files_are_bounded(tmp_path, monkeypatch):
    """Past MAX_TRACKED waiting or ready files, new sightings wait for a rescan, run once there is room (defect 11)."""
    monkeypatch.setattr("stainbridge.daemon.intake.watcher.MAX_TRACKED", 3)
    (tmp_path / "drop").mkdir(exist_ok=True)
    for i in range(5):
        (tmp_path / "drop" / f"{i}.png").write_bytes(b"x")
    w = DropFolderWatcher(settings_for(tmp_path))
    w.rescan(now=0.0)
    assert len(w._seen) == 3 and w.overflowed == 2
    assert len(w.ready_files(now=QUIET)) == 3
    assert w.ready_files(now=QUIET + 1) == []  # room again: this call rescans, the other two now wait their turn
    assert [c.source_name for c in w.ready_files(now=2 * QUIET + 1)] == ["3.png", "4.png"]


def test_rescan_finds_file_created_while_stopped(tmp_path):
    """A file dropped while the watcher was down is found by the start-up scan."""
    settings = settings_for(tmp_path)
    first = DropFolderWatcher(settings)
    first.start()
    first.stop()
    assert not first.healthy()
    (tmp_path / "drop" / "sub").mkdir()
    (tmp_path / "drop" / "sub" / "e.png").write_bytes(b"e")
    second = DropFolderWatcher(settings)
    second.start()
    try:
        ready = second.ready_files(now=time.monotonic() + QUIET)
        assert [c.source_name for c in ready] == ["sub/e.png"]
    finally:
        second.stop()


def test_symlink_and_hard_link_refused(watcher, tmp_path):
    """Symlinks and hard-linked files come back as refusals with a reason after the quiet time, never followed."""
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"secret")
    (tmp_path / "drop" / "link.png").symlink_to(outside)
    (tmp_path / "drop" / "hard.png").write_bytes(b"h")
    os.link(tmp_path / "drop" / "hard.png", tmp_path / "drop" / "hard2.png")
    watcher.rescan()
    assert watcher.ready_files(now=time.monotonic()) == []  # a refusal waits the quiet time like any file
    ready = {c.source_name: c for c in watcher.ready_files(now=time.monotonic() + QUIET)}
    assert ready["link.png"].refusal == "symlink" and ready["link.png"].path == tmp_path / "drop" / "link.png"
    assert ready["hard.png"].refusal == "hard_link" and ready["hard2.png"].refusal == "hard_link"
    watcher.rescan()
    assert watcher.ready_files(now=time.monotonic() + 3 * QUIET) == []  # refused once, not on every rescan


def test_link_then_unlink_publisher_gets_its_file_taken(watcher, tmp_path):
    """A file hard-linked in, then unlinked from where it was written, is a plain file once its quiet time ends."""
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "x.png").write_bytes(b"x" * 50)
    os.link(staging / "x.png", tmp_path / "drop" / "x.png")  # nlink 2: would be a refusal if judged now
    deadline = time.monotonic() + 5
    while tmp_path / "drop" / "x.png" not in watcher._seen and time.monotonic() < deadline:
        time.sleep(0.02)  # the create event, seen by the observer thread
    assert watcher.ready_files(now=time.monotonic()) == []
    os.unlink(staging / "x.png")
    ready = watcher.ready_files(now=time.monotonic() + QUIET)
    assert [(c.source_name, c.size, c.refusal) for c in ready] == [("x.png", 50, None)]


def test_symlinked_subfolder_is_never_walked(watcher, tmp_path):
    """A sub-folder that is a symlink is refused as an entry; nothing behind it is ever a candidate."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"s")
    (tmp_path / "drop" / "sub").symlink_to(outside, target_is_directory=True)
    watcher.rescan()
    (outside / "later.png").write_bytes(b"l")  # written through the real path after the scan
    (tmp_path / "drop" / "sub" / "via-link.png").write_bytes(b"v")  # written through the link
    time.sleep(0.2)  # let any event arrive: none may be taken
    watcher.rescan()
    ready = watcher.ready_files(now=time.monotonic() + QUIET)
    assert [(c.source_name, c.refusal) for c in ready] == [("sub", "symlink")]


def test_subfolder_swapped_for_symlink_is_not_followed(tmp_path):
    """A waiting file whose folder is swapped for a symlink to elsewhere is dropped, not handed out (defect 9)."""
    (tmp_path / "drop" / "sub").mkdir(parents=True)
    (tmp_path / "drop" / "sub" / "decoy.png").write_bytes(b"decoy")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "decoy.png").write_bytes(b"the database, say")
    w = DropFolderWatcher(settings_for(tmp_path))
    w.rescan(now=0.0)  # sub/decoy.png is waiting out its quiet time
    os.rename(tmp_path / "drop" / "sub", tmp_path / "moved-away")
    (tmp_path / "drop" / "sub").symlink_to(outside, target_is_directory=True)
    assert w.ready_files(now=QUIET) == []
    assert w.ready_files(now=3 * QUIET) == []  # nor later: the path now runs through a symlink
    assert (outside / "decoy.png").read_bytes() == b"the database, say"


def test_archive_and_hidden_folders_skipped(watcher, tmp_path):
    """Files in an archive folder inside the drop folder, or in dot-folders, are never candidates."""
    for folder in ("archive/2026/11/26", ".staging"):
        (tmp_path / "drop" / folder).mkdir(parents=True)
        (tmp_path / "drop" / folder / "f.png").write_bytes(b"f")
    watcher.rescan()
    assert watcher.ready_files(now=time.monotonic() + 2 * QUIET) == []


def test_moved_out_file_is_forgotten(tmp_path):
    """A file moved away while it waits out its quiet time is not handed out (looked at again when due)."""
    (tmp_path / "drop").mkdir()
    path = tmp_path / "drop" / "g.png"
    path.write_bytes(b"g")
    w = DropFolderWatcher(settings_for(tmp_path))
    w.rescan(now=0.0)
    os.rename(path, tmp_path / "elsewhere.png")
    assert w.ready_files(now=QUIET) == []


def test_ready_file_moved_out_is_dropped_by_its_event(watcher, tmp_path):
    """A ready file moved away is taken off the ready queue by the move event, without a stat.

    Until that event arrives the path may still be handed out; the pipeline's own lstat then
    skips it without a row (`Pipeline._intake`).
    """
    path = tmp_path / "drop" / "m.png"
    path.write_bytes(b"m")
    deadline = time.monotonic() + 5
    while path not in watcher._ready and time.monotonic() < deadline:
        time.sleep(0.02)
    os.rename(path, tmp_path / "elsewhere.png")
    while path in watcher._ready and time.monotonic() < deadline:
        time.sleep(0.02)
    assert watcher.ready_files(now=time.monotonic() + QUIET) == []


def test_forget_lets_a_left_file_come_back(tmp_path):
    """A delivered file left in place is handed out again after forget() and a rescan."""
    (tmp_path / "drop").mkdir()
    (tmp_path / "drop" / "h.png").write_bytes(b"h")
    w = DropFolderWatcher(settings_for(tmp_path))
    w.rescan(now=0.0)
    [candidate] = w.ready_files(now=QUIET)
    w.rescan(now=QUIET)
    assert w.ready_files(now=3 * QUIET) == []
    w.forget(candidate.path)
    w.rescan(now=3 * QUIET)
    assert [c.source_name for c in w.ready_files(now=4 * QUIET)] == ["h.png"]


def test_polling_observer_sees_files(tmp_path):
    """With polling (network shares) a new file is still seen and becomes ready after the quiet time."""
    w = DropFolderWatcher(settings_for(tmp_path, polling=True, quiet=1.0))
    w.start()
    try:
        (tmp_path / "drop" / "p.png").write_bytes(b"p")
        assert [c.source_name for c in wait_for(w, "p.png", timeout=8.0)] == ["p.png"]
        assert w.healthy()
    finally:
        w.stop()


def test_iter_candidates_for_ingest(tmp_path):
    """One-shot ingest lists files in folders (skipping temp names) and explicit files, links refused."""
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "in" / "a.png").write_bytes(b"a")
    (tmp_path / "in" / "sub" / "b.dcm").write_bytes(b"b")
    (tmp_path / "in" / "c.png.part").write_bytes(b"c")
    (tmp_path / "in" / "l.png").symlink_to(tmp_path / "in" / "a.png")
    (tmp_path / "single.bmp").write_bytes(b"s")
    found = {c.source_name: c.refusal for c in iter_candidates([tmp_path / "in", tmp_path / "single.bmp"])}
    assert found == {"a.png": None, "l.png": "symlink", "sub/b.dcm": None, "single.bmp": None}
    with pytest.raises(FileNotFoundError):
        list(iter_candidates([tmp_path / "missing"]))
