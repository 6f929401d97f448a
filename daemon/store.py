"""The SQL record: tables, the `results` view and the engine.

The database is the record of what happened to every file; the folders only follow it.
The same code runs on SQLite (embedded default: WAL, busy_timeout, foreign keys) and on
PostgreSQL (several workers share one database).
"""

from __future__ import annotations

import enum
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    create_engine,
    event,
    text,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker
from sqlalchemy.types import Enum as SAEnum

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


STAIN_REGIONS = ("background", "other_stained", "nucleus")  # models.metrics.STAIN_REGIONS, as stored


def stain_columns(summary: dict[str, tuple[float, float, float]]) -> dict[str, float | None]:
    """The ``images.stain_*`` values of one image's stain summary (region -> L*, a*, b*); a missing region is NULL."""
    return {f"stain_{region}_{axis}": (summary[region][i] if region in summary else None)
            for region in STAIN_REGIONS for i, axis in enumerate("lab")}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class ImageStatus(str, enum.Enum):
    pending = "pending"
    processing = "processing"
    done = "done"
    failed = "failed"
    duplicate = "duplicate"


class ModelKind(str, enum.Enum):
    standardizer = "standardizer"
    classifier = "classifier"


class VersionState(str, enum.Enum):
    """A model version's place in the registry: exactly one `active` per kind and site (a partial unique index)."""

    candidate = "candidate"  # registered (by hand or by the nightly job), not serving
    active = "active"  # what the service uses for new predictions
    retired = "retired"  # served once; `models rollback` may bring it back


class GateVerdict(str, enum.Enum):
    """The promotion gate's last verdict on a version (``model_versions.gate_verdict``; NULL: never gated).

    ``awaiting_evidence``: refused only because the site has fewer than ``[retraining] min_gate_reviews``
    reviewed cells it was not trained on; the service shadows such a candidate (``daemon.versions.shadow``)."""

    passed = "passed"
    refused = "refused"  # refused on the evidence (or a guard, or other classes): not awaiting anything
    awaiting_evidence = "awaiting_evidence"


class SiteState(str, enum.Enum):
    """What a site's results rest on: `unvalidated` (the day-0 recipe, no evidence from this site yet) or
    `validated` (its recipe was chosen on reviewed cells of its own; the score is in the `sites` row)."""

    unvalidated = "unvalidated"
    validated = "validated"


class RunStatus(str, enum.Enum):
    """A retraining run: `running`, then `skipped` (too few new images), `failed` (training crashed
    or was killed), `rejected` (the gate refused the candidate) or `succeeded` (candidate promoted)."""

    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    rejected = "rejected"
    skipped = "skipped"


def _str_enum(cls: type[enum.Enum], name: str) -> SAEnum:
    # Stored as VARCHAR + CHECK on every backend: adding a state later is a plain migration.
    return SAEnum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda e: [m.value for m in e],
    )


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: DateTime(timezone=True), dict[str, Any]: JSON}


