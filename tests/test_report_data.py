"""The report's aggregates and the export's stream on both databases, on a fully known history."""

from __future__ import annotations

from datetime import date

from stainbridge.daemon.commands.export import stream_rows
from stainbridge.daemon.config import LabSettings
from stainbridge.daemon.lab.render import render
from stainbridge.daemon.lab.report import Period, gather
from stainbridge.daemon.store import make_engine
from tests.lab_helpers import seed_known_history


def _gather(url: str, period: Period):
    engine = make_engine(url)
    try:
        return gather(engine, period, "test")
    finally:
        engine.dispose()


def test_report_aggregates_on_both_databases(database_url: str) -> None:
    """Counts, days, histogram, confusion, failures, models and site profile come out of SQL right."""
    seed_known_history(database_url)
    data = _gather(database_url, Period())
    assert data.status_counts == {"done": 3, "duplicate": 1, "failed": 3, "pending": 1}
    assert data.class_counts == [("neutrophil", 2), ("monocyte", 1)]
    assert data.daily == [("2026-11-02", "monocyte", 1), ("2026-11-02", "neutrophil", 1),
                          ("2026-11-03", "neutrophil", 1)]
    assert {i: n for i, n in enumerate(data.histogram) if n} == {8: 1, 11: 1, 18: 1}  # 0.4, 0.55, 0.9
    assert sorted(data.confusion) == [("lymphocyte", "neutrophil", 1), ("monocyte", "monocyte", 1)]
    assert data.accuracy == 0.5
    assert data.failures == [("corrupt", 2), ("empty", 1)]
    assert [s.source_name for s in data.lowest] == ["c.png"]
    # the review queue's first tier, as review export lists it: the shadowed candidate disagrees on c.png
    assert data.disagreements == [(3, "c.png", "hospital-x", "neutrophil", "lymphocyte", "resnet-v3")]
    assert data.disagreements_total == 1
    assert [s.source_name for s in data.grid] == ["c.png", "b.png", "a.png"]
    assert data.usage == [("cyclegan-a", "resnet-v2", True, 1.25, 2), ("cyclegan-a", "resnet-v2", False, 1.25, 1)]
    assert data.site_profile == {"magnification": 1.25, "method": "test"}
    assert data.throughput["done"] == 3 and data.throughput["latency_ms"] == 12.0
    assert [(v["name"], v["state"]) for v in data.versions] == [  # newest first
        ("resnet-v3", "candidate"), ("resnet-v2", "active"), ("resnet-v1", "retired"), ("cyclegan-a", "active")]
    page = render(data)
    assert "Accuracy against 2 reviewed images: <b>50.0%</b>" in page and "magnification" in page
    assert 'id="candidate-disagreements"' in page and "<td>lymphocyte</td>" in page


def test_report_period_and_export_stream_on_both_databases(database_url: str) -> None:
    """--since/--until keep whole UTC days; export streams the same rows, oldest first."""
    seed_known_history(database_url)
    second_day = _gather(database_url, Period.from_dates(date(2026, 11, 3), date(2026, 11, 3)))
    assert second_day.class_counts == [("neutrophil", 1)]
    assert second_day.failures == [("corrupt", 1), ("empty", 1)]
    assert second_day.status_counts == {"done": 1, "duplicate": 1, "failed": 2, "pending": 1}
    rows = list(stream_rows(database_url))
    assert [r["source_name"] for r in rows] == ["a.png", "b.png", "f.png", "c.png", "c-copy.png", "d.png", "e.png",
                                               "g.png"]
    assert rows[0]["label"] == "monocyte" and rows[0]["reviewed_label"] == "monocyte"
    assert rows[0]["received_at"].startswith("2026-11-02T09:00:00")
    assert [r["source_name"] for r in stream_rows(database_url, since=date(2026, 11, 3))][0] == "c.png"


def test_report_specimens_and_one_site_on_both_databases(database_url: str) -> None:
    """The specimen table comes from specimen_differentials; --site keeps that site's rows and names it."""
    seed_known_history(database_url)
    engine = make_engine(database_url)
    try:
        data = gather(engine, Period(), "test", lab=LabSettings(min_cells=3), site="hospital-x")
        elsewhere = gather(engine, Period(), "test", site="hospital-y")
    finally:
        engine.dispose()
    assert data.site_counts == [("hospital-x", 3, 1)]
    assert data.site_classes == {("hospital-x", "monocyte"): 1, ("hospital-x", "neutrophil"): 2}
    [group] = data.specimens
    assert (group.site, group.total, group.labels) == ("hospital-x", 1, ["monocyte", "neutrophil"])
    [row] = group.rows
    assert (row.specimen, row.counted, row.flagged) == ("BS-1", 2, 1)
    assert row.classes == {"monocyte": (1, 50.0, 0), "neutrophil": (1, 50.0, 1)}
    assert row.flags == ["2 cells counted (fewer than 3)", "1 flagged for review"]
    page = render(data)
    assert "site hospital-x" in page and 'data-label="neutrophil">50.0 (1)</td>' in page
    assert elsewhere.status_counts == {} and elsewhere.specimens == [] and elsewhere.sites == []


def test_report_refuses_an_unknown_site_naming_the_known_ones(tmp_path, run_stainbridge) -> None:
    """`report --site` with a typo: exit 1 and the sites the database knows."""
    url = f"sqlite:///{tmp_path / 'stainbridge.db'}"
    seed_known_history(url)
    result = run_stainbridge("report", "--site", "hospital-z", "--out", str(tmp_path / "r.html"),
                             env={"STAINBRIDGE_DATABASE_URL": url})
    assert result.returncode == 1 and "known sites: hospital-x" in result.stderr
    assert not (tmp_path / "r.html").exists()
