"""The pipeline and the service tick (`run_once`) on a tmp_path drop folder with a real SQLite file."""

from __future__ import annotations

import argparse
import os
import socket
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import func, select

from stainbridge.daemon import folders
from stainbridge.daemon.commands import ingest
from stainbridge.daemon.intake import claims, reading
from stainbridge.daemon.intake.watcher import iter_candidates
from stainbridge.daemon.pipeline import runner as pipeline_module
from stainbridge.daemon.pipeline.batch import STEPS
from stainbridge.daemon.pipeline.runner import Pipeline
from stainbridge.daemon.service.lifecycle import Service
from stainbridge.daemon.store import (
    Image,
    ImageStatus,
    ModelKind,
    ModelVersion,
    Prediction,
    make_engine,
    make_sessionmaker,
)
from stainbridge.daemon.versions.loading import ModelConfigError, load_models
from stainbridge.daemon.versions.registry import active_versions, register_model
from tests.daemon_helpers import CLASSES, write_cell, write_config


@pytest.fixture
def service(make_service):
    return make_service()


@pytest.fixture
def settings(service):
    return service.settings


@pytest.fixture
def sessions(service):
    return service.pipeline.sessions


def drain(service: Service, expected: int, timeout: float = 30) -> int:
    """Call run_once until `expected` files were handled; the total."""
    total, deadline = 0, time.monotonic() + timeout
    while total < expected and time.monotonic() < deadline:
        n = service.run_once()
        total += n
        if n == 0:
            time.sleep(0.05)
    return total


def count(sessions, *where) -> int:
    with sessions() as s:
        return s.scalar(select(func.count(Image.id)).where(*where))


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if (p.is_file() or p.is_symlink()) and p.name != folders.MARKER)


@pytest.mark.slow
def test_run_once_classifies_records_and_archives(service, sessions, settings, tiny_models):
    """run_once returns how many files it handled; each gets one prediction with versions and sha256."""
    for i in range(2):
        write_cell(settings.drop_dir / f"cell{i}.png", seed=i)
    assert drain(service, 2) == 2
    with sessions() as s:
        rows = s.scalars(select(Image)).all()
        preds = s.scalars(select(Prediction)).all()
        assert {r.status for r in rows} == {ImageStatus.done} and len(preds) == 2
        for p in preds:
            assert set(p.probabilities) == set(CLASSES) and abs(sum(p.probabilities.values()) - 1) < 1e-4
            assert p.label in CLASSES and p.confidence == max(p.probabilities.values()) and p.latency_ms > 0
            assert s.get(ModelVersion, p.classifier_version_id).sha256 == tiny_models.classifier_sha256
            assert s.get(ModelVersion, p.standardizer_version_id).sha256 == tiny_models.standardizer_sha256
    day = datetime.now(UTC).strftime("%Y/%m/%d")
    archived = files_under(settings.archive_dir)
    assert [p.name for p in archived] == ["cell0.png", "cell1.png"] and all(day in str(p) for p in archived)
    assert {r.archive_path for r in rows} == {str(p) for p in archived}
    assert files_under(settings.drop_dir) == []


def test_run_once_returns_zero_when_nothing_is_ready(service):
    """An empty drop folder: run_once handles nothing and says so."""
    assert service.run_once() == 0


@pytest.mark.slow
def test_micro_batch_is_capped_at_batch_size(service, settings):
    """Six ready files with batch_size 4: one tick handles 4, the next 2."""
    for i in range(6):
        write_cell(settings.drop_dir / f"c{i}.png", seed=10 + i)
    service.watcher.rescan()
    service._backlog = service.watcher.ready_files(now=time.monotonic() + 60)  # all six, past their quiet time
    assert len(service._backlog) == 6
    assert service.run_once() == 4
    assert service.run_once() == 2


def test_duplicate_is_recorded_once_and_archived(service, sessions, settings):
    """The same bytes under two names: one classified, one `duplicate` row pointing at it."""
    write_cell(settings.drop_dir / "first.png", seed=3)
    assert drain(service, 1) == 1
    (settings.drop_dir / "again.png").write_bytes(next(settings.archive_dir.rglob("first.png")).read_bytes())
    assert drain(service, 1) == 1
    with sessions() as s:
        dup = s.scalars(select(Image).where(Image.status == ImageStatus.duplicate)).one()
        assert dup.source_name == "again.png" and s.get(Image, dup.duplicate_of_id).source_name == "first.png"
        assert s.scalar(select(func.count(Prediction.id))) == 1
    assert sorted(p.name for p in files_under(settings.archive_dir)) == ["again.png", "first.png"]