class Image(Base):
    """One file that arrived in the drop folder (a duplicate arrival gets its own row)."""

    __tablename__ = "images"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str | None] = mapped_column(String(64))
    duplicate_of_id: Mapped[int | None] = mapped_column(ForeignKey("images.id", ondelete="SET NULL"))
    source_name: Mapped[str] = mapped_column(String(512))
    site: Mapped[str] = mapped_column(String(128), index=True)
    # The slide / patient sample it was taken from (intake.specimens; NULL: nothing said, or before 0011).
    specimen: Mapped[str | None] = mapped_column(String(128), index=True)
    status: Mapped[ImageStatus] = mapped_column(_str_enum(ImageStatus, "image_status"), index=True)
    error: Mapped[str | None] = mapped_column(Text)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    format: Mapped[str | None] = mapped_column(String(16))
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    study_uid: Mapped[str | None] = mapped_column(String(64))
    series_uid: Mapped[str | None] = mapped_column(String(64))
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    acquisition_time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    institution: Mapped[str | None] = mapped_column(String(256))
    patient_pseudonym: Mapped[str | None] = mapped_column(String(64), index=True)
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    claimed_at: Mapped[datetime | None]
    received_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    processed_at: Mapped[datetime | None]
    archive_path: Mapped[str | None] = mapped_column(String(1024))
    # Workers that died holding this image's claim, since a claim of it last ended otherwise
    # (intake.claims: quarantined at MAX_CRASHES without being read again).
    crashes: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    # The received image's stain (models.metrics.stain_summary): median CIE L*a*b* of its background, its other
    # stained pixels (red cells, cytoplasm) and its nucleus; NULL where not measured (before 0012, or too small).
    stain_background_l: Mapped[float | None] = mapped_column(Float)
    stain_background_a: Mapped[float | None] = mapped_column(Float)
    stain_background_b: Mapped[float | None] = mapped_column(Float)
    stain_other_stained_l: Mapped[float | None] = mapped_column(Float)
    stain_other_stained_a: Mapped[float | None] = mapped_column(Float)
    stain_other_stained_b: Mapped[float | None] = mapped_column(Float)
    stain_nucleus_l: Mapped[float | None] = mapped_column(Float)
    stain_nucleus_a: Mapped[float | None] = mapped_column(Float)
    stain_nucleus_b: Mapped[float | None] = mapped_column(Float)

    predictions: Mapped[list["Prediction"]] = relationship(back_populates="image", cascade="all, delete-orphan")

    __table_args__ = (
        # One claim per content: the same bytes dropped twice become a `duplicate` row
        # pointing at the first, which is the only row holding the sha256 uniquely.
        Index(
            "uq_images_sha256_original",
            "sha256",
            unique=True,
            sqlite_where=text("duplicate_of_id IS NULL"),
            postgresql_where=text("duplicate_of_id IS NULL"),
        ),
    )


class ModelVersion(Base):
    """A checkpoint the service has loaded or the retraining job has produced, for one site.

    Each site has its own versions (the same file serving two sites is two rows, one sha256)."""

    __tablename__ = "model_versions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[ModelKind] = mapped_column(_str_enum(ModelKind, "model_kind"))
    site: Mapped[str] = mapped_column(String(128))
    name: Mapped[str] = mapped_column(String(128))
    path: Mapped[str] = mapped_column(String(1024))
    sha256: Mapped[str] = mapped_column(String(64))
    header: Mapped[dict[str, Any]] = mapped_column(default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    state: Mapped[VersionState] = mapped_column(_str_enum(VersionState, "version_state"),
                                                default=VersionState.candidate)
    # The run that trained it (training_runs.id; no FK: training_runs.model_version_id points back).
    training_run_id: Mapped[int | None] = mapped_column(Integer)
    reason: Mapped[str | None] = mapped_column(Text)  # why the gate refused it (or why it was promoted)
    # The gate's last verdict (nightly job, `models gate`); no CHECK constraint: added in place by migration 0013.
    gate_verdict: Mapped[GateVerdict | None] = mapped_column(
        SAEnum(GateVerdict, name="gate_verdict", native_enum=False, create_constraint=False, length=32,
               values_callable=lambda e: [m.value for m in e]))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    promoted_at: Mapped[datetime | None]

    __table_args__ = (
        Index("uq_model_versions_site_kind_sha256", "site", "kind", "sha256", unique=True),
        # Exactly one active version per kind and site, enforced by the database, not only by code.
        Index("uq_model_versions_one_active_per_site", "site", "kind", unique=True,
              sqlite_where=text("state = 'active'"), postgresql_where=text("state = 'active'")),
    )

    @property
    def active(self) -> bool:
        return self.state is VersionState.active


class Prediction(Base):
    __tablename__ = "predictions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    label: Mapped[str] = mapped_column(String(64))
    confidence: Mapped[float] = mapped_column(Float)
    probabilities: Mapped[dict[str, Any]]
    standardizer_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    classifier_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    latency_ms: Mapped[float] = mapped_column(Float)
    # How it was computed (NULL on rows from before migration 0005): the 8-view average, and the
    # site magnification of the window the cell was seen through (NULL: whole frame, legacy classifier).
    tta: Mapped[bool | None]
    magnification: Mapped[float | None] = mapped_column(Float)
    # Whether a person should look at it (NULL on rows from before migration 0009): the label's calibrated
    # probability, the out-of-distribution score (NULL: the classifier has no OOD statistics), and the flag
    # with its reason, "low_confidence" or "not_a_known_class" (models.abstention). The label is the best guess.
    calibrated_confidence: Mapped[float | None] = mapped_column(Float)
    ood_score: Mapped[float | None] = mapped_column(Float)
    needs_review: Mapped[bool | None]
    review_reason: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    image: Mapped[Image] = relationship(back_populates="predictions")
    standardizer_version: Mapped[ModelVersion | None] = relationship(foreign_keys=[standardizer_version_id])
    classifier_version: Mapped[ModelVersion] = relationship(foreign_keys=[classifier_version_id])


class ShadowPrediction(Base):
    """A candidate's answer for a cell the active version classified (``[retraining] shadow_share`` of new cells,
    while the candidate awaits evidence). Never a result: no view, report or export shows it as one; the review
    queue lists the cells where it disagrees with the active version first (tier ``candidate_disagrees``)."""

    __tablename__ = "shadow_predictions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), index=True)
    label: Mapped[str] = mapped_column(String(64))
    confidence: Mapped[float] = mapped_column(Float)  # the plain softmax probability of the label
    calibrated_confidence: Mapped[float | None] = mapped_column(Float)  # NULL: the candidate carries no calibration
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index("uq_shadow_predictions_image_id_version", "image_id", "model_version_id", unique=True),)


