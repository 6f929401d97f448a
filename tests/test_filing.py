"""Filing: archive and quarantine moves never overwrite, never delete, never follow links."""

from __future__ import annotations

import errno
import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from stainbridge.daemon.pipeline import filing
from stainbridge.daemon.pipeline.filing import FilingError, archive_file, quarantine_file, save_standardized

WHEN = datetime(2026, 11, 26, 1, 30, tzinfo=timezone.utc)


def drop(tmp_path: Path, name: str, data: bytes = b"cell") -> Path:
    folder = tmp_path / "drop"
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_bytes(data)
    return path


def test_archive_goes_to_dated_folder(tmp_path):
    """A file lands in archive/YYYY/MM/DD/ with its name and bytes, and leaves the drop folder."""
    source = drop(tmp_path, "a.png", b"abc")
    target = archive_file(source, tmp_path / "archive", WHEN)
    assert target == tmp_path / "archive" / "2026" / "11" / "26" / "a.png"
    assert target.read_bytes() == b"abc" and not source.exists()


def test_archive_name_collision_gets_numbered(tmp_path):
    """Same names on the same day become a.png, a__1.png, a__2.png; nothing is overwritten."""
    targets = [archive_file(drop(tmp_path, "a.png", bytes([n])), tmp_path / "archive", WHEN) for n in range(3)]
    assert [t.name for t in targets] == ["a.png", "a__1.png", "a__2.png"]
    assert [t.read_bytes() for t in targets] == [b"\0", b"\1", b"\2"]


def test_quarantine_writes_error_note(tmp_path):
    """A quarantined file gets <name>.error.txt beside it with reason, detail and time."""
    source = drop(tmp_path, "bad.jpg")
    target = quarantine_file(source, tmp_path / "quarantine", "truncated", "bad.jpg cannot be decoded", when=WHEN)
    assert target.parent == tmp_path / "quarantine" / "2026" / "11" / "26"
    note = (target.parent / "bad.jpg.error.txt").read_text()
    assert "reason: truncated" in note and "detail: bad.jpg cannot be decoded" in note and WHEN.isoformat() in note
    assert not source.exists()


def test_quarantine_collision_keeps_notes_apart(tmp_path):
    """Two quarantined files of the same name keep one note each."""
    first = quarantine_file(drop(tmp_path, "x.png"), tmp_path / "q", "corrupt", "one", when=WHEN)
    second = quarantine_file(drop(tmp_path, "x.png"), tmp_path / "q", "empty", "two", when=WHEN)
    assert second.name == "x__1.png"
    assert "one" in filing.error_note_path(first).read_text() and "two" in filing.error_note_path(second).read_text()


def test_quarantine_symlink_moves_the_link_not_the_target(tmp_path):
    """A symlink is quarantined as a link; its target outside the drop folder is untouched."""
    secret = tmp_path / "outside.txt"
    secret.write_text("do not touch")
    link = tmp_path / "drop" / "link.png"
    link.parent.mkdir()
    link.symlink_to(secret)
    target = quarantine_file(link, tmp_path / "q", "symlink", "symbolic links are never followed", when=WHEN)
    assert target.is_symlink() and os.readlink(target) == str(secret)
    assert not os.path.lexists(link) and secret.read_text() == "do not touch"


def test_cross_filesystem_move_copies_then_unlinks(tmp_path, monkeypatch):
    """When rename fails with EXDEV the file is copied, synced, and only then removed."""
    source = drop(tmp_path, "a.png", b"payload")
    mtime = source.stat().st_mtime_ns
    real_rename = os.rename

    def cross_device(src, dst, **kwargs):
        if Path(src) == source:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_rename(src, dst, **kwargs)

    monkeypatch.setattr(filing.os, "rename", cross_device)
    target = archive_file(source, tmp_path / "archive", WHEN)
    assert target.read_bytes() == b"payload" and target.stat().st_mtime_ns == mtime and not source.exists()


def test_failed_move_keeps_the_original(tmp_path, monkeypatch):
    """If the move fails the input stays where it was and no empty reservation is left."""
    source = drop(tmp_path, "a.png")

    def refuse(src, dst, **kwargs):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(filing.os, "rename", refuse)
    with pytest.raises(FilingError):
        archive_file(source, tmp_path / "archive", WHEN)
    assert source.exists() and not list((tmp_path / "archive").rglob("*.png"))


def test_save_standardized_beside_original(tmp_path):
    """The standardized picture is written as <stem>.standardized.png next to the archived file."""
    archived = archive_file(drop(tmp_path, "cell.jpg"), tmp_path / "archive", WHEN)
    image = PILImage.fromarray(np.full((8, 8, 3), 90, dtype=np.uint8))
    out = save_standardized(image, archived)
    assert out == archived.with_name("cell.standardized.png")
    assert np.asarray(PILImage.open(out)).mean() == 90


