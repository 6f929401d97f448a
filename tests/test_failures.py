"""One bad file never stops the service: the tick (`run_once`) with hostile files and failing parts.

Each test drives a real `Service` on a tmp_path drop folder, on SQLite and (where the database
is what rejects the file) on PostgreSQL too, and checks the rows, the folders and that the other
files of the same batch went through.
"""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from stainbridge.daemon.intake import claims, reading
from stainbridge.daemon.intake.failures import MAX_ATTEMPTS, storable_source_name
from stainbridge.daemon.pipeline import claiming
from stainbridge.daemon.pipeline import runner as pipeline_module
from stainbridge.daemon.service.lifecycle import Service
from stainbridge.daemon.store import Image, ImageStatus, Prediction
from tests import dicom_factory
from tests.daemon_helpers import wait_for, write_cell


def rows(service: Service) -> list[Image]:
    with service.pipeline.sessions() as session:
        return list(session.scalars(select(Image).order_by(Image.id)))


def predictions(service: Service) -> int:
    with service.pipeline.sessions() as session:
        return len(session.scalars(select(Prediction.id)).all())


def settle(service: Service, files: int, timeout: float = 60) -> list[Image]:
    """Tick until `files` rows are final and filed (archive_path set); the rows."""
    def finished() -> list[Image] | None:
        service.run_once()
        current = rows(service)
        final = [r for r in current if r.status not in (ImageStatus.pending, ImageStatus.processing) and r.archive_path]
        return current if len(final) >= files else None

    return wait_for(finished, timeout, f"{files} files recorded and filed", interval=0.05)


def drop_files(service: Service, count: int, *, start_seed: int = 0) -> list[Path]:
    return [write_cell(service.settings.drop_dir / f"cell-{start_seed + i}.png", seed=start_seed + i) for i in range(count)]


@pytest.mark.slow
def test_latin1_file_name_is_classified_and_the_loop_goes_on(make_service, database_url):
    """A Latin-1 name (not UTF-8, as from a Windows share) is recorded with an escape and classified."""
    service = make_service(database_url)
    drop = os.fsencode(service.settings.drop_dir)
    write_cell(Path(os.fsdecode(drop + b"/\xc9chantillon.png")), seed=1)
    drop_files(service, 2, start_seed=10)
    final = settle(service, 3)
    names = sorted(r.source_name for r in final)
    assert names == ["\\xc9chantillon.png", "cell-10.png", "cell-11.png"]
    assert all(r.status is ImageStatus.done for r in final) and predictions(service) == 3
    assert [n for n in os.listdir(drop) if not n.startswith(b".")] == []


@pytest.mark.slow
def test_name_longer_than_the_column_is_recorded_not_retried_forever(make_service, database_url):
    """A 600-character relative path (deep folders) fits the 512-character column and is classified."""
    service = make_service(database_url)
    deep = service.settings.drop_dir / ("a" * 200) / ("b" * 200) / ("c" * 150)
    long_file = write_cell(deep / "cell.png", seed=2)
    drop_files(service, 1, start_seed=20)
    final = settle(service, 2)
    long_row = next(r for r in final if r.source_name.startswith("a" * 100))
    assert long_row.status is ImageStatus.done and len(long_row.source_name) <= 512
    assert long_row.source_name == storable_source_name(long_file.relative_to(service.settings.drop_dir).as_posix())


@pytest.mark.slow
def test_nul_byte_in_dicom_institution_does_not_poison_the_batch(make_service, database_url, tmp_path):
    """A DICOM InstitutionName with a NUL byte is stored without it; the other files of the batch are done."""
    service = make_service(database_url)
    path = tmp_path / "nul.dcm"
    dicom_factory.write_rgb(path)
    ds = dcmread(path)
    ds.InstitutionName = "Lab\x00Two"
    ds.save_as(path, enforce_file_format=True)
    os.replace(path, service.settings.drop_dir / "nul.dcm")
    drop_files(service, 2, start_seed=30)
    final = settle(service, 3)
    assert [r.status for r in final] == [ImageStatus.done] * 3
    assert next(r for r in final if r.source_name == "nul.dcm").institution == "Lab Two"