class TrainingRun(Base):
    __tablename__ = "training_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[ModelKind] = mapped_column(_str_enum(ModelKind, "model_kind"))
    status: Mapped[RunStatus] = mapped_column(_str_enum(RunStatus, "run_status"))
    trigger: Mapped[str] = mapped_column(String(32), default="manual")
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    images_used: Mapped[int | None] = mapped_column(Integer)
    reference_images: Mapped[int | None] = mapped_column(Integer)
    held_out_images: Mapped[int | None] = mapped_column(Integer)
    reason: Mapped[str | None] = mapped_column(Text)  # why it was skipped, refused, promoted or failed
    worker: Mapped[str | None] = mapped_column(String(128))  # intake.claim_owner of the process running it
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    log_path: Mapped[str | None] = mapped_column(String(1024))
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]


class Site(Base):
    """One incoming hospital or laboratory and its validation state (docs/sites.md).

    Created when the site's first file is classified. ``reviews_needed`` is ``[site] validation_reviews``
    (kept in step by the service). When validated: the recipe chosen (its two version ids and name), its
    balanced accuracy with the bootstrap 95 % interval on ``validated_cells`` reviewed cells, and every
    recipe's score in ``validation``."""

    __tablename__ = "sites"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    state: Mapped[SiteState] = mapped_column(_str_enum(SiteState, "site_state"), default=SiteState.unvalidated)
    reviews_needed: Mapped[int] = mapped_column(Integer)
    sample_chosen_at: Mapped[datetime | None]
    recipe: Mapped[str | None] = mapped_column(String(512))
    standardizer_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    classifier_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    balanced_accuracy: Mapped[float | None] = mapped_column(Float)
    ci_low: Mapped[float | None] = mapped_column(Float)
    ci_high: Mapped[float | None] = mapped_column(Float)
    validated_cells: Mapped[int | None] = mapped_column(Integer)
    validation: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    validated_at: Mapped[datetime | None]


class ValidationCell(Base):
    """A cell chosen for a site's validation sample (``models.validation.select_validation_sample``),
    in review order (``rank`` 1 first); ``review export`` lists the unreviewed ones first."""

    __tablename__ = "validation_cells"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id", ondelete="CASCADE"))
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), unique=True)
    rank: Mapped[int] = mapped_column(Integer)
    predicted: Mapped[str] = mapped_column(String(64))  # the day-0 recipe's class when it was chosen
    disagreement: Mapped[int] = mapped_column(Integer)  # recipes that did not give the most common class

    __table_args__ = (Index("uq_validation_cells_site_id_rank", "site_id", "rank", unique=True),)


class Review(Base):
    """A label confirmed (or corrected) by a hematologist.

    One current review per image and reviewer (a partial unique index); a changed label supersedes the
    old row (``superseded_at`` set), which stays as the history."""

    __tablename__ = "reviews"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    label: Mapped[str] = mapped_column(String(64))
    reviewer: Mapped[str] = mapped_column(String(128))
    comment: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    superseded_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index("uq_reviews_current", "image_id", "reviewer", unique=True,
              sqlite_where=text("superseded_at IS NULL"), postgresql_where=text("superseded_at IS NULL")),
    )


