"""Retention: old run folders (with the PNG copies of reviewed images) and unused candidates go; what may serve stays."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest

from stainbridge.daemon import cli
from stainbridge.daemon.config import load_settings
from stainbridge.daemon.retraining.nightly import run_retraining
from stainbridge.daemon.schema import upgrade_database
from stainbridge.daemon.store import (
    ModelKind,
    ModelVersion,
    RunStatus,
    TrainingRun,
    make_engine,
    make_sessionmaker,
    utcnow,
)
from stainbridge.daemon.versions import registry
from stainbridge.models.inference import file_sha256

OLD = utcnow() - timedelta(days=40)


@pytest.fixture
def runs_world(tmp_path, monkeypatch):
    """Six finished runs: 1-5 forty days ago, 6 today. Standardizers: run 1's was promoted over the built-in, run
    2's over it, run 3's over that (active: its rollback target is run 2's); run 4's was refused; run 5 fine-tuned a
    classifier on PNG copies of reviewed cells (refused); run 6's candidate is recent."""
    state = tmp_path / "state"
    url = f"sqlite:///{state / 'stainbridge.db'}"
    monkeypatch.setenv("STAINBRIDGE_DATABASE_URL", url)
    monkeypatch.setenv("STAINBRIDGE_PATHS_STATE", str(state))
    upgrade_database(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    folders = {}
    with sessions.begin() as s:
        builtin = registry.register_model(s, ModelKind.standardizer, "none", "0" * 64, {}, site="default")
        for run_id in range(1, 7):
            when = OLD if run_id < 6 else utcnow()
            kind = ModelKind.classifier if run_id == 5 else ModelKind.standardizer
            s.add(TrainingRun(id=run_id, kind=kind, status=RunStatus.rejected, started_at=when, finished_at=when))
            folder = folders[run_id] = state / "retraining" / f"run-{run_id}"
            (folder / "reviewed" / "monocyte").mkdir(parents=True)
            (folder / "reviewed" / "monocyte" / "000000.png").write_bytes(b"patient cell")
            (folder / "train.log").write_text("log\n")
            checkpoint = folder / f"{kind.value}.safetensors"
            checkpoint.write_bytes(f"weights of run {run_id}".encode())
            version = registry.register_model(s, kind, str(checkpoint), file_sha256(checkpoint), {}, site="default",
                                              state=registry.VersionState.candidate, training_run_id=run_id)
            if run_id <= 3:
                registry.activate(s, version)
        assert builtin.state.value == "retired"
    yield sessions, folders
    engine.dispose()


def test_prune_dry_run_lists_and_removes_nothing(runs_world, capsys) -> None:
    """`models prune --dry-run --json` names what would go (runs 1, 4, 5 whole; 2 and 3 but their checkpoints)."""
    _, folders = runs_world
    assert cli.main(["models", "prune", "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["folders"] == [str(folders[n]) for n in (1, 4, 5)]
    assert plan["emptied"] == [str(folders[n]) for n in (2, 3)] and plan["versions"] == [2, 5, 6]
    assert all((folder / "reviewed" / "monocyte" / "000000.png").is_file() for folder in folders.values())


def test_prune_removes_old_runs_and_keeps_the_active_and_rollback_checkpoints(runs_world, capsys) -> None:
    """Old run folders go (patient PNGs included); the active version's and its rollback target's checkpoints stay
    alone in theirs; a recent run is untouched; pruned versions stay listed with metrics.pruned_at."""
    sessions, folders = runs_world
    assert cli.main(["models", "prune"]) == 0
    assert "removed 3 run folder(s) and the rest of 2" in capsys.readouterr().out
    assert [n for n, folder in folders.items() if folder.exists()] == [2, 3, 6]
    assert [p.name for p in folders[2].iterdir()] == ["standardizer.safetensors"]
    assert [p.name for p in folders[3].iterdir()] == ["standardizer.safetensors"]
    assert (folders[6] / "reviewed" / "monocyte" / "000000.png").is_file()
    with sessions() as s:
        pruned = sorted(v.id for v in s.query(ModelVersion) if "pruned_at" in (v.metrics or {}))
        assert pruned == [2, 5, 6]
        assert registry.rollback(s, ModelKind.standardizer, "default")[1].id == 3  # the kept target still loads
    assert cli.main(["models", "prune"]) == 0
    assert "removed 0 run folder(s) and the rest of 0" in capsys.readouterr().out


def test_the_nightly_job_prunes_too(runs_world) -> None:
    """A run of the nightly job (here skipped: no reference folder) ends by pruning what is older than keep_days."""
    sessions, folders = runs_world
    result = run_retraining(load_settings(), sessions)
    assert result.status == "skipped"
    assert result.metrics["pruned"]["folders"] == [str(folders[n]) for n in (1, 4, 5)]
    assert not folders[5].exists() and Path(folders[3] / "standardizer.safetensors").is_file()


def test_backup_leaves_pruned_checkpoints_out_without_a_warning(runs_world, tmp_path, capsys) -> None:
    """After a prune, `backup` copies the kept checkpoints and says nothing about the files removed on purpose."""
    sessions, _ = runs_world
    from stainbridge.daemon.commands.backup import copy_checkpoints

    assert cli.main(["models", "prune"]) == 0
    with sessions() as s:
        versions = [v for v in s.query(ModelVersion) if not registry.is_builtin(v)]
    (tmp_path / "backup").mkdir()
    entries, warnings = copy_checkpoints(versions, tmp_path / "backup")
    assert warnings == [] and sorted(i for e in entries for i in e.versions) == [3, 4, 7]