@pytest.mark.slow
def test_oserror_while_hashing_quarantines_that_file_only(make_service, monkeypatch):
    """EIO while hashing one file: it is quarantined as unreadable; the rest of the batch is classified."""
    service = make_service()
    real = reading.read_and_hash

    def flaky(handle, **kwargs):
        if Path(handle.name).name == "cell-1.png":
            raise OSError(errno.EIO, "Input/output error")
        return real(handle, **kwargs)

    monkeypatch.setattr(reading, "read_and_hash", flaky)
    drop_files(service, 3)
    final = settle(service, 3)
    failed = [r for r in final if r.status is ImageStatus.failed]
    assert [r.source_name for r in failed] == ["cell-1.png"] and failed[0].error.startswith("unreadable:")
    assert "/quarantine/" in failed[0].archive_path and predictions(service) == 2


@pytest.mark.slow
def test_file_that_breaks_its_batch_is_quarantined_after_bounded_attempts(make_service, monkeypatch):
    """An unexpected error on one file: the others go through at once; it is quarantined after MAX_ATTEMPTS."""
    service = make_service()
    real = reading.read_and_hash
    calls = []

    def breaking(handle, **kwargs):
        if Path(handle.name).name == "cell-2.png":
            calls.append(1)
            raise RuntimeError("a bug that only this file triggers")
        return real(handle, **kwargs)

    monkeypatch.setattr(reading, "read_and_hash", breaking)
    drop_files(service, 4)
    final = settle(service, 4)
    assert len(calls) == MAX_ATTEMPTS + 1  # the batch, then the file alone MAX_ATTEMPTS times
    poison = next(r for r in final if r.source_name == "cell-2.png")
    assert poison.status is ImageStatus.failed and poison.error.startswith("poison:")
    assert "RuntimeError" in poison.error and (Path(poison.archive_path).parent / "cell-2.png.error.txt").exists()
    assert predictions(service) == 3
    assert not [r for r in rows(service) if r.status in (ImageStatus.pending, ImageStatus.processing)]


def test_huge_file_is_refused_before_it_is_read(make_service, monkeypatch):
    """A file over max_file_mb is quarantined as too_large without being hashed."""
    service = make_service(watch_max_file_mb=0.001)
    hashed = []
    real = reading.read_and_hash
    monkeypatch.setattr(reading, "read_and_hash", lambda handle, **kw: hashed.append(handle.name) or real(handle, **kw))
    (service.settings.drop_dir / "huge.png").write_bytes(os.urandom(4096))
    final = settle(service, 1)
    assert final[0].error.startswith("too_large:") and hashed == []


@pytest.mark.slow
def test_gpu_failure_leaves_files_pending_and_the_service_unhealthy_until_it_works(make_service, monkeypatch):
    """Inference fails on everything (CUDA OOM): no file is failed, health says so, then all are classified."""
    service = make_service()
    real = pipeline_module.run_batch

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(pipeline_module, "run_batch", out_of_memory)
    drop_files(service, 3)
    wait_for(lambda: service.run_once() == 0 and service.pace.trouble, 30, "the inference failure to be noticed")
    assert {r.status for r in rows(service)} == {ImageStatus.pending}
    assert len([p for p in service.settings.drop_dir.iterdir() if not p.name.startswith(".")]) == 3
    assert service.healthy(max_loop_age=0.0)["moving"] is False
    monkeypatch.setattr(pipeline_module, "run_batch", real)
    service.pace.delay = 0.0
    final = settle(service, 3)
    assert [r.status for r in final] == [ImageStatus.done] * 3 and service.pace.trouble is None
    assert service.healthy()["moving"] is True


@pytest.mark.slow
def test_database_outage_leaves_files_in_place_and_backs_off(make_service, monkeypatch):
    """An OperationalError in the claim: nothing is failed or lost, the pause grows, then the files go through."""
    from sqlalchemy.exc import OperationalError

    service = make_service()
    real, real_new = claims.claim, claiming.claim_new_content

    def down(session, *args, **kwargs):
        raise OperationalError("INSERT", {}, Exception("server closed the connection unexpectedly"))

    monkeypatch.setattr(claims, "claim", down)
    monkeypatch.setattr(claiming, "claim_new_content", down)
    drop_files(service, 2)
    wait_for(lambda: service.run_once() == 0 and service.pace.failures >= 1, 30, "the outage to be noticed")
    first = service.pace.delay
    service.watcher.rescan(time.monotonic() + 10)
    wait_for(lambda: service.run_once() == 0 and service.pace.failures >= 2, 30, "a second failed attempt")
    assert service.pace.delay > first and rows(service) == []
    monkeypatch.setattr(claims, "claim", real)
    monkeypatch.setattr(claiming, "claim_new_content", real_new)
    final = settle(service, 2)
    assert [r.status for r in final] == [ImageStatus.done] * 2