class PromotionAction(str, enum.Enum):
    promote = "promote"  # a version made active: by hand, by the nightly gate, by validation, by the configuration
    rollback = "rollback"  # `models rollback`: back to the version that served before


class Promotion(Base):
    """One change of a site's active version of one kind: the history `models rollback` walks back."""

    __tablename__ = "promotions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[ModelKind] = mapped_column(_str_enum(ModelKind, "model_kind"))
    site: Mapped[str] = mapped_column(String(128))
    from_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    to_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    action: Mapped[PromotionAction] = mapped_column(_str_enum(PromotionAction, "promotion_action"))
    actor: Mapped[str] = mapped_column(String(128))
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index("ix_promotions_site_kind", "site", "kind"),)


class ServedModels(Base):
    """What one worker's service actually serves for one site (hot swap writes it), and a swap it refused."""

    __tablename__ = "served_models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    worker: Mapped[str] = mapped_column(String(128))  # intake.claim_owner: host@boot.pidns:pid
    site: Mapped[str] = mapped_column(String(128))
    classifier_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    standardizer_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    refused_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    refused_reason: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index("uq_served_models_worker_site", "worker", "site", unique=True),)


class Worker(Base):
    """A `stainbridge run` process's heartbeat (``daemon.service.heartbeat``), rewritten every ``interval_seconds``:
    ``state`` ready / paused / retrying / unhealthy / stopped, ``reason`` why, files ``handled`` since it started
    and when it last finished one. A row whose heartbeat is older than three intervals is a process that died."""

    __tablename__ = "workers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    worker: Mapped[str] = mapped_column(String(255), unique=True)  # intake.claims.worker_id(): host:pid
    version: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    interval_seconds: Mapped[float] = mapped_column(Float)
    handled: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime]
    heartbeat_at: Mapped[datetime]
    last_processed_at: Mapped[datetime | None]


# What lab staff query: one row per image with its latest prediction and latest review.
# Migrations keep their own frozen copy of this text; change both together. The latest rows are
# found by joining grouped maxima, not by a correlated subquery in the join condition: PostgreSQL
# evaluates that per pair of rows (minutes at 100,000 images; see migration 0004).
RESULTS_VIEW_SQL = """
CREATE VIEW results AS
SELECT
    i.id AS image_id,
    i.source_name,
    i.site,
    i.specimen,
    i.status,
    i.error,
    i.sha256,
    i.duplicate_of_id,
    i.study_uid,
    i.series_uid,
    i.sop_instance_uid,
    i.patient_pseudonym,
    i.received_at,
    i.processed_at,
    i.archive_path,
    p.label,
    p.confidence,
    p.probabilities,
    p.latency_ms,
    p.tta,
    p.magnification,
    p.calibrated_confidence,
    p.ood_score,
    p.needs_review,
    p.review_reason,
    s.name AS standardizer,
    s.sha256 AS standardizer_sha256,
    c.name AS classifier,
    c.sha256 AS classifier_sha256,
    r.label AS reviewed_label,
    r.reviewer
FROM images i
LEFT JOIN (SELECT image_id, MAX(id) AS id FROM predictions GROUP BY image_id) lp ON lp.image_id = i.id
LEFT JOIN predictions p ON p.id = lp.id
LEFT JOIN model_versions s ON s.id = p.standardizer_version_id
LEFT JOIN model_versions c ON c.id = p.classifier_version_id
LEFT JOIN (SELECT image_id, MAX(id) AS id FROM reviews GROUP BY image_id) lr ON lr.image_id = i.id
LEFT JOIN reviews r ON r.id = lr.id
"""


def _tune_sqlite(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=FULL")  # a committed result survives a power cut before its file moves
    cursor.close()


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine tuned for a long-running daemon; creates the SQLite file's folder if needed."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30}, **kwargs)
        event.listen(engine, "connect", _tune_sqlite)
        return engine
    return create_engine(url, pool_pre_ping=True, **kwargs)


def make_sessionmaker(engine: Engine) -> sessionmaker:
    return sessionmaker(engine, expire_on_commit=False)
