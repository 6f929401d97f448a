"""Lab views: latest_results, daily_counts, low_confidence_queue, review_disagreements, failures_by_reason.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

Read-only views over `results` and `images` for the questions a lab asks (README "For the lab").
The text is a frozen copy of daemon/views.py as of this revision: a later change there needs a new
revision. Two expressions differ by dialect (the UTC day of a timestamp, the failure reason).
"""

from __future__ import annotations

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None

_DAY = {"sqlite": "date({col})", "postgresql": "CAST(({col} AT TIME ZONE 'UTC') AS date)"}
_REASON = {
    "sqlite": "CASE WHEN instr({col}, ':') > 0 THEN substr({col}, 1, instr({col}, ':') - 1) ELSE {col} END",
    "postgresql": "split_part({col}, ':', 1)",
}
VIEW_NAMES = ("latest_results", "daily_counts", "low_confidence_queue", "review_disagreements", "failures_by_reason")


def _views(dialect: str) -> list[str]:
    day = _DAY[dialect].format(col="received_at")
    reason = _REASON[dialect].format(col="error")
    return [
        """CREATE VIEW latest_results AS
SELECT image_id, source_name, site, patient_pseudonym, study_uid, received_at, processed_at,
       label, confidence, standardizer, classifier, reviewed_label, reviewer, archive_path
FROM results
WHERE status = 'done' AND duplicate_of_id IS NULL""",
        f"""CREATE VIEW daily_counts AS
SELECT {day} AS day, site, label, COUNT(*) AS images, AVG(confidence) AS mean_confidence
FROM latest_results
GROUP BY {day}, site, label""",
        """CREATE VIEW low_confidence_queue AS
SELECT image_id, source_name, site, received_at, label, confidence, classifier, archive_path
FROM latest_results
WHERE reviewed_label IS NULL""",
        """CREATE VIEW review_disagreements AS
SELECT image_id, source_name, site, received_at, label, confidence, reviewed_label, reviewer, classifier
FROM latest_results
WHERE reviewed_label IS NOT NULL AND reviewed_label <> label""",
        f"""CREATE VIEW failures_by_reason AS
SELECT {reason} AS reason, site, COUNT(*) AS images, MIN(received_at) AS first_at, MAX(received_at) AS last_at
FROM images
WHERE status = 'failed'
GROUP BY {reason}, site""",
    ]


def upgrade() -> None:
    for statement in _views(op.get_bind().dialect.name):
        op.execute(statement)


def downgrade() -> None:
    for name in reversed(VIEW_NAMES):
        op.execute(f"DROP VIEW IF EXISTS {name}")
