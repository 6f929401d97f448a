"""End to end: the real `stainbridge run` process, on SQLite and on PostgreSQL.

Each test writes a config under tmp_path, starts the daemon as a subprocess with a real
NOTIFY_SOCKET, drops files in the ways a lab does, and checks the database and the folders.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from stainbridge.daemon import folders
from stainbridge.daemon.schema import upgrade_database
from tests.daemon_helpers import (
    Daemon,
    bomb_png,
    build_tiny_models,
    query,
    scalar,
    wait_for,
    write_cell,
    write_config,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    return build_tiny_models(tmp_path_factory.mktemp("models"))


def make_daemon(tmp_path: Path, url: str, checkpoints, *, env: dict[str, str] | None = None, **sections) -> Daemon:
    if url.startswith("postgresql"):
        upgrade_database(url)  # what the operator does once: `stainbridge db upgrade`
    config = write_config(tmp_path / "stainbridge.toml", tmp_path, url, checkpoints, **sections)
    return Daemon(config, tmp_path, env=env)


@pytest.fixture
def daemon_factory(tmp_path, tiny_models):
    made: list[Daemon] = []

    def make(url: str, **kwargs) -> Daemon:
        daemon = make_daemon(tmp_path, url, tiny_models, **kwargs)
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        daemon.close()


def finished(url: str) -> int:
    return scalar(url, "SELECT count(*) FROM images WHERE status IN ('done', 'failed', 'duplicate')")


def rows_by_source(url: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for source, status in query(url, "SELECT source_name, status FROM images ORDER BY id"):
        out.setdefault(source, []).append(status)
    return out


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if (p.is_file() or p.is_symlink()) and p.name != folders.MARKER)


def test_ready_after_startup_scan_watchdog_pings_and_stopping_on_sigterm(daemon_factory, database_url, tmp_path):
    """READY=1 comes after models and the start-up scan, WATCHDOG=1 while healthy, STOPPING=1 and exit 0 on SIGTERM."""
    daemon = daemon_factory(database_url, env={"WATCHDOG_USEC": "600000"})
    write_cell(tmp_path / "drop" / "waiting.png", seed=1)
    daemon.start()
    events = [e["event"] for e in daemon.events()]
    assert events.index("models_loaded") < events.index("ready")  # both logged before READY=1 was sent
    daemon.wait_message("WATCHDOG=1", 15)
    wait_for(lambda: finished(database_url) == 1, 30, "the file present at start-up is processed")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(30) == 0
    assert any(m.startswith("STOPPING=1") for m in daemon.receive())


def test_files_arriving_every_way_are_processed_exactly_once(daemon_factory, database_url, tmp_path):
    """Copied while down (before start), slow chunked copy, atomic rename and a duplicate: each recorded exactly once."""
    drop = tmp_path / "drop"
    # A quiet time far longer than any pause between chunks, however loaded the machine: the slow
    # copy becomes ready by its close-write event, never half-written by the clock.
    daemon = daemon_factory(database_url, watch={"quiet_seconds": 5.0})
    first = write_cell(drop / "down1.png", seed=1).read_bytes()
    write_cell(drop / "sub" / "down2.png", seed=2)
    daemon.start()

    data = write_cell(tmp_path / "staging" / "slow.png", seed=3).read_bytes()
    with open(drop / "slow.png", "wb") as out:  # a slow copy: written in chunks, closed at the end
        for start in range(0, len(data), 2048):
            out.write(data[start:start + 2048])
            out.flush()
            time.sleep(0.05)
    staged = write_cell(drop / ".renamed.png.part", seed=4)
    os.rename(staged, drop / "renamed.png")
    wait_for(lambda: finished(database_url) == 4, 60, "four files processed")
    (drop / "down1-copy.png").write_bytes(first)
    wait_for(lambda: finished(database_url) == 5, 30, "the duplicate recorded")
    assert daemon.stop() == 0

    assert rows_by_source(database_url) == {
        "down1.png": ["done"], "sub/down2.png": ["done"], "slow.png": ["done"], "renamed.png": ["done"],
        "down1-copy.png": ["duplicate"],
    }
    assert scalar(database_url, "SELECT count(*) FROM predictions") == 4
    original = scalar(database_url, "SELECT id FROM images WHERE source_name = 'down1.png'")
    assert scalar(database_url, "SELECT duplicate_of_id FROM images WHERE status = 'duplicate'") == original
    assert sorted(p.name for p in files_under(tmp_path / "archive")) == sorted(
        ["down1.png", "down2.png", "slow.png", "renamed.png", "down1-copy.png"])
    assert files_under(drop) == []


def test_bad_inputs_are_quarantined_with_reasons_while_valid_files_flow(daemon_factory, database_url, tmp_path):
    """Corrupt, zero-byte, non-image, decompression bomb and symlink are quarantined; valid files are classified."""
    drop = tmp_path / "drop"
    daemon = daemon_factory(database_url).start()
    good = write_cell(tmp_path / "staging" / "good0.png", seed=10).read_bytes()
    (drop / "corrupt.png").write_bytes(good[: len(good) // 2])
    write_cell(drop / "good1.png", seed=11)
    (drop / "empty.png").write_bytes(b"")
    (drop / "notes.png").write_text("these are my notes, not an image\n")
    write_cell(drop / "good2.png", seed=12)
    (drop / "bomb.png").write_bytes(bomb_png())
    outside = write_cell(tmp_path / "elsewhere" / "target.png", seed=13)
    os.symlink(outside, drop / "link.png")
    write_cell(drop / "good3.png", seed=14)
    wait_for(lambda: finished(database_url) == 8, 60, "all eight files handled")
    assert daemon.stop() == 0

    rows = dict(query(database_url, "SELECT source_name, coalesce(error, status) FROM images"))
    reasons = {name: value.split(":")[0] for name, value in rows.items()}
    assert reasons["corrupt.png"] in ("truncated", "corrupt")
    assert reasons["empty.png"] == "empty"
    assert reasons["notes.png"] == "unsupported_format"
    assert reasons["bomb.png"] == "decompression_bomb"
    assert reasons["link.png"] == "symlink"
    assert [reasons[f"good{i}.png"] for i in (1, 2, 3)] == ["done"] * 3
    quarantined = {p.name for p in files_under(tmp_path / "quarantine")}
    for name in ("corrupt.png", "empty.png", "notes.png", "bomb.png", "link.png"):
        assert name in quarantined and f"{name}.error.txt" in quarantined
    assert outside.exists() and files_under(drop) == []


def test_sigterm_during_a_burst_exits_zero_and_a_restart_finishes_the_rest(daemon_factory, database_url, tmp_path):
    """SIGTERM mid-burst finishes the current batch and exits 0 in time; the next start handles the rest once."""
    drop, staging, total = tmp_path / "drop", tmp_path / "staging", 60
    daemon = daemon_factory(database_url, models={"batch_size": 2}).start()
    names = [write_cell(staging / f"burst{i:03d}.png", seed=100 + i).name for i in range(total)]
    for name in names:
        os.rename(staging / name, drop / name)
    wait_for(lambda: scalar(database_url, "SELECT count(*) FROM images WHERE status = 'done'") >= 2, 60,
             "the burst has started")
    started = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(30) == 0 and time.monotonic() - started < 30
    done_before = scalar(database_url, "SELECT count(*) FROM images WHERE status = 'done'")
    assert done_before < total, "the burst was over before SIGTERM; make it larger"
    assert scalar(database_url, "SELECT count(*) FROM images WHERE status = 'processing'") == 0

    daemon.start()
    wait_for(lambda: finished(database_url) == total, 90, "the rest of the burst processed after restart")
    assert daemon.stop() == 0
    assert Counter(s for v in rows_by_source(database_url).values() for s in v) == {"done": total}
    assert len(rows_by_source(database_url)) == total
    assert scalar(database_url, "SELECT count(*) FROM predictions") == total


def test_second_signal_exits_at_once_and_a_restart_loses_and_repeats_nothing(daemon_factory, sqlite_url, tmp_path):
    """A second signal exits immediately (128+signum) mid-batch; the restart processes every file exactly once."""
    drop, staging, total = tmp_path / "drop", tmp_path / "staging", 40
    daemon = daemon_factory(sqlite_url, models={"batch_size": 2}).start()
    names = [write_cell(staging / f"b{i:03d}.png", seed=300 + i).name for i in range(total)]
    for name in names:
        os.rename(staging / name, drop / name)
    wait_for(lambda: scalar(sqlite_url, "SELECT count(*) FROM images") >= 3, 60, "the burst has started")
    daemon.signal(signal.SIGINT)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(30) == 128 + signal.SIGTERM
    assert "second_signal_exiting_now" in daemon.log_text()

    daemon.start()
    wait_for(lambda: finished(sqlite_url) == total, 90, "every file processed after the restart")
    assert daemon.stop() == 0
    assert all(v == ["done"] for v in rows_by_source(sqlite_url).values()) and len(rows_by_source(sqlite_url)) == total
    assert scalar(sqlite_url, "SELECT count(*) FROM predictions") == total
    assert len(files_under(tmp_path / "archive")) == total


def test_missing_classifier_exits_1_with_a_one_line_error_before_ready(daemon_factory, sqlite_url, tmp_path):
    """A classifier path that does not exist: one clear error line, exit 1, and no READY=1."""
    daemon = daemon_factory(sqlite_url, models={"classifier": str(tmp_path / "missing.safetensors")})
    daemon.start(wait_ready=False)
    assert daemon.wait_exit(60) == 1
    lines = [line for line in daemon.log_text().splitlines() if line.startswith("stainbridge run:")]
    assert len(lines) == 1 and "missing.safetensors does not exist" in lines[0] and "[models] classifier" in lines[0]
    assert not any(m.startswith("READY=1") for m in daemon.receive())


@pytest.mark.postgres
def test_postgres_schema_behind_head_is_refused_with_the_upgrade_command(tmp_path, tiny_models, postgres_url):
    """On PostgreSQL the service does not migrate: an empty database makes it exit 1 naming `stainbridge db upgrade`."""
    config = write_config(tmp_path / "stainbridge.toml", tmp_path, postgres_url, tiny_models)
    daemon = Daemon(config, tmp_path)
    try:
        daemon.start(wait_ready=False)
        assert daemon.wait_exit(60) == 1
        assert "stainbridge db upgrade" in daemon.log_text()
        assert not any(m.startswith("READY=1") for m in daemon.receive())
    finally:
        daemon.close()


UNIT = Path(__file__).resolve().parent.parent / "config" / "stainbridge.service"


def test_systemd_unit_is_notify_hardened_and_still_reaches_the_gpu():
    """The unit is Type=notify with a watchdog and hardening, allows /dev/nvidia*, and never hides devices or W+X."""
    directives = [line.split("=", 1) for line in UNIT.read_text().splitlines() if "=" in line and not line.startswith("#")]
    keys = {key for key, _ in directives}
    values = {key: value for key, value in directives}
    assert values["Type"] == "notify" and values["Restart"] == "on-failure"
    assert {"WatchdogSec", "TimeoutStopSec", "StateDirectory", "ReadWritePaths"} <= keys
    assert values["ExecStart"].startswith("/opt/stainbridge/.venv/bin/stainbridge run --config ")
    for hardening in ("ProtectSystem", "ProtectHome", "NoNewPrivileges", "PrivateTmp", "ProtectKernelTunables",
                      "ProtectControlGroups", "RestrictAddressFamilies", "LockPersonality"):
        assert hardening in keys, hardening
    assert values["DevicePolicy"] == "closed"
    allowed = [value for key, value in directives if key == "DeviceAllow"]
    assert {"/dev/nvidia0 rw", "/dev/nvidiactl rw", "/dev/nvidia-uvm rw"} <= set(allowed)
    assert "PrivateDevices" not in keys and "MemoryDenyWriteExecute" not in keys


def test_systemd_unit_writes_no_core_file_and_outlasts_a_file_that_kills_the_service():
    """LimitCORE=0: a watchdog SIGABRT or a crash writes no core file (it would hold patient images); the start
    limit leaves room for the deaths after which a file that kills the service is quarantined."""
    from stainbridge.daemon.intake.claims import MAX_CRASHES

    values = dict(line.split("=", 1) for line in UNIT.read_text().splitlines() if "=" in line and not line.startswith("#"))
    assert values["LimitCORE"] == "0"
    assert int(values["StartLimitBurst"]) > MAX_CRASHES + 1  # the deaths, then the start that quarantines it


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_unit_passes_systemd_analyze_verify(tmp_path):
    """`systemd-analyze verify` accepts the unit (ExecStart pointed at an existing binary for the check)."""
    unit = tmp_path / "stainbridge.service"
    unit.write_text(UNIT.read_text().replace("/opt/stainbridge/.venv/bin/stainbridge", "/bin/true"))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, cwd=tmp_path, check=False,
                            timeout=60)
    assert result.returncode == 0, result.stderr
