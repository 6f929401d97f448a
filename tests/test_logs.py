"""Logging: JSON lines for machines, stdlib loggers routed through structlog, no patient identifiers."""

from __future__ import annotations

import io
import json
import logging

import pytest

from stainbridge.daemon.logs import configure_logging, get_logger

pytestmark = pytest.mark.usefixtures("restore_logging")


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_with_iso_utc_timestamp() -> None:
    """A non-terminal stream gets one JSON object per event with bound context and a UTC timestamp."""
    out = io.StringIO()
    configure_logging("info", "auto", stream=out)
    get_logger("stainbridge.test").bind(image="abc123").info("classified", label="lymphocyte", confidence=0.93)
    [event] = lines(out)
    assert event["event"] == "classified" and event["image"] == "abc123" and event["confidence"] == 0.93
    assert event["level"] == "info" and event["logger"] == "stainbridge.test"
    assert event["timestamp"].endswith("Z") and "T" in event["timestamp"]


def test_stdlib_loggers_are_routed_through_structlog() -> None:
    """Records from libraries such as SQLAlchemy and APScheduler come out as the same JSON lines."""
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    logging.getLogger("apscheduler.scheduler").warning("job %s missed", "retrain")
    [event] = lines(out)
    assert event == {**event, "event": "job retrain missed", "level": "warning", "logger": "apscheduler.scheduler"}


def test_level_filters_events() -> None:
    """Events below the configured level are dropped."""
    out = io.StringIO()
    configure_logging("warning", "json", stream=out)
    get_logger("t").info("quiet")
    get_logger("t").warning("loud")
    assert [e["event"] for e in lines(out)] == ["loud"]


def test_configuring_twice_does_not_duplicate_output() -> None:
    """configure_logging is idempotent: one handler, one line per event."""
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    configure_logging("info", "json", stream=out)
    get_logger("t").info("once")
    assert len(lines(out)) == 1


def test_patient_identifiers_never_appear() -> None:
    """Patient names, IDs and birth dates are masked in any spelling, nested, or from stdlib extras."""
    out = io.StringIO()
    configure_logging("debug", "json", stream=out)
    log = get_logger("t")
    log.info("decoded", PatientName="Doe^Jane", patient_id="PID-778899", PATIENTBIRTHDATE="19700101",
             patient_pseudonym="3f2a", tags={"PatientID": "PID-778899", "Patient's Name": "Roe^Richard"})
    log.warning("odd header value Roe^Richard^Q seen")
    logging.getLogger("pydicom").warning("bad tag", extra={"patient_name": "Doe^Jane"})
    text = out.getvalue()
    for secret in ("Doe", "Jane", "PID-778899", "19700101", "Roe", "Richard"):
        assert secret not in text
    first = lines(out)[0]
    assert first["patient_pseudonym"] == "3f2a"
    assert first["PatientName"] == "[redacted]"


def test_console_format_is_readable_text() -> None:
    """fmt='console' renders key=value text instead of JSON, still without identifiers."""
    out = io.StringIO()
    configure_logging("info", "console", stream=out)
    get_logger("t").info("started", workers=2, patient_name="Doe^Jane")
    text = out.getvalue()
    assert "started" in text and "workers=2" in text and "Doe" not in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_bad_level_is_rejected() -> None:
    """An unknown level is an error naming the allowed ones."""
    with pytest.raises(ValueError, match="debug, info, warning, error"):
        configure_logging("verbose")
