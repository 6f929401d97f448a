"""The lab surface on a real history: the running service's metrics endpoint is scraped, then
`stainbridge review import`, `report` and `export` run as real processes, and the report is loaded
in headless Chromium (skipped without chromium, except under CI=true where it must run).

One history serves every test here (module scope): tiny random-weight models, synthetic cells and
two broken files through `stainbridge run` on SQLite, a succeeded retraining run, four reviews.
"""

from __future__ import annotations

import csv
import io
import json
import re
import socket
import urllib.request
from datetime import datetime, timezone

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from stainbridge.daemon.schema import upgrade_database
from stainbridge.daemon.store import make_engine
from tests.browser import check_page, find_chromium
from tests.daemon_helpers import CLASSES, Daemon, build_tiny_models, query, wait_for, write_cell, write_config
from tests.suite_rules import under_ci

pytestmark = pytest.mark.slow
GOOD = 8
RETRAINED_AT = datetime(2026, 11, 20, 3, 0, tzinfo=timezone.utc)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def _samples(scrape: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(scrape) for s in family.samples}


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    root = tmp_path_factory.mktemp("lab")
    url = f"sqlite:///{root / 'stainbridge.db'}"
    models = build_tiny_models(root / "models")
    port = _free_port()
    config = write_config(root / "stainbridge.toml", root, url, models, metrics={"port": port},
                          watch={"save_standardized": True})
    upgrade_database(url)
    engine = make_engine(url)
    with engine.begin() as c:  # what the nightly job leaves behind when a candidate is promoted
        c.execute(text("INSERT INTO training_runs (kind, status, trigger, params, metrics, started_at, finished_at) "
                       "VALUES ('standardizer', 'succeeded', 'schedule', '{}', '{}', :t, :t)"), {"t": RETRAINED_AT})
    engine.dispose()
    daemon = Daemon(config, root)
    try:
        daemon.start()
        drop = root / "drop"
        for i in range(GOOD):
            write_cell(drop / f"cell-{i}.png", seed=100 + i, label=CLASSES[i % len(CLASSES)])
        (drop / "empty.png").write_bytes(b"")
        (drop / "notes.png").write_text("not an image\n")
        wait_for(lambda: query(url, "SELECT count(*) FROM images WHERE status IN ('done', 'failed')")[0][0] == GOOD + 2,
                 90, "every dropped file handled")
        counted = (f'stainbridge_files_processed_total{{outcome="done"}} {float(GOOD)}',
                   'stainbridge_files_processed_total{outcome="failed"} 2.0')
        scrape = wait_for(lambda: next((s for s in [_scrape(port)] if all(c in s for c in counted)), None), 30,
                          "the metrics to count the batch")
        assert daemon.stop() == 0
    finally:
        daemon.close()
    done = query(url, "SELECT image_id, label FROM latest_results ORDER BY image_id")
    reviews = root / "reviews.csv"
    with reviews.open("w", newline="") as handle:  # two agree with the model, two correct it
        writer = csv.writer(handle)
        writer.writerow(["image", "label", "reviewer"])
        for n, (image_id, label) in enumerate(done[:4]):
            other = next(c for c in CLASSES if c != label)
            writer.writerow([image_id, label if n < 2 else other, "dr-test"])
    return {"root": root, "url": url, "config": config, "scrape": scrape, "port": port, "done": done,
            "reviews": reviews}


def test_metrics_scraped_from_the_running_service(history) -> None:
    """Files by outcome and failure reason, queue depth, free space, batch latency, active models, last retraining."""
    samples = _samples(history["scrape"])
    assert samples[("stainbridge_files_processed_total", (("outcome", "done"),))] == GOOD
    assert samples[("stainbridge_files_processed_total", (("outcome", "failed"),))] == 2
    assert samples[("stainbridge_files_failed_total", (("reason", "empty"),))] == 1
    assert samples[("stainbridge_files_failed_total", (("reason", "unsupported_format"),))] == 1
    assert samples[("stainbridge_queue_depth", ())] == 0
    assert samples[("stainbridge_free_bytes", (("folder", "archive"),))] > 0
    assert samples[("stainbridge_batch_seconds_count", ())] >= 1
    assert samples[("stainbridge_batch_seconds_sum", ())] > 0
    active = {labels for name, labels in samples if name == "stainbridge_active_model_info"}
    assert {dict(labels)["kind"] for labels in active} == {"standardizer", "classifier"}
    assert samples[("stainbridge_last_successful_retraining_timestamp_seconds", ())] == RETRAINED_AT.timestamp()



