"""Operator commands around the nightly job that need no trained model: `retrain --now --json` under a held lock."""

from __future__ import annotations

import json

from stainbridge.daemon import cli
from stainbridge.daemon.config import load_settings
from stainbridge.daemon.retraining.scheduler import job_lock
from stainbridge.daemon.schema import upgrade_database
from stainbridge.daemon.store import make_engine


def test_retrain_now_json_prints_json_when_another_worker_holds_the_lock(tmp_path, monkeypatch, capsys,
                                                                       restore_logging) -> None:
    """With the retraining lock held elsewhere, `retrain --now --json` exits 1 printing {"status": "locked", ...}."""
    url = f"sqlite:///{tmp_path / 'state' / 'stainbridge.db'}"
    monkeypatch.setenv("STAINBRIDGE_DATABASE_URL", url)
    monkeypatch.setenv("STAINBRIDGE_PATHS_STATE", str(tmp_path / "state"))
    upgrade_database(url)
    engine = make_engine(url)
    try:
        with job_lock(load_settings(), engine) as got:
            assert got
            assert cli.main(["retrain", "--now", "--json"]) == 1
    finally:
        engine.dispose()
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == "locked" and "another worker is running the retraining job" in out["reason"]
    assert out["run_id"] is None and out["promoted"] is False