def test_an_idle_worker_is_healthy_again_once_the_database_is_back(make_service, monkeypatch):
    """The database down while a file waited, the file then taken by another worker, the database back: with
    nothing left to take, the idle loop clears the trouble (health "moving", STATUS=) without waiting for a batch
    (before: unhealthy, no WATCHDOG=1, until systemd killed the idle worker)."""
    from sqlalchemy.exc import OperationalError

    from stainbridge.daemon.service import sdnotify

    service = make_service()
    real, real_new = claims.claim, claiming.claim_new_content

    def down(session, *args, **kwargs):
        raise OperationalError("INSERT", {}, Exception("connection refused"))

    monkeypatch.setattr(claims, "claim", down)
    monkeypatch.setattr(claiming, "claim_new_content", down)
    files = drop_files(service, 1)
    wait_for(lambda: service.run_once() == 0 and service.pace.trouble, 30, "the outage to be noticed")
    service.run_once()
    assert service.pace.trouble is not None  # the file still waits: the trouble stays until it goes through
    for path in files:
        path.unlink()  # another worker took it (and filed it) while this one waited
    monkeypatch.setattr(claims, "claim", real)
    monkeypatch.setattr(claiming, "claim_new_content", real_new)
    said: list[str] = []
    monkeypatch.setattr(sdnotify, "notify", said.append)
    assert service.run_once() == 0
    assert service.pace.trouble is None and service.healthy(max_loop_age=0.0)["moving"] is True
    assert said == [f"STATUS=watching {service.settings.drop_dir}"]


@pytest.mark.slow
def test_ingest_and_service_record_a_drop_folder_file_under_one_name(make_service, tmp_path):
    """`ingest` of a file in the drop folder records the service's relative name: the service then files it, no twin."""
    import argparse

    from stainbridge.daemon.commands import ingest

    service = make_service()
    s = service.settings
    write_cell(s.drop_dir / "sub" / "both.png", seed=77)
    config = tmp_path / "ingest.toml"
    config.write_text(f"""[paths]\ndrop = "{s.drop_dir}"\narchive = "{s.archive_dir}"\nquarantine = "{s.quarantine_dir}"
state = "{s.state_dir}"\n[database]\nurl = "{s.database_url}"\n[models]\nclassifier = "{s.models.classifier}"
standardizer = "{s.models.standardizer}"\ndevice = "cpu"\n""")
    args = argparse.Namespace(config=str(config), paths=[str(s.drop_dir / "sub" / "both.png")], move=False, json=False)
    assert ingest.run(args) == 0
    final = settle(service, 1)
    assert [(r.source_name, r.status) for r in final] == [("sub/both.png", ImageStatus.done)]
    assert predictions(service) == 1


def test_released_claim_of_replaced_content_is_not_left_pending(make_service):
    """A claim released after a crash, whose file was then rewritten, is dropped when the new content is claimed."""
    service = make_service()
    with service.pipeline.sessions.begin() as session:
        claims.claim(session, sha256="a" * 64, source_name="x.png", site="s", size_bytes=100)
        claims.release_stale_claims(session, 3600, startup=True)  # the worker "died" mid-write of x.png
    with service.pipeline.sessions.begin() as session:
        claims.claim(session, sha256="b" * 64, source_name="x.png", site="s", size_bytes=200)
    assert [(r.sha256[0], r.status) for r in rows(service)] == [("b", ImageStatus.processing)]


@pytest.mark.slow
def test_content_that_failed_gets_another_chance_when_dropped_again(make_service, monkeypatch):
    """A file quarantined for a content reason, dropped again, is classified: the same row, no duplicate."""
    service = make_service()
    real = pipeline_module.Pipeline._models_work
    real_batch = pipeline_module.run_batch
    monkeypatch.setattr(pipeline_module, "run_batch",
                        lambda images, *a, **k: (_ for _ in ()).throw(ValueError("bad")) if len(images) == 1
                        and images[0].size != (64, 64) else real_batch(images, *a, **k))
    monkeypatch.setattr(pipeline_module.Pipeline, "_models_work", real)
    cell = write_cell(service.settings.drop_dir / "again.png", seed=5)
    content = cell.read_bytes()
    final = settle(service, 1)
    assert final[0].status is ImageStatus.failed and final[0].error.startswith("inference:")
    monkeypatch.setattr(pipeline_module, "run_batch", real_batch)
    (service.settings.drop_dir / "again-fixed.png").write_bytes(content)
    wait_for(lambda: service.run_once() or rows(service)[0].status is ImageStatus.done, 60, "the second chance")
    settle(service, 1)
    assert [(r.status, r.source_name) for r in rows(service)] == [(ImageStatus.done, "again-fixed.png")]
    assert predictions(service) == 1


