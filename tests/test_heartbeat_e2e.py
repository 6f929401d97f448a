"""`stainbridge status` says whether the service runs, from its heartbeat (daemon/service/heartbeat.py).

A real `stainbridge run` process: while it runs, `status` says "running" with its state and when it last
processed a file; killed with SIGKILL (no chance to say goodbye), `status` says "NOT RUNNING" within a minute;
stopped with SIGTERM, at once.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.daemon_helpers import (
    STAINBRIDGE,
    Daemon,
    build_tiny_models,
    subprocess_env,
    wait_for,
    write_cell,
    write_config,
)

pytestmark = pytest.mark.slow


def _status(config: Path) -> dict:
    done = subprocess.run([str(STAINBRIDGE), "--config", str(config), "status", "--json"], env=subprocess_env(),
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def _status_text(config: Path) -> str:
    return subprocess.run([str(STAINBRIDGE), "--config", str(config), "status"], env=subprocess_env(),
                          capture_output=True, text=True, timeout=120, check=True).stdout


def test_status_says_running_then_not_running_within_a_minute_of_a_kill(tmp_path) -> None:
    """Running: state ready and the last processed file; after kill -9: "NOT RUNNING" within 60 s."""
    url = f"sqlite:///{tmp_path / 'state' / 'stainbridge.db'}"
    config = write_config(tmp_path / "stainbridge.toml", tmp_path, url, build_tiny_models(tmp_path / "models"))
    daemon = Daemon(config, tmp_path).start()
    try:
        write_cell(tmp_path / "drop" / "cell.png", seed=1)
        report = wait_for(lambda: (r := _status(config))["workers"] and r["workers"][0]["handled"] == 1 and r, 90,
                          "the heartbeat after the first file", interval=1.0)
        assert report["service"] == "running"
        worker = report["workers"][0]
        assert worker["state"] == "ready" and worker["last_processed_at"] and report["last_processed_at"]
        assert worker["last_processed_at"].endswith("+00:00")
        assert _status_text(config).startswith("service             running, ready (")
        daemon.signal(signal.SIGKILL)
        daemon.wait_exit(30)
        killed = time.monotonic()
        wait_for(lambda: _status(config)["service"] == "not running", 60, "status to say not running", interval=2.0)
        assert time.monotonic() - killed <= 60
        text = _status_text(config)
        assert text.startswith("service             NOT RUNNING (last heartbeat ") and "s ago from" in text
    finally:
        daemon.close()


def test_a_clean_stop_says_stopped_at_once(tmp_path) -> None:
    """SIGTERM: the last heartbeat says "stopped", so `status` says "NOT RUNNING (stopped at ...)" right away."""
    url = f"sqlite:///{tmp_path / 'state' / 'stainbridge.db'}"
    config = write_config(tmp_path / "stainbridge.toml", tmp_path, url, build_tiny_models(tmp_path / "models"))
    daemon = Daemon(config, tmp_path).start()
    try:
        assert _status(config)["service"] == "running"
        assert daemon.stop() == 0
        report = _status(config)
        assert report["service"] == "not running" and report["workers"][0]["state"] == "stopped"
        assert "NOT RUNNING (stopped at " in _status_text(config)
    finally:
        daemon.close()
