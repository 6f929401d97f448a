"""The service mode of `bench throughput`: the real `stainbridge run` process, files in, rows out.

A fresh state folder (drop, archive, quarantine, SQLite database) and a config file are written;
`stainbridge run` starts as a subprocess with a notify socket (as systemd would start it) and the
bench waits for ``READY=1``. The images are staged next to the drop folder, then renamed into it
one after the other (atomic, so the watcher never sees a half-written file). The clock runs from
the first rename to the moment ``SELECT count(*) FROM images WHERE status IN ('done','failed')``
reaches the number of files; then SIGTERM, and the process must exit.

That burst holds two different numbers, reported apart: the **time to first result** (first
rename -> first committed row: the ``[watch] quiet_seconds`` wait for files not announced by a
close or move event, then one batch) and the **steady state**: the rows of the batches between
the first and the last over the time between their commits (``images.processed_at``, one value
per batch), so neither the quiet time and the first batch nor the last, partial batch's wait
(``[watch] batch_wait_seconds``) is in the rate. The service logs each batch's steps (``steps_ms`` of its ``batch`` line, ``Pipeline.process``'s own
timers); they are summed over the same batches for the stage shares. The child's CPU time
(``/proc/<pid>/stat``) is read at the first result and at the end: CPU milliseconds per image
hold still on a shared machine where wall-clock rates do not.

This module talks to the service only through its command line, its config file, its log and
its database (plain SQL through SQLAlchemy): ``models`` never imports ``daemon``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Engine, create_engine, text

DONE_SQL = text("SELECT count(*) FROM images WHERE status IN ('done', 'failed')")
FAILED_SQL = text("SELECT count(*) FROM images WHERE status = 'failed'")
# one processed_at per results transaction, i.e. per batch
BATCHES_SQL = text("SELECT processed_at, count(*) FROM images WHERE status IN ('done', 'failed') "
                   "GROUP BY processed_at ORDER BY processed_at")
POLL_SECONDS = 0.02


class ServiceRunError(RuntimeError):
    """The service could not be started, did not finish the files, or did not stop."""


@dataclass
class ServiceResult:
    images: int
    seconds: float  # first file dropped -> last row committed
    failed: int
    peak_rss_mb: float | None  # the child's VmHWM
    startup_seconds: float
    exit_code: int
    log_stages: dict[str, float] = field(default_factory=dict)  # seconds, summed over the run, from the log
    batches: int = 0
    time_to_first_result: float | None = None  # first file dropped -> first row committed (seconds)
    steady_images: int = 0  # rows committed by the batches between the first and the last
    steady_seconds: float = 0.0  # first batch's commit -> the last but one's
    batch_steps: list[dict[str, float]] = field(default_factory=list)  # per batch, seconds per step (from the log)
    batch_cpu_steps: list[dict[str, float]] = field(default_factory=list)  # per batch, CPU seconds per step
    steady_cpu_seconds: float | None = None  # the child's CPU time from the first result seen to the last
    steady_cpu_images: int = 0  # rows committed over that CPU time

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")

    @property
    def steady_images_per_s(self) -> float | None:
        return self.steady_images / self.steady_seconds if self.steady_seconds > 0 else None


def write_config(root: Path, *, classifier: Path, standardizer: str, device: str, batch_size: int,
                 tta: bool = False) -> Path:
    """A config for a fresh service under ``root``: its own drop folder, archive and SQLite file."""
    config = root / "stainbridge.toml"
    config.write_text(f"""# Written by `stainbridge bench throughput` (service mode).
[paths]
state = "{root}"
drop = "{root / 'drop'}"
archive = "{root / 'archive'}"
quarantine = "{root / 'quarantine'}"

[database]
url = "sqlite:///{root / 'stainbridge.db'}"

[models]
classifier = "{classifier}"
standardizer = "{standardizer}"
device = "{device}"
batch_size = {batch_size}
tta = {str(tta).lower()}

[site]
name = "bench"

[logging]
format = "json"
""", encoding="utf-8")
    return config


def _child_env() -> dict[str, str]:
    # The configuration comes from the file alone; thread settings (OMP_NUM_THREADS...) pass through.
    return {k: v for k, v in os.environ.items() if not k.startswith("STAINBRIDGE_") and k != "NOTIFY_SOCKET"}


def cpu_seconds(pid: int) -> float | None:
    """A process's CPU time so far (user + system, all its threads), or None when /proc does not say."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)
    except (OSError, ValueError, IndexError):
        return None


