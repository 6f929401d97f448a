"""`stainbridge demo` (`make demo`): the real main job, end to end, on synthetic data.

1. synthetic cell images of two staining protocols: "reference" (the lab whose classifier we
   trust) and "incoming" (another lab's stain), with known labels;
2. tiny models trained on CPU (reused from the state folder when present): a classifier on the
   reference images, and the service's default recipe for a new site: Reinhard's stain normalization
   onto the reference stain with the site profile (magnification from red-cell diameters, else nucleus
   areas), both estimated from the incoming lab's unlabeled images (``train site-profile --method
   reinhard``), and the classifier adapted to those same unlabeled images behind it (``train adapt``);
3. a config file, then the real service (`stainbridge run`, a subprocess) on a fresh drop folder
   with SQLite; READY=1 arrives on a notify socket, as it would for systemd;
4. held-out incoming images dropped in (atomically renamed), plus one corrupt file;
5. once the database says every file is handled: the results via SQL on the `results` view, the
   accuracy against the known labels, and the quarantined file with its reason;
6. SIGTERM: the service finishes and exits 0;
7. the HTML report of the run (`stainbridge report`): the incoming cells before and after
   standardization with their labels, counts, confidence and the failure; its path is printed last.

Everything lives in the state folder (``./demo-state`` or ``--workdir``); ``run/`` is recreated
on every run, data and models are kept for the next one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.pool import NullPool

from stainbridge.daemon.commands.report import write_report

CLASSES = ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil")
SIZE = 64
# The synthetic incoming lab draws its cells larger; the site profile in the standardizer says by how
# much, and the service and the raw comparison both use it.
SCALE = "profile"
RESULTS_SQL = """SELECT source_name, status, label, confidence, standardizer, error
FROM results ORDER BY source_name"""


class DemoError(RuntimeError):
    """A step of the demo failed; the message says which and where its log is."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="demo-state", help="state folder (default: ./demo-state)")
    parser.add_argument("--per-class", type=int, default=6, help="incoming images dropped per class (default 6)")
    parser.add_argument("--retrain", action="store_true", help="train the models again even if present")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the service")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "stainbridge.daemon.cli", *args]


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STAINBRIDGE_")}
    # One math thread per process: on a small, shared CPU, more threads mostly wait for each other.
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _step(text_: str) -> None:
    print(f"\n== {text_}", flush=True)


def _run_logged(cmd: list[str], log: Path, what: str) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with log.open("w") as out:
        code = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=_child_env())
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise DemoError(f"{what} failed (exit {code}); log: {log}\n{tail}")
    print(f"   {what}: {time.monotonic() - started:.0f} s (log: {log})", flush=True)


def make_data(root: Path, per_class: int) -> dict[str, Path]:
    """Reference (training), incoming (unlabeled GAN training) and incoming held-out test images."""
    sets = {
        "reference": (root / "reference", "reference", 40, 5),
        "incoming-train": (root / "incoming-train", "incoming", 16, 1),
        "incoming-test": (root / f"incoming-test-{per_class}", "incoming", per_class, 2),
    }
    for name, (folder, protocol, n, seed) in sets.items():
        marker = folder / ".complete"
        if marker.exists():
            print(f"   {name}: reusing {folder}")
            continue
        shutil.rmtree(folder, ignore_errors=True)
        _run_logged(_cli("synth", "--out", str(folder), "--protocol", protocol, "--per-class", str(n),
                         "--size", str(SIZE), "--seed", str(seed)),
                    root / "logs" / f"synth-{name}.log", f"drew {n} {protocol}-stain images per class ({name})")
        counts = {d.name: sum(1 for _ in d.iterdir()) for d in sorted(folder.iterdir()) if d.is_dir()}
        marker.write_text(json.dumps(counts))
    return {name: spec[0] for name, spec in sets.items()}


def make_models(workdir: Path, data: dict[str, Path], retrain: bool) -> tuple[Path, Path, Path]:
    """(reference classifier, classifier adapted to the incoming site, standardizer)."""
    models, logs = workdir / "models", workdir / "logs"
    classifier, standardizer = models / "classifier.safetensors", models / "standardizer-reinhard.safetensors"
    adapted = models / "classifier-adapted.safetensors"
    if retrain or not classifier.exists():
        _run_logged(_cli("train", "classifier", "--data", str(data["reference"]), "--out", str(classifier),
                         "--preset", "tiny", "--epochs", "12", "--color-augment", "--device", "cpu"),
                    logs / "train-classifier.log", "trained the classifier (ResNet-18, 64 px)")
    else:
        print(f"   reusing {classifier}")
    if retrain or not standardizer.exists():
        _run_logged(_cli("train", "site-profile", "--method", "reinhard", "--source", str(data["incoming-train"]),
                         "--classifier", str(classifier), "--out", str(standardizer)),
                    logs / "train-site-profile.log",
                    "estimated the incoming lab's site profile for Reinhard's normalization onto the reference "
                    "stain (no labels used)")
    else:
        print(f"   reusing {standardizer}")
    if retrain or not adapted.exists():
        _run_logged(_cli("train", "adapt", "--init-from", str(classifier), "--source", str(data["incoming-train"]),
                         "--standardizer", str(standardizer), "--out", str(adapted), "--batch-size", "32",
                         "--device", "cpu"),
                    logs / "train-adapt.log",
                    "adapted the classifier to the incoming lab's unlabeled images behind that standardizer")
    else:
        print(f"   reusing {adapted}")
    return classifier, adapted, standardizer