def test_metrics_say_the_state_last_file_predictions_confidence_and_version(history) -> None:
    """The heartbeat's state, when the last file went through, predictions per class, the confidence histogram
    and the build's version."""
    samples = _samples(history["scrape"])
    assert samples[("stainbridge_service_state", (("state", "ready"),))] == 1
    assert samples[("stainbridge_service_state", (("state", "stopped"),))] == 0
    assert samples[("stainbridge_last_processed_timestamp_seconds", ())] > RETRAINED_AT.timestamp()
    predicted = sum(v for (name, _), v in samples.items() if name == "stainbridge_predictions_total")
    assert predicted == GOOD == samples[("stainbridge_confidence_count", ())]
    assert {dict(labels)["label"] for name, labels in samples if name == "stainbridge_predictions_total"} <= set(CLASSES)
    build = next(dict(labels) for name, labels in samples if name == "stainbridge_build_info")
    assert set(build) == {"version"} and build["version"]


def test_report_from_a_real_history(history, run_stainbridge) -> None:
    """`review import` then `report`: self-contained, every picture embedded, the numbers right."""
    imported = run_stainbridge("--config", str(history["config"]), "review", "import", str(history["reviews"]))
    assert imported.returncode == 0, imported.stderr
    out = history["root"] / "report.html"
    result = run_stainbridge("report", "--out", str(out), "--config", str(history["config"]))
    assert result.returncode == 0, result.stderr
    assert f"report written to {out}" in result.stdout
    page = out.read_text(encoding="utf-8")
    sources = re.findall(r'<img [^>]*src="([^"]*)"', page)
    assert sources and all(s.startswith(("data:image/png;base64,", "data:image/jpeg;base64,")) for s in sources)
    assert not re.search(r'(src|href)="(https?:)?//', page)
    grid, lowest = page.split("<h2>Lowest confidence")
    assert len(re.findall(r'alt="standardized cell-\d\.png"', grid)) == GOOD  # after, from save_standardized
    assert len(re.findall(r'alt="received cell-\d\.png"', grid)) == GOOD
    assert len(re.findall(r'alt="received cell-\d\.png"', lowest)) == GOOD - 4  # the unreviewed ones
    assert 'id="plot-confusion"' in page and 'id="plot-confidence"' in page and 'id="plot-daily"' in page
    assert re.search(r"Accuracy against 4 reviewed images: <b>50\.0%</b>", page)
    assert re.search(r"<td>empty</td><td class=\"n\">1</td>", page)
    assert re.search(r"<th>files received</th><td class=\"n\">10</td>", page)
    # the models table says how the answers were computed (the service's default tta; the tiny classifier
    # sees the whole frame, so no magnification)
    assert re.search(rf"<td>8 turns and flips</td><td>-</td><td class=\"n\">{GOOD}</td>", page)
    assert out.stat().st_size < 1_000_000
    later = run_stainbridge("report", "--since", "2999-01-01", "--out", str(out.with_name("empty.html")),
                            "--config", str(history["config"]))
    assert later.returncode == 0, later.stderr
    assert "No images were received in this period." in out.with_name("empty.html").read_text()
    backwards = run_stainbridge("report", "--since", "2026-12-02", "--until", "2026-12-01", "--out", str(out),
                                "--config", str(history["config"]))
    assert backwards.returncode == 2 and "--until" in backwards.stderr


@pytest.mark.browser
def test_report_fits_a_phone_screen_with_the_notice_on_top(history, run_stainbridge, tmp_path) -> None:
    """At 420 px wide nothing makes the page scroll sideways (plots and pictures shrink, wide tables scroll in
    their own box), and the research-use notice is the first thing on it."""
    chromium = find_chromium()
    if chromium is None:
        if under_ci():
            pytest.fail("CI=true but chromium is not installed; .ci/run installs Debian's chromium", pytrace=False)
        pytest.skip("chromium not installed (apt-get install -y chromium; .ci/run does it)")
    out = tmp_path / "report.html"
    assert run_stainbridge("report", "--out", str(out), "--config", str(history["config"])).returncode == 0
    page = out.read_text(encoding="utf-8")
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in page
    check = check_page(chromium, out, tmp_path / "narrow.png", tmp_path / "chromium-profile", width=420)
    assert check.scroll_width <= 420, check.scroll_width
    assert check.text.lstrip().startswith("For research use only.")
    assert [i for i in check.images if not (i["complete"] and i["width"] > 0 and i["shown"])] == []


