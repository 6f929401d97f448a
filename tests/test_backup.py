"""`stainbridge backup DIR` / `restore DIR` on a real service's state: the nightly job's checkpoints come back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from sqlalchemy import text

from stainbridge.daemon import cli
from stainbridge.daemon.config import load_settings
from stainbridge.daemon.schema import upgrade_database
from stainbridge.daemon.service.lifecycle import Service
from stainbridge.daemon.store import make_engine
from stainbridge.models.checkpoint import save_checkpoint
from stainbridge.models.cyclegan import build_generator
from tests.daemon_helpers import GEN_ARGS, SIZE, query, wait_for, write_cell, write_config


def _stop(service: Service) -> None:
    service.watcher.stop()
    service.pipeline.close()
    service.engine.dispose()


def _retrained_standardizer(state: Path) -> Path:
    """What the nightly job leaves: a new standardizer checkpoint under <state>/retraining/run-N/."""
    torch.manual_seed(1)  # other weights than the configured one: another sha256
    path = state / "retraining" / "run-1" / "standardizer.safetensors"
    path.parent.mkdir(parents=True)
    save_checkpoint(path, build_generator(**GEN_ARGS).state_dict(),
                    {"kind": "standardizer", "architecture": "resnet_generator", "arch_args": GEN_ARGS,
                     "input_size": SIZE})
    return path


@pytest.fixture
def served(tmp_path, tiny_models, database_url, restore_logging):
    """A service that classified three files and then switched to a promoted nightly-job checkpoint; stopped."""
    if database_url.startswith("postgresql") and shutil.which("pg_dump") is None:
        pytest.skip("pg_dump is not installed (apt-get install postgresql-client-15)")
    config = write_config(tmp_path / "stainbridge.toml", tmp_path, database_url, tiny_models)
    upgrade_database(database_url)
    settings = load_settings(config, environ={})
    service = Service(settings)
    service.start()
    try:
        for i in range(3):
            write_cell(settings.drop_dir / f"cell-{i}.png", seed=i)
        wait_for(lambda: service.run_once() >= 0 and service.handled == 3, 60, "three files classified")
        checkpoint = _retrained_standardizer(settings.state_dir)
        assert cli.main(["--config", str(config), "models", "register", str(checkpoint)]) == 0
        new_id = query(database_url, "SELECT max(id) FROM model_versions")[0][0]
        assert cli.main(["--config", str(config), "models", "promote", str(new_id)]) == 0
    finally:
        _stop(service)
    return config, settings, checkpoint, new_id


def _counts(url: str) -> list[tuple]:
    return query(url, "SELECT (SELECT count(*) FROM images), (SELECT count(*) FROM predictions), "
                      "(SELECT count(*) FROM model_versions)")


def _lose_everything(settings, checkpoint: Path, url: str) -> None:
    """The disk is gone: the database and the nightly job's checkpoints with it."""
    shutil.rmtree(checkpoint.parent.parent)
    if url.startswith("sqlite"):
        Path(url.split("///", 1)[1]).unlink()
    else:
        from stainbridge.daemon.schema import downgrade_database

        downgrade_database(url, "base")  # every table and view gone
        engine = make_engine(url)
        with engine.begin() as connection:
            connection.execute(text("DROP TABLE alembic_version"))
        engine.dispose()


@pytest.mark.slow
def test_a_restored_backup_brings_back_the_database_and_the_nightly_job_s_checkpoint(served, tmp_path, database_url):
    """Backup, lose the database and <state>/retraining, restore: the same rows, the active checkpoint back with its
    sha256, and the service starts on it (before: the docs' rsync list missed run-N/, the service refused to start)."""
    config, settings, checkpoint, new_id = served
    before, sha = _counts(database_url), query(database_url, "SELECT sha256 FROM model_versions WHERE id = :i",
                                               i=new_id)[0][0]
    backup = tmp_path / "backup-1"
    assert cli.main(["--config", str(config), "backup", str(backup)]) == 0
    manifest = json.loads((backup / "manifest.json").read_text())
    assert {f["restore_to"] for f in manifest["files"] if f["role"] == "checkpoint"} >= {str(checkpoint)}
    assert [f["restore_to"] for f in manifest["files"] if f["role"] == "configuration"] == [str(config)]
    _lose_everything(settings, checkpoint, database_url)
    assert cli.main(["--config", str(config), "restore", str(backup)]) == 0
    assert _counts(database_url) == before
    assert checkpoint.is_file()
    service = Service(settings)
    service.start()  # the registry's active standardizer is the restored run-1 file, sha256 verified at load
    try:
        assert service.pipeline.models.default.standardizer_version_id == new_id
        assert query(database_url, "SELECT sha256 FROM model_versions WHERE state = 'active' AND "
                                   "kind = 'standardizer'") == [(sha,)]
    finally:
        _stop(service)


@pytest.mark.slow
def test_a_damaged_backup_is_refused_before_anything_is_written(served, tmp_path, database_url):
    """One flipped byte in a backed-up checkpoint: restore exits 1 naming it and writes nothing."""
    config, settings, checkpoint, _ = served
    backup = tmp_path / "backup-2"
    assert cli.main(["--config", str(config), "backup", str(backup)]) == 0
    damaged = next((backup / "checkpoints").iterdir())
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    _lose_everything(settings, checkpoint, database_url)
    assert cli.main(["--config", str(config), "restore", str(backup)]) == 1
    assert not checkpoint.exists() and not checkpoint.parent.exists()
    if database_url.startswith("sqlite"):
        assert not Path(database_url.split("///", 1)[1]).exists()


def test_backup_refuses_a_folder_that_is_not_empty_and_a_missing_database(tmp_path, tiny_models, capsys):
    """A backup never mixes with another (DIR must be new or empty) and never creates the database it backs up."""
    url = f"sqlite:///{tmp_path / 'state' / 'stainbridge.db'}"
    config = write_config(tmp_path / "stainbridge.toml", tmp_path, url, tiny_models)
    assert cli.main(["--config", str(config), "backup", str(tmp_path / "b")]) == 1
    assert "no database at" in capsys.readouterr().err and not (tmp_path / "state" / "stainbridge.db").exists()
    upgrade_database(url)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("x")
    assert cli.main(["--config", str(config), "backup", str(tmp_path / "used")]) == 1
    assert "is not empty" in capsys.readouterr().err
