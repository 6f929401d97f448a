"""Lab views: latest_results, daily_counts, low_confidence_queue, review_disagreements, failures_by_reason.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

Read-only views over `results` and `images` for the questions a lab asks (docs/lab.md, "SQL views").
The text is a frozen copy of daemon/lab/views.py (then daemon/views.py) as of this revision: a later
change there needs a new revision. Two expressions differ by dialect (the UTC day of a timestamp, the failure reason).

`results` is re-created with the same columns but joins grouped maxima instead of a correlated
subquery in the join condition, which PostgreSQL evaluated per pair of rows (a GROUP BY over
`results` took minutes at 100,000 images; now well under a second).
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
# Frozen copies of the results view: before (0003) and from this revision on.
RESULTS_VIEW_SQL_0003 = """
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
LEFT JOIN (SELECT image_id, MAX(id) AS id FROM predictions GROUP BY image_id) lp ON lp.image_id = i.id
LEFT JOIN predictions p ON p.id = lp.id
LEFT JOIN model_versions s ON s.id = p.standardizer_version_id
LEFT JOIN model_versions c ON c.id = p.classifier_version_id
LEFT JOIN (SELECT image_id, MAX(id) AS id FROM reviews GROUP BY image_id) lr ON lr.image_id = i.id
LEFT JOIN reviews r ON r.id = lr.id
"""
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
    op.execute("DROP VIEW IF EXISTS results")
    op.execute(RESULTS_VIEW_SQL)
    for statement in _views(op.get_bind().dialect.name):
        op.execute(statement)


def downgrade() -> None:
    for name in reversed(VIEW_NAMES):
        op.execute(f"DROP VIEW IF EXISTS {name}")
    op.execute("DROP VIEW IF EXISTS results")
    op.execute(RESULTS_VIEW_SQL_0003)
