"""The SQL views the lab queries (docs/lab.md, "SQL views"): one question each, built on `results`.

`results` (daemon/store.py) already picks each image's latest prediction and latest review; these
views only filter and aggregate it, so "latest" has one definition. `site_validation` says per site
what its results rest on (docs/sites.md), and `latest_results` carries that text on every row, so day-0
output is never mistaken for validated output. Three expressions differ between SQLite and PostgreSQL
(the UTC day of a timestamp, the reason before the first ':' of an error, a number with two decimals),
hence one text per dialect (and SQLite's times get their zone written out). Migrations keep frozen copies (0004;
latest_results and site_validation since 0008, with the review columns since 0009, the specimen,
specimen_differentials and weekly_drift since 0011; weekly_stain and failures_by_reason's zoned times on SQLite since
0012; candidate_disagreements since 0013): a change here needs a new revision.

Any later migration that rebuilds a table with batch mode (SQLite) must drop these views and
`results` first and create them again afterwards (see 0003 for `results`).
"""

from __future__ import annotations

from stainbridge.daemon.store import STAIN_REGIONS

# The UTC calendar day of a timestamp column, and the failure reason of `images.error`
# (the pipeline stores "reason: detail", e.g. "corrupt: x.png cannot be decoded").
_DAY = {"sqlite": "date({col})", "postgresql": "CAST(({col} AT TIME ZONE 'UTC') AS date)"}
_REASON = {
    "sqlite": "CASE WHEN instr({col}, ':') > 0 THEN substr({col}, 1, instr({col}, ':') - 1) ELSE {col} END",
    "postgresql": "split_part({col}, ':', 1)",
}


# The UTC week (its Monday) of a timestamp column.
_WEEK = {"sqlite": "date({col}, '-6 days', 'weekday 1')",
         "postgresql": "CAST(date_trunc('week', {col} AT TIME ZONE 'UTC') AS date)"}


_TWO_DECIMALS = {"sqlite": "printf('%.2f', {col})", "postgresql": "to_char({col}, 'FM0.00')"}

# A timestamp column as shown with its zone: PostgreSQL's timestamptz carries it; SQLite stores UTC text without one,
# so it is written out as ISO 8601 with its offset (to the second), as `export` writes times.
_ZONED = {"sqlite": "strftime('%Y-%m-%dT%H:%M:%S', {col}) || '+00:00'", "postgresql": "{col}"}


def day_sql(dialect: str, column: str) -> str:
    """SQL for the UTC calendar day of a timestamp column."""
    return _DAY[dialect].format(col=column)


def week_sql(dialect: str, column: str) -> str:
    """SQL for the Monday (UTC) of a timestamp column's week."""
    return _WEEK[dialect].format(col=column)


def reason_sql(dialect: str, column: str = "error") -> str:
    """SQL for the failure reason (the part of `images.error` before the first ':')."""
    return _REASON[dialect].format(col=column)


# What one result rests on (``results r`` joined to ``site_validation v`` on the site): its site's line, or,
# at a validated site, "not the validated recipe (site validated: ...)" when other versions made it (a
# result from before validation, or from a version promoted since).
ROW_VALIDATION_SQL = """CASE WHEN v.state = 'validated'
            AND (COALESCE(r.standardizer_sha256, '') <> COALESCE(v.validated_standardizer_sha256, '')
                 OR COALESCE(r.classifier_sha256, '') <> COALESCE(v.validated_classifier_sha256, ''))
       THEN 'not the validated recipe (site ' || v.validation || ')'
       ELSE v.validation END"""

LAB_VIEW_NAMES = ("site_validation", "latest_results", "daily_counts", "low_confidence_queue",
                  "review_disagreements", "failures_by_reason", "specimen_differentials", "weekly_drift",
                  "weekly_stain", "candidate_disagreements")

# The candidate each site shadows (daemon.versions.shadow.shadowed_candidates says the same in the ORM): the site's
# newest registered version, while it is a candidate whose last gate verdict is "awaiting_evidence". A newer
# version of the site (of either kind) supersedes it; promotion (active) or a verdict on evidence ends it.
SHADOWED_CANDIDATES_SQL = """SELECT v.id, v.site, v.kind, v.name
FROM model_versions v
JOIN (SELECT site, MAX(id) AS id FROM model_versions GROUP BY site) n ON n.id = v.id
WHERE v.state = 'candidate' AND v.gate_verdict = 'awaiting_evidence'"""

