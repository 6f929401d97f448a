"""`stainbridge status`: queue, counts, failures by reason, throughput, models, next retraining."""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timedelta

import pytest

from stainbridge.daemon.commands import status
from stainbridge.daemon.schema import upgrade_database
from stainbridge.daemon.store import (
    Image,
    ImageStatus,
    ModelKind,
    RunStatus,
    TrainingRun,
    make_engine,
    make_sessionmaker,
    utcnow,
)
from stainbridge.daemon.versions.registry import register_model


@pytest.mark.parametrize("command", [("status",), ("status", "--json"), ("report", "--out", "r.html"),
                                     ("export", "--format", "csv"), ("db", "current")])
def test_read_only_commands_never_create_a_database(run_stainbridge, tmp_path, command):
    """Without a database where the configuration points (the default state folder, or a URL into a folder that
    does not exist), `status`, `report`, `export` and `db current` exit 1 naming the file they looked for, and
    create neither the file nor its folder (before: a fresh database, zeros and exit 0)."""
    home = tmp_path / "home"
    default = home / ".local" / "state" / "stainbridge" / "stainbridge.db"
    for env, looked_for in (({"HOME": str(home), "XDG_STATE_HOME": ""}, default),
                            ({"STAINBRIDGE_DATABASE_URL": f"sqlite:///{tmp_path / 'nonexistent' / 'dir' / 'x.db'}"},
                             tmp_path / "nonexistent" / "dir" / "x.db")):
        result = run_stainbridge(*command, env=env)
        assert result.returncode == 1, result.stdout
        assert f"no database at {looked_for}" in result.stderr and "nothing was created" in result.stderr
        assert not looked_for.parent.exists()
        assert result.stdout == ""


def test_read_only_commands_read_the_system_configuration_by_default(monkeypatch, tmp_path, settings_factory):
    """Without --config and $STAINBRIDGE_CONFIG, /etc/stainbridge/stainbridge.toml (when it exists) is the
    configuration: an operator's `stainbridge status` reads the service's database. --config and the variable win."""
    from stainbridge.daemon import config

    system = tmp_path / "etc" / "stainbridge.toml"
    system.parent.mkdir()
    system.write_text(f'[paths]\nstate = "{tmp_path / "service-state"}"\n', encoding="utf-8")
    other = tmp_path / "other.toml"
    other.write_text(f'[paths]\nstate = "{tmp_path / "other-state"}"\n', encoding="utf-8")
    monkeypatch.setattr(config, "SYSTEM_CONFIG", system)
    assert config.load_settings(environ={}).state_dir == tmp_path / "service-state"
    assert config.load_settings(environ={}).source == f"built-in defaults < {system}"
    assert config.load_settings(other, environ={}).state_dir == tmp_path / "other-state"
    assert config.load_settings(environ={"STAINBRIDGE_CONFIG": str(other)}).state_dir == tmp_path / "other-state"
    assert config.load_settings(environ={"STAINBRIDGE_CONFIG": ""}).source == "built-in defaults"


def test_status_shows_the_latest_run_of_each_kind(run_stainbridge, tmp_path):
    """After a night with expert reviews (standardizer run, then classifier fine-tuning) both runs show,
    each the latest of its kind, in the JSON report and the text report of the real command."""
    env = {"STAINBRIDGE_PATHS_STATE": str(tmp_path / "state")}
    database_url = f"sqlite:///{tmp_path / 'state' / 'stainbridge.db'}"
    (tmp_path / "state").mkdir()
    upgrade_database(database_url)
    engine = make_engine(database_url)
    try:
        with make_sessionmaker(engine).begin() as session:
            session.add_all([
                TrainingRun(kind=ModelKind.standardizer, status=RunStatus.failed, reason="last week's crash"),
                TrainingRun(kind=ModelKind.standardizer, status=RunStatus.rejected, reason="gate: worse than active"),
                TrainingRun(kind=ModelKind.classifier, status=RunStatus.succeeded, reason="promoted after 40 reviews"),
            ])
    finally:
        engine.dispose()
    result = run_stainbridge("status", "--json", env=env)
    assert result.returncode == 0, result.stderr
    last = json.loads(result.stdout)["last_retraining"]
    assert (last["standardizer"]["run_id"], last["standardizer"]["status"]) == (2, "rejected")
    assert (last["classifier"]["run_id"], last["classifier"]["status"]) == (3, "succeeded")
    text = run_stainbridge("status", env=env).stdout
    assert "last standardizer   run 2 rejected" in text and "gate: worse than active" in text
    assert "last classifier     run 3 succeeded" in text and "last week's crash" not in text