@pytest.mark.slow
def test_corrupt_file_is_quarantined_with_reason_and_the_next_is_classified(service, sessions, settings):
    """A truncated PNG goes to quarantine with a .error.txt and its reason in SQL; a valid file still flows."""
    good = write_cell(settings.drop_dir / "good.png", seed=4)
    data = good.read_bytes()
    (settings.drop_dir / "broken.png").write_bytes(data[: len(data) // 2])
    assert drain(service, 2) == 2
    with sessions() as s:
        broken = s.scalars(select(Image).where(Image.source_name == "broken.png")).one()
        assert broken.status is ImageStatus.failed and broken.error.split(":")[0] in ("truncated", "corrupt")
        assert s.scalars(select(Image).where(Image.source_name == "good.png")).one().status is ImageStatus.done
    quarantined = next(settings.quarantine_dir.rglob("broken.png"))
    note = quarantined.with_name("broken.png.error.txt").read_text()
    assert "reason:" in note and broken.error.split(":")[0] in note


def test_symlink_is_quarantined_as_a_link_and_its_target_untouched(service, sessions, settings, tmp_path):
    """A symlink in the drop folder is refused, recorded and moved as a link; the target stays."""
    target = write_cell(tmp_path / "outside.png", seed=5)
    os.symlink(target, settings.drop_dir / "link.png")
    assert drain(service, 1) == 1
    with sessions() as s:
        row = s.scalars(select(Image)).one()
        assert row.status is ImageStatus.failed and row.error.startswith("symlink:") and row.sha256 is None
    moved = next(settings.quarantine_dir.rglob("link.png"))
    assert moved.is_symlink() and target.exists()


@pytest.mark.slow
def test_poison_image_fails_alone(service, sessions, settings, monkeypatch):
    """When inference raises on one image, the batch is retried one by one and only that image fails."""
    real = pipeline_module.run_batch

    def picky(images, *args, **kwargs):
        if any(img.width == 47 for img in images):
            raise RuntimeError("simulated model failure")
        return real(images, *args, **kwargs)

    monkeypatch.setattr(pipeline_module, "run_batch", picky)
    write_cell(settings.drop_dir / "ok1.png", seed=6)
    write_cell(settings.drop_dir / "poison.png", seed=7, size=47)
    write_cell(settings.drop_dir / "ok2.png", seed=8)
    assert drain(service, 3) == 3
    with sessions() as s:
        status = dict(s.execute(select(Image.source_name, Image.status)).all())
        assert status == {"ok1.png": ImageStatus.done, "ok2.png": ImageStatus.done, "poison.png": ImageStatus.failed}
        assert s.scalars(select(Image.error).where(Image.source_name == "poison.png")).one().startswith("inference:")


@pytest.mark.slow
def test_save_standardized_writes_a_png_next_to_the_archived_original(settings_factory, tiny_models):
    """With save_standardized on, <stem>.standardized.png lands beside the archived file."""
    settings = settings_factory(models_classifier=str(tiny_models.classifier), models_standardizer="none",
                                models_device="cpu", watch_quiet_seconds=0.05, watch_save_standardized=True)
    folders.prepare(settings)
    svc = Service(settings)
    svc.start()
    try:
        write_cell(settings.drop_dir / "s.png", seed=9)
        assert drain(svc, 1) == 1
    finally:
        svc.watcher.stop()
        svc.engine.dispose()
    names = sorted(p.name for p in files_under(settings.archive_dir))
    assert names == ["s.png", "s.standardized.png"]


def _candidates(settings):
    return list(iter_candidates([settings.drop_dir]))


def test_batch_report_times_each_step_of_the_batch(service, settings):
    """A batch's report carries the wall and CPU time of every pipeline step (the service logs them with the batch)."""
    for i in range(3):
        write_cell(settings.drop_dir / f"t{i}.png", seed=20 + i)
    report = service.pipeline.process(_candidates(settings))
    assert report.done == 3
    assert set(report.step_seconds) == set(report.step_cpu_seconds) == set(STEPS)
    assert all(seconds >= 0 for seconds in report.step_seconds.values())
    assert report.step_seconds["inference"] <= report.step_seconds["decode_and_inference"]


@pytest.mark.slow
def test_crash_between_commit_and_move_files_without_reclassifying(service, sessions, settings):
    """A file already `done` but still in the drop folder is just archived: no new prediction, no duplicate."""
    write_cell(settings.drop_dir / "late.png", seed=11)
    unfiled = Pipeline(settings, sessions, service.pipeline.models, file_results=False)
    assert unfiled.process(_candidates(settings)).done == 1  # "crash" before the move
    report = service.pipeline.process(_candidates(settings))
    assert (report.done, report.duplicates, report.refiled) == (0, 0, 1)
    assert count(sessions) == 1 and count(sessions, Image.status == ImageStatus.done) == 1
    with sessions() as s:
        assert s.scalar(select(func.count(Prediction.id))) == 1
    assert [p.name for p in files_under(settings.archive_dir)] == ["late.png"]


def test_failed_file_left_by_a_crash_is_quarantined_with_its_stored_reason(service, sessions, settings):
    """A `failed` row whose file never moved: the next pass quarantines it with the reason from SQL."""
    (settings.drop_dir / "junk.png").write_text("not an image")
    Pipeline(settings, sessions, service.pipeline.models, file_results=False).process(_candidates(settings))
    report = service.pipeline.process(_candidates(settings))
    assert (report.failed, report.refiled, report.refiled_failed) == (0, 1, 1) and count(sessions) == 1
    note = next(settings.quarantine_dir.rglob("junk.png.error.txt")).read_text()
    assert "reason: unsupported_format" in note


def test_duplicate_row_is_not_recorded_twice_after_a_crash_before_archiving(service, sessions, settings):
    """A duplicate recorded but never archived (crash) is archived on the next pass, not counted again."""
    write_cell(settings.drop_dir / "a.png", seed=12)
    (settings.drop_dir / "b.png").write_bytes((settings.drop_dir / "a.png").read_bytes())
    first = Pipeline(settings, sessions, service.pipeline.models, file_results=False).process(_candidates(settings))
    assert (first.done, first.duplicates) == (1, 1)
    again = service.pipeline.process(_candidates(settings))
    assert (again.done, again.duplicates, again.refiled) == (0, 0, 2)
    assert count(sessions) == 2 and count(sessions, Image.status == ImageStatus.duplicate) == 1
    assert files_under(settings.drop_dir) == []


def test_claim_left_by_a_dead_process_is_released_and_processed_once(service, sessions, settings):
    """A `processing` row of a crashed worker on this host is released at start-up and classified once."""
    path = write_cell(settings.drop_dir / "orphan.png", seed=13)
    with sessions.begin() as s:
        result = claims.claim(s, sha256=reading.sha256_file(path), source_name="orphan.png", site="test",
                              size_bytes=path.stat().st_size)
        s.get(Image, result.image_id).claimed_by = f"{socket.gethostname()}:{2**22 + 12345}"  # no such pid
    assert service.pipeline.recover() == 1
    report = service.pipeline.process(_candidates(settings))
    assert report.done == 1 and count(sessions) == 1
    with sessions() as s:
        assert s.scalar(select(func.count(Prediction.id))) == 1


def test_missing_classifier_is_a_model_config_error(settings_factory, tmp_path):
    """A classifier path that does not exist stops start-up with a message naming the setting."""
    settings = settings_factory(models_classifier=str(tmp_path / "nope.safetensors"))
    engine = make_engine(settings.database_url)
    try:
        with pytest.raises(ModelConfigError, match=r"\[models\] classifier"):
            load_models(settings, make_sessionmaker(engine))
    finally:
        engine.dispose()


def test_register_model_is_idempotent_and_keeps_one_active_per_kind(sessions):
    """Registering the same sha256 twice returns one row; a new one deactivates the old."""
    with sessions.begin() as s:
        a = register_model(s, ModelKind.classifier, "/m/a.safetensors", "a" * 64, {"architecture": "resnet18"},
                           site="default")
        again = register_model(s, ModelKind.classifier, "/m/a.safetensors", "a" * 64, {"architecture": "resnet18"},
                               site="default")
        b = register_model(s, ModelKind.classifier, "/m/b.safetensors", "b" * 64, {}, site="default")
        assert a.id == again.id and not a.active and b.active
        kinds = [v.kind for v in active_versions(s)]
        assert kinds.count(ModelKind.classifier) == 1 and kinds.count(ModelKind.standardizer) == 1


def _ingest(config: Path, *paths: Path, move: bool = False) -> int:
    return ingest.run(argparse.Namespace(config=str(config), paths=[str(p) for p in paths], move=move, json=False))


@pytest.mark.slow
def test_ingest_records_leaves_files_in_place_and_is_idempotent(tmp_path, tiny_models, capsys):
    """`ingest` classifies a folder, leaves the files, exits 1 on a failure; a rerun counts nothing twice."""
    config = write_config(tmp_path / "c.toml", tmp_path, f"sqlite:///{tmp_path / 'i.db'}", tiny_models)
    backfill = tmp_path / "old-archive"
    for i in range(3):
        write_cell(backfill / "2025" / f"x{i}.png", seed=20 + i)
    (backfill / "bad.png").write_bytes(b"\x89PNG broken")
    assert _ingest(config, backfill) == 1
    assert "classified          3" in capsys.readouterr().out
    assert len(files_under(backfill)) == 4 and files_under(tmp_path / "archive") == []
    assert _ingest(config, backfill) == 1
    out = capsys.readouterr().out
    assert "classified          0" in out and "already recorded    4 (1 of them failed before)" in out
    engine = make_engine(f"sqlite:///{tmp_path / 'i.db'}")
    try:
        with make_sessionmaker(engine)() as s:
            assert s.scalar(select(func.count(Image.id))) == 4
            assert s.scalar(select(func.count(Prediction.id))) == 3
    finally:
        engine.dispose()


def test_ingest_move_archives_like_the_service(tmp_path, tiny_models, capsys):
    """`ingest --move` files each image into archive/YYYY/MM/DD and exits 0 when all succeeded."""
    config = write_config(tmp_path / "c.toml", tmp_path, f"sqlite:///{tmp_path / 'i.db'}", tiny_models)
    one = write_cell(tmp_path / "in" / "one.png", seed=30)
    assert _ingest(config, one, move=True) == 0
    assert not one.exists() and [p.name for p in files_under(tmp_path / "archive")] == ["one.png"]


def _datagrams_while_ticking(service: Service, listener: socket.socket, seconds: float) -> list[bytes]:
    """Run the service loop (run_once) for `seconds`, collecting notify datagrams."""
    received, deadline = [], time.monotonic() + seconds
    listener.settimeout(0.05)
    while time.monotonic() < deadline:
        service.run_once()
        try:
            received.append(listener.recv(64))
        except TimeoutError:
            pass
    return received


def test_watchdog_pings_only_while_watcher_loop_and_database_are_healthy(service, tmp_path, monkeypatch):
    """WATCHDOG=1 is sent while the loop ticks and all checks pass; it stops when the watcher thread is gone."""
    path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    pinger = threading.Thread(target=service._watchdog, args=(0.3,), daemon=True)
    try:
        pinger.start()
        assert b"WATCHDOG=1" in _datagrams_while_ticking(service, listener, 1.0)
        assert service.healthy() == {"watcher": True, "loop": True, "database": True, "moving": True}
        service.watcher.stop()
        assert service.healthy()["watcher"] is False
        _datagrams_while_ticking(service, listener, 0.2)  # a ping already on its way may still arrive
        assert not [d for d in _datagrams_while_ticking(service, listener, 0.6) if b"WATCHDOG=1" in d]
        # The loop stops ticking: once its heartbeat is older than max_loop_age, the loop check fails.
        deadline = time.monotonic() + 10
        while service.healthy(max_loop_age=0.3)["loop"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert service.healthy(max_loop_age=0.3)["loop"] is False
    finally:
        service._stop.set()
        pinger.join(timeout=2)
        listener.close()