@pytest.mark.browser
def test_report_loads_in_headless_chromium(history, run_stainbridge, tmp_path) -> None:
    """What a reader sees: the counts, the failure reasons and every shown cell's name as rendered text, every
    <img> decoded and laid out (not only "the page loaded"), nothing logged as an error, a screenshot saved."""
    chromium = find_chromium()
    if chromium is None:
        if under_ci():
            pytest.fail("CI=true but chromium is not installed; .ci/run installs Debian's chromium", pytrace=False)
        pytest.skip("chromium not installed (apt-get install -y chromium; .ci/run does it)")
    out = tmp_path / "report.html"
    result = run_stainbridge("report", "--out", str(out), "--config", str(history["config"]))
    assert result.returncode == 0, result.stderr
    screenshot = tmp_path / "report.png"
    check = check_page(chromium, out, screenshot, tmp_path / "chromium-profile")
    assert check.title.startswith("stainbridge report")
    assert len(check.images) >= 2 * GOOD + 3
    assert [i for i in check.images if not (i["complete"] and i["width"] > 0 and i["shown"])] == []
    visible = check.text
    assert re.search(r"files received\s+10\b", visible), visible[:2000]
    assert re.search(r"\bempty\s+1\b", visible) and re.search(r"\bunsupported_format\s+1\b", visible)
    assert all(f"cell-{i}.png" in visible for i in range(GOOD))
    assert "Traceback" not in visible and "{{" not in visible and "{%" not in visible
    assert check.errors == []
    assert screenshot.stat().st_size > 10_000 and screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_export_streams_csv_and_json(history, run_stainbridge) -> None:
    """Both formats hold one row per received image with its latest answer; --since filters."""
    config = str(history["config"])
    as_csv = run_stainbridge("export", "--format", "csv", "--config", config)
    assert as_csv.returncode == 0, as_csv.stderr
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert len(rows) == GOOD + 2 and "stainbridge export: 10 rows" in as_csv.stderr
    labels = {int(r["image_id"]): r["label"] for r in rows if r["status"] == "done"}
    assert labels == dict(history["done"])
    probabilities = [f"probability_{name}" for name in sorted(CLASSES)]
    assert "probabilities" not in rows[0] and list(rows[0])[list(rows[0]).index("confidence") - len(CLASSES):
                                                        list(rows[0]).index("confidence")] == probabilities
    for row in (r for r in rows if r["status"] == "done"):  # 4 decimals at most, summing to 1
        assert all(re.fullmatch(r"[01](\.\d{1,4})?", row[c]) for c in [*probabilities, "confidence"]), row
        assert sum(float(row[c]) for c in probabilities) == pytest.approx(1.0, abs=1e-3)
        assert row["received_at"].endswith("+00:00") and row["processed_at"].endswith("+00:00")
    out = history["root"] / "export.json"
    as_json = run_stainbridge("export", "--format", "json", "--out", str(out), "--config", config)
    assert as_json.returncode == 0, as_json.stderr
    records = json.loads(out.read_text())
    assert [r["image_id"] for r in records] == [int(r["image_id"]) for r in rows]
    assert {r["error"].split(":")[0] for r in records if r["status"] == "failed"} == {"empty", "unsupported_format"}
    # how each answer was computed: the service's default [models] tta = true, on both backends alike
    assert {r["tta"] for r in records if r["status"] == "done"} == {True}
    assert {r["tta"] for r in rows if r["status"] == "done"} == {"True"}
    none = run_stainbridge("export", "--format", "json", "--since", "2999-01-01", "--config", config)
    assert none.returncode == 0 and json.loads(none.stdout) == []


def test_report_restandardizes_images_without_a_saved_copy(history, run_stainbridge) -> None:
    """Without saved copies the report says so; --restandardize draws them with the active models."""
    for saved in history["root"].joinpath("archive").rglob("*.standardized.png"):
        saved.unlink()
    config, out = str(history["config"]), history["root"] / "redone.html"
    plain = run_stainbridge("report", "--out", str(out), "--config", config)
    assert plain.returncode == 0, plain.stderr
    grid = out.read_text().split("<h2>Lowest confidence")[0]
    assert 'alt="standardized cell-' not in grid and grid.count("not saved</div>") == GOOD
    redone = run_stainbridge("report", "--restandardize", "--out", str(out), "--config", config)
    assert redone.returncode == 0, redone.stderr
    grid = out.read_text().split("<h2>Lowest confidence")[0]
    assert len(re.findall(r'alt="standardized cell-\d\.png" src="data:image/jpeg;base64,', grid)) == GOOD
    assert grid.count("standardized now</div>") == GOOD and "not saved</div>" not in grid
