"""The per-batch path of the pipeline: few commits, one fsync per folder, a pixel budget, one open file per image."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import event, func, select

from stainbridge.daemon import folders
from stainbridge.daemon.intake.decoding import decode_open
from stainbridge.daemon.intake.watcher import iter_candidates
from stainbridge.daemon.pipeline import filing, recording
from stainbridge.daemon.pipeline import runner as pipeline_module
from stainbridge.daemon.pipeline.batch import PixelBudget
from stainbridge.daemon.service.lifecycle import Service
from stainbridge.daemon.store import Image, ImageStatus, Prediction
from stainbridge.models.inference import run_batch
from tests.daemon_helpers import write_cell

SIDE = 48  # write_cell's default size
# These tests drive the batches themselves: the watcher must not pick the files up first.
IDLE_WATCHER = {"models_batch_size": 8, "watch_quiet_seconds": 30, "watch_rescan_seconds": 60}


@pytest.fixture
def make_service(make_service):
    return lambda **overrides: make_service(**{**IDLE_WATCHER, **overrides})


def candidates(service: Service):
    return list(iter_candidates([service.settings.drop_dir]))


def statuses(service: Service) -> list[ImageStatus]:
    with service.pipeline.sessions() as session:
        return list(session.scalars(select(Image.status).order_by(Image.id)))


@pytest.mark.slow
def test_a_batch_of_new_files_takes_three_commits(make_service):
    """Six new files: one commit claims them all, one records every result, one records where they went."""
    service = make_service()
    for n in range(6):
        write_cell(service.settings.drop_dir / f"cell{n}.png", seed=n)
    commits: list[int] = []
    event.listen(service.engine, "commit", lambda connection: commits.append(1))
    report = service.pipeline.process(candidates(service))
    assert report.done == 6 and statuses(service) == [ImageStatus.done] * 6
    assert len(commits) == 3


@pytest.mark.slow
def test_archive_folder_is_fsynced_once_per_batch_before_the_paths_commit(make_service, monkeypatch):
    """Moved files' folder is fsynced once for the whole batch, and before their rows say where they are."""
    service = make_service()
    for n in range(5):
        write_cell(service.settings.drop_dir / f"cell{n}.png", seed=n)
    steps: list[str] = []
    real = recording.fsync_dir
    monkeypatch.setattr(recording, "fsync_dir", lambda folder: steps.append(f"fsync {folder}") or real(folder))
    event.listen(service.engine, "commit", lambda connection: steps.append("commit"))
    service.pipeline.process(candidates(service))
    with service.pipeline.sessions() as session:
        folders = set(session.scalars(select(Image.archive_path)))
    assert len(folders) == 5
    (folder,) = {str(Path(p).parent) for p in folders}
    assert steps == ["commit", "commit", f"fsync {folder}", "commit"]


@pytest.mark.slow
def test_pixel_budget_bounds_the_decoded_images_held_at_once(make_service, monkeypatch):
    """With room for two images, a batch of seven is decoded and classified two at a time, all of them."""
    cap = 2 * SIDE * SIDE
    service = make_service(models_max_inflight_pixels=cap)
    for n in range(7):
        write_cell(service.settings.drop_dir / f"cell{n}.png", seed=n)
    held: list[int] = []
    real_reserve = PixelBudget.reserve

    def reserve(budget, pixels):
        real_reserve(budget, pixels)
        held.append(budget.used)

    monkeypatch.setattr(PixelBudget, "reserve", reserve)
    sizes: list[int] = []
    real_batch = pipeline_module.run_batch
    monkeypatch.setattr(pipeline_module, "run_batch",
                        lambda images, *a, **k: sizes.append(len(images)) or real_batch(images, *a, **k))
    report = service.pipeline.process(candidates(service))
    assert report.done == 7 and len(held) == 7
    assert max(held) <= cap and max(sizes) <= 2 and sum(sizes) == 7
    with service.pipeline.sessions() as session:
        assert session.scalar(select(func.count(Prediction.id))) == 7


