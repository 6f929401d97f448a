"""Prometheus metrics of `stainbridge run` (`[metrics] port`; off when 0, the default).

What this worker did since it started (counters and histograms, kept in memory):
``stainbridge_files_processed_total{outcome}``, ``stainbridge_files_failed_total{reason}``,
``stainbridge_filing_failures_total`` (recorded files that could not be moved out of the drop folder),
``stainbridge_predictions_total{label,flagged}``, ``stainbridge_confidence`` and ``stainbridge_batch_seconds``;
``stainbridge_last_processed_timestamp_seconds``, ``stainbridge_service_state{state}`` (the heartbeat's, see
``daemon.service.heartbeat``) and ``stainbridge_build_info{version}``. What is true now (read at each scrape):
``stainbridge_queue_depth`` (files the watcher tracks as waiting or ready: its own count, no walk of the drop
folder), ``stainbridge_served_model_info{site,kind,name,sha256}`` (the versions this worker serves: a promotion
shows here once the hot swap has loaded it), ``stainbridge_model_swap_refused{site}`` (1 while this worker refuses
a promoted version; it retries at every poll), ``stainbridge_active_model_info{site,kind,name,sha256}`` (the
registry's active versions), ``stainbridge_last_successful_retraining_timestamp_seconds`` and, per site whose
candidate awaits evidence (docs/retraining.md, "Shadow"), ``stainbridge_shadow_candidate_info{site,kind,name,version}``,
``stainbridge_shadow_cells{site}``, ``stainbridge_shadow_disagreement_share{site}``,
``stainbridge_shadow_gate_reviews{site}`` and ``stainbridge_shadow_gate_reviews_needed{site}`` from the database.

The endpoint is plain HTTP without authentication: it listens on 127.0.0.1 unless ``[metrics]
address`` says otherwise; expose it only to the lab's monitoring network.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timezone
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector
from sqlalchemy import func, select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import sessionmaker

from stainbridge.daemon import diskspace
from stainbridge.daemon.config import ConfigError, LabSettings, RetrainingSettings, Settings
from stainbridge.daemon.intake import claims
from stainbridge.daemon.lab.drift import gather_drift
from stainbridge.daemon.logs import get_logger
from stainbridge.daemon.retraining.shadowing import ShadowSummary, shadow_summaries
from stainbridge.daemon.store import RunStatus, TrainingRun
from stainbridge.daemon.versions.registry import active_versions
from stainbridge.daemon.versions.serving import served
from stainbridge.daemon.versions.site_state import site_summaries

if TYPE_CHECKING:  # the batch imports the networks (torch); status reads the metrics' states without them
    from stainbridge.daemon.pipeline.batch import BatchReport

log = get_logger(__name__)


def build_version() -> str:
    """The installed stainbridge version (``unknown`` for a source tree that is not installed)."""
    try:
        return package_version("stainbridge")
    except PackageNotFoundError:
        return "unknown"
BATCH_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CONFIDENCE_BUCKETS = tuple(round(0.1 * i, 1) for i in range(1, 10)) + (0.95, 0.99)
STATES = ("ready", "paused", "retrying", "unhealthy", "stopped")  # daemon.service.heartbeat says which


class DatabaseCollector(Collector):
    """Gauges read from the database at scrape time; a database that does not answer yields none."""

    def __init__(self, sessions: sessionmaker, lab: LabSettings | None = None,
                 retraining: RetrainingSettings | None = None) -> None:
        self.sessions = sessions
        self.lab = lab or LabSettings()
        self.retraining = retraining or RetrainingSettings()

    def collect(self) -> Iterator[Any]:
        try:
            with self.sessions() as session:
                versions = active_versions(session)
                serving = served(session, claims.claim_owner())
                sites = site_summaries(session)
                last = session.scalar(select(func.max(TrainingRun.finished_at))
                                      .where(TrainingRun.status == RunStatus.succeeded))
                drift = gather_drift(lambda sql: session.execute(text(sql)).all(), self.lab)
                shadows = shadow_summaries(session, self.retraining)
        except SQLAlchemyError as exc:
            log.warning("metrics_database_unavailable", error=str(exc).splitlines()[0])
            return
        info = GaugeMetricFamily("stainbridge_active_model_info",
                                 "The active model version of each kind and site (value 1)",
                                 labels=["site", "kind", "name", "sha256"])
        for version in versions:
            info.add_metric([version.site, version.kind.value, version.name, version.sha256[:12]], 1)
        yield info
        served_info = GaugeMetricFamily("stainbridge_served_model_info",
                                        "The model version this worker serves, per kind and site (value 1)",
                                        labels=["site", "kind", "name", "sha256"])
        refused = GaugeMetricFamily("stainbridge_model_swap_refused", "1 while this worker refuses to load a site's "
                                    "newly active version (retried at every poll), else 0", labels=["site"])
        for row in serving:
            for kind in ("standardizer", "classifier"):
                if row[kind] is not None:
                    served_info.add_metric([row["site"], kind, row[kind]["name"], row[kind]["sha256"]], 1)
            refused.add_metric([row["site"]], 1 if row["refused"] else 0)
        yield served_info
        yield refused
        validated = GaugeMetricFamily("stainbridge_site_validated",
                                      "1 when the site's recipe was chosen on its own reviewed cells, 0 on the "
                                      "day-0 recipe (docs/sites.md)", labels=["site"])
        reviews = GaugeMetricFamily("stainbridge_site_reviews", "Reviewed cells of each site", labels=["site"])
        for site in sites:
            validated.add_metric([site.site], 1 if site.validated else 0)
            reviews.add_metric([site.site], site.reviews)
        yield validated
        yield reviews
        alerts = GaugeMetricFamily("stainbridge_drift_alert", "1 when the site's latest week moved beyond [lab] "
                                   "drift bounds from its baseline (docs/lab.md, Drift)", labels=["site"])
        for site in drift:
            alerts.add_metric([site.site], 1 if site.latest_alert else 0)
        yield alerts
        stain = GaugeMetricFamily("stainbridge_stain_delta_e", "CIE76 colour difference of the site's latest week "
                                  "(of 30 measured cells or more) from its baseline's stain, per region; background "
                                  "and nucleus alert above [lab] drift_stain_delta_e (docs/lab.md, Drift)",
                                  labels=["site", "region"])
        for site in drift:
            for region, value in site.latest_stain_delta_e.items():
                stain.add_metric([site.site, region], round(value, 3))
        yield stain
        yield from _shadow_metrics(shadows)
        if last is not None:
            if last.tzinfo is None:  # SQLite hands timestamps back without their zone; they are UTC
                last = last.replace(tzinfo=timezone.utc)
            yield GaugeMetricFamily("stainbridge_last_successful_retraining_timestamp_seconds",
                                    "When the last successful retraining run finished (Unix time)",
                                    value=last.timestamp())


def _shadow_metrics(shadows: list[ShadowSummary]) -> Iterator[GaugeMetricFamily]:
    """Per site whose newest candidate awaits evidence: which, the cells it scored, how often it disagrees with the
    active version, and the reviewed cells its gate has against those it needs."""
    info = GaugeMetricFamily("stainbridge_shadow_candidate_info", "The candidate a site shadows while it awaits "
                             "evidence (value 1)", labels=["site", "kind", "name", "version"])
    cells = GaugeMetricFamily("stainbridge_shadow_cells", "Cells the shadowed candidate scored", labels=["site"])
    share = GaugeMetricFamily("stainbridge_shadow_disagreement_share", "Share of the shadowed cells where the "
                              "candidate's label differs from the active version's", labels=["site"])
    reviews = GaugeMetricFamily("stainbridge_shadow_gate_reviews", "Reviewed cells the gate counts as evidence "
                                "for the shadowed candidate", labels=["site"])
    needed = GaugeMetricFamily("stainbridge_shadow_gate_reviews_needed", "Reviewed cells the gate needs "
                               "([retraining] min_gate_reviews)", labels=["site"])
    for s in shadows:
        info.add_metric([s.site, s.kind, s.name, str(s.version)], 1)
        cells.add_metric([s.site], s.cells)
        if s.disagreement_share is not None:
            share.add_metric([s.site], s.disagreement_share)
        reviews.add_metric([s.site], s.reviews)
        needed.add_metric([s.site], s.reviews_needed)
    yield from (info, cells, share, reviews, needed)


class ServiceMetrics:
    """The worker's metrics and their HTTP endpoint."""

    def __init__(self, settings: Settings, sessions: sessionmaker, queue_depth: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self.files = Counter("stainbridge_files_processed", "Files this worker finished, by outcome",
                             ["outcome"], registry=self.registry)
        self.failures = Counter("stainbridge_files_failed", "Files this worker quarantined, by reason",
                                ["reason"], registry=self.registry)
        self.unfiled = Counter("stainbridge_filing_failures", "Recorded files this worker could not move out of the "
                               "drop folder (read-only drop folder, archive not mounted...); they are retried",
                               registry=self.registry)
        self.batch_seconds = Histogram("stainbridge_batch_seconds", "Time to take one micro-batch through the "
                                       "pipeline (decode, models, database, filing)", buckets=BATCH_BUCKETS,
                                       registry=self.registry)
        queue = Gauge("stainbridge_queue_depth", "Files waiting in the drop folder", registry=self.registry)
        queue.set_function(queue_depth)
        free = Gauge("stainbridge_free_bytes", "Free space on the volume of each folder the service writes to "
                     "(no files are taken below [paths] min_free_mb)", ["folder"], registry=self.registry)
        for role, folder in diskspace.written_folders(settings).items():
            free.labels(role).set_function(lambda folder=folder: diskspace.free_bytes(folder))
        self.registry.register(DatabaseCollector(sessions, settings.lab, settings.retraining))
        self.predictions = Counter("stainbridge_predictions", "Cells this worker classified, by predicted class and "
                                   "whether they were flagged for review", ["label", "flagged"], registry=self.registry)
        self.confidence = Histogram("stainbridge_confidence", "Confidence of each classified cell in its label "
                                    "(calibrated when the classifier carries a calibration)",
                                    buckets=CONFIDENCE_BUCKETS, registry=self.registry)
        self.last_processed = Gauge("stainbridge_last_processed_timestamp_seconds", "When this worker last finished "
                                    "a file (Unix time; 0 before the first)", registry=self.registry)
        self.state = Gauge("stainbridge_service_state", "1 for the state this worker's heartbeat says now (ready, "
                           "paused, retrying, unhealthy, stopped), 0 for the others", ["state"], registry=self.registry)
        Gauge("stainbridge_build_info", "The stainbridge version running (value 1)", ["version"],
              registry=self.registry).labels(build_version()).set(1)
        for outcome in ("done", "failed", "duplicate"):
            self.files.labels(outcome)  # present (at 0) from the first scrape
        self._server: Any = None

    def set_state(self, state: str) -> None:
        """The heartbeat's state (daemon.service.heartbeat.STATES)."""
        for name in STATES:
            self.state.labels(name).set(1 if name == state else 0)

    def record(self, report: BatchReport) -> None:
        """Count one pipeline report (what the service loop books in Service._account)."""
        self.files.labels("done").inc(report.done)
        self.files.labels("failed").inc(report.failed)
        self.files.labels("duplicate").inc(report.duplicates)
        for reason, n in report.failures.items():
            self.failures.labels(reason).inc(n)
        self.unfiled.inc(report.unfiled)
        for label, confidence, flagged in report.predictions:
            self.predictions.labels(label, "true" if flagged else "false").inc()
            self.confidence.observe(confidence)
        if report.handled - report.unfiled > 0:
            self.last_processed.set_to_current_time()

    def record_poison(self, reason: str = "poison") -> None:
        """A file quarantined after failing alone, again and again (`reason`: poison, memory)."""
        self.files.labels("failed").inc()
        self.failures.labels(reason).inc()

    def observe_batch(self, seconds: float) -> None:
        self.batch_seconds.observe(seconds)

    def serve(self, port: int, address: str) -> None:
        try:
            self._server, _thread = start_http_server(port, addr=address, registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"[metrics] cannot listen on {address}:{port}: {exc.strerror}; choose a free port "
                              "or set [metrics] port = 0 to turn the endpoint off") from None
        log.info("metrics_listening", address=address, port=port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def start_metrics(settings: Settings, sessions: sessionmaker, queue_depth: Callable[[], int]) -> ServiceMetrics | None:
    """The metrics endpoint when `[metrics] port` is set, else None."""
    if not settings.metrics.port:
        return None
    metrics = ServiceMetrics(settings, sessions, queue_depth)
    metrics.serve(settings.metrics.port, settings.metrics.address)
    return metrics
