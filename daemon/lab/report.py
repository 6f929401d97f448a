"""`stainbridge report`: what came in, what the models said, whether to trust it; the numbers.

Every count is an aggregate computed by the database (GROUP BY over the lab views, see
daemon/lab/views.py), so a year of results costs a handful of queries and the rows that reach Python
are bounded: classes x days, 20 histogram bins, a few dozen images for the picture grids, the model
registry. Rendering (plots, thumbnails, the HTML template) lives in daemon/lab/render.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from datetime import date, datetime, time, timedelta, timezone
from typing import Any

from sqlalchemy import DateTime, bindparam, text
from sqlalchemy.engine import Engine

from stainbridge.daemon.config import LabSettings
from stainbridge.daemon.lab.drift import SiteDrift, gather_drift
from stainbridge.daemon.lab.specimens import SiteSpecimens, gather_specimens
from stainbridge.daemon.lab.views import day_sql, reason_sql

HISTOGRAM_BINS = 20
GRID_IMAGES = 12  # incoming images shown before and after standardization
REVIEW_IMAGES = 12  # lowest-confidence unreviewed images shown for review
DISAGREEMENT_ROWS = 50  # cells where a shadowed candidate disagrees, listed for review first
EARLIEST = datetime(1970, 1, 1, tzinfo=timezone.utc)
LATEST = datetime(9999, 1, 1, tzinfo=timezone.utc)


@dataclass
class Period:
    """[since, until) in UTC; the command's --until DATE includes that whole day."""

    since: datetime = EARLIEST
    until: datetime = LATEST

    @classmethod
    def from_dates(cls, since: date | None, until: date | None) -> "Period":
        start = datetime.combine(since, time(), timezone.utc) if since else EARLIEST
        end = datetime.combine(until + timedelta(days=1), time(), timezone.utc) if until else LATEST
        if end <= start:
            raise ValueError(f"--until {until} is before --since {since}; give an --until on or after --since")
        return cls(start, end)

    def describe(self) -> str:
        since = "the first result" if self.since == EARLIEST else self.since.date().isoformat()
        until = "now" if self.until == LATEST else (self.until - timedelta(days=1)).date().isoformat()
        return f"{since} to {until}"


@dataclass
class Shown:
    """One image in a picture grid: where its files are and what the models said."""

    image_id: int
    source_name: str
    label: str
    confidence: float
    archive_path: str | None
    reviewed_label: str | None = None
    site: str | None = None


@dataclass
class ReportData:
    period: Period
    generated_at: datetime
    database: str
    status_counts: dict[str, int] = field(default_factory=dict)
    class_counts: list[tuple[str, int]] = field(default_factory=list)
    daily: list[tuple[str, str, int]] = field(default_factory=list)  # (day, label, images)
    histogram: list[int] = field(default_factory=lambda: [0] * HISTOGRAM_BINS)
    grid: list[Shown] = field(default_factory=list)
    lowest: list[Shown] = field(default_factory=list)
    # cells `review export` lists first (view candidate_disagreements, any period): (image_id, source_name, site,
    # active label, candidate label, candidate); and how many there are in all
    disagreements: list[tuple[int, str, str, str, str, str]] = field(default_factory=list)
    disagreements_total: int = 0
    confusion: list[tuple[str, str, int]] = field(default_factory=list)  # (reviewed, predicted, n)
    failures: list[tuple[str, int]] = field(default_factory=list)
    throughput: dict[str, Any] = field(default_factory=lambda: _throughput((0, None, None, None)))
    site_profile: dict[str, Any] = field(default_factory=dict)
    versions: list[dict[str, Any]] = field(default_factory=list)
    usage: list[tuple[str, str, int]] = field(default_factory=list)  # (standardizer, classifier, predictions)
    runs: list[dict[str, Any]] = field(default_factory=list)
    sites: list[tuple[str, str]] = field(default_factory=list)  # (site, its validation line)
    site: str | None = None  # --site: the report is about this site only
    site_counts: list[tuple[str, int, int]] = field(default_factory=list)  # (site, classified, flagged)
    site_classes: dict[tuple[str, str], int] = field(default_factory=dict)  # (site, predicted class) -> cells
    specimens: list[SiteSpecimens] = field(default_factory=list)  # per site, its specimens' differentials
    drift: list[SiteDrift] = field(default_factory=list)  # per site, its weeks in the period and their alerts

    @property
    def reviewed(self) -> int:
        return sum(n for _, _, n in self.confusion)

    @property
    def accuracy(self) -> float | None:
        agree = sum(n for truth, predicted, n in self.confusion if truth == predicted)
        return agree / self.reviewed if self.reviewed else None


