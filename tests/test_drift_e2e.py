"""Stain drift through the real service (docs/lab.md, "Drift per site"): the acceptance test of issue 25's stain.

`stainbridge run` classifies a week of a site's cells in its usual stain ("incoming"), the test lets a week pass,
then the same site sends cells from faded, under-stained slides ("faded"). `stainbridge status` must name the stain
drift of that site and the running service's metrics must say 1.

Time passing: after the first week's cells are recorded, their recorded times (arrival, processing, prediction) are
moved back seven days with one UPDATE, as if they had arrived a week ago. The stain measured on each file is the
service's own and is not touched. `[lab] drift_baseline_weeks = 1` makes that one week the site's baseline (the
site is not validated), so the test needs two weeks of DRIFT_MIN_CELLS cells instead of five.
"""

from __future__ import annotations

import re
import socket
import subprocess
import urllib.request
from datetime import timedelta

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from stainbridge.daemon.lab.drift import DRIFT_MIN_CELLS
from stainbridge.daemon.store import Image, Prediction, make_engine, make_sessionmaker
from tests.daemon_helpers import (
    CLASSES,
    STAINBRIDGE,
    Daemon,
    scalar,
    subprocess_env,
    wait_for,
    write_cell,
    write_config,
)

pytestmark = pytest.mark.slow
SITE = "test-site"
A_WEEK = timedelta(days=7)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _samples(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        scrape = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(scrape) for s in family.samples}


def _drop_week(drop, url: str, protocol: str, first_seed: int, expected_done: int) -> None:
    for i in range(DRIFT_MIN_CELLS):
        write_cell(drop / f"{protocol}-{i:02d}.png", seed=first_seed + i, label=CLASSES[i % len(CLASSES)],
                   protocol=protocol)
    wait_for(lambda: scalar(url, "SELECT count(*) FROM images WHERE status = 'done'") == expected_done, 180,
             f"{expected_done} cells classified")


def _a_week_passes(url: str) -> None:
    """Every recorded time moves back seven days: the cells so far arrived last week."""
    engine = make_engine(url)
    try:
        with make_sessionmaker(engine).begin() as session:
            for image in session.scalars(select(Image)):
                image.received_at -= A_WEEK
                image.processed_at -= A_WEEK
            for prediction in session.scalars(select(Prediction)):
                prediction.created_at -= A_WEEK
    finally:
        engine.dispose()


def test_faded_slides_a_week_later_raise_a_stain_drift_alert_in_status_and_metrics(tmp_path, tiny_models) -> None:
    """A week of the site's usual stain, a week passes, a week of faded slides: `stainbridge status` reports the
    site's stain drift (background and nucleus Delta E beyond 10) and stainbridge_drift_alert{site} is 1."""
    url = f"sqlite:///{tmp_path / 'state' / 'stainbridge.db'}"
    port = _free_port()
    config = write_config(tmp_path / "stainbridge.toml", tmp_path, url, tiny_models, metrics={"port": port},
                          lab={"drift_baseline_weeks": 1})
    daemon = Daemon(config, tmp_path).start()
    try:
        _drop_week(tmp_path / "drop", url, "incoming", 0, DRIFT_MIN_CELLS)
        assert scalar(url, "SELECT count(*) FROM images WHERE stain_nucleus_l IS NOT NULL") == DRIFT_MIN_CELLS
        _a_week_passes(url)
        assert _samples(port)[("stainbridge_drift_alert", (("site", SITE),))] == 0  # the baseline alone
        _drop_week(tmp_path / "drop", url, "faded", 1000, 2 * DRIFT_MIN_CELLS)
        samples = _samples(port)
        status = subprocess.run([str(STAINBRIDGE), "--config", str(config), "status"], env=subprocess_env(),
                                capture_output=True, text=True, timeout=120, check=False)
    finally:
        assert daemon.stop() == 0
        daemon.close()
    assert status.returncode == 0, status.stderr[-3000:]
    drift = [line for line in status.stdout.splitlines() if line.startswith("DRIFT")]
    assert len(drift) == 1 and f"site {SITE}, week of " in drift[0], status.stdout
    moved = {region: float(value) for region, value in re.findall(r"(background|nucleus) stain Delta E ([\d.]+)",
                                                                  drift[0])}
    assert set(moved) == {"background", "nucleus"} and min(moved.values()) > 10, drift[0]
    assert samples[("stainbridge_drift_alert", (("site", SITE),))] == 1
    for region, value in moved.items():
        assert samples[("stainbridge_stain_delta_e", (("region", region), ("site", SITE)))] == pytest.approx(
            value, abs=0.05)
