"""``latest_results`` shows how each answer was computed: ``tta`` and ``magnification``.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01

Revision 0005 stored both per prediction and showed them in ``results``; the lab's own view of the
current answers did not carry them, so the report restated its filter on ``results`` to read them.
They are appended after ``archive_path`` (queries that name columns are unaffected). The other lab
views select named columns from ``latest_results``; they are dropped with it (SQLite has no CREATE
OR REPLACE VIEW) and re-created unchanged from revision 0004 (loaded from that file, which is frozen).
"""

from __future__ import annotations

from alembic import op

from stainbridge.migrations import frozen_revision

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None

# Frozen copy of latest_results from this revision on.
LATEST_RESULTS_VIEW_SQL = """CREATE VIEW latest_results AS
SELECT image_id, source_name, site, patient_pseudonym, study_uid, received_at, processed_at,
       label, confidence, standardizer, classifier, reviewed_label, reviewer, archive_path, tta, magnification
FROM results
WHERE status = 'done' AND duplicate_of_id IS NULL"""


def _replace_lab_views(latest_results_sql: str | None) -> None:
    """Drop the lab views and create them again, with `latest_results_sql` in place of 0004's (its first)."""
    lab = frozen_revision("0004_lab_views.py")
    for name in reversed(lab.VIEW_NAMES):
        op.execute(f"DROP VIEW IF EXISTS {name}")
    statements = lab._views(op.get_bind().dialect.name)
    if latest_results_sql is not None:
        statements[0] = latest_results_sql
    for statement in statements:
        op.execute(statement)


def upgrade() -> None:
    _replace_lab_views(LATEST_RESULTS_VIEW_SQL)


def downgrade() -> None:
    _replace_lab_views(None)