def test_one_image_over_the_budget_still_runs_alone():
    """The budget never blocks an image when nothing else is held (max_pixels bounds it instead)."""
    budget = PixelBudget(10)
    budget.reserve(50)
    assert budget.used == 50
    budget.release(50)
    assert budget.used == 0


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["inference", "cross_filesystem_copy"])
def test_file_replaced_mid_processing_is_not_archived_under_the_old_row(make_service, monkeypatch, moment):
    """A re-export (temp file + rename) during inference, or during the copy to an archive on another
    filesystem: the archive gets the bytes that were classified, the new version is never moved or
    deleted, and it is then processed on its own."""
    service = make_service()
    drop = service.settings.drop_dir
    first = write_cell(drop / "cell.png", seed=1).read_bytes()
    second = write_cell(drop.parent / "second.png", seed=2).read_bytes()
    replaced: list[int] = []

    def re_export() -> None:
        if not replaced:
            replaced.append(1)
            (drop / ".cell.png.tmp").write_bytes(second)
            os.replace(drop / ".cell.png.tmp", drop / "cell.png")

    if moment == "inference":
        real_batch = pipeline_module.run_batch
        monkeypatch.setattr(pipeline_module, "run_batch", lambda *a, **k: re_export() or real_batch(*a, **k))
    else:
        def cross_device(src, dst, **kwargs):
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        real_copy = filing.shutil.copyfileobj
        monkeypatch.setattr(filing.os, "rename", cross_device)
        monkeypatch.setattr(filing.shutil, "copyfileobj", lambda *a, **k: re_export() or real_copy(*a, **k))
    report = service.pipeline.process(candidates(service))
    assert report.done == 1 and replaced and (drop / "cell.png").read_bytes() == second
    assert service.pipeline.process(candidates(service)).done == 1
    with service.pipeline.sessions() as session:
        done = list(session.scalars(select(Image).order_by(Image.id)))
    assert [r.status for r in done] == [ImageStatus.done] * 2
    assert [Path(r.archive_path).read_bytes() for r in done] == [first, second]
    assert [r.sha256 for r in done] == [hashlib.sha256(first).hexdigest(), hashlib.sha256(second).hexdigest()]
    assert not (drop / "cell.png").exists()


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["after_hashing", "during_inference", "cross_filesystem_copy"])
@pytest.mark.parametrize("how", ["cp", "cp_p_same_size"])
def test_file_rewritten_in_place_is_classified_and_archived_as_it_was_hashed(make_service, monkeypatch, moment, how):
    """`cp` over the name (same inode) after the hash, during inference or during a copy across filesystems: the row,
    its prediction and the archived bytes are all the version that was hashed; the new version stays in the drop
    folder and is processed on its own. `cp -p` of a same-size file (only the ctime differs) too."""
    service = make_service()
    drop = service.settings.drop_dir
    first = write_cell(drop / "cell.bmp", seed=1, fmt="BMP").read_bytes()  # BMP: same size for every seed
    second = write_cell(drop.parent / "second.bmp", seed=2, fmt="BMP").read_bytes()
    assert len(first) == len(second) and first != second
    original = os.stat(drop / "cell.bmp")
    rewritten: list[int] = []

    def rewrite_in_place() -> None:
        if rewritten:
            return
        rewritten.append(1)
        time.sleep(0.02)  # a later clock tick than the first write, as any real rewrite is
        with open(drop / "cell.bmp", "r+b") as handle:  # what cp does to an existing name: same inode
            handle.truncate(0)
            handle.write(second if how == "cp_p_same_size" else second + b"\0")
        if how == "cp_p_same_size":
            os.utime(drop / "cell.bmp", ns=(original.st_atime_ns, original.st_mtime_ns))  # cp -p: the old mtime
        assert os.stat(drop / "cell.bmp").st_ino == original.st_ino

    if moment == "after_hashing":
        real_claim = pipeline_module.claim_items
        monkeypatch.setattr(pipeline_module, "claim_items", lambda *a, **k: rewrite_in_place() or real_claim(*a, **k))
    elif moment == "during_inference":
        real_batch = pipeline_module.run_batch
        monkeypatch.setattr(pipeline_module, "run_batch", lambda *a, **k: rewrite_in_place() or real_batch(*a, **k))
    else:
        def cross_device(src, dst, **kwargs):
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        real_copy = filing.shutil.copyfileobj
        monkeypatch.setattr(filing.os, "rename", cross_device)
        monkeypatch.setattr(filing.shutil, "copyfileobj", lambda *a, **k: rewrite_in_place() or real_copy(*a, **k))
    report = service.pipeline.process(candidates(service))
    assert report.done == 1 and rewritten
    newer = (drop / "cell.bmp").read_bytes()  # the new version waits in the drop folder for its own turn
    with service.pipeline.sessions() as session:
        row = session.scalars(select(Image)).one()
        probabilities = session.scalars(select(Prediction.probabilities)).one()
    assert row.sha256 == hashlib.sha256(first).hexdigest()
    assert Path(row.archive_path).read_bytes() == first  # before: the archive held the new bytes under this row
    assert probabilities == pytest.approx(classify(service, first))  # and the prediction was the new bytes'
    monkeypatch.undo()
    again = service.pipeline.process(candidates(service))
    assert again.done == 1 and not (drop / "cell.bmp").exists()
    with service.pipeline.sessions() as session:
        rows = list(session.scalars(select(Image).order_by(Image.id)))
    assert [Path(r.archive_path).read_bytes() for r in rows] == [first, newer]
    assert [r.sha256 for r in rows] == [hashlib.sha256(first).hexdigest(), hashlib.sha256(newer).hexdigest()]


