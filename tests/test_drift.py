"""Drift per site (daemon/lab/drift.py, the weekly_drift and weekly_stain views): a site whose output or stain
changes after its baseline weeks raises an alert that the report, `status` and the metrics show, on both databases;
the service records each image's stain (the live test through `stainbridge run`: tests/test_drift_e2e.py)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import insert, select, text

from stainbridge.daemon.commands import status
from stainbridge.daemon.config import LabSettings
from stainbridge.daemon.lab.drift import DRIFT_MIN_CELLS, Week, compare, gather_drift, site_drift
from stainbridge.daemon.lab.metrics import DatabaseCollector
from stainbridge.daemon.lab.render import render
from stainbridge.daemon.lab.report import Period, gather
from stainbridge.daemon.schema import upgrade_database
from stainbridge.daemon.store import (
    Image,
    ModelVersion,
    Prediction,
    make_engine,
    make_sessionmaker,
    stain_columns,
)
from tests.daemon_helpers import write_cell

MONDAY = datetime(2026, 10, 5, 10, 0, tzinfo=UTC)  # weeks of 2026-10-05 ... 2026-11-02
CELLS = 40


BASE_STAIN = {"background": (85.0, 0.0, 5.0), "other_stained": (60.0, 25.0, 5.0), "nucleus": (45.0, 25.0, -35.0)}
MOVED_NUCLEUS = (57.0, 15.0, -25.0)  # Delta E 18.5 from the baseline's nucleus


def _stain(i: int, nucleus_moved: bool) -> dict[str, float | None]:
    """One cell's stain columns: the site's stain, +-1 L* from cell to cell, the nucleus moved if asked."""
    wobble = 1.0 if i % 2 else -1.0
    summary = {region: (lab[0] + wobble, lab[1], lab[2]) for region, lab in BASE_STAIN.items()}
    if nucleus_moved:
        summary["nucleus"] = MOVED_NUCLEUS
    return stain_columns(summary)


def _seed_drifting_site(url: str, *, stain_moves: bool = False) -> None:
    """Five weeks of 40 cells at hospital-d: four of half neutrophils, half lymphocytes at confidence 0.9; then a
    week of 90 % neutrophils at confidence 0.6 with a quarter flagged (and, if `stain_moves`, its nuclei stained
    differently)."""
    upgrade_database(url)
    engine = make_engine(url)
    images, predictions = [], []
    for week in range(5):
        drifted = week == 4
        for i in range(CELLS):
            n = len(images) + 1000
            when = MONDAY + timedelta(weeks=week, hours=i)
            neutrophil = i < (36 if drifted else 20)
            images.append({"id": n, "sha256": f"{n:064x}", "source_name": f"w{week}/c{i}.png", "site": "hospital-d",
                           "status": "done", "received_at": when, "processed_at": when,
                           **_stain(i, drifted and stain_moves)})
            predictions.append({"id": n, "image_id": n, "label": "neutrophil" if neutrophil else "lymphocyte",
                                "confidence": 0.6 if drifted else 0.9, "probabilities": {},
                                "classifier_version_id": 100, "latency_ms": 1.0, "created_at": when,
                                "needs_review": drifted and i % 4 == 0})
    try:
        with engine.begin() as c:
            c.execute(insert(ModelVersion.__table__), [{"id": 100, "kind": "classifier", "site": "hospital-d",
                                                        "name": "clf", "path": "/m/c", "sha256": "c1", "header": {},
                                                        "metrics": {}, "state": "active", "created_at": MONDAY}])
            c.execute(insert(Image.__table__), images)
            c.execute(insert(Prediction.__table__), predictions)
    finally:
        engine.dispose()


def test_weekly_drift_view_holds_each_weeks_shares_confidence_and_flags(database_url: str) -> None:
    """One row per site, week (its Monday) and class, the week's numbers on each, on both databases."""
    _seed_drifting_site(database_url)
    engine = make_engine(database_url)
    try:
        with engine.connect() as c:
            rows = c.execute(text("SELECT week, label, cells, share, week_cells, mean_confidence, share_flagged "
                                  "FROM weekly_drift WHERE site = 'hospital-d' ORDER BY week, label")).all()
    finally:
        engine.dispose()
    assert [str(r.week)[:10] for r in rows[::2]] == ["2026-10-05", "2026-10-12", "2026-10-19", "2026-10-26",
                                                      "2026-11-02"]
    assert [(r.label, r.cells, round(r.share, 3)) for r in rows[:2]] == [("lymphocyte", 20, 0.5),
                                                                         ("neutrophil", 20, 0.5)]
    last = rows[-1]
    assert (last.label, last.cells, last.week_cells) == ("neutrophil", 36, CELLS)
    assert round(last.mean_confidence, 3) == 0.6 and round(last.share_flagged, 3) == 0.25


