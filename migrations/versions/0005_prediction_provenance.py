"""Predictions record how they were computed: ``tta`` and ``magnification``.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01

Two results of the same image by the same model versions can differ because of the service's
settings: ``[models] tta`` (the mean over the 8 turns and flips) and the site magnification of the
window the cell was seen through (the standardizer's site profile or ``[site] scale``). Both are
now stored per prediction and shown in ``results``; rows written before this revision keep NULL
(unknown). ``magnification`` is also NULL for a classifier without a reference window (whole frame).

The columns are nullable, so both dialects add them in place. ``results`` is re-created with the
two columns after ``latency_ms``; the lab views read it, so they are dropped first and re-created
unchanged from revision 0004 (loaded from that file, which is frozen).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from stainbridge.migrations import frozen_revision

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None

# Frozen copy of the results view from this revision on.
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
    p.tta,
    p.magnification,
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


def _drop_views(lab_view_names: tuple[str, ...]) -> None:
    for name in reversed(lab_view_names):
        op.execute(f"DROP VIEW IF EXISTS {name}")
    op.execute("DROP VIEW IF EXISTS results")


def _create_views(results_sql: str, lab_views: list[str]) -> None:
    op.execute(results_sql)
    for statement in lab_views:
        op.execute(statement)


def upgrade() -> None:
    lab = frozen_revision("0004_lab_views.py")
    _drop_views(lab.VIEW_NAMES)
    op.add_column("predictions", sa.Column("tta", sa.Boolean(), nullable=True))
    op.add_column("predictions", sa.Column("magnification", sa.Float(), nullable=True))
    _create_views(RESULTS_VIEW_SQL, lab._views(op.get_bind().dialect.name))


def downgrade() -> None:
    lab = frozen_revision("0004_lab_views.py")
    _drop_views(lab.VIEW_NAMES)
    with op.batch_alter_table("predictions") as batch:  # SQLite drops columns by rebuilding the table
        batch.drop_column("magnification")
        batch.drop_column("tta")
    _create_views(lab.RESULTS_VIEW_SQL, lab._views(op.get_bind().dialect.name))