# The review queue's first tier (`review export`, tier candidate_disagrees) and the report's list of the same cells:
# unreviewed classified cells whose shadow prediction by their site's shadowed candidate differs from their current
# answer (which the active version gave: shadow predictions are never results).
CANDIDATE_DISAGREEMENTS_SQL = f"""CREATE VIEW candidate_disagreements AS
SELECT r.image_id, r.source_name, r.site, r.received_at, r.label, r.confidence, r.calibrated_confidence,
       sp.label AS candidate_label, sp.confidence AS candidate_confidence,
       sp.calibrated_confidence AS candidate_calibrated_confidence,
       c.id AS candidate_version_id, c.kind AS candidate_kind, c.name AS candidate, r.archive_path
FROM latest_results r
JOIN shadow_predictions sp ON sp.image_id = r.image_id
JOIN ({SHADOWED_CANDIDATES_SQL}) c ON c.id = sp.model_version_id AND c.site = r.site
WHERE r.reviewed_label IS NULL AND sp.label <> r.label"""

# Per site, specimen and predicted class (long format: the classes are whatever the site's classifier knows, so
# no column per class): cells counted (the cell's current answer, not a duplicate, not flagged for review), their
# share of the specimen's counted cells in percent, the cells of that best guess flagged for review, and the
# specimen's totals and first and last image (received_at). Percentages of a specimen sum to 100; a specimen with
# every cell flagged has NULL percentages. Cells without a specimen are left out.
SPECIMEN_DIFFERENTIALS_SQL = """CREATE VIEW specimen_differentials AS
SELECT c.site, c.specimen, c.label, c.cells,
       CASE WHEN t.cells_counted > 0 THEN CAST(100.0 * c.cells / t.cells_counted AS DOUBLE PRECISION) END AS percent,
       c.flagged, t.cells_counted, t.cells_flagged, t.first_at, t.last_at
FROM (SELECT site, specimen, label,
             SUM(CASE WHEN needs_review THEN 0 ELSE 1 END) AS cells,
             SUM(CASE WHEN needs_review THEN 1 ELSE 0 END) AS flagged
      FROM latest_results
      WHERE specimen IS NOT NULL
      GROUP BY site, specimen, label) c
JOIN (SELECT site, specimen,
             SUM(CASE WHEN needs_review THEN 0 ELSE 1 END) AS cells_counted,
             SUM(CASE WHEN needs_review THEN 1 ELSE 0 END) AS cells_flagged,
             MIN(received_at) AS first_at, MAX(received_at) AS last_at
      FROM latest_results
      WHERE specimen IS NOT NULL
      GROUP BY site, specimen) t ON t.site = c.site AND t.specimen = c.specimen"""


def weekly_drift_sql(dialect: str) -> str:
    """CREATE VIEW weekly_drift: per site, UTC week (its Monday) and predicted class, the cells (current answers,
    flagged ones by their best guess) and their share of the week's cells, with the week's cells, mean confidence
    (calibrated where recorded) and share flagged for review on every row (daemon/lab/drift.py compares weeks)."""
    week = week_sql(dialect, "received_at")
    return f"""CREATE VIEW weekly_drift AS
SELECT c.site, c.week, c.label, c.cells, CAST(1.0 * c.cells / t.cells AS DOUBLE PRECISION) AS share,
       t.cells AS week_cells, t.mean_confidence, t.share_flagged
FROM (SELECT site, {week} AS week, label, COUNT(*) AS cells
      FROM latest_results
      GROUP BY site, {week}, label) c
JOIN (SELECT site, {week} AS week, COUNT(*) AS cells,
             CAST(AVG(COALESCE(calibrated_confidence, confidence)) AS DOUBLE PRECISION) AS mean_confidence,
             CAST(AVG(CASE WHEN needs_review THEN 1.0 ELSE 0.0 END) AS DOUBLE PRECISION) AS share_flagged
      FROM latest_results
      GROUP BY site, {week}) t ON t.site = c.site AND t.week = c.week"""


def weekly_stain_sql(dialect: str) -> str:
    """CREATE VIEW weekly_stain: per site and UTC week (its Monday, as in weekly_drift), the classified cells whose
    stain was measured (current ones, duplicates left out) and the mean of their per-image medians (L*, a*, b*) of
    each stain region (``images.stain_*``; daemon/lab/drift.py compares them with the baseline's)."""
    week = week_sql(dialect, "received_at")
    means = ",\n       ".join(f"CAST(AVG(stain_{region}_{axis}) AS DOUBLE PRECISION) AS {region}_{axis}"
                              for region in STAIN_REGIONS for axis in "lab")
    return f"""CREATE VIEW weekly_stain AS
SELECT site, {week} AS week, COUNT(*) AS cells,
       {means}
FROM images
WHERE status = 'done' AND duplicate_of_id IS NULL AND stain_background_l IS NOT NULL
GROUP BY site, {week}"""