def _drift_everywhere(url: str, settings_factory):
    """The one site's drift, the report's data, `status`'s report and the metric families, from the database."""
    lab = LabSettings()
    engine = make_engine(url)
    try:
        with engine.connect() as c:
            [site] = gather_drift(lambda sql: c.execute(text(sql)).all(), lab)
        data = gather(engine, Period(), "test", lab=lab)
        with make_sessionmaker(engine)() as session:
            report = status.collect(settings_factory(database_url=url), session)
        families = list(DatabaseCollector(make_sessionmaker(engine), lab).collect())
    finally:
        engine.dispose()
    return site, data, report, families


def test_a_drifting_week_alerts_in_report_status_and_metrics(database_url: str, settings_factory) -> None:
    """The fifth week moved beyond the bounds: the report lists it with its reasons, `status` says DRIFT, the
    metric is 1; the four baseline weeks raise nothing."""
    _seed_drifting_site(database_url)
    site, data, report, families = _drift_everywhere(database_url, settings_factory)
    assert site.baseline == ["2026-10-05", "2026-10-12", "2026-10-19", "2026-10-26"]
    assert [(a.week, a.reasons) for a in site.alerts] == [("2026-11-02", [
        "lymphocyte 10% (baseline 50%)", "neutrophil 90% (baseline 50%)", "mean confidence 0.60 (baseline 0.90)",
        "flagged 25% (baseline 0%)"])]
    assert report.drift == [site.alerts[0].describe()]
    assert "DRIFT               site hospital-d, week of 2026-11-02: lymphocyte 10%" in status.render(report)
    page = render(data)
    assert '<table class="drift" data-site="hospital-d">' in page and "neutrophil 90% (baseline 50%)" in page
    assert 'class="plot-drift" alt="site hospital-d per week"' in page
    [alert] = [f for f in families if isinstance(f, GaugeMetricFamily) and f.name == "stainbridge_drift_alert"]
    assert [(s.labels["site"], s.value) for s in alert.samples] == [("hospital-d", 1)]


def test_small_weeks_and_moves_within_bounds_raise_nothing() -> None:
    """A week under DRIFT_MIN_CELLS is not judged; 10 points and a 0.05 confidence drop are within the defaults."""
    base = Week("b", 200, 0.9, 0.0, {"neutrophil": 0.5, "lymphocyte": 0.5})
    assert compare(Week("w", 100, 0.85, 0.05, {"neutrophil": 0.6, "lymphocyte": 0.4}), base, LabSettings()) == []
    assert DRIFT_MIN_CELLS > 1


def test_the_service_logs_a_new_drift_alert_once(make_service, tmp_path) -> None:
    """The running service looks for drift (hourly, and at its first batch) and logs each new alert once."""
    service = make_service()
    _seed_drifting_site(service.settings.database_url)
    [alert] = service.check_drift()
    assert (alert.site, alert.week) == ("hospital-d", "2026-11-02")
    service._last_drift_check = -3600.0  # an hour later: the same alert is not logged again
    assert service.check_drift() == []


def test_weekly_stain_view_holds_each_weeks_mean_stain(database_url: str) -> None:
    """One row per site and week: the cells measured and the mean of their medians per region, on both databases."""
    _seed_drifting_site(database_url, stain_moves=True)
    engine = make_engine(database_url)
    try:
        with engine.connect() as c:
            rows = c.execute(text("SELECT week, cells, background_l, nucleus_l, nucleus_a, nucleus_b, other_stained_b "
                                  "FROM weekly_stain WHERE site = 'hospital-d' ORDER BY week")).all()
    finally:
        engine.dispose()
    assert [(str(r.week)[:10], r.cells) for r in rows] == [
        ("2026-10-05", CELLS), ("2026-10-12", CELLS), ("2026-10-19", CELLS), ("2026-10-26", CELLS), ("2026-11-02", CELLS)]
    assert [round(v, 3) for v in rows[0][2:]] == [85.0, 45.0, 25.0, -35.0, 5.0]
    assert [round(v, 3) for v in rows[-1][2:]] == [85.0, 57.0, 15.0, -25.0, 5.0]


