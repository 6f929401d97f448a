"""The SQL views the lab queries (docs/lab.md, "SQL views"): one question each, built on `results`.

`results` (daemon/store.py) already picks each image's latest prediction and latest review; these
views only filter and aggregate it, so "latest" has one definition. Two expressions differ between
SQLite and PostgreSQL (the UTC day of a timestamp, the reason before the first ':' of an error),
hence one text per dialect. Migrations keep frozen copies (0004; latest_results since 0006, with the
review columns since 0008): a change here needs a new revision.

Any later migration that rebuilds a table with batch mode (SQLite) must drop these views and
`results` first and create them again afterwards (see 0003 for `results`).
"""

from __future__ import annotations

# The UTC calendar day of a timestamp column, and the failure reason of `images.error`
# (the pipeline stores "reason: detail", e.g. "corrupt: x.png cannot be decoded").
_DAY = {"sqlite": "date({col})", "postgresql": "CAST(({col} AT TIME ZONE 'UTC') AS date)"}
_REASON = {
    "sqlite": "CASE WHEN instr({col}, ':') > 0 THEN substr({col}, 1, instr({col}, ':') - 1) ELSE {col} END",
    "postgresql": "split_part({col}, ':', 1)",
}


def day_sql(dialect: str, column: str) -> str:
    """SQL for the UTC calendar day of a timestamp column."""
    return _DAY[dialect].format(col=column)


def reason_sql(dialect: str, column: str = "error") -> str:
    """SQL for the failure reason (the part of `images.error` before the first ':')."""
    return _REASON[dialect].format(col=column)


LAB_VIEW_NAMES = ("latest_results", "daily_counts", "low_confidence_queue", "review_disagreements",
                  "failures_by_reason")


def lab_views_sql(dialect: str) -> list[str]:
    """CREATE VIEW statements for the lab views, in creation order, for 'sqlite' or 'postgresql'."""
    if dialect not in _DAY:
        raise ValueError(f"no lab views for the {dialect!r} dialect; stainbridge supports sqlite and postgresql")
    day, reason = day_sql(dialect, "received_at"), reason_sql(dialect)
    return [
        # One row per distinct image content that was classified: its current answer.
        """CREATE VIEW latest_results AS
SELECT image_id, source_name, site, patient_pseudonym, study_uid, received_at, processed_at,
       label, confidence, standardizer, classifier, reviewed_label, reviewer, archive_path, tta, magnification,
       calibrated_confidence, ood_score, needs_review, review_reason
FROM results
WHERE status = 'done' AND duplicate_of_id IS NULL""",
        f"""CREATE VIEW daily_counts AS
SELECT {day} AS day, site, label, COUNT(*) AS images, AVG(confidence) AS mean_confidence
FROM latest_results
GROUP BY {day}, site, label""",
        # Classified, not yet reviewed; filter on confidence and order by it (docs/lab.md).
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
