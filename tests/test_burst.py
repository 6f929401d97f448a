"""A burst: thousands of files land in the drop folder of a real `stainbridge run` at once.

Half are renamed in one by one (each ready from its move event), half arrive as folders moved in
whole (seen by the folder's event, ready after the quiet time). The test checks that every file
is recorded exactly once and filed, and reads the service's peak resident memory (VmHWM from
/proc/<pid>/status) against a stated bound: memory must not grow with the number of files.

In `make test` it runs 2,000 files (about a minute on 2 cores); the 10,000-file row of docs/reliability.md
comes from the same test with a larger count:

    STAINBRIDGE_TEST_BURST_FILES=10000 .venv/bin/python -m pytest -q -s -m burst tests/test_burst.py
"""

from __future__ import annotations

import io
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stainbridge.models.imaging import synthetic
from tests.daemon_helpers import Daemon, build_tiny_models, query, wait_for, write_config
from tests.reliability_helpers import report_row

pytestmark = [pytest.mark.slow, pytest.mark.burst]

FILES = int(os.environ.get("STAINBRIDGE_TEST_BURST_FILES", "2000"))
PER_FOLDER = 250
# The bound: the service's peak resident memory may exceed what it held at READY=1 by at most this.
# A batch of 32 small images, the backlog (MAX_BACKLOG candidates) and the watcher's maps (a few
# hundred bytes per file) fit in well under it; holding every file's pixels or rows would not.
GROWTH_BOUND_MIB = 150.0


def vm_kib(pid: int, field: str) -> int:
    """A `/proc/<pid>/status` field (VmHWM, VmRSS) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"/proc/{pid}/status has no {field}")


def distinct_cells(count: int) -> list[bytes]:
    """`count` small PNG cells with distinct bytes: a few rendered cells, each pixel (0, 0) set to the index."""
    rng = np.random.default_rng(0)
    bases = [np.asarray(synthetic.render_cell(label, protocol="incoming", size=40, rng=rng))
             for label in synthetic.CLASSES]
    out = []
    for i in range(count):
        pixels = bases[i % len(bases)].copy()
        pixels[0, 0] = (i & 0xFF, (i >> 8) & 0xFF, (i >> 16) & 0xFF)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
        out.append(buffer.getvalue())
    return out


def stage(staging: Path, count: int) -> tuple[list[Path], list[Path], list[str]]:
    """Write the files beside the drop folder: single files, and folders to move in whole; their source names."""
    singles, folders, names = [], [], []
    for i, data in enumerate(distinct_cells(count)):
        if i % 2 == 0:
            path = staging / f"single-{i:05d}.png"
            singles.append(path)
            names.append(path.name)
        else:
            folder = staging / f"batch-{i // (2 * PER_FOLDER):03d}"
            if folder not in folders:
                folder.mkdir()
                folders.append(folder)
            path = folder / f"cell-{i:05d}.png"
            names.append(f"{folder.name}/{path.name}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return singles, folders, names


@pytest.mark.timeout(1800)
def test_burst_every_file_recorded_once_with_bounded_memory(tmp_path):
    """A burst of FILES files: each recorded and filed exactly once; peak memory within GROWTH_BOUND_MIB of READY."""
    models = build_tiny_models(tmp_path / "models")
    url = f"sqlite:///{tmp_path / 'state' / 'stainbridge.db'}"
    config = write_config(tmp_path / "stainbridge.toml", tmp_path, url, models,
                          models={"batch_size": 32, "standardizer": "none"},
                          watch={"quiet_seconds": 0.5, "rescan_seconds": 10.0, "batch_wait_seconds": 0.1})
    singles, folders, names = stage(tmp_path / "staging", FILES)
    (tmp_path / "w").mkdir()
    daemon = Daemon(config, tmp_path / "w")
    try:
        daemon.start(timeout=120)
        pid = daemon.process.pid
        ready_rss = vm_kib(pid, "VmRSS") / 1024
        ready_hwm = vm_kib(pid, "VmHWM") / 1024
        drop = tmp_path / "drop"
        started = time.monotonic()
        for path in singles:
            os.rename(path, drop / path.name)
        for folder in folders:
            os.rename(folder, drop / folder.name)
        dropped = time.monotonic() - started

        def finished() -> bool:
            assert daemon.process.poll() is None, f"the service exited:\n{daemon.log_text()[-3000:]}"
            return query(url, "SELECT count(*) FROM images WHERE archive_path IS NOT NULL")[0][0] >= FILES

        wait_for(finished, 1500, f"{FILES} files recorded and filed", interval=0.5)
        seconds = time.monotonic() - started
        peak = vm_kib(pid, "VmHWM") / 1024
        assert daemon.stop() == 0
    finally:
        daemon.close()

    rows = query(url, "SELECT source_name, status, archive_path FROM images")
    recorded = Counter(name for name, _, _ in rows)
    lost = [name for name in names if not recorded[name]]
    duplicated = [name for name, count in recorded.items() if count > 1]
    stuck = sum(status in ("pending", "processing") for _, status, _ in rows)
    memory = f"peak RSS {peak:.0f} MiB, +{peak - ready_rss:.0f} over READY (bound +{GROWTH_BOUND_MIB:.0f})"
    report_row(f"SQLite, {FILES:,}-file burst ({memory})", "1 burst", FILES, len(lost), len(duplicated), stuck,
               seconds)
    print(f"burst: {FILES} files dropped in {dropped:.1f} s, all recorded once in {seconds:.0f} s "
          f"({FILES / seconds:.0f} files/s); RSS at READY {ready_rss:.0f} MiB (high-water mark then {ready_hwm:.0f})",
          flush=True)
    assert lost == [] and duplicated == [] and stuck == 0
    assert sorted(recorded) == sorted(names)  # no row for anything else
    assert {status for _, status, _ in rows} == {"done"}
    assert query(url, "SELECT count(*), count(DISTINCT image_id) FROM predictions")[0] == (FILES, FILES)
    assert [p for p in (tmp_path / "drop").rglob("*") if p.is_file() and not p.name.startswith(".")] == []
    assert all(Path(path).is_file() and Path(path).is_relative_to(tmp_path / "archive") for _, _, path in rows)
    assert peak - ready_rss <= GROWTH_BOUND_MIB