def failures_by_reason_sql(dialect: str) -> str:
    """CREATE VIEW failures_by_reason: per failure reason and site, the files and the first and last one's arrival
    (with its zone on both databases)."""
    reason = reason_sql(dialect)
    first, last = (_ZONED[dialect].format(col=f"{f}(received_at)") for f in ("MIN", "MAX"))
    return f"""CREATE VIEW failures_by_reason AS
SELECT {reason} AS reason, site, COUNT(*) AS images, {first} AS first_at, {last} AS last_at
FROM images
WHERE status = 'failed'
GROUP BY {reason}, site"""


def site_validation_sql(dialect: str) -> str:
    """CREATE VIEW site_validation: per site its state, reviews in and needed, the recipe serving it now
    (active standardizer + classifier) and the one validation chose, the score, and one line saying it
    ("unvalidated (12 of 50 reviews)", "validated: 0.91 [0.86-0.95] on 50 cells")."""
    score, low, high = (_TWO_DECIMALS[dialect].format(col=f"s.{c}") for c in ("balanced_accuracy", "ci_low", "ci_high"))
    return f"""CREATE VIEW site_validation AS
SELECT s.name AS site, s.state, COALESCE(r.reviews, 0) AS reviews, s.reviews_needed,
       sv.name || ' + ' || cv.name AS recipe, s.recipe AS validated_recipe,
       s.balanced_accuracy, s.ci_low, s.ci_high, s.validated_cells, s.validated_at,
       CASE WHEN s.state = 'validated'
            THEN 'validated: ' || {score} || ' [' || {low} || '-' || {high} || '] on ' || s.validated_cells || ' cells'
            ELSE 'unvalidated (' || COALESCE(r.reviews, 0) || ' of ' || s.reviews_needed || ' reviews)'
       END AS validation,
       vs.sha256 AS validated_standardizer_sha256, vc.sha256 AS validated_classifier_sha256
FROM sites s
LEFT JOIN (SELECT i.site, COUNT(DISTINCT v.image_id) AS reviews
           FROM reviews v JOIN images i ON i.id = v.image_id
           WHERE i.status = 'done' AND i.duplicate_of_id IS NULL
           GROUP BY i.site) r ON r.site = s.name
LEFT JOIN model_versions sv ON sv.site = s.name AND sv.kind = 'standardizer' AND sv.state = 'active'
LEFT JOIN model_versions cv ON cv.site = s.name AND cv.kind = 'classifier' AND cv.state = 'active'
LEFT JOIN model_versions vs ON vs.id = s.standardizer_version_id
LEFT JOIN model_versions vc ON vc.id = s.classifier_version_id"""


def lab_views_sql(dialect: str) -> list[str]:
    """CREATE VIEW statements for the lab views, in creation order, for 'sqlite' or 'postgresql'."""
    if dialect not in _DAY:
        raise ValueError(f"no lab views for the {dialect!r} dialect; stainbridge supports sqlite and postgresql")
    day = day_sql(dialect, "received_at")
    return [
        site_validation_sql(dialect),
        # One row per distinct image content that was classified: its current answer, and what it rests on.
        f"""CREATE VIEW latest_results AS
SELECT r.image_id, r.source_name, r.site, r.specimen, r.patient_pseudonym, r.study_uid, r.received_at, r.processed_at,
       r.label, r.confidence, r.standardizer, r.classifier, r.reviewed_label, r.reviewer, r.archive_path, r.tta,
       r.magnification, {ROW_VALIDATION_SQL} AS validation,
       r.calibrated_confidence, r.ood_score, r.needs_review, r.review_reason
FROM results r
LEFT JOIN site_validation v ON v.site = r.site
WHERE r.status = 'done' AND r.duplicate_of_id IS NULL""",
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
        failures_by_reason_sql(dialect),
        SPECIMEN_DIFFERENTIALS_SQL,
        weekly_drift_sql(dialect),
        weekly_stain_sql(dialect),
        CANDIDATE_DISAGREEMENTS_SQL,
    ]
