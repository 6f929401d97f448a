"""Helpers for the retraining tests: a trained tiny classifier, a broken standardizer, a world of
archived incoming images in a real database, and a controllable clock for APScheduler."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import torch

from stainbridge.daemon.config import Settings
from stainbridge.daemon.intake.reading import sha256_file
from stainbridge.daemon.schema import upgrade_database
from stainbridge.daemon.store import Image, ImageStatus, make_engine, make_sessionmaker, utcnow
from stainbridge.daemon.versions.loading import load_models
from stainbridge.models.checkpoint import save_checkpoint
from stainbridge.models.cyclegan import build_generator
from stainbridge.models.imaging import synthetic
from tests.daemon_helpers import GEN_ARGS, SIZE, STAINBRIDGE, subprocess_env


@dataclass(frozen=True)
class Lab:
    reference: Path  # labeled reference images, one folder per class
    incoming: Path  # labeled incoming images (labels unused by the job)
    classifier: Path  # a tiny classifier trained on `reference` (it tells cells apart, a little)
    broken: Path  # a standardizer that paints every image black


def build_lab(root: Path) -> Lab:
    """Synthetic data and a classifier trained for a few seconds (session-scoped in the tests)."""
    root.mkdir(parents=True, exist_ok=True)
    reference, incoming = root / "reference", root / "incoming"
    synthetic.write_dataset(reference, protocol="reference", per_class=10, size=48, seed=1)
    synthetic.write_dataset(incoming, protocol="incoming", per_class=4, size=48, seed=2)
    classifier = root / "classifier.safetensors"
    # 32 optimizer steps (35 training images, 4 batches of 8, 8 epochs): batch norm's running statistics, which
    # the classifier uses when it predicts, need about that many to settle (momentum 0.1: 1 - 0.9**32 = 97 %).
    # After 6 steps they were half-way from their initial values, and the network, which had learned (0.90 on its
    # own reference images with settled statistics), predicted near-uniform probabilities at 0.40: tests of what
    # it does with its predictions then hung on the last bits of the floating-point arithmetic.
    done = subprocess.run([str(STAINBRIDGE), "train", "classifier", "--data", str(reference), "--out", str(classifier),
                           "--preset", "tiny", "--size", str(SIZE), "--epochs", "8", "--batch-size", "8",
                           "--device", "cpu"], env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return Lab(reference, incoming, classifier, broken_standardizer(root / "broken.safetensors"))


def broken_standardizer(path: Path) -> Path:
    """A valid ResNet-generator checkpoint whose last convolution outputs -1 (black) everywhere."""
    generator = build_generator(**GEN_ARGS)
    state = generator.state_dict()
    last_weight, last_bias = [k for k in state if k.endswith(".weight")][-1], [k for k in state if k.endswith(".bias")][-1]
    state[last_weight] = torch.zeros_like(state[last_weight])
    state[last_bias] = torch.full_like(state[last_bias], -5.0)
    header = {"kind": "standardizer", "architecture": "resnet_generator", "arch_args": GEN_ARGS, "input_size": SIZE,
              "metrics": {"note": "deliberately broken: black output"}}
    save_checkpoint(path, state, header)
    return path


def archive_incoming(settings: Settings, sessions, lab: Lab, *, received_at: datetime | None = None) -> int:
    """Copy the lab's incoming images into the archive and record them as classified (status done)."""
    when = received_at or utcnow()
    count = 0
    with sessions.begin() as session:
        for source in sorted(lab.incoming.rglob("*.png")):
            target = settings.archive_dir / "2026" / "12" / "01" / f"{source.parent.name}-{source.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
            session.add(Image(sha256=sha256_file(target), source_name=target.name, site=settings.site.name,
                              status=ImageStatus.done, received_at=when, processed_at=when, archive_path=str(target)))
            count += 1
    return count


def open_world(settings: Settings):
    """Schema, engine, sessions, and the configured models registered (as the service's start-up does)."""
    upgrade_database(settings.database_url)
    engine = make_engine(settings.database_url)
    sessions = make_sessionmaker(engine)
    load_models(settings, sessions)
    return engine, sessions


class FakeClock:
    """APScheduler 3 reads the time with datetime.now() in two modules; tests set it instead."""

    def __init__(self, monkeypatch, start: datetime) -> None:
        self.now = start
        clock = self

        class FrozenDatetime(datetime):
            @classmethod
            def now(cls, tz=None):  # noqa: D102
                return clock.now.astimezone(tz) if tz else clock.now.replace(tzinfo=None)

        import apscheduler.executors.base as executors
        import apscheduler.schedulers.base as schedulers

        monkeypatch.setattr(schedulers, "datetime", FrozenDatetime)
        monkeypatch.setattr(executors, "datetime", FrozenDatetime)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now = self.now + timedelta(**delta)


def local(year: int, month: int, day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute).astimezone().astimezone(timezone.utc)


class EventRecorder:
    """Stands in for a module's structlog logger: records event names, whatever logging is configured."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []

    def _record(self, event: str, **values) -> None:
        self.events.append((event, values))

    info = warning = error = exception = debug = _record

    def bind(self, **_values) -> "EventRecorder":
        return self

    def names(self) -> list[str]:
        return [name for name, _ in self.events]