def classify(service: Service, data: bytes) -> dict[str, float]:
    """The probabilities the service's models give these bytes (decoded as the service decodes them)."""
    picture = decode_open(io.BytesIO(data), "x.bmp", max_pixels=10**8, max_bytes=10**8).image
    settings = service.settings
    models = service.pipeline.models.default
    result = run_batch([picture], models.standardizer, models.classifier,
                       scale=settings.site.scale, tta=settings.models.tta)[0]
    return result.probabilities


@pytest.mark.parametrize("moment", ["before_reading", "during_inference"])
def test_sub_folder_swapped_for_a_link_never_reaches_outside(make_service, monkeypatch, tmp_path, moment):
    """drop/sub swapped for a link to an outside folder (holding a stand-in for the database file) after its
    file was seen: nothing outside is read or moved; a file already read is filed from its real folder."""
    service = make_service()
    drop = service.settings.drop_dir
    inside = write_cell(drop / "sub" / "cell.png", seed=3).read_bytes()
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "cell.png"  # same name, size and mtime as the file inside, other bytes
    secret_bytes = bytes(byte ^ 0xFF if n == len(inside) // 2 else byte for n, byte in enumerate(inside))
    secret.write_bytes(secret_bytes)
    seen_stat = (drop / "sub" / "cell.png").stat()
    os.utime(secret, ns=(seen_stat.st_atime_ns, seen_stat.st_mtime_ns))
    seen = candidates(service)  # listed while drop/sub was a real folder

    def swap() -> None:
        if not (drop / "sub").is_symlink():
            os.rename(drop / "sub", drop / ".sub-moved")
            os.symlink(outside, drop / "sub")

    if moment == "before_reading":
        swap()
    else:
        real_batch = pipeline_module.run_batch
        monkeypatch.setattr(pipeline_module, "run_batch", lambda *a, **k: swap() or real_batch(*a, **k))
    report = service.pipeline.process(seen)
    assert secret.read_bytes() == secret_bytes and sorted(outside.iterdir()) == [secret]
    filed = [p.read_bytes() for root in (service.settings.archive_dir, service.settings.quarantine_dir)
             for p in root.rglob("*") if p.is_file() and p.name != folders.MARKER]
    with service.pipeline.sessions() as session:
        hashes = set(session.scalars(select(Image.sha256)))
    assert secret_bytes not in filed and hashlib.sha256(secret_bytes).hexdigest() not in hashes
    if moment == "during_inference":
        assert report.done == 1 and filed == [inside] and not (drop / ".sub-moved" / "cell.png").exists()
    else:
        assert report.handled == 0 and hashes == set()


def test_stale_candidates_leave_no_row_and_write_nothing(make_service, tmp_path):
    """Candidates that left the drop folder before their batch (another worker filed them, or they were
    deleted) — a plain file, a symlink and a hard-linked file — record nothing: not even a row deleted later."""
    service = make_service()
    drop = service.settings.drop_dir
    write_cell(drop / "plain.png", seed=1)
    target = write_cell(tmp_path / "elsewhere.png", seed=2)
    os.symlink(target, drop / "link.png")
    os.link(target, drop / "hard.png")
    stale = candidates(service)
    assert sorted(c.refusal or "" for c in stale) == ["", "hard_link", "symlink"]
    for entry in drop.iterdir():
        if entry.name != folders.MARKER:
            entry.unlink()
    writes: list[str] = []
    event.listen(service.engine, "before_cursor_execute",
                 lambda conn, cursor, statement, *rest: writes.append(statement)
                 if statement.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE")) else None)
    report = service.pipeline.process(stale)
    assert report.handled == 0 and report.skipped == 3 and writes == [] and statuses(service) == []
    assert target.exists()


def test_an_abandoned_batch_never_leaves_a_decoder_waiting_for_pixels():
    """A decoder waiting for room in the budget is let go (with an error) when its batch is abandoned."""
    budget = PixelBudget(10)
    budget.reserve(10)
    outcome: list[str] = []

    def decoder() -> None:
        try:
            budget.reserve(5)
            outcome.append("reserved")
        except RuntimeError:
            outcome.append("abandoned")

    thread = threading.Thread(target=decoder)
    thread.start()
    deadline = time.monotonic() + 10
    while budget.waiting == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert budget.waiting == 1
    budget.close()
    thread.join(10)
    assert not thread.is_alive() and outcome == ["abandoned"]
