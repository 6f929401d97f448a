"""The configured folders: `stainbridge init` makes them, the service never does, and a folder that fails says so."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from stainbridge.daemon import folders
from stainbridge.daemon.commands import status
from stainbridge.daemon.intake.watcher import DropFolderWatcher
from stainbridge.daemon.lab.metrics import ServiceMetrics
from stainbridge.daemon.service.lifecycle import Service, StartupError
from stainbridge.daemon.store import Image
from tests.daemon_helpers import wait_for, write_cell
from tests.retraining_helpers import EventRecorder


def test_init_prepares_every_folder_and_the_database_once(run_stainbridge, tmp_path) -> None:
    """`stainbridge init` creates the state, drop, archive and quarantine folders with their marker and migrates the
    database; a second run changes nothing and says each folder is fine."""
    env = {"STAINBRIDGE_PATHS_STATE": str(tmp_path / "state"), "STAINBRIDGE_PATHS_ARCHIVE": str(tmp_path / "share")}
    first = run_stainbridge("init", env=env)
    assert first.returncode == 0, first.stderr
    for folder in ("state", "state/drop", "share", "state/quarantine"):
        assert (tmp_path / folder / folders.MARKER).is_file()
        assert "created the " in first.stdout and str(tmp_path / folder) in first.stdout
    assert "at revision" in first.stdout and (tmp_path / "state" / "stainbridge.db").is_file()
    second = run_stainbridge("init", env=env)
    assert second.returncode == 0 and "created" not in second.stdout and "marked" not in second.stdout
    assert second.stdout.count("(exists, prepared, writable)") == 4


@pytest.mark.parametrize("fault", ["missing", "unprepared"])
def test_the_service_refuses_to_start_without_its_prepared_folders_and_creates_none(settings_factory, tiny_models,
                                                                                    fault) -> None:
    """An archive folder that does not exist, or exists without the marker `init` writes (the empty mount point of an
    unmounted share), stops start-up with what to do; nothing is created (before: re-created on the root disk)."""
    settings = settings_factory(models_classifier=str(tiny_models.classifier), models_device="cpu")
    folders.prepare(settings)
    archive = settings.archive_dir
    (archive / folders.MARKER).unlink()
    if fault == "missing":
        archive.rmdir()
    service = Service(settings)
    with pytest.raises(StartupError) as refused:
        service.start()
    assert f"the archive folder {archive}" in str(refused.value) and "stainbridge init" in str(refused.value)
    assert archive.exists() == (fault == "unprepared") and not any(archive.iterdir() if archive.exists() else [])


@pytest.mark.slow
def test_an_archive_that_goes_away_stops_filing_reports_it_and_resumes(make_service, settings_factory) -> None:
    """The archive's marker gone mid-run (its share unmounted): files are classified and recorded but stay in the drop
    folder, nothing is written below the bare mount point, health and STATUS say why, metrics and `status` count
    them; the share back, they are filed (before: re-created on the root disk, `done`, and no one told)."""
    service = make_service(watch_quiet_seconds=0.05)
    service.metrics = ServiceMetrics(service.settings, service.pipeline.sessions, lambda: 0)
    archive = service.settings.archive_dir
    marker = (archive / folders.MARKER).read_bytes()
    (archive / folders.MARKER).unlink()  # what an unmounted share leaves: its empty mount point
    files = [write_cell(service.settings.drop_dir / f"c{i}.png", seed=i) for i in range(3)]
    wait_for(lambda: service.run_once() == 0 and service.pace.trouble, 30, "the filing failure to be noticed")
    assert service.pace.trouble.startswith("filing: the archive folder") and all(f.exists() for f in files)
    assert list(archive.iterdir()) == []
    assert service.healthy(max_loop_age=0.0)["moving"] is False
    assert service.metrics.registry.get_sample_value("stainbridge_filing_failures_total") == 3
    with service.pipeline.sessions() as session:
        report = status.collect(service.settings, session)
        recorded = session.query(Image).filter(Image.archive_path.is_(None)).count()
    assert recorded == 3 and any("is not the one `stainbridge init` prepared" in p for p in report.folder_problems)
    (archive / folders.MARKER).write_bytes(marker)  # the share is mounted again
    service.pace.delay = 0.0
    service.watcher.rescan(time.monotonic())
    wait_for(lambda: service.run_once() >= 0 and not any(f.exists() for f in files), 30, "the files filed")
    assert service.pace.trouble is None and len(list(archive.rglob("c*.png"))) == 3


def test_a_replaced_drop_folder_is_watched_again_with_a_log_line(settings_factory, monkeypatch) -> None:
    """The drop folder moved away and made again (a share remounted): the next rescan says so and watches the new
    folder, whose close-write events make files ready at once (before: no event until each rescan, no log line)."""
    from stainbridge.daemon.intake import watcher as watcher_module

    recorder = EventRecorder()
    monkeypatch.setattr(watcher_module, "log", recorder)
    settings = settings_factory(watch_quiet_seconds=3600, watch_rescan_seconds=3600)
    folders.prepare(settings)
    drop = settings.drop_dir
    watcher = DropFolderWatcher(settings)
    watcher.start()
    try:
        drop.rename(drop.with_name("drop-old"))
        drop.mkdir()
        watcher.rescan()
        assert recorder.names() == ["drop_folder_replaced"] and watcher.healthy()
        write_cell(drop / "new.png", seed=1)  # quiet time an hour: only a close-write event makes it ready
        ready = wait_for(lambda: watcher.ready_files(), 10, "the new folder's event")
        assert [c.source_name for c in ready] == ["new.png"]
        drop.rename(drop.with_name("drop-gone"))
        watcher.rescan()
        assert recorder.names()[-1] == "drop_folder_missing" and not watcher.healthy()
    finally:
        watcher.stop()


def test_status_reads_without_writing_the_folders(settings_factory, tmp_path) -> None:
    """`status` checks the folders with os.access, never with a probe file (it only reads)."""
    settings = settings_factory()
    folders.prepare(settings)
    before = {p: p.stat().st_mtime_ns for p in folders.configured(settings).values()}
    assert folders.problems(settings, probe=False) == []
    assert {p: p.stat().st_mtime_ns for p in folders.configured(settings).values()} == before
    assert not [p for p in Path(tmp_path).rglob(".stainbridge-write-test*")]