def steady_state(batches: list[tuple[datetime, int]]) -> tuple[int, float]:
    """(rows, seconds) of the steady state: the rows of batches 2 .. n-1 over the time from the first
    batch's commit to batch n-1's. Left out: the first batch (it waited out the quiet time) and the
    last (the burst's rest, which waits ``[watch] batch_wait_seconds`` for files that never come).
    ``batches``: (processed_at, rows) in order; (0, 0.0) with fewer than three."""
    if len(batches) < 3:
        return 0, 0.0
    return sum(n for _, n in batches[1:-1]), (batches[-2][0] - batches[0][0]).total_seconds()


def committed_batches(engine: Engine) -> list[tuple[datetime, int]]:
    """(processed_at, rows) per results transaction, oldest first."""
    with engine.connect() as connection:
        rows = connection.execute(BATCHES_SQL).all()
    return [(value if isinstance(value, datetime) else datetime.fromisoformat(value), int(n))
            for value, n in rows if value is not None]


def vm_hwm_mb(pid: int) -> float | None:
    """A process's peak resident set (VmHWM) in MiB, or None when /proc does not say."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def prepare_folders(config: Path) -> None:
    """`stainbridge init`: the folders the service needs (it creates none of them itself) and the database."""
    cmd = [sys.executable, "-m", "stainbridge.daemon.cli", "init", "--config", str(config)]
    done = subprocess.run(cmd, env=_child_env(), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ServiceRunError(f"`stainbridge init` failed ({done.returncode}): {done.stderr.strip()}")


class ServiceProcess:
    """`stainbridge run --config FILE` as a child process, ready when it says ``READY=1``.

    `stainbridge demo` has the same runner (`daemon/commands/demo.py`, `DemoDaemon`); keep the two
    in step. The layout rules (tests/test_layout.py) leave no module both may import: models never
    import daemon, and the daemon reaches models only through `stainbridge.models.inference`.
    """

    def __init__(self, config: Path, root: Path) -> None:
        self.log = root / "service.log"
        self.sock_path = root / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.sock_path))
        self.sock.settimeout(0.2)
        env = {**_child_env(), "NOTIFY_SOCKET": str(self.sock_path)}
        cmd = [sys.executable, "-m", "stainbridge.daemon.cli", "run", "--config", str(config)]
        with self.log.open("w") as out:
            self.process = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def tail(self, lines: int = 12) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServiceRunError(f"`stainbridge run` exited ({self.process.returncode}) before READY=1; "
                                      f"its log ({self.log}) ends:\n{self.tail()}")
            try:
                message = self.sock.recv(4096).decode(errors="replace")
            except TimeoutError:
                continue
            if "READY=1" in message.splitlines():
                return
        raise ServiceRunError(f"`stainbridge run` sent no READY=1 within {timeout:.0f} s; see {self.log}")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (the current batch finishes), then wait; kill only if it does not exit in time."""
        try:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
                    raise ServiceRunError(f"`stainbridge run` did not exit within {timeout:.0f} s of SIGTERM; "
                                          f"it was killed. Log: {self.log}") from None
            return self.process.returncode
        finally:
            self.sock.close()


def stage_files(images: list[Path], staging: Path) -> list[Path]:
    """Copy the images into a staging folder on the drop folder's filesystem (renames stay atomic)."""
    staging.mkdir(parents=True, exist_ok=True)
    staged = []
    for path in images:
        target = staging / path.name
        shutil.copyfile(path, target)
        staged.append(target)
    return staged


def log_stages(log: Path, dropped_at: datetime | None = None) -> tuple[dict[str, float], int]:
    """Per-run seconds the service's JSON log lets us separate, summed over its batches.

    Per batch the pipeline logs one ``classified`` line per image right after the results commit
    (with ``latency_ms``: decode plus the image's share of inference), then files the images, then
    logs ``batch``. So: ``move`` = batch line - last classified line; ``decode_and_inference`` =
    sum of latency_ms; ``intake_and_database`` = the rest of the batch (hash, per-image claim
    transactions, the results commit, watcher scans and batch waiting). The first batch starts
    at ``dropped_at`` (the first rename), not at ``ready``."""
    move = decode_infer = rest = 0.0
    batches = 0
    previous_end: datetime | None = None
    classified: list[tuple[datetime, float]] = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
            when = datetime.fromisoformat(entry["timestamp"])
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
        event = entry.get("event")
        if event == "ready":
            previous_end = max(when, dropped_at) if dropped_at is not None else when
        elif event == "classified":
            classified.append((when, float(entry.get("latency_ms") or 0.0) / 1000))
        elif event == "batch" and classified:
            batches += 1
            last = classified[-1][0]
            move += (when - last).total_seconds()
            spent = sum(s for _, s in classified)
            decode_infer += spent
            if previous_end is not None:
                rest += max(0.0, (last - previous_end).total_seconds() - spent)
            classified = []
            previous_end = when
        elif event == "batch":
            previous_end = when
    return {"move": move, "decode_and_inference": decode_infer, "intake_and_database": rest}, batches