def test_a_stain_shift_alerts_in_status_metrics_and_report(sqlite_url: str, settings_factory) -> None:
    """A week whose nuclei are stained 18.5 Delta E away from the baseline's alerts with that reason (beyond the
    default bound of 10); the metric gives each region's Delta E, the report draws the stain under the shares."""
    _seed_drifting_site(sqlite_url, stain_moves=True)
    site, data, report, families = _drift_everywhere(sqlite_url, settings_factory)
    [alert] = site.alerts
    assert alert.week == "2026-11-02"
    assert alert.reasons[-1] == "nucleus stain Delta E 18.5 (L*a*b* 57 15 -25; baseline 45 25 -35)"
    assert "nucleus stain Delta E 18.5" in report.drift[0]
    [gauge] = [f for f in families if isinstance(f, GaugeMetricFamily) and f.name == "stainbridge_stain_delta_e"]
    assert {s.labels["region"]: round(s.value, 1) for s in gauge.samples if s.labels["site"] == "hospital-d"} == {
        "background": 0.0, "other_stained": 0.0, "nucleus": 18.5}
    assert "nucleus stain Delta E 18.5" in render(data)


def test_stain_moves_within_the_bound_or_outside_the_judged_regions_raise_nothing() -> None:
    """Background and nucleus 5 Delta E away stay within the default bound of 10; the other stained pixels (red cells
    and cytoplasm, whose colour follows the cells that arrive) are shown but never alert."""
    base = {"background": (85.0, 0.0, 5.0), "other_stained": (60.0, 25.0, 5.0), "nucleus": (45.0, 25.0, -35.0)}
    moved = {"background": (90.0, 0.0, 5.0), "other_stained": (80.0, 5.0, 5.0), "nucleus": (45.0, 20.0, -35.0)}
    weeks = [Week(f"2026-10-{5 + 7 * i:02d}", 40, 0.9, 0.0, {"neutrophil": 1.0}, 40, base) for i in range(4)]
    weeks.append(Week("2026-11-02", 40, 0.9, 0.0, {"neutrophil": 1.0}, 40, moved))
    drift = site_drift("s", weeks, LabSettings(), None)
    assert drift.alerts == []
    assert round(drift.stain_delta_e["2026-11-02"]["other_stained"], 1) == 28.3


def test_baseline_weeks_from_before_the_stain_was_measured_give_way_to_the_first_measured_weeks() -> None:
    """A site validated before migration 0012 has no measured baseline stain: its first drift_baseline_weeks measured
    weeks stand in, and a later week is judged against them."""
    lab = LabSettings(drift_baseline_weeks=2)
    unmeasured = [Week(f"2026-09-{7 + 7 * i:02d}", 40, 0.9, 0.0, {"neutrophil": 1.0}) for i in range(3)]
    stain = {"background": (85.0, 0.0, 5.0), "nucleus": (45.0, 25.0, -35.0)}
    measured = [Week(f"2026-10-{5 + 7 * i:02d}", 40, 0.9, 0.0, {"neutrophil": 1.0}, 40, stain) for i in range(2)]
    faded = Week("2026-10-19", 40, 0.9, 0.0, {"neutrophil": 1.0}, 40,
                 {"background": (95.0, 0.0, 2.0), "nucleus": (65.0, 10.0, -15.0)})
    drift = site_drift("s", [*unmeasured, *measured, faded], lab, "2026-09-21T10:00:00+00:00")
    assert drift.baseline == ["2026-09-07", "2026-09-14", "2026-09-21"]
    assert drift.stain_baseline == stain
    assert [(a.week, [r.split(" (")[0] for r in a.reasons]) for a in drift.alerts] == [
        ("2026-10-19", ["background stain Delta E 10.4", "nucleus stain Delta E 32.0"])]


def test_run_once_records_the_received_images_stain(make_service) -> None:
    """The service stores each classified image's stain as received: what stain_summary says of the file dropped."""
    from PIL import Image as PILImage

    from stainbridge.models.metrics import stain_summary

    service = make_service()
    cell = write_cell(service.settings.drop_dir / "cell.png", seed=3)
    expected = stain_columns(stain_summary(PILImage.open(cell)))
    deadline = time.monotonic() + 30
    while service.run_once() == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    with service.pipeline.sessions() as session:
        row = session.scalars(select(Image)).one()
        assert {column: getattr(row, column) for column in expected} == pytest.approx(expected)
    assert None not in expected.values()