def write_config(workdir: Path, run_dir: Path, classifier: Path, standardizer: Path) -> Path:
    config = workdir / "stainbridge.toml"
    config.write_text(f"""# Written by `stainbridge demo`.
[paths]
state = "{run_dir}"
drop = "{run_dir / 'drop'}"
archive = "{run_dir / 'archive'}"
quarantine = "{run_dir / 'quarantine'}"

[database]
url = "sqlite:///{run_dir / 'stainbridge.db'}"

[models]
classifier = "{classifier}"
standardizer = "{standardizer}"
device = "cpu"
batch_size = 8

[site]
name = "demo-incoming-lab"
scale = "{SCALE}"

[watch]
save_standardized = true
quiet_seconds = 0.5
rescan_seconds = 5
batch_wait_seconds = 0.3

[logging]
format = "json"
""", encoding="utf-8")
    return config


class DemoDaemon:
    """`stainbridge run` as a subprocess, with a notify socket to learn when it is ready.

    The bench has the same runner (`models/bench/service_run.py`, `ServiceProcess`); keep the two
    in step. It cannot be shared: models never import daemon, the daemon imports nothing from
    models but `stainbridge.models.inference` (tests/test_layout.py), and a process runner does
    not belong in the inference path the service loads.
    """

    def __init__(self, config: Path, run_dir: Path) -> None:
        self.log = run_dir / "daemon.log"
        self.sock_path = run_dir / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.sock_path))
        self.sock.settimeout(0.5)
        env = {**_child_env(), "NOTIFY_SOCKET": str(self.sock_path)}
        with self.log.open("w") as out:
            self.process = subprocess.Popen(_cli("run", "--config", str(config)), env=env, stdout=out,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def wait_for(self, state: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise DemoError(f"the service exited ({self.process.returncode}) before {state}; log: {self.log}\n"
                                + self.tail())
            try:
                message = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            if state in message.splitlines():
                return
        raise DemoError(f"no {state} from the service within {timeout:.0f} s; log: {self.log}")

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.sock.close()
        return self.process.returncode


def drop_images(test_dir: Path, drop: Path) -> tuple[dict[str, str], dict[str, Path]]:
    """Copy the held-out images in under neutral names (atomic rename); one corrupt file too."""
    truth: dict[str, str] = {}
    originals: dict[str, Path] = {}
    staging = drop.parent / "staging"
    staging.mkdir(parents=True, exist_ok=True)
    images = sorted((p for label in CLASSES for p in (test_dir / label).glob("*.png")), key=lambda p: p.name)
    for i, path in enumerate(sorted(images, key=lambda p: (p.stem, p.parent.name))):
        name = f"cell-{i:04d}.png"
        truth[name], originals[name] = path.parent.name, path
        shutil.copyfile(path, staging / name)
        os.rename(staging / name, drop / name)
    broken = images[0].read_bytes()
    (staging / "corrupt-scan.png").write_bytes(broken[: len(broken) // 3])
    os.rename(staging / "corrupt-scan.png", drop / "corrupt-scan.png")
    return truth, originals


def wait_until_handled(engine: Engine, expected: int, daemon: DemoDaemon, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        with engine.connect() as connection:
            handled = connection.scalar(text(
                "SELECT count(*) FROM images WHERE status IN ('done', 'failed', 'duplicate')"))
        if handled >= expected:
            return time.monotonic() - started
        if daemon.process.poll() is not None:
            raise DemoError(f"the service exited ({daemon.process.returncode}); log: {daemon.log}\n{daemon.tail()}")
        time.sleep(0.3)
    raise DemoError(f"only {handled} of {expected} files handled after {timeout:.0f} s (a full disk, "
                    f"a stuck model?); log: {daemon.log}\n{daemon.tail()}")


def raw_accuracy(classifier: Path, standardizer: Path, drop_names: dict[str, Path], truth: dict[str, str]) -> float:
    """The reference classifier on the same images, at the same site geometry and TTA, without standardization."""
    import torch
    from PIL import Image

    from stainbridge.models.inference import load_classifier, load_standardizer, resolve_geometry, run_batch

    torch.set_num_threads(1)
    model = load_classifier(classifier, device="cpu")
    identity = load_standardizer("none")
    geometry = resolve_geometry(model, load_standardizer(str(standardizer), classifier=model), scale=SCALE)
    names = sorted(drop_names)
    images = [Image.open(drop_names[n]).convert("RGB") for n in names]
    results = run_batch(images, identity, model, scale=str(geometry.magnification or 1.0), tta=True)  # as [models] tta
    return sum(r.label == truth[n] for n, r in zip(names, results, strict=True)) / len(names)


def report(engine: Engine, truth: dict[str, str]) -> float:
    with engine.connect() as connection:
        rows = connection.execute(text(RESULTS_SQL)).all()
    print(RESULTS_SQL.replace("\n", " "), "\n")
    print(f"   {'source_name':<18}{'status':<9}{'label':<12}{'confidence':>10}  {'true label':<12}standardizer")
    correct = classified = 0
    for source, status, label, confidence, standardizer, error in rows:
        if status != "done":
            print(f"   {source:<18}{status:<9}{'-':<12}{'-':>10}  {'-':<12}{error or ''}")
            continue
        classified += 1
        correct += label == truth.get(source)
        mark = "" if label == truth.get(source) else " x"
        print(f"   {source:<18}{status:<9}{label:<12}{confidence:>10.3f}  {truth.get(source, '?'):<12}{standardizer}{mark}")
    accuracy = correct / classified if classified else 0.0
    print(f"\n   accuracy on the incoming stain, through the service: {correct}/{classified} = {accuracy:.2f} "
          f"(chance {1 / len(CLASSES):.2f})")
    return accuracy


def run(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir).absolute()
    run_dir = workdir / "run"
    started = time.monotonic()
    daemon: DemoDaemon | None = None
    try:
        _step(f"1/5 synthetic images of two staining protocols in {workdir / 'data'}")
        data = make_data(workdir / "data", args.per_class)
        _step("2/5 tiny models (CPU)")
        classifier, adapted, standardizer = make_models(workdir, data, args.retrain)
        _step(f"3/5 the service on a fresh drop folder ({run_dir})")
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        config = write_config(workdir, run_dir, adapted, standardizer)
        _run_logged(_cli("init", "--config", str(config)), workdir / "init.log", "stainbridge init")
        daemon = DemoDaemon(config, run_dir)
        daemon.wait_for("READY=1", args.timeout)
        print(f"   READY=1 received (config: {config}, log: {daemon.log})")
        _step("4/5 dropping held-out incoming images and one corrupt file")
        truth, originals = drop_images(data["incoming-test"], run_dir / "drop")
        print(f"   {len(truth)} images + corrupt-scan.png")
        engine = create_engine(f"sqlite:///{run_dir / 'stainbridge.db'}", poolclass=NullPool)
        try:
            seconds = wait_until_handled(engine, len(truth) + 1, daemon, args.timeout)
            print(f"   all {len(truth) + 1} files handled in {seconds:.1f} s")
            _step("5/5 results (SQL on the `results` view)")
            accuracy = report(engine, truth)
        finally:
            engine.dispose()
        raw = raw_accuracy(classifier, standardizer, originals, truth)
        verdict = (f"here it gains {accuracy - raw:+.2f} over that" if accuracy > raw else
                   "here it does not beat that" if accuracy < raw else "here it ties that")
        print(f"   the reference classifier, not adapted, without standardization: {raw:.2f}. The service ran the "
              "default recipe: Reinhard's normalization onto the reference stain with the site profile, estimated from "
              "the incoming lab's unlabeled images (`train site-profile --method reinhard`) and the classifier "
              f"adapted to them without labels (`train adapt`); {verdict}. `stainbridge bench accuracy` compares "
              "the methods on real images.")
        quarantined = sorted(p.name for p in (run_dir / "quarantine").rglob("*")
                             if p.is_file() and not p.name.startswith("."))  # not init's marker
        print(f"   quarantine: {', '.join(quarantined)}")
        code = daemon.stop()
        daemon = None
        if code != 0:
            raise DemoError(f"the service exited {code} on SIGTERM; log: {run_dir / 'daemon.log'}")
        print("   SIGTERM -> STOPPING=1, exit 0.")
        page = write_report(f"sqlite:///{run_dir / 'stainbridge.db'}", run_dir / "report.html")
        print(f"\n   The incoming cells before and after standardization, with their labels, counts and the "
              f"failure: open {page} in a browser (`stainbridge report --config {config} --out FILE` writes it "
              f"again). Demo finished in {time.monotonic() - started:.0f} s.")
        return 0
    except DemoError as exc:
        print(f"stainbridge demo: {exc}", file=sys.stderr)
        return 1
    finally:
        if daemon is not None:
            daemon.stop(timeout=10)