def batch_steps(log: Path, key: str = "steps_ms") -> list[dict[str, float]]:
    """Each batch's step times in seconds, in order, from `key` of the log's ``batch`` lines (``steps_ms``:
    wall time, ``steps_cpu_ms``: the process's CPU time)."""
    batches = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("event") == "batch" and isinstance(entry.get(key), dict):
            batches.append({step: float(ms) / 1000 for step, ms in entry[key].items()})
    return batches


def sum_steps(batches: list[dict[str, float]]) -> dict[str, float]:
    """Seconds per step, summed over `batches`."""
    total: dict[str, float] = {}
    for steps in batches:
        for step, seconds in steps.items():
            total[step] = total.get(step, 0.0) + seconds
    return total


def run_service(images: list[Path], root: Path, *, classifier: Path, standardizer: str, device: str,
                batch_size: int, timeout: float, tta: bool = False) -> ServiceResult:
    """Start the service on a fresh folder, drop ``images``, time them to committed rows, stop it."""
    root = root.resolve()  # the config names absolute paths, whatever the service's working directory
    root.mkdir(parents=True, exist_ok=True)
    config = write_config(root, classifier=classifier, standardizer=standardizer, device=device,
                          batch_size=batch_size, tta=tta)
    drop = root / "drop"
    prepare_folders(config)
    staged = stage_files(images, root / "staging")
    started = time.monotonic()
    service = ServiceProcess(config, root)
    engine = None
    peak: float | None = None
    try:
        service.wait_ready(timeout)
        startup = time.monotonic() - started
        engine = create_engine(f"sqlite:///{root / 'stainbridge.db'}")
        t0, dropped_at = time.perf_counter(), datetime.now(UTC)
        for path in staged:
            os.rename(path, drop / path.name)
        handled = 0
        first: tuple[float, float | None, int] | None = None  # (seconds since the drop, child CPU, rows) at the first row
        deadline = time.monotonic() + timeout
        while True:
            with engine.connect() as connection:
                handled = int(connection.scalar(DONE_SQL) or 0)
            if handled and first is None:
                first = (time.perf_counter() - t0, cpu_seconds(service.process.pid), handled)
            if handled >= len(staged):
                break
            peak = max(peak or 0.0, vm_hwm_mb(service.process.pid) or 0.0) or None
            if service.process.poll() is not None:
                raise ServiceRunError(f"`stainbridge run` exited ({service.process.returncode}) after {handled} of "
                                      f"{len(staged)} files; its log ({service.log}) ends:\n{service.tail()}")
            if time.monotonic() > deadline:
                raise ServiceRunError(f"only {handled} of {len(staged)} files were committed after {timeout:.0f} s; "
                                      f"see {service.log}")
            time.sleep(POLL_SECONDS)
        seconds = time.perf_counter() - t0
        cpu_end = cpu_seconds(service.process.pid)
        peak = max(peak or 0.0, vm_hwm_mb(service.process.pid) or 0.0) or None
        with engine.connect() as connection:
            failed = int(connection.scalar(FAILED_SQL) or 0)
        steady_images, steady_seconds = steady_state(committed_batches(engine))
    finally:
        if engine is not None:
            engine.dispose()
        code = service.stop()
    if code != 0:
        raise ServiceRunError(f"`stainbridge run` exited {code} on SIGTERM (expected 0); log: {service.log}\n"
                              + service.tail())
    stages, batches = log_stages(service.log, dropped_at)
    cpu_start = first[1] if first else None
    return ServiceResult(images=len(staged), seconds=seconds, failed=failed, peak_rss_mb=peak,
                         startup_seconds=startup, exit_code=code, log_stages=stages, batches=batches,
                         time_to_first_result=first[0] if first else None,
                         steady_images=steady_images, steady_seconds=steady_seconds,
                         batch_steps=batch_steps(service.log),
                         batch_cpu_steps=batch_steps(service.log, "steps_cpu_ms"),
                         steady_cpu_seconds=cpu_end - cpu_start if cpu_end is not None and cpu_start is not None else None,
                         steady_cpu_images=len(staged) - first[2] if first else 0)
