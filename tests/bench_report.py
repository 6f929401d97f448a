"""What `stainbridge report` and `export` cost on a long history (a tool, not collected by pytest).

    .venv/bin/python tests/bench_report.py --images 100000 [--url postgresql+psycopg://...]

Fills a fresh database with N classified images spread over 365 days (2% reviewed, 1% failed,
real small PNGs in an archive folder for the thumbnails), then times the report's queries, its
rendering and a full CSV export, and prints the report's size and the process's peak memory.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from PIL import Image as PILImage
from sqlalchemy import insert

from stainbridge.daemon.commands.export import known_classes, stream_rows, write_csv
from stainbridge.daemon.lab.render import render
from stainbridge.daemon.lab.report import Period, gather
from stainbridge.daemon.schema import upgrade_database
from stainbridge.daemon.store import Image, ModelVersion, Prediction, Review, make_engine

CLASSES = ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil")
CHUNK = 5000


def fill(url: str, n: int, archive: Path) -> None:
    rng = random.Random(0)
    archive.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(40):
        path = archive / f"cell-{i}.png"
        PILImage.new("RGB", (64, 64), (rng.randrange(256), rng.randrange(256), rng.randrange(256))).save(path)
        files.append(str(path))
    start = datetime.now(timezone.utc) - timedelta(days=365)
    upgrade_database(url)
    engine = make_engine(url)
    with engine.begin() as c:
        c.execute(insert(ModelVersion.__table__), [
            {"id": 1, "kind": "standardizer", "site": "hospital-x", "name": "cyclegan", "path": "/m/s", "sha256": "s" * 64, "header": {},
             "metrics": {}, "state": "active", "created_at": start},
            {"id": 2, "kind": "classifier", "site": "hospital-x", "name": "resnet18", "path": "/m/c", "sha256": "c" * 64, "header": {},
             "metrics": {}, "state": "active", "created_at": start}])
    for first in range(1, n + 1, CHUNK):
        images, predictions, reviews = [], [], []
        for i in range(first, min(first + CHUNK, n + 1)):
            at = start + timedelta(seconds=365 * 86400 * i / n)
            failed = rng.random() < 0.01
            images.append({"id": i, "sha256": f"{i:064x}", "source_name": f"img-{i}.png", "site": "hospital-x",
                           "specimen": f"BS-{i // 200}",  # 200 cells per specimen
                           "status": "failed" if failed else "done", "received_at": at, "processed_at": at,
                           "error": rng.choice(["corrupt: x", "empty: x", "too_large: x"]) if failed else None,
                           "archive_path": files[i % len(files)]})
            if failed:
                continue
            probs = [rng.random() for _ in CLASSES]
            total = sum(probs)
            top = max(range(len(CLASSES)), key=probs.__getitem__)
            predictions.append({"image_id": i, "label": CLASSES[top], "confidence": probs[top] / total,
                                "probabilities": {c: p / total for c, p in zip(CLASSES, probs)},
                                "standardizer_version_id": 1, "classifier_version_id": 2, "latency_ms": 20.0,
                                "needs_review": probs[top] / total < 0.25, "created_at": at})
            if rng.random() < 0.02:
                reviews.append({"image_id": i, "label": rng.choice(CLASSES), "reviewer": "dr", "created_at": at})
        with engine.begin() as c:
            c.execute(insert(Image.__table__), images)
            c.execute(insert(Prediction.__table__), predictions)
            if reviews:
                c.execute(insert(Review.__table__), reviews)
    engine.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--url", help="database URL (default: a SQLite file in a temporary folder); must be empty")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = args.url or f"sqlite:///{Path(tmp) / 'bench.db'}"
        started = time.perf_counter()
        fill(url, args.images, Path(tmp) / "archive")
        print(f"filled {args.images} images in {time.perf_counter() - started:.1f} s ({url.split(':')[0]})")
        engine = make_engine(url)
        started = time.perf_counter()
        data = gather(engine, Period(), "bench")
        queries = time.perf_counter() - started
        started = time.perf_counter()
        page = render(data)
        rendering = time.perf_counter() - started
        engine.dispose()
        print(f"report: queries {queries:.2f} s, rendering {rendering:.2f} s, {len(page.encode()) / 1024:.0f} KiB HTML")
        started = time.perf_counter()
        rows = write_csv(stream_rows(url), _Null(), known_classes(url))
        print(f"export csv: {rows} rows in {time.perf_counter() - started:.2f} s")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"peak memory (max RSS) of this process: {peak:.0f} MiB")
        started = time.perf_counter()
        env = {**os.environ, "STAINBRIDGE_DATABASE_URL": url, "STAINBRIDGE_LOGGING_LEVEL": "warning"}
        subprocess.run([sys.executable, "-m", "stainbridge.daemon.cli", "export", "--format", "json"], env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(f"`stainbridge export --format json` as a process: {time.perf_counter() - started:.2f} s, "
              f"peak memory {child:.0f} MiB")
    return 0


class _Null(io.TextIOBase):
    """Discards the export (measures the database and the formatting, not a disk)."""

    def write(self, text: str) -> int:
        return len(text)


if __name__ == "__main__":
    sys.exit(main())
