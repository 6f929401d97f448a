"""Hot swap: the service follows promotions between batches; a version that does not load is refused."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest

from stainbridge.daemon.retraining import nightly as retraining
from stainbridge.daemon.retraining import runs
from stainbridge.daemon.schema import upgrade_database
from stainbridge.daemon.store import ModelKind, VersionState, make_engine, make_sessionmaker
from stainbridge.daemon.versions import hotswap, registry
from stainbridge.daemon.versions.hotswap import ModelSwapper
from stainbridge.daemon.versions.loading import load_models
from tests.daemon_helpers import Daemon, build_tiny_models, query, wait_for, write_cell, write_config
from tests.retraining_helpers import EventRecorder, broken_standardizer


@pytest.fixture
def world(tmp_path, settings_factory):
    tiny = build_tiny_models(tmp_path / "m")
    settings = settings_factory(models_classifier=tiny.classifier, models_standardizer=tiny.standardizer,
                                models_device="cpu", models_poll_seconds=0.01)
    upgrade_database(settings.database_url)
    engine = make_engine(settings.database_url)
    sessions = make_sessionmaker(engine)
    yield settings, sessions, load_models(settings, sessions), broken_standardizer(tmp_path / "other.safetensors")
    engine.dispose()


def _promote(sessions, path: Path, site: str = "default") -> int:
    from stainbridge.models.checkpoint import file_sha256

    with sessions.begin() as s:
        version = registry.register_model(s, ModelKind.standardizer, str(path), file_sha256(path), {}, site=site,
                                          state=VersionState.candidate)
        registry.promote(s, version.id)
        return version.id


def test_a_promoted_version_replaces_the_loaded_one(world) -> None:
    """After a promotion the next check returns models with the new version loaded and named."""
    settings, sessions, current, other = world
    swapper = ModelSwapper(settings, sessions)
    assert swapper.check(current, force=True) is None
    new_id = _promote(sessions, other)
    new = swapper.check(current, force=True)
    assert new.standardizer_version_id == new_id and new.standardizer.sha256 != current.standardizer.sha256
    assert new.classifier is current.classifier


def test_a_refused_swap_is_retried_at_the_next_poll_and_reported(world, monkeypatch) -> None:
    """A promoted file changed on disk is refused at each poll (logged with the attempt, the old models keep serving,
    `status` names the refusal); once the file is restored the next poll swaps it in and `status` says it serves."""
    from stainbridge.daemon.commands.status import collect

    settings, sessions, current, other = world
    swaps, loads = EventRecorder(), EventRecorder()
    monkeypatch.setattr(hotswap, "log", swaps)
    monkeypatch.setattr(registry, "log", loads)
    swapper = ModelSwapper(settings, sessions)
    new_id = _promote(sessions, other)
    good = other.read_bytes()
    other.write_bytes(good[:-10] + b"0123456789")
    assert swapper.check(current, force=True) is None
    assert swapper.check(current, force=True) is None
    assert swaps.names() == ["model_refused", "model_refused"] and loads.names() == ["checkpoint_changed"] * 2
    with sessions() as s:
        standardizer = next(m for m in collect(settings, s).models if m["kind"] == "standardizer")
    assert standardizer["id"] == new_id and standardizer["served"] is False
    assert "swap refused" in standardizer["not_served"] and "attempt 2" in standardizer["not_served"]
    other.write_bytes(good)
    new = swapper.check(current, force=True)
    assert new is not None and new.standardizer_version_id == new_id
    with sessions() as s:
        report = collect(settings, s)
    assert all(m["served"] for m in report.models) and report.serving[0]["refused"] is None


def test_the_metrics_name_the_served_version_not_only_the_registry_s(world) -> None:
    """While a promoted version is refused, the metrics' served standardizer is the one still loaded, flagged refused."""
    from stainbridge.daemon.lab.metrics import DatabaseCollector

    settings, sessions, current, other = world
    new_id = _promote(sessions, other)
    other.write_bytes(other.read_bytes()[:-10] + b"0123456789")
    assert ModelSwapper(settings, sessions).check(current, force=True) is None
    families = {family.name: family.samples for family in DatabaseCollector(sessions).collect()}
    served = {s.labels["kind"]: s.labels["name"] for s in families["stainbridge_served_model_info"]}
    active = {s.labels["kind"]: s.labels["name"] for s in families["stainbridge_active_model_info"]}
    with sessions() as s:
        names = {v.id: v.name for v in registry.list_versions(s)}
    assert served["standardizer"] == names[current.standardizer_version_id] != active["standardizer"] == names[new_id]
    assert [s.value for s in families["stainbridge_model_swap_refused"]] == [1]


@pytest.mark.slow
def test_the_running_service_switches_models_between_batches_and_survives_a_killed_training(tmp_path, monkeypatch) -> None:
    """Files keep flowing while a version is promoted: every file is classified, earlier ones by the old version and
    later ones by the new; a training subprocess killed meanwhile leaves a failed run and the service working."""
    tiny = build_tiny_models(tmp_path / "m")
    url = f"sqlite:///{tmp_path / 'state' / 'stainbridge.db'}"
    config = write_config(tmp_path / "stainbridge.toml", tmp_path, url, tiny, models={"poll_seconds": 0.2},
                          retraining={"min_new_images": 1, "reference": str(tmp_path)})
    daemon = Daemon(config, tmp_path).start()
    drop = tmp_path / "drop"
    try:
        for i in range(4):
            write_cell(drop / f"a{i}.png", seed=i)
        wait_for(lambda: len(query(url, "SELECT id FROM predictions")) == 4, 90, "the first 4 files classified")
        old = query(url, "SELECT DISTINCT standardizer_version_id FROM predictions")
        engine = make_engine(url)
        sessions = make_sessionmaker(engine)
        new_id = _promote(sessions, broken_standardizer(tmp_path / "other.safetensors"), "test-site")
        flowing = threading.Thread(target=lambda: [write_cell(drop / f"b{i}.png", seed=100 + i) for i in range(8)])
        flowing.start()
        flowing.join()
        wait_for(lambda: len(query(url, "SELECT id FROM predictions")) == 12, 90, "all 12 files classified")
        versions = [v for (v,) in query(url, "SELECT standardizer_version_id FROM predictions ORDER BY id")]
        assert versions[:4] == [old[0][0]] * 4 and versions[-1] == new_id
        assert versions == sorted(versions, key=lambda v: v == new_id)  # never back to the old one
        assert any(e.get("event") == "models_swapped" for e in daemon.events())

        # A retraining run whose training subprocess is killed: recorded as failed, the service goes on.
        pidfile = tmp_path / "child.pid"
        monkeypatch.setattr(runs, "CHILD", "import os, sys, time; os.nice(int(sys.argv[1])); "
                            f"open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(120)")
        from stainbridge.daemon.config import load_settings

        settings = load_settings(config, environ={})
        results: list = []
        job = threading.Thread(target=lambda: results.append(retraining.run_retraining(settings, sessions)))
        job.start()
        os.kill(int(wait_for(lambda: pidfile.exists() and pidfile.read_text(), 60, "the training pid")), signal.SIGKILL)
        job.join(60)
        assert results[0].status == "failed" and "SIGKILL" in results[0].reason
        write_cell(drop / "c.png", seed=999)
        wait_for(lambda: len(query(url, "SELECT id FROM predictions")) == 13, 90, "a file after the killed run")
        assert query(url, "SELECT status FROM training_runs") == [("failed",)]
        assert daemon.process.poll() is None
        engine.dispose()
    finally:
        assert daemon.stop() == 0
        daemon.close()
