"""Initial schema: images, model_versions, predictions, reviews, training_runs and the results view.

Revision ID: 0001
Revises:
Create Date: 2026-11-26

Generated with autogenerate against an empty database, then checked by hand. Every
constraint and index is named explicitly (op.f) so this revision does not depend on the
naming convention in daemon/store.py; the view text is a frozen copy of RESULTS_VIEW_SQL.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None

IMAGE_STATUSES = ("pending", "processing", "done", "failed", "duplicate")
MODEL_KINDS = ("standardizer", "classifier")
RUN_STATUSES = ("running", "succeeded", "failed", "rejected")

# Frozen copy of daemon.store.RESULTS_VIEW_SQL as of this revision: a later change to the
# view is a new revision that drops and re-creates it, never an edit here.
RESULTS_VIEW_SQL = """
CREATE VIEW results AS
SELECT
    i.id AS image_id,
    i.source_name,
    i.site,
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
    s.name AS standardizer,
    s.sha256 AS standardizer_sha256,
    c.name AS classifier,
    c.sha256 AS classifier_sha256,
    r.label AS reviewed_label,
    r.reviewer
FROM images i
LEFT JOIN predictions p
    ON p.id = (SELECT MAX(p2.id) FROM predictions p2 WHERE p2.image_id = i.id)
LEFT JOIN model_versions s ON s.id = p.standardizer_version_id
LEFT JOIN model_versions c ON c.id = p.classifier_version_id
LEFT JOIN reviews r
    ON r.id = (SELECT MAX(r2.id) FROM reviews r2 WHERE r2.image_id = i.id)
"""


def _one_of(column: str, values: tuple[str, ...], name: str) -> sa.CheckConstraint:
    """The CHECK that SQLAlchemy's non-native Enum(create_constraint=True) emits."""
    allowed = ", ".join(f"'{value}'" for value in values)
    return sa.CheckConstraint(f"{column} IN ({allowed})", name=op.f(name))


def upgrade() -> None:
    op.create_table(
        "images",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=True),
        sa.Column("duplicate_of_id", sa.Integer(), nullable=True),
        sa.Column("source_name", sa.String(length=512), nullable=False),
        sa.Column("site", sa.String(length=128), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("size_bytes", sa.BigInteger(), nullable=True),
        sa.Column("format", sa.String(length=16), nullable=True),
        sa.Column("width", sa.Integer(), nullable=True),
        sa.Column("height", sa.Integer(), nullable=True),
        sa.Column("study_uid", sa.String(length=64), nullable=True),
        sa.Column("series_uid", sa.String(length=64), nullable=True),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("acquisition_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("institution", sa.String(length=256), nullable=True),
        sa.Column("patient_pseudonym", sa.String(length=64), nullable=True),
        sa.Column("claimed_by", sa.String(length=128), nullable=True),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("archive_path", sa.String(length=1024), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_images")),
        sa.ForeignKeyConstraint(
            ["duplicate_of_id"], ["images.id"], name=op.f("fk_images_duplicate_of_id_images"), ondelete="SET NULL"
        ),
        _one_of("status", IMAGE_STATUSES, "ck_images_image_status"),
    )
    op.create_index(op.f("ix_images_patient_pseudonym"), "images", ["patient_pseudonym"])
    op.create_index(op.f("ix_images_received_at"), "images", ["received_at"])
    op.create_index(op.f("ix_images_sop_instance_uid"), "images", ["sop_instance_uid"])
    op.create_index(op.f("ix_images_status"), "images", ["status"])
    # One claim per content: only rows that are not duplicates hold their sha256 uniquely.
    op.create_index(
        op.f("uq_images_sha256_original"),
        "images",
        ["sha256"],
        unique=True,
        sqlite_where=sa.text("duplicate_of_id IS NULL"),
        postgresql_where=sa.text("duplicate_of_id IS NULL"),
    )

    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("path", sa.String(length=1024), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("header", sa.JSON(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("promoted_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_versions")),
        _one_of("kind", MODEL_KINDS, "ck_model_versions_model_kind"),
    )
    op.create_index(op.f("uq_model_versions_kind_sha256"), "model_versions", ["kind", "sha256"], unique=True)

    op.create_table(
        "predictions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("label", sa.String(length=64), nullable=False),
        sa.Column("confidence", sa.Float(), nullable=False),
        sa.Column("probabilities", sa.JSON(), nullable=False),
        sa.Column("standardizer_version_id", sa.Integer(), nullable=True),
        sa.Column("classifier_version_id", sa.Integer(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_predictions")),
        sa.ForeignKeyConstraint(
            ["image_id"], ["images.id"], name=op.f("fk_predictions_image_id_images"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["standardizer_version_id"],
            ["model_versions.id"],
            name=op.f("fk_predictions_standardizer_version_id_model_versions"),
        ),
        sa.ForeignKeyConstraint(
            ["classifier_version_id"],
            ["model_versions.id"],
            name=op.f("fk_predictions_classifier_version_id_model_versions"),
        ),
    )
    op.create_index(op.f("ix_predictions_image_id"), "predictions", ["image_id"])

    op.create_table(
        "reviews",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("label", sa.String(length=64), nullable=False),
        sa.Column("reviewer", sa.String(length=128), nullable=False),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reviews")),
        sa.ForeignKeyConstraint(["image_id"], ["images.id"], name=op.f("fk_reviews_image_id_images"), ondelete="CASCADE"),
    )
    op.create_index(op.f("ix_reviews_image_id"), "reviews", ["image_id"])

    op.create_table(
        "training_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("trigger", sa.String(length=32), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("images_used", sa.Integer(), nullable=True),
        sa.Column("model_version_id", sa.Integer(), nullable=True),
        sa.Column("log_path", sa.String(length=1024), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_training_runs")),
        sa.ForeignKeyConstraint(
            ["model_version_id"], ["model_versions.id"], name=op.f("fk_training_runs_model_version_id_model_versions")
        ),
        _one_of("kind", MODEL_KINDS, "ck_training_runs_model_kind"),
        _one_of("status", RUN_STATUSES, "ck_training_runs_run_status"),
    )

    op.execute(RESULTS_VIEW_SQL)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS results")
    op.drop_table("training_runs")
    op.drop_index(op.f("ix_reviews_image_id"), table_name="reviews")
    op.drop_table("reviews")
    op.drop_index(op.f("ix_predictions_image_id"), table_name="predictions")
    op.drop_table("predictions")
    op.drop_index(op.f("uq_model_versions_kind_sha256"), table_name="model_versions")
    op.drop_table("model_versions")
    op.drop_index(op.f("uq_images_sha256_original"), table_name="images")
    op.drop_index(op.f("ix_images_status"), table_name="images")
    op.drop_index(op.f("ix_images_sop_instance_uid"), table_name="images")
    op.drop_index(op.f("ix_images_received_at"), table_name="images")
    op.drop_index(op.f("ix_images_patient_pseudonym"), table_name="images")
    op.drop_table("images")
