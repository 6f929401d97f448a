"""Retraining: model version states (one active per kind), richer training runs.

Revision ID: 0003
Revises: 0001
Create Date: 2026-12-01

- ``model_versions.active`` (a boolean nothing enforced) becomes ``state``:
  candidate | active | retired, with a partial unique index so that the database itself
  allows exactly one active version per kind. Existing rows: active -> active, others -> retired
  (they served once). Adds ``training_run_id`` and ``reason`` (why the gate refused it).
- ``training_runs`` gains ``skipped`` as a status, the reason, data counts and the worker
  (host:pid) that runs it.

SQLite cannot alter columns or CHECK constraints in place: batch mode recreates the tables.
The results view reads model_versions, so it is dropped first and re-created unchanged.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0001"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None

VERSION_STATES = ("candidate", "active", "retired")
RUN_STATUSES_0001 = ("running", "succeeded", "failed", "rejected")
RUN_STATUSES = ("running", "succeeded", "failed", "rejected", "skipped")

# Frozen copy of the results view as of this revision (unchanged from 0001).
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
    allowed = ", ".join(f"'{value}'" for value in values)
    return sa.CheckConstraint(f"{column} IN ({allowed})", name=op.f(name))


def upgrade() -> None:
    op.execute("DROP VIEW IF EXISTS results")
    with op.batch_alter_table("model_versions") as batch:
        batch.add_column(sa.Column("state", sa.String(length=16), nullable=False, server_default="retired"))
        batch.add_column(sa.Column("training_run_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("reason", sa.Text(), nullable=True))
    op.execute("UPDATE model_versions SET state = CASE WHEN active THEN 'active' ELSE 'retired' END")
    with op.batch_alter_table("model_versions") as batch:
        batch.alter_column("state", server_default=None)
        batch.drop_column("active")
        batch.create_check_constraint(op.f("ck_model_versions_version_state"),
                                      f"state IN ({', '.join(repr(s) for s in VERSION_STATES)})")
    op.create_index(op.f("uq_model_versions_one_active"), "model_versions", ["kind"], unique=True,
                    sqlite_where=sa.text("state = 'active'"), postgresql_where=sa.text("state = 'active'"))

    with op.batch_alter_table("training_runs") as batch:
        batch.add_column(sa.Column("reference_images", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("held_out_images", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("reason", sa.Text(), nullable=True))
        batch.add_column(sa.Column("worker", sa.String(length=128), nullable=True))
        batch.drop_constraint(op.f("ck_training_runs_run_status"), type_="check")
        batch.create_check_constraint(op.f("ck_training_runs_run_status"),
                                      f"status IN ({', '.join(repr(s) for s in RUN_STATUSES)})")
    op.execute(RESULTS_VIEW_SQL)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS results")
    op.execute("UPDATE training_runs SET status = 'failed' WHERE status = 'skipped'")
    with op.batch_alter_table("training_runs") as batch:
        batch.drop_constraint(op.f("ck_training_runs_run_status"), type_="check")
        batch.create_check_constraint(op.f("ck_training_runs_run_status"),
                                      f"status IN ({', '.join(repr(s) for s in RUN_STATUSES_0001)})")
        batch.drop_column("worker")
        batch.drop_column("reason")
        batch.drop_column("held_out_images")
        batch.drop_column("reference_images")
    op.drop_index(op.f("uq_model_versions_one_active"), table_name="model_versions")
    with op.batch_alter_table("model_versions") as batch:
        batch.add_column(sa.Column("active", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.execute("UPDATE model_versions SET active = (state = 'active')")
    with op.batch_alter_table("model_versions") as batch:
        batch.alter_column("active", server_default=None)
        batch.drop_constraint(op.f("ck_model_versions_version_state"), type_="check")
        batch.drop_column("reason")
        batch.drop_column("training_run_id")
        batch.drop_column("state")
    op.execute(RESULTS_VIEW_SQL)
