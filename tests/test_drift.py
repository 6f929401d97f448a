"""Drift per site (daemon/lab/drift.py, the weekly_drift view): a site whose output changes after its baseline
weeks raises an alert that the report, `status` and the metrics show, on both databases."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import insert, text

from stainbridge.daemon.commands import status
from stainbridge.daemon.config import LabSettings
from stainbridge.daemon.lab.drift import DRIFT_MIN_CELLS, Week, compare, gather_drift
from stainbridge.daemon.lab.metrics import DatabaseCollector
from stainbridge.daemon.lab.render import render
from stainbridge.daemon.lab.report import Period, gather
from stainbridge.daemon.schema import upgrade_database
from stainbridge.daemon.store import Image, ModelVersion, Prediction, make_engine, make_sessionmaker

MONDAY = datetime(2026, 10, 5, 10, 0, tzinfo=UTC)  # weeks of 2026-10-05 ... 2026-11-02
CELLS = 40


def _seed_drifting_site(url: str) -> None:
    """Five weeks of 40 cells at hospital-d: four of half neutrophils, half lymphocytes at confidence 0.9; then a
    week of 90 % neutrophils at confidence 0.6 with a quarter flagged."""
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
                           "status": "done", "received_at": when, "processed_at": when})
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


def test_a_drifting_week_alerts_in_report_status_and_metrics(database_url: str, settings_factory) -> None:
    """The fifth week moved beyond the bounds: the report lists it with its reasons, `status` says DRIFT, the
    metric is 1; the four baseline weeks raise nothing."""
    _seed_drifting_site(database_url)
    lab = LabSettings()
    engine = make_engine(database_url)
    try:
        with engine.connect() as c:
            [site] = gather_drift(lambda sql: c.execute(text(sql)).all(), lab)
        data = gather(engine, Period(), "test", lab=lab)
        with make_sessionmaker(engine)() as session:
            report = status.collect(settings_factory(database_url=database_url), session)
        families = list(DatabaseCollector(make_sessionmaker(engine), lab).collect())
    finally:
        engine.dispose()
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