def test_file_moved_before_a_crash_gets_its_archive_path_back(tmp_path, settings_factory):
    """A row recorded done whose file was moved but whose archive_path never committed is completed at recovery."""
    import hashlib
    from datetime import datetime, timezone

    from stainbridge.daemon.pipeline.filing import archive_file, record_moved_files
    from stainbridge.daemon.schema import upgrade_database
    from stainbridge.daemon.store import Image, ImageStatus, make_engine, make_sessionmaker

    settings = settings_factory()
    upgrade_database(settings.database_url)
    engine = make_engine(settings.database_url)
    try:
        sessions = make_sessionmaker(engine)
        now = datetime.now(timezone.utc)
        settings.drop_dir.mkdir(parents=True)
        rows = []
        for name, data in (("a.png", b"first"), ("b/a.png", b"second")):
            source = settings.drop_dir / name
            source.parent.mkdir(parents=True, exist_ok=True)
            source.write_bytes(data)
            archive_file(source, settings.archive_dir, now)  # moved; the crash came before archive_path
            rows.append(Image(sha256=hashlib.sha256(data).hexdigest(), source_name=name, site="s",
                              status=ImageStatus.done, received_at=now, processed_at=now))
        with sessions.begin() as session:
            session.add_all(rows)
        assert record_moved_files(sessions, settings) == 2
        with sessions() as session:
            paths = {r.source_name: Path(r.archive_path) for r in session.query(Image)}
        assert paths["a.png"].read_bytes() == b"first" and paths["b/a.png"].read_bytes() == b"second"
    finally:
        engine.dispose()


def test_a_file_moved_before_a_crash_is_found_behind_many_rows_still_waiting(tmp_path, settings_factory):
    """1,500 recorded rows whose files still wait in the drop folder (a read-only drop folder for a while) do not
    hide the one whose file was moved before the crash: every row is looked at, not an unordered first 1,000."""
    import hashlib
    from datetime import UTC

    from sqlalchemy import insert

    from stainbridge.daemon.pipeline.filing import record_moved_files
    from stainbridge.daemon.schema import upgrade_database
    from stainbridge.daemon.store import Image, ImageStatus, make_engine, make_sessionmaker

    settings = settings_factory()
    upgrade_database(settings.database_url)
    engine = make_engine(settings.database_url)
    try:
        sessions = make_sessionmaker(engine)
        now = datetime.now(UTC)
        settings.drop_dir.mkdir(parents=True)
        waiting = [{"sha256": f"{n:064x}", "source_name": f"wait-{n}.png", "site": "s", "status": ImageStatus.done,
                    "received_at": now, "processed_at": now} for n in range(1500)]
        for row in waiting:
            (settings.drop_dir / row["source_name"]).write_bytes(b"x")
        moved = drop(tmp_path, "moved.png", b"moved")
        archive_file(moved, settings.archive_dir, now)
        with sessions.begin() as session:
            session.execute(insert(Image), waiting)
            session.add(Image(sha256=hashlib.sha256(b"moved").hexdigest(), source_name="moved.png", site="s",
                              status=ImageStatus.done, received_at=now, processed_at=now))
        assert record_moved_files(sessions, settings) == 1
        with sessions() as session:
            found = session.query(Image).filter(Image.source_name == "moved.png").one().archive_path
        assert Path(found).read_bytes() == b"moved"
    finally:
        engine.dispose()


@pytest.mark.parametrize("raw_name", [b"\xc9chantillon.png", ("\u00e9" * 121 + ".png").encode(), b"new\nline.png"],
                         ids=["latin-1", "long-utf-8-cut-mid-character", "newline"])
def test_the_stored_archive_path_opens_the_archived_file(tmp_path, raw_name):
    """A name that is not UTF-8, a long UTF-8 name shortened where a character would be cut in two, a control
    character: the file is archived under a name whose stored text (`archive_path`) opens it."""
    from stainbridge.daemon.intake.failures import storable_text

    folder = tmp_path / "drop"
    folder.mkdir()
    source = Path(os.fsdecode(os.fsencode(folder) + b"/" + raw_name))
    source.write_bytes(b"cell")
    stored = storable_text(str(archive_file(source, tmp_path / "archive", WHEN)), 1024)  # what the row holds
    assert Path(stored).read_bytes() == b"cell"  # before: it named no file ("file moved", reprocess: missing)
    assert len(os.fsencode(Path(stored).name)) <= filing.NAME_MAX_BYTES
