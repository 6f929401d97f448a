"""`stainbridge status [--json]`: what the service has done and what is waiting.

Reads the database and the drop folder only; it never needs the models or a GPU, so it can run
while the service is busy. It creates nothing: without a database where the configuration points
it says which one it looked for and exits 1; a database older than this code asks for `stainbridge
db upgrade`. It also shows recorded files that could not be filed yet (a read-only drop folder, an
archive that is not mounted) and what is wrong with the configured folders.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from stainbridge.daemon import diskspace
from stainbridge.daemon import folders as configured_folders
from stainbridge.daemon.config import ConfigError, Settings, load_settings
from stainbridge.daemon.config_values import schedule_trigger
from stainbridge.daemon.intake.walking import is_ignored_name
from stainbridge.daemon.lab.drift import gather_drift
from stainbridge.daemon.retraining.shadowing import shadow_summaries
from stainbridge.daemon.schema import (
    SchemaError,
    require_database,
    safe_url,
)
from stainbridge.daemon.service.heartbeat import is_stale
from stainbridge.daemon.store import (
    Image,
    ImageStatus,
    ModelKind,
    ModelVersion,
    Review,
    TrainingRun,
    VersionState,
    Worker,
    make_engine,
    make_sessionmaker,
    utcnow,
)
from stainbridge.daemon.versions.registry import active_versions
from stainbridge.daemon.versions.serving import served
from stainbridge.daemon.versions.site_state import site_summaries


def error_reason(error: str | None) -> str:
    """The short reason code of a stored error ("decode: truncated file" -> "decode")."""
    if not error:
        return "unknown"
    head = error.split(":", 1)[0].strip()
    return head if head and " " not in head else "other"


def count_waiting(settings: Settings) -> int:
    """Files in the drop folder that the watcher will take (hidden and temporary names excluded)."""
    drop = settings.drop_dir
    if not drop.is_dir():
        return 0
    skip = (settings.archive_dir, settings.quarantine_dir)
    waiting = 0
    for path in drop.rglob("*"):
        if any(path == s or s in path.parents for s in skip):
            continue
        if any(is_ignored_name(part) for part in path.relative_to(drop).parts):
            continue
        if path.is_file() or path.is_symlink():
            waiting += 1
    return waiting


def next_retraining(settings: Settings, now: datetime | None = None) -> str:
    if not settings.retraining.enabled:
        return "disabled"
    trigger = schedule_trigger(settings.retraining.schedule)
    now = now or datetime.now(trigger.timezone)
    fire = trigger.get_next_fire_time(None, now)
    seconds = len(settings.retraining.schedule.split()) == 6  # a schedule with a seconds field
    return fire.isoformat(timespec="seconds" if seconds else "minutes") if fire else "never"


@dataclass
class StatusReport:
    site: str
    database: str
    drop_folder: str
    waiting: int
    processed_today: int
    failed_today: int
    failed_total: int
    failures_by_reason: dict[str, int]
    duplicates_total: int
    processing: int
    throughput_per_min: float
    models: list[dict[str, Any]] = field(default_factory=list)
    next_retraining: str = "disabled"
    reviews_total: int = 0
    candidates: int = 0
    last_retraining: dict[str, dict[str, Any] | None] = field(default_factory=dict)  # per kind; None: no run yet
    disk: list[dict[str, Any]] = field(default_factory=list)  # free space per volume written to
    disk_short: str | None = None  # why the service takes no files now, if a volume is below [paths] min_free_mb
    unfiled: int = 0  # recorded, but still in the drop folder: filing fails (read-only drop, archive not mounted)
    unfiled_since: str | None = None  # when the oldest of them was recorded
    folder_problems: list[str] = field(default_factory=list)  # what is wrong with the configured folders
    # every site's validation state: `stainbridge sites --json` objects plus the "validation" line
    sites: list[dict[str, Any]] = field(default_factory=list)
    # what each running worker serves per site (daemon.versions.serving), and a hot swap it refused
    serving: list[dict[str, Any]] = field(default_factory=list)
    # the service's heartbeat (daemon.service.heartbeat): "running", "not running", or "never started"
    service: str = "never started"
    workers: list[dict[str, Any]] = field(default_factory=list)  # live ones, else the newest that went silent
    last_processed_at: str | None = None  # the newest processed_at of any image, whichever worker did it
    drift: list[str] = field(default_factory=list)  # sites whose latest week drifted from their baseline, in words
    # per site, the candidate that awaits evidence and is shadowed (daemon.retraining.shadowing.ShadowSummary)
    shadow: list[dict[str, Any]] = field(default_factory=list)


def _local_midnight_utc() -> datetime:
    local_now = datetime.now().astimezone()
    midnight = local_now.replace(hour=0, minute=0, second=0, microsecond=0)
    return midnight.astimezone(UTC)


def _count(session: Session, *conditions: Any) -> int:
    return int(session.scalar(select(func.count(Image.id)).where(*conditions)) or 0)


def collect(settings: Settings, session: Session) -> StatusReport:
    """Gather the report from the database and the drop folder."""
    today = _local_midnight_utc()
    folders = diskspace.written_folders(settings)
    hour_ago = utcnow() - timedelta(hours=1)
    finished = Image.status.in_([ImageStatus.done, ImageStatus.failed])
    failed = Image.status == ImageStatus.failed
    reasons: dict[str, int] = {}
    for error, n in session.execute(select(Image.error, func.count(Image.id)).where(failed).group_by(Image.error)):
        reasons[error_reason(error)] = reasons.get(error_reason(error), 0) + int(n)
    last_hour = _count(session, finished, Image.processed_at >= hour_ago)
    serving = served(session)
    models = [{"site": v.site, "kind": v.kind.value, "name": v.name, "sha256": v.sha256[:12], "id": v.id,
               **_served_state(v.site, v.kind.value, v.id, serving)} for v in active_versions(session)]
    return StatusReport(
        site=settings.site.name,
        database=safe_url(settings.database_url),
        drop_folder=str(settings.drop_dir),
        waiting=count_waiting(settings),
        processed_today=_count(session, Image.status == ImageStatus.done, Image.processed_at >= today),
        failed_today=_count(session, failed, Image.processed_at >= today),
        failed_total=_count(session, failed),
        failures_by_reason=dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
        duplicates_total=_count(session, Image.status == ImageStatus.duplicate),
        processing=_count(session, Image.status.in_([ImageStatus.pending, ImageStatus.processing])),
        throughput_per_min=round(last_hour / 60.0, 2),
        models=models,
        next_retraining=next_retraining(settings),
        **_retraining_status(session),
        disk=[{"role": v.role, "folder": str(v.folder), "free_mb": round(v.free_bytes / diskspace.MIB)}
              for v in diskspace.volumes(folders)],
        disk_short=diskspace.shortage(folders, settings.paths.min_free_mb),
        **_unfiled(session),
        folder_problems=configured_folders.problems(settings, probe=False),
        sites=[{**summary.as_json(), "validation": summary.validation} for summary in site_summaries(session)],
        serving=serving,
        **_liveness(session),
        drift=[d.latest_alert.describe() for d in gather_drift(lambda sql: session.execute(text(sql)).all(),
                                                                   settings.lab) if d.latest_alert],
        shadow=[summary.as_json() for summary in shadow_summaries(session, settings.retraining)],
    )


def _served_state(site: str, kind: str, version_id: int, serving: list[dict[str, Any]]) -> dict[str, Any]:
    """Whether the running workers serve a site's active version: ``served`` None (no worker serves the site
    now), True, or False with ``not_served`` saying what they serve instead and why."""
    workers = [row for row in serving if row["site"] == site]
    if not workers:
        return {"served": None, "not_served": None}
    behind = [row for row in workers if (row[kind] or {}).get("id") != version_id]
    if not behind:
        return {"served": True, "not_served": None}
    row = behind[0]
    why = (f"swap refused: {row['refused_reason']}" if row["refused"] and row["refused"]["id"] == version_id
           else "switches at the next poll")
    return {"served": False, "not_served": f"{len(behind)} of {len(workers)} worker(s) still serve version "
                                          f"{(row[kind] or {}).get('id')} ({(row[kind] or {}).get('name')}); {why}"}


def _aware(value: datetime | None) -> datetime | None:
    return value if value is None or value.tzinfo else value.replace(tzinfo=UTC)  # SQLite drops the zone


def _liveness(session: Session) -> dict[str, Any]:
    """Whether a service beats (its `workers` rows), and when any file was last processed."""
    now = utcnow()
    rows = session.scalars(select(Worker).order_by(Worker.heartbeat_at.desc()).limit(50)).all()
    live = [row for row in rows if not is_stale(row, now)]
    shown = live or rows[:1]
    workers = [{"worker": row.worker, "running": row in live, "state": row.state, "reason": row.reason,
                "version": row.version, "heartbeat_at": _aware(row.heartbeat_at).isoformat(timespec="seconds"),
                "heartbeat_age_s": round((now - _aware(row.heartbeat_at)).total_seconds()),
                "handled": row.handled, "started_at": _aware(row.started_at).isoformat(timespec="seconds"),
                "last_processed_at": (_aware(row.last_processed_at).isoformat(timespec="seconds")
                                      if row.last_processed_at else None)} for row in shown]
    last = _aware(session.scalar(select(func.max(Image.processed_at)).where(Image.status == ImageStatus.done)))
    return {"service": "running" if live else "not running" if rows else "never started", "workers": workers,
            "last_processed_at": last.isoformat(timespec="seconds") if last else None}


UNFILED_AFTER_SECONDS = 60  # a file is moved within a second of its row's commit: older ones are stuck


def _unfiled(session: Session) -> dict[str, Any]:
    """Recorded files whose move out of the drop folder has not happened (the service retries them)."""
    recorded = Image.status.in_([ImageStatus.done, ImageStatus.failed, ImageStatus.duplicate])
    before = utcnow() - timedelta(seconds=UNFILED_AFTER_SECONDS)
    count, oldest = session.execute(select(func.count(Image.id), func.min(Image.processed_at)).where(
        recorded, Image.archive_path.is_(None), Image.processed_at < before)).one()
    return {"unfiled": int(count or 0), "unfiled_since": oldest.isoformat(timespec="seconds") if oldest else None}


def _latest_run(session: Session, kind: ModelKind) -> dict[str, Any] | None:
    """The latest retraining run of one kind with its outcome (None: no run of that kind yet)."""
    last = session.scalars(select(TrainingRun).where(TrainingRun.kind == kind)
                           .order_by(TrainingRun.id.desc()).limit(1)).first()
    if last is None:
        return None
    running = last.status.value == "running"
    return {"run_id": last.id, "status": last.status.value, "started_at": last.started_at.isoformat(),
            "reason": last.reason, "candidate_id": last.model_version_id,
            # a run in progress: where it is (retraining.runs.mark_stage) and the log to follow
            "stage": ((last.params or {}).get("stage") or "preparing") if running else None,
            # its training child's process id while it trains (retraining.runs.record_pid)
            "pid": (last.params or {}).get("pid") if running else None,
            "log_path": last.log_path}


def _retraining_status(session: Session) -> dict[str, Any]:
    """Reviews recorded, candidates waiting, and the last retraining run of each kind with its outcome.

    Each kind on its own: a night with expert reviews runs the standardizer and then the classifier
    fine-tuning, and the standardizer's run must not disappear behind the later one.
    """
    return {
        "reviews_total": int(session.scalar(select(func.count(Review.id)).where(Review.superseded_at.is_(None))) or 0),
        "candidates": int(session.scalar(select(func.count(ModelVersion.id))
                                         .where(ModelVersion.state == VersionState.candidate)) or 0),
        "last_retraining": {kind.value: _latest_run(session, kind) for kind in ModelKind},
    }


def _service_lines(report: StatusReport) -> list[str]:
    if report.service == "never started":
        return ["service             NOT RUNNING (no heartbeat: `stainbridge run` never ran against this database)"]
    lines = []
    for w in report.workers:
        if w["running"]:
            why = f": {w['reason']}" if w["reason"] else ""
            lines.append(f"service             running, {w['state']}{why} ({w['worker']}, heartbeat {w['heartbeat_age_s']} s "
                         f"ago, version {w['version']}, {w['handled']} file(s) since {w['started_at']})")
        elif w["state"] == "stopped":
            lines.append(f"service             NOT RUNNING (stopped at {w['heartbeat_at']}, {w['worker']})")
        else:
            lines.append(f"service             NOT RUNNING (last heartbeat {w['heartbeat_age_s']} s ago from {w['worker']}, "
                         f"state then: {w['state']}; it was killed or the machine went down: see its log)")
    return lines


def _shadow_line(s: dict[str, Any]) -> str:
    share = "" if s["disagreement_share"] is None else f" ({s['disagreement_share']:.0%})"
    off = "; shadowing is off ([retraining] shadow_share = 0)" if s["share"] <= 0 else ""
    return (f"candidate {s['kind']} version {s['version']} ({s['name']}) awaits evidence: {s['cells']} cell(s) "
            f"shadowed, {s['disagreements']} disagree{share}; the gate has {s['reviews']} of {s['reviews_needed']} "
            f"reviewed cells{off}")


def render(report: StatusReport) -> str:
    lines = [
        *_service_lines(report),
        f"last processed      {report.last_processed_at or 'never'}",
        f"site                {report.site}",
        f"database            {report.database}",
        f"drop folder         {report.drop_folder}",
        f"waiting             {report.waiting} file(s) in the drop folder, {report.processing} claimed",
        f"processed today     {report.processed_today}",
        f"failed              {report.failed_today} today, {report.failed_total} in total",
    ]
    for reason, n in report.failures_by_reason.items():
        lines.append(f"  {reason:<18} {n}")  # a space even after an 18-character reason (unsupported_format)
    lines += [
        f"duplicates          {report.duplicates_total} in total",
        f"throughput          {report.throughput_per_min:.2f} images/min over the last hour",
    ]
    for site in report.sites:
        lines.append(f"site {site['site']}: {site['validation']}")
    if report.models:
        several = len({model["site"] for model in report.models}) > 1
        for model in report.models:
            lines.append(f"{model['kind']:<20}{model['name']}  sha256 {model['sha256']}"
                         + (f"  (site {model['site']})" if several else ""))
            if model["served"] is False:
                lines.append(f"{'  NOT SERVED':<20}{model['not_served']}")
    else:
        lines.append("models              none registered yet (the service records them at start-up)")
    lines.append(f"next retraining     {report.next_retraining}")
    for kind, last in report.last_retraining.items():
        label = f"last {kind}"
        if last is None:
            lines.append(f"{label:<20}none yet")
        else:
            lines.append(f"{label:<20}run {last['run_id']} {last['status']} ({last['started_at'][:16]}): "
                         + (f"stage {last['stage']}, " + (f"pid {last['pid']}, " if last["pid"] else "")
                            + f"log {last['log_path'] or '(not yet)'}" if last["stage"] else str(last["reason"])))
    lines.append(f"reviews             {report.reviews_total} recorded, {report.candidates} candidate model(s) waiting")
    for shadow in report.shadow:
        lines.append(f"{'shadow ' + shadow['site']:<20}" + _shadow_line(shadow))
    for volume in report.disk:
        lines.append(f"{'free, ' + volume['role']:<20}{volume['free_mb']} MiB ({volume['folder']})")
    if report.disk_short:
        lines.append(f"PAUSED              {report.disk_short}; no files are taken until space is freed")
    if report.unfiled:
        lines.append(f"NOT FILED           {report.unfiled} recorded file(s) still in the drop folder (oldest "
                     f"{report.unfiled_since}): the service cannot move them; see its log (filing_failed)")
    for line in report.drift:
        lines.append(f"DRIFT               {line} (stainbridge report, docs/lab.md)")
    for problem in report.folder_problems:
        lines.append(f"FOLDER              {problem}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")


def run(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config)
        require_database(settings.database_url, settings.source)
    except (ConfigError, SchemaError) as exc:
        print(f"stainbridge status: {exc}", file=sys.stderr)
        return 1
    engine = make_engine(settings.database_url)
    try:
        with make_sessionmaker(engine)() as session:
            report = collect(settings, session)
    finally:
        engine.dispose()
    print(json.dumps(asdict(report), indent=2) if args.json else render(report))
    return 0