@pytest.mark.postgres
def test_status_on_postgres_without_migrations_says_to_run_db_upgrade(postgres_url, monkeypatch, capsys):
    """On an un-migrated PostgreSQL database status exits 1 and names `stainbridge db upgrade`."""
    monkeypatch.setenv("STAINBRIDGE_DATABASE_URL", postgres_url)
    assert status.run(argparse.Namespace(config=None, json=False)) == 1
    assert "stainbridge db upgrade" in capsys.readouterr().err


def test_status_counts_failures_throughput_models_and_waiting_files(settings_factory, database_url):
    """Counts today's and all failures by reason, throughput over the last hour, active models and waiting files."""
    settings = settings_factory(database_url=database_url, retraining_enabled=True, retraining_schedule="30 3 * * *")
    upgrade_database(database_url)
    now = utcnow()
    old = now - timedelta(days=3)
    engine = make_engine(database_url)
    try:
        with make_sessionmaker(engine).begin() as session:
            rows = [
                ("a.png", ImageStatus.done, None, now), ("b.png", ImageStatus.done, None, now),
                ("c.png", ImageStatus.failed, "corrupt: c.png cannot be decoded", now),
                ("d.png", ImageStatus.failed, "symlink: d.png: links are never followed", now),
                ("e.png", ImageStatus.failed, "corrupt: e.png cannot be decoded", old),
            ]
            added = [Image(sha256=f"{i:064x}", source_name=name, site="s", status=state, error=error,
                           received_at=when, processed_at=when) for i, (name, state, error, when) in enumerate(rows)]
            session.add_all(added)
            session.flush()
            session.add(Image(sha256=added[0].sha256, duplicate_of_id=added[0].id, source_name="f.png", site="s",
                              status=ImageStatus.duplicate, received_at=now, processed_at=now))
            register_model(session, ModelKind.classifier, "/m/clf.safetensors", "c" * 64, {"architecture": "resnet18"},
                           site="default")
            register_model(session, ModelKind.standardizer, "none", "d" * 64, {}, site="default")
        settings.drop_dir.mkdir(parents=True)
        for name in ("x.png", "y.dcm", ".hidden.png", "z.png.part"):
            (settings.drop_dir / name).write_bytes(b"x")
        with make_sessionmaker(engine)() as session:
            report = status.collect(settings, session)
    finally:
        engine.dispose()
    assert report.waiting == 2
    assert (report.processed_today, report.failed_today, report.failed_total) == (2, 2, 3)
    assert report.failures_by_reason == {"corrupt": 2, "symlink": 1}
    assert report.duplicates_total == 1
    assert report.throughput_per_min == round(4 / 60, 2)
    assert [(m["kind"], m["sha256"]) for m in report.models] == [("standardizer", "d" * 12), ("classifier", "c" * 12)]
    fire = datetime.fromisoformat(report.next_retraining)
    assert (fire.hour, fire.minute) == (3, 30) and fire > datetime.now(fire.tzinfo)
    text = status.render(report)
    assert "corrupt" in text and "c" * 12 in text and "images/min" in text
    # no service ever wrote a heartbeat here; the newest processed file is one of today's
    assert report.service == "never started" and report.workers == []
    assert text.startswith("service             NOT RUNNING (no heartbeat")
    assert datetime.fromisoformat(report.last_processed_at) >= now.replace(microsecond=0)


def test_next_retraining_is_disabled_unless_enabled(settings_factory):
    """With [retraining] enabled = false the report says "disabled"."""
    assert status.next_retraining(settings_factory()) == "disabled"


def test_status_does_not_import_torch() -> None:
    """`status` reads the database only: importing it loads no torch (11 s of a 2-core machine's time under load, when
    the served-models record imported the model loader for a type hint)."""
    import subprocess
    import sys

    code = "import sys; from stainbridge.daemon.commands import status; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
