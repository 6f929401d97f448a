"""Where the service's time goes, per stage, on real files: a developer tool, not a test.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python tests/profile_service.py CONFIG.toml N

Start `stainbridge run`'s Service in-process on CONFIG (e.g. the one `bench throughput --workdir
DIR` writes to DIR/service/stainbridge.toml, with N images copied into its drop folder), wrap the
pipeline's steps and the watcher's ``ready_files`` in timers, handle N files and print
milliseconds per image per step, and the cyclic garbage collector's pauses. Indented steps are
part of the one above them. The log goes, as JSON lines, to STATE/profile_service.log. Set
OMP_WAIT_POLICY yourself: this does not go through the CLI, which sets it.
"""

from __future__ import annotations

import collections
import gc
import sys
import time
from typing import Any

from stainbridge.daemon.config import load_settings
from stainbridge.daemon.intake import watcher
from stainbridge.daemon.logs import configure_logging
from stainbridge.daemon.pipeline import recording
from stainbridge.daemon.pipeline import runner as pipeline
from stainbridge.daemon.service import lifecycle as service

SPENT: dict[str, float] = collections.defaultdict(float)
CALLS: collections.Counter[str] = collections.Counter()
_GC_STARTED: list[float] = []


def time_garbage_collection(phase: str, info: dict[str, int]) -> None:
    """gc.callbacks hook: the cyclic collector's pauses, by generation (any thread)."""
    if phase == "start":
        _GC_STARTED.append(time.perf_counter())
    elif _GC_STARTED:
        label = f"garbage collection, generation {info['generation']}"
        SPENT[label] += time.perf_counter() - _GC_STARTED.pop()
        CALLS[label] += 1


def timed(owner: Any, name: str, label: str) -> None:
    inner = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            SPENT[label] += time.perf_counter() - started
            CALLS[label] += 1

    setattr(owner, name, wrapper)


def main(config: str, expected: int) -> None:
    timed(watcher.DropFolderWatcher, "ready_files", "watcher.ready_files")
    timed(pipeline, "claim_items", "claims (one transaction per batch, then the rest one by one)")
    timed(pipeline.Pipeline, "_decode_and_infer", "decode (thread pool) overlapped with inference")
    timed(pipeline.Pipeline, "_infer", "  inference (run_batch)")
    timed(pipeline, "record", "results transaction")
    timed(pipeline, "file_items", "file (moves, one fsync per folder, archive_path transaction)")
    timed(recording.filing, "archive_file", "  moves (rename)")
    settings = load_settings(config)
    log_file = (settings.state_dir / "profile_service.log").open("w")  # JSON lines to a file, as under systemd
    configure_logging(settings.logging.level, "json", stream=log_file)
    worker = service.Service(settings)
    worker.start()
    gc.freeze()  # as Service.run does once started
    time.sleep(worker.settings.watch.quiet_seconds + 0.2)  # the start-up scan's files wait out the quiet time
    gc.callbacks.append(time_garbage_collection)
    handled, started = 0, time.perf_counter()
    while handled < expected:
        handled += worker.run_once()
    seconds = time.perf_counter() - started
    gc.callbacks.remove(time_garbage_collection)
    print(f"handled {handled} files in {seconds:.2f} s = {handled / seconds:.1f} images/s")
    for label, spent in SPENT.items():
        print(f"  {label:<50} {1000 * spent / handled:7.2f} ms/image {spent / seconds:5.0%}  ({CALLS[label]} calls, "
              f"{1e6 * spent / CALLS[label]:.1f} us/call)")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
