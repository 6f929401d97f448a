"""Helpers for the daemon tests: tiny checkpoints, config files, a real `stainbridge run` process.

Checkpoints are built directly from the network builders with random weights (accuracy does not
matter here, speed does): a ResNet-18 classifier at 32 px and a 2-block generator. The daemon
runs as a subprocess with a config file under tmp_path, a real AF_UNIX notify socket standing
in for systemd, and its log captured in a file.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from stainbridge.daemon import folders
from stainbridge.daemon.config import load_settings
from stainbridge.models.checkpoint import save_checkpoint
from stainbridge.models.classifier import build_classifier
from stainbridge.models.cyclegan import build_generator
from stainbridge.models.imaging import synthetic

CLASSES = list(synthetic.CLASSES)
SIZE = 32
GEN_ARGS = {"ngf": 8, "n_blocks": 2, "upsample": "resize_conv", "norm": "instance"}
STAINBRIDGE = Path(sys.executable).parent / "stainbridge"


@dataclass(frozen=True)
class TinyModels:
    classifier: Path
    standardizer: Path
    classifier_sha256: str
    standardizer_sha256: str


def build_tiny_models(folder: Path) -> TinyModels:
    """A random-weight classifier and standardizer checkpoint (seconds to build, CPU-fast)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    clf, gen = folder / "classifier.safetensors", folder / "standardizer.safetensors"
    clf_header = {
        "kind": "classifier", "architecture": "resnet18", "arch_args": {"num_classes": len(CLASSES)},
        "classes": CLASSES, "input_size": SIZE,
        "normalization": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        "geometry": {"reference_cell_fraction": 0.3}, "metrics": {"note": "random weights for tests"},
    }
    clf_sha = save_checkpoint(clf, build_classifier(arch="resnet18", num_classes=len(CLASSES)).state_dict(), clf_header)
    gen_header = {"kind": "standardizer", "architecture": "resnet_generator", "arch_args": GEN_ARGS, "input_size": SIZE}
    gen_sha = save_checkpoint(gen, build_generator(**GEN_ARGS).state_dict(), gen_header)
    return TinyModels(clf, gen, clf_sha, gen_sha)


def write_cell(path: Path, *, seed: int, label: str = "lymphocyte", size: int = 48, fmt: str = "PNG",
               protocol: str = "incoming") -> Path:
    """A synthetic cell image stained by `protocol` (models.imaging.synthetic); a different seed gives different bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = synthetic.render_cell(label, protocol=protocol, size=size, rng=np.random.default_rng(seed))
    img.save(path, format=fmt)
    return path


def cell_bytes(tmp: Path, *, seed: int) -> bytes:
    return write_cell(tmp / f".cell-{seed}.png", seed=seed).read_bytes()


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def write_config(path: Path, root: Path, database_url: str, checkpoints: TinyModels, **sections: dict[str, Any]) -> Path:
    """A config file with every folder under `root` and fast test timings; `sections` override."""
    config: dict[str, dict[str, Any]] = {
        "paths": {"state": root / "state", "drop": root / "drop", "archive": root / "archive",
                  "quarantine": root / "quarantine"},
        "database": {"url": database_url},
        "models": {"classifier": checkpoints.classifier, "standardizer": checkpoints.standardizer, "device": "cpu",
                   "batch_size": 4},
        "site": {"name": "test-site", "pseudonym_secret": "test-secret-0123456789"},
        "watch": {"quiet_seconds": 0.4, "rescan_seconds": 1.0, "batch_wait_seconds": 0.1},
        "logging": {"level": "info", "format": "json"},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    lines = []
    for section, values in config.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    folders.prepare(load_settings(path, environ={}))  # what `stainbridge init` does at install
    return path


def wait_for(condition: Callable[[], Any], timeout: float, message: str, interval: float = 0.1) -> Any:
    """Poll until condition() is truthy; fail with `message` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for: {message}")
        time.sleep(interval)


def query(url: str, sql: str, **params: Any) -> list[tuple]:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(text(sql), params)]
    finally:
        engine.dispose()


def scalar(url: str, sql: str, **params: Any) -> Any:
    rows = query(url, sql, **params)
    return rows[0][0] if rows else None


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STAINBRIDGE_", "NOTIFY_", "WATCHDOG_"))}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


REPO = Path(__file__).resolve().parents[1]
# `stainbridge` in a process that SIGKILLs itself when it decodes a marked file (tests/crashing_service.py)
CRASHING_STAINBRIDGE = (sys.executable, "-m", "tests.crashing_service")


class Daemon:
    """A real `stainbridge run --config FILE` process with a notify socket and a log file.

    `launcher`: the command that stands for `stainbridge` (e.g. CRASHING_STAINBRIDGE, or one wrapped in
    `unshare` to give the service its own mounts); the repository is put on its PYTHONPATH."""

    def __init__(self, config: Path, workdir: Path, *, env: dict[str, str] | None = None,
                 launcher: tuple[str, ...] = (str(STAINBRIDGE),)) -> None:
        self.config, self.workdir = config, workdir
        self.extra_env = env or {}
        self.launcher = launcher
        self.process: subprocess.Popen[bytes] | None = None
        self.messages: list[str] = []
        self.starts = 0
        # An AF_UNIX path holds at most 107 bytes: pytest-xdist's tmp_path (.../popen-gw0/test_long_name0/w1) does
        # not leave room, so the socket lives in a short private folder of its own.
        self.socket_dir = Path(tempfile.mkdtemp(prefix="sb-notify-"))
        self.socket_path = self.socket_dir / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.socket_path))
        self.sock.setblocking(False)

    @property
    def log_path(self) -> Path:
        return self.workdir / "daemon.log"

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def start(self, *, wait_ready: bool = True, timeout: float = 90) -> Daemon:
        assert self.process is None or self.process.poll() is not None, "already running"
        self.receive()
        self.messages.clear()  # READY=1 of an earlier life must not count for this one
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"--- start {self.starts} ---\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                [*self.launcher, "run", "--config", str(self.config)],
                env=subprocess_env(NOTIFY_SOCKET=str(self.socket_path), PYTHONPATH=str(REPO), **self.extra_env),
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.workdir,
            )
        if wait_ready:
            self.wait_message("READY=1", timeout)
        return self

    def receive(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return self.messages

    def wait_message(self, prefix: str, timeout: float) -> str:
        def arrived() -> str | None:
            for message in self.receive():
                if any(line.startswith(prefix) for line in message.splitlines()):
                    return message
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"daemon exited ({self.process.returncode}) before {prefix}:\n{self.log_text()[-4000:]}")
            return None

        return wait_for(arrived, timeout, f"{prefix} from the daemon")

    def signal(self, signum: int = signal.SIGTERM) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait_exit(self, timeout: float = 60) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM and wait: the return code."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        self.sock.close()
        shutil.rmtree(self.socket_dir, ignore_errors=True)


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header claiming width x height pixels with a token of pixel data."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
