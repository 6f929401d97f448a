"""Small checks of the lab surface that need no service: escaping, missing files, metrics settings."""

from __future__ import annotations

import socket
from datetime import date, datetime, timezone

import pytest

from stainbridge.daemon.config import ConfigError
from stainbridge.daemon.lab.metrics import ServiceMetrics, start_metrics
from stainbridge.daemon.lab.render import render
from stainbridge.daemon.lab.report import Period, ReportData, Shown


def test_report_escapes_what_comes_from_files_and_says_when_a_picture_is_gone(tmp_path) -> None:
    """A file name is text, never markup; an archived file that was moved away shows as such."""
    data = ReportData(period=Period(), generated_at=datetime.now(timezone.utc), database="sqlite:///x.db")
    data.status_counts = {"done": 1}
    data.grid = [Shown(1, "<script>alert(1)</script>.png", "monocyte", 0.5, str(tmp_path / "gone.png"))]
    page = render(data)
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;.png" in page
    assert "file moved" in page and "not saved" in page


def test_period_includes_the_until_day_and_refuses_a_backwards_range() -> None:
    period = Period.from_dates(date(2026, 11, 1), date(2026, 11, 30))
    assert period.since == datetime(2026, 11, 1, tzinfo=timezone.utc)
    assert period.until == datetime(2026, 12, 1, tzinfo=timezone.utc)
    assert period.describe() == "2026-11-01 to 2026-11-30"
    with pytest.raises(ValueError, match="--until"):
        Period.from_dates(date(2026, 11, 2), date(2026, 11, 1))


def test_metrics_are_off_by_default_and_a_taken_port_is_a_clear_error(settings_factory) -> None:
    assert settings_factory().metrics.port == 0
    assert start_metrics(settings_factory(), sessions=None, queue_depth=lambda: 0) is None  # type: ignore[arg-type]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        metrics = ServiceMetrics(settings_factory(), sessions=None, queue_depth=lambda: 0)  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match=rf"127\.0\.0\.1:{port}.*\[metrics\] port = 0"):
            metrics.serve(port, "127.0.0.1")


def test_the_report_shows_a_dicom_with_a_patient_id_without_the_pseudonym_secret(tmp_path, monkeypatch) -> None:
    """An archived DICOM that carries a PatientID, and a configuration without the pseudonym secret (the report
    only draws pixels): `stainbridge report` exits 0 with its thumbnail (before: exit 1, PseudonymSecretMissing)."""
    from sqlalchemy import text

    from stainbridge.daemon import cli
    from stainbridge.daemon.store import make_engine
    from tests import dicom_factory
    from tests.lab_helpers import seed_known_history

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    seed_known_history(url)
    scan = tmp_path / "archive" / "scan.dcm"
    scan.parent.mkdir()
    dicom_factory.write_rgb(scan, patient_id="PAT-000123")
    engine = make_engine(url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE images SET source_name = 'scan.dcm', archive_path = :p WHERE id = 3"),
                           {"p": str(scan)})
    engine.dispose()
    monkeypatch.setenv("STAINBRIDGE_DATABASE_URL", url)
    out = tmp_path / "report.html"
    assert cli.main(["report", "--out", str(out)]) == 0
    page = out.read_text(encoding="utf-8")
    assert 'alt="received scan.dcm" src="data:image/jpeg;base64,' in page and "PAT-000123" not in page
