"""Below `[paths] min_free_mb` on a volume it writes to, the service takes no files and goes on once there is room.

A full disk cannot be made in a test without root; a floor above the volume's free space is the same
condition for the service (`diskspace.shortage` reads statvfs), so the real process and the real
folders are exercised with such a floor.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time

import pytest

from stainbridge.daemon import diskspace
from stainbridge.daemon.config import ConfigError
from tests.daemon_helpers import Daemon, scalar, wait_for, write_cell, write_config

ABOVE_ANY_DISK_MB = 1e12  # a million TiB


def test_shortage_names_the_folder_and_the_setting(tmp_path) -> None:
    free_mb = shutil.disk_usage(tmp_path).free / diskspace.MIB
    folders = {"archive": tmp_path / "archive-not-made-yet"}
    assert diskspace.shortage(folders, 0) is None
    assert diskspace.shortage(folders, free_mb / 2) is None
    message = diskspace.shortage(folders, free_mb * 2)
    assert message.startswith("disk: the archive folder ") and message.endswith(f"[paths] min_free_mb = {free_mb * 2:g}")


def test_volumes_are_counted_once_and_the_sqlite_folder_is_watched(settings_factory, tmp_path) -> None:
    settings = settings_factory(f"sqlite:///{tmp_path / 'elsewhere' / 'db.sqlite'}")
    folders = diskspace.written_folders(settings)
    assert folders["database"] == (tmp_path / "elsewhere").resolve()
    assert {"state", "archive", "quarantine"} <= set(folders)
    assert len(diskspace.volumes(folders)) == 1  # all under tmp_path: one file system, reported once


@pytest.mark.parametrize("value", ["-1", "x", "inf"])
def test_min_free_mb_must_be_a_finite_number_at_least_zero(settings_factory, value) -> None:
    with pytest.raises(ConfigError, match="min_free_mb"):
        settings_factory(paths_min_free_mb=value)


@pytest.mark.slow
def test_the_tick_takes_nothing_below_the_floor_and_goes_on_above_it(make_service) -> None:
    service = make_service(paths_min_free_mb=ABOVE_ANY_DISK_MB)
    files = [write_cell(service.settings.drop_dir / f"c{i}.png", seed=i) for i in range(3)]
    wait_for(lambda: service.run_once() == 0 and service.watcher.ready_count() == 3, 30, "the files ready")
    assert [service.run_once() for _ in range(5)] == [0] * 5
    assert all(f.exists() for f in files) and service.watcher.ready_count() == 3  # ready, and left alone
    assert "min_free_mb" in service._space_short
    assert all(service.healthy().values())  # waiting on purpose: the watchdog keeps the service

    service.settings = dataclasses.replace(
        service.settings, paths=dataclasses.replace(service.settings.paths, min_free_mb=0.0))
    handled = []
    wait_for(lambda: handled.append(service.run_once()) or sum(handled) == len(files), 30, "the files taken")
    assert not any(f.exists() for f in files) and service._space_short is None


@pytest.mark.slow
def test_the_running_service_pauses_reports_and_resumes(tiny_models, tmp_path, run_stainbridge) -> None:
    """`stainbridge run` with a floor above the disk: STATUS= and the log say why, the files stay, `status` shows
    it; restarted with the floor off (as after freeing space) it takes them."""
    url = f"sqlite:///{tmp_path / 'state' / 'stainbridge.db'}"
    config = write_config(tmp_path / "stainbridge.toml", tmp_path, url, tiny_models,
                          paths={"min_free_mb": ABOVE_ANY_DISK_MB})
    daemon = Daemon(config, tmp_path)
    try:
        daemon.start()
        files = [write_cell(tmp_path / "drop" / f"c{i}.png", seed=i) for i in range(4)]
        status = daemon.wait_message("STATUS=paused: disk: ", 60)
        assert "min_free_mb" in status and "files wait in the drop folder" in status
        time.sleep(2)  # several ticks of the loop
        assert [e.get("event") for e in daemon.events()].count("disk_space_low") == 1  # once, not every tick
        report = run_stainbridge("--config", str(config), "status", "--json")
        assert report.returncode == 0, report.stderr
        answer = json.loads(report.stdout)
        assert answer["waiting"] == 4 and "min_free_mb" in answer["disk_short"]
        assert answer["disk"] and all(v["free_mb"] > 0 for v in answer["disk"])
        assert all(f.exists() for f in files) and scalar(url, "SELECT COUNT(*) FROM images") == 0
        assert daemon.stop() == 0

        config.write_text(config.read_text(encoding="utf-8").replace(
            f"min_free_mb = {ABOVE_ANY_DISK_MB!r}", "min_free_mb = 0"), encoding="utf-8")
        daemon.start()
        # the row commits before the file is filed (crash-safe order), so wait for both, not the row alone
        wait_for(lambda: scalar(url, "SELECT COUNT(*) FROM images WHERE status = 'done'") == 4
                 and not any(f.exists() for f in files), 60, "the waiting files classified and archived")
        assert daemon.stop() == 0
    finally:
        daemon.close()
