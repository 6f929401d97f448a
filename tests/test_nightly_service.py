"""The nightly job inside a real `stainbridge run` (issue 23): `[retraining] enabled = true` with a schedule seconds
away; the training child the service spawned is SIGKILLed (the run fails, files keep flowing), then the next slot's
run is promoted on reviews imported with `stainbridge review import` and the service swaps it in.

The service serves the lab's tiny trained classifier behind a standardizer that paints every cell black, and the
drop folder gets 20 reference-style cells the classifier can read, each reviewed with its true class: a trained
candidate is better on that evidence, so the gate (`min_gate_reviews = 20`) can promote it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from stainbridge.daemon.intake.reading import sha256_file
from stainbridge.models.imaging import synthetic
from tests.daemon_helpers import Daemon, TinyModels, query, wait_for, write_cell, write_config

pytestmark = pytest.mark.slow
CELLS = 20  # 4 per class: [retraining] min_new_images and min_gate_reviews
GAP = 20  # seconds between the two slots of a minute: time to kill, check and run `status` before the next run


def _two_slots_a_minute(first_in: int) -> str:
    """A six-field schedule (seconds first): `first_in` seconds from now, then GAP seconds later, every minute."""
    first = (int(time.time()) + first_in) % 60
    return f"{first},{(first + GAP) % 60} * * * * *"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _standardizer_runs(url: str) -> list[tuple]:
    """(id, status, reason, params as a dict, model_version_id) of every standardizer run, oldest first."""
    rows = query(url, "SELECT id, status, reason, params, model_version_id FROM training_runs "
                      "WHERE kind = 'standardizer' ORDER BY id")
    return [(i, status, reason, json.loads(params) if isinstance(params, str) else params or {}, version)
            for i, status, reason, params, version in rows]


def _training_child(url: str) -> tuple[int, int] | None:
    """(run id, pid) of a running run whose training child the service recorded."""
    return next(((i, p["pid"]) for i, status, _, p, _ in _standardizer_runs(url) if status == "running" and p.get("pid")),
                None)


def _done(url: str, names: list[str]) -> bool:
    placeholders = ", ".join(f":n{i}" for i in range(len(names)))
    rows = query(url, f"SELECT count(*) FROM images WHERE status = 'done' AND source_name IN ({placeholders})",
                 **{f"n{i}": name for i, name in enumerate(names)})
    return rows[0][0] == len(names)


def test_the_service_s_nightly_job_survives_a_killed_child_then_promotes_and_swaps(lab, tmp_path, run_stainbridge) -> None:
    """A scheduled run whose training child is SIGKILLed is failed with the signal and `status` shows it, while files
    keep flowing; the next slot's run is promoted on imported reviews, and the service serves it to new files."""
    url = f"sqlite:///{tmp_path / 'state' / 'stainbridge.db'}"
    port = _free_port()
    config = write_config(
        tmp_path / "stainbridge.toml", tmp_path, url, TinyModels(lab.classifier, lab.broken, "", ""),
        models={"poll_seconds": 0.5}, metrics={"port": port},
        retraining={"enabled": True, "schedule": _two_slots_a_minute(20), "reference": lab.reference,
                    "min_new_images": CELLS, "min_gate_reviews": CELLS, "epochs": 1, "steps_per_epoch": 1,
                    "device": "cpu", "held_out_fraction": 0.3})
    readable = tmp_path / "readable"  # the lab's classifier reads the reference style, not its incoming one
    synthetic.write_dataset(readable, protocol="reference", per_class=CELLS // 5, size=48, seed=9)
    daemon = Daemon(config, tmp_path).start()
    drop = tmp_path / "drop"
    try:
        reviews, names = ["image,label,reviewer"], []
        for path in sorted(readable.rglob("*.png")):
            names.append(f"{path.parent.name}-{path.name}")
            reviews.append(f"{sha256_file(path)},{path.parent.name},dr a")
            (drop / names[-1]).write_bytes(path.read_bytes())
        wait_for(lambda: _done(url, names), 90, f"the {CELLS} reviewed-to-be cells classified")
        (tmp_path / "reviews.csv").write_text("\n".join(reviews) + "\n")
        imported = run_stainbridge("--config", str(config), "review", "import", str(tmp_path / "reviews.csv"))
        assert imported.returncode == 0 and f"imported {CELLS} review(s)" in imported.stdout, imported.stderr

        # 1. The scheduled run's training child, killed: the run fails with the signal, the service goes on.
        run_id, pid = wait_for(lambda: _training_child(url), 150, "a scheduled run's training child")
        assert b"train" in Path(f"/proc/{pid}/cmdline").read_bytes()  # the child the run recorded, not a stranger
        os.kill(pid, signal.SIGKILL)
        failed = wait_for(lambda: next((r for r in _standardizer_runs(url) if r[0] == run_id and r[1] != "running"),
                                       None), 30, "the killed run to be closed")
        assert failed[1] == "failed" and "training was killed by SIGKILL" in failed[2] and failed[4] is None
        assert daemon.process.poll() is None
        shown = run_stainbridge("--config", str(config), "status")
        assert shown.returncode == 0, shown.stderr
        last = next(line for line in shown.stdout.splitlines() if line.startswith("last standardizer"))
        assert f"run {run_id} failed" in last and "training was killed by SIGKILL" in last, shown.stdout
        after_kill = [write_cell(drop / f"after-kill-{i}.png", seed=500 + i).name for i in range(2)]
        wait_for(lambda: _done(url, after_kill), 60, "files dropped after the kill classified")

        # 2. The next slot's run trains again; the gate promotes it on the reviews; the service swaps it in.
        finished = wait_for(lambda: next((r for r in _standardizer_runs(url) if r[0] > run_id and r[1] != "running"
                                          and r[1] != "skipped"), None), 180, "the next scheduled run to finish")
        assert finished[1] == "succeeded", finished[2]
        candidate = finished[4]
        assert query(url, "SELECT state FROM model_versions WHERE id = :v", v=candidate) == [("active",)]
        wait_for(lambda: query(url, "SELECT standardizer_version_id FROM served_models") == [(candidate,)], 30,
                 "the service to serve the promoted standardizer")
        after_swap = [write_cell(drop / f"after-swap-{i}.png", seed=700 + i).name for i in range(2)]
        wait_for(lambda: _done(url, after_swap), 60, "files dropped after the swap classified")
        versions = query(url, "SELECT p.standardizer_version_id FROM predictions p JOIN images i ON i.id = p.image_id "
                              "WHERE i.source_name LIKE 'after-swap-%'")
        assert versions == [(candidate,), (candidate,)]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            families = {f.name: f.samples for f in text_string_to_metric_families(response.read().decode())}
        served = {s.labels["kind"]: s.labels["name"] for s in families["stainbridge_served_model_info"]}
        name = query(url, "SELECT name FROM model_versions WHERE id = :v", v=candidate)[0][0]
        assert served["standardizer"] == name and f"run {finished[0]}" in name
        assert any(e.get("event") == "models_swapped" for e in daemon.events())
    finally:
        assert daemon.stop() == 0
        daemon.close()