def _text(sql: str) -> Any:
    # Typed binds: on SQLite the bounds are written exactly as the ORM writes received_at.
    return text(sql).bindparams(bindparam("since", type_=DateTime(timezone=True)),
                                bindparam("until", type_=DateTime(timezone=True)))


IN_PERIOD = "received_at >= :since AND received_at < :until"


def gather(engine: Engine, period: Period, database: str, *, lab: LabSettings | None = None,
           site: str | None = None) -> ReportData:
    """Run the report's aggregate queries (of one `site`, or all); nothing here grows with the number of images."""
    data = ReportData(period=period, generated_at=datetime.now(timezone.utc), database=database, site=site)
    dialect = engine.dialect.name
    bounds: dict[str, Any] = {"since": period.since, "until": period.until, **({"site": site} if site else {})}
    where = IN_PERIOD + (" AND site = :site" if site else "")
    of_site = "WHERE site = :site" if site else ""
    with engine.connect() as c:
        def rows(sql: str) -> list[Any]:
            return list(c.execute(_text(sql), bounds))

        data.status_counts = {status: n for status, n in rows(
            f"SELECT status, COUNT(*) FROM images WHERE {where} GROUP BY status")}
        data.class_counts = [(label, n) for label, n in rows(
            f"SELECT label, COUNT(*) AS n FROM latest_results WHERE {where} GROUP BY label ORDER BY n DESC, label")]
        day = day_sql(dialect, "received_at")
        data.daily = [(str(d), label, n) for d, label, n in rows(
            f"SELECT {day} AS day, label, COUNT(*) FROM latest_results WHERE {where} "
            f"GROUP BY {day}, label ORDER BY day, label")]
        bin_sql = (f"CAST(confidence * {HISTOGRAM_BINS} AS INTEGER)" if dialect == "sqlite"
                   else f"CAST(FLOOR(confidence * {HISTOGRAM_BINS}) AS INTEGER)")
        for bucket, n in rows(f"SELECT {bin_sql} AS b, COUNT(*) FROM latest_results WHERE {where} GROUP BY b"):
            data.histogram[min(max(int(bucket), 0), HISTOGRAM_BINS - 1)] += n
        shown = ("SELECT image_id, source_name, label, confidence, archive_path, reviewed_label, site FROM {view} "
                 f"WHERE {where} ORDER BY {{order}} LIMIT {{limit}}")
        newest = shown.format(view="latest_results", order="received_at DESC, image_id DESC", limit=GRID_IMAGES)
        data.grid = [Shown(*r) for r in rows(newest)]
        lowest = shown.replace("reviewed_label, site FROM", "NULL AS reviewed_label, site FROM")
        data.lowest = [Shown(*r) for r in rows(lowest.format(view="low_confidence_queue", order="confidence, image_id",
                                                             limit=REVIEW_IMAGES))]
        disagree = f"FROM candidate_disagreements {'WHERE site = :site' if site else ''}"
        data.disagreements = [tuple(r) for r in c.execute(text(
            f"SELECT image_id, source_name, site, label, candidate_label, candidate {disagree} "
            f"ORDER BY COALESCE(calibrated_confidence, confidence), image_id LIMIT {DISAGREEMENT_ROWS}"), bounds)]
        data.disagreements_total = int(c.execute(text(f"SELECT COUNT(*) {disagree}"), bounds).scalar_one())
        data.confusion = [tuple(r) for r in rows(
            f"SELECT reviewed_label, label, COUNT(*) FROM latest_results WHERE reviewed_label IS NOT NULL "
            f"AND {where} GROUP BY reviewed_label, label")]
        reason = reason_sql(dialect)
        data.failures = [(r, n) for r, n in rows(
            f"SELECT {reason} AS reason, COUNT(*) AS n FROM images WHERE status = 'failed' AND {where} "
            "GROUP BY reason ORDER BY n DESC, reason")]
        data.throughput = _throughput(rows(
            f"SELECT COUNT(*), MIN(processed_at), MAX(processed_at), AVG(latency_ms) FROM results "
            f"WHERE status = 'done' AND {where}")[0])
        data.usage = [(std, clf, None if tta is None else bool(tta), magnification, n) for std, clf, tta, magnification, n
                      in rows(f"SELECT COALESCE(standardizer, '-'), classifier, tta, magnification, COUNT(*) AS n "
                              f"FROM latest_results WHERE {where} "
                              "GROUP BY standardizer, classifier, tta, magnification ORDER BY n DESC, tta")]
        data.versions = [dict(r._mapping) for r in c.execute(text(
            f"SELECT id, kind, name, state, sha256, created_at, promoted_at, reason, header, site FROM model_versions "
            f"{of_site} ORDER BY created_at DESC, id DESC LIMIT 50"), bounds)]
        data.sites = [(name, line) for name, line in c.execute(text(
            f"SELECT site, validation FROM site_validation {of_site} ORDER BY site"), bounds)]
        per_site: dict[str, list[int]] = {}
        for name, label, n, flagged in rows("SELECT site, label, COUNT(*), SUM(CASE WHEN needs_review THEN 1 ELSE 0 "
                                            f"END) FROM latest_results WHERE {where} GROUP BY site, label"):
            data.site_classes[(name, label)] = int(n)
            totals = per_site.setdefault(name, [0, 0])
            totals[0], totals[1] = totals[0] + int(n), totals[1] + int(flagged or 0)
        data.site_counts = [(name, n, flagged) for name, (n, flagged) in sorted(per_site.items())]
        data.specimens = gather_specimens(rows, lab or LabSettings(), site)
        first, last = (period.since.date().isoformat(), period.until.date().isoformat())
        data.drift = [replace(d, weeks=[w for w in d.weeks if first <= w.week < last],
                              alerts=[a for a in d.alerts if first <= a.week < last])
                      for d in gather_drift(lambda sql: list(c.execute(text(sql), bounds)), lab or LabSettings(), site)]
        data.runs = [dict(r._mapping) for r in c.execute(text(
            "SELECT id, kind, status, trigger, images_used, reason, started_at, finished_at FROM training_runs "
            "ORDER BY started_at DESC, id DESC LIMIT 20"))]
    active_std = next((v for v in data.versions if v["kind"] == "standardizer" and v["state"] == "active"), None)
    header = _as_dict(active_std["header"]) if active_std else {}
    data.site_profile = _as_dict(header.get("site_profile"))
    for version in data.versions:
        version.pop("header", None)
    return data


def _as_dict(value: Any) -> dict[str, Any]:
    if isinstance(value, str):  # JSON read through a plain text() query on SQLite
        try:
            value = json.loads(value)
        except ValueError:
            return {}
    return value if isinstance(value, dict) else {}


def _as_datetime(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value))  # SQLite returns MIN/MAX of timestamps as text


def _throughput(row: Any) -> dict[str, Any]:
    done, first, last, latency = row
    first, last = _as_datetime(first), _as_datetime(last)
    span = (last - first).total_seconds() if first and last else 0.0
    return {
        "done": int(done or 0),
        "first": first,
        "last": last,
        "per_hour": (done / span * 3600) if span > 0 else None,
        "latency_ms": float(latency) if latency is not None else None,
    }