OUT_OF_MEMORY_CHILD = r"""
import json, resource, sys, time
from stainbridge.daemon.config import load_settings
from stainbridge.daemon.service.lifecycle import Service
from stainbridge.daemon.store import make_engine
from sqlalchemy import text

def vm_bytes():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))

def rows():
    with service.engine.connect() as c:
        return sorted(tuple(r) for r in c.execute(text("SELECT source_name, status, error FROM images")))

def tick_until(done, what):
    deadline = time.monotonic() + 60
    while not done():
        service.run_once()
        assert time.monotonic() < deadline, what
        time.sleep(0.05)

service = Service(load_settings(sys.argv[1], environ={}))
service.start()
list(service.pipeline._pool.map(abs, range(64)))  # the intake threads exist (their stacks mapped) before the cap
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
resource.setrlimit(resource.RLIMIT_AS, (vm_bytes() + 48 * 2**20, hard))  # less than one 36-megapixel image needs
tick_until(lambda: service.pace.trouble is not None, "a batch with the large image")
capped = {"rows": rows(), "trouble": service.pace.trouble, "batch_size": service.pace.batch_size,
          "moving": service.healthy(max_loop_age=0.0)["moving"]}
resource.setrlimit(resource.RLIMIT_AS, (soft, hard))  # memory is free again
service.pace.delay = 0.0
tick_until(lambda: [r[1] for r in rows()] == ["done"] * 4, "every file classified")
print(json.dumps({"capped": capped, "after": rows(), "trouble": service.pace.trouble}))
"""


@pytest.mark.slow
def test_out_of_memory_while_decoding_is_retried_not_recorded_as_corrupt(tmp_path, tiny_models):
    """A valid 36-megapixel PNG decoded while the process's memory is capped (RLIMIT_AS: a real MemoryError): the
    file stays in the drop folder with its claim released, nothing is failed, the batch size halves and health says
    why; the three small files of its batch are classified; once memory is free it is classified too (before:
    recorded `corrupt` and quarantined for good, which `reprocess --status failed` never retried)."""
    import subprocess
    import sys
    from io import BytesIO

    from PIL import Image as PILImage

    from stainbridge.daemon.schema import upgrade_database
    from tests.daemon_helpers import subprocess_env, write_config

    url = f"sqlite:///{tmp_path / 'state' / 'stainbridge.db'}"
    config = write_config(tmp_path / "stainbridge.toml", tmp_path, url, tiny_models,
                          watch={"quiet_seconds": 0.05, "rescan_seconds": 0.2, "batch_wait_seconds": 0.2})
    upgrade_database(url)
    for seed in range(3):
        write_cell(tmp_path / "drop" / f"cell-{seed}.png", seed=seed)
    big = BytesIO()
    PILImage.new("RGB", (6000, 6000), (200, 120, 170)).save(big, format="PNG")  # 36 Mpx, 108 MB decoded
    (tmp_path / "drop" / "large.png").write_bytes(big.getvalue())
    child = subprocess.run([sys.executable, "-c", OUT_OF_MEMORY_CHILD, str(config)], capture_output=True, text=True,
                           timeout=300, env=subprocess_env(MALLOC_ARENA_MAX="1"), check=False)
    assert child.returncode == 0, child.stderr[-3000:]
    seen = json.loads(child.stdout.strip().splitlines()[-1])
    capped = seen["capped"]
    assert capped["rows"] == [["cell-0.png", "done", None], ["cell-1.png", "done", None],
                              ["cell-2.png", "done", None], ["large.png", "pending", None]]
    assert capped["trouble"].startswith("memory:") and capped["batch_size"] == 2 and capped["moving"] is False
    assert [status for _, status, _ in seen["after"]] == ["done"] * 4 and seen["trouble"] is None
