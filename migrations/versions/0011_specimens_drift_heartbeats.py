"""Specimens (``images.specimen``, ``specimen_differentials``), weekly drift (``weekly_drift``) and the heartbeat.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07

- ``images.specimen``: the slide / patient sample a cell was taken from (``daemon.intake.specimens``), indexed;
  NULL for rows from before this revision. ``results`` shows it after ``site``, ``latest_results`` too.
- ``specimen_differentials``: the differential per site and specimen, one row per class (frozen copy of
  ``daemon.lab.views.SPECIMEN_DIFFERENTIALS_SQL`` as of this revision).
- ``weekly_drift``: per site, UTC week and class, the share of the week's cells, with the week's mean confidence
  and share flagged (frozen copy of ``daemon.lab.views.weekly_drift_sql``).
- ``workers``: one row per running service process, rewritten every few seconds (its state, why, and when it
  last finished a file); `stainbridge status` says "not running" when the newest row is stale.

The views are dropped and re-created from 0009's frozen text with the specimen inserted (no copies here).
Downgrade drops the column in place (SQLite 3.35+; a batch copy of ``images`` would lose its partial unique index's
WHERE), the view and the table.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from stainbridge.migrations import frozen_revision

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None

SPECIMEN_DIFFERENTIALS_VIEW_SQL = """CREATE VIEW specimen_differentials AS
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

_WEEK = {"sqlite": "date(received_at, '-6 days', 'weekday 1')",
         "postgresql": "CAST(date_trunc('week', received_at AT TIME ZONE 'UTC') AS date)"}
WEEKLY_DRIFT_VIEW_SQL = """CREATE VIEW weekly_drift AS
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


def _insert_once(text: str, anchor: str, replacement: str, what: str) -> str:
    if text.count(anchor) != 1:
        raise RuntimeError(f"the frozen {what} changed; revision 0011 builds on its text")
    return text.replace(anchor, replacement)


def _create_views(with_specimen: bool) -> None:
    results, views = frozen_revision("0009_needs_review.py")._views(with_columns=True)
    if with_specimen:
        results = _insert_once(results, "    i.site,\n", "    i.site,\n    i.specimen,\n", "results view")
        views[1] = _insert_once(views[1], "r.source_name, r.site, ", "r.source_name, r.site, r.specimen, ",
                                "latest_results view")
        views.append(SPECIMEN_DIFFERENTIALS_VIEW_SQL)
        views.append(WEEKLY_DRIFT_VIEW_SQL.format(week=_WEEK[op.get_bind().dialect.name]))
    for statement in (results, *views):
        op.execute(statement)


def _drop_views() -> None:
    op.execute("DROP VIEW IF EXISTS weekly_drift")
    op.execute("DROP VIEW IF EXISTS specimen_differentials")
    frozen_revision("0009_needs_review.py")._drop_views()


def upgrade() -> None:
    _drop_views()
    op.add_column("images", sa.Column("specimen", sa.String(length=128), nullable=True))
    op.create_index(op.f("ix_images_specimen"), "images", ["specimen"], unique=False)
    op.create_table(
        "workers",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("worker", sa.String(length=255), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("interval_seconds", sa.Float(), nullable=False),
        sa.Column("handled", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_processed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workers")),
        sa.UniqueConstraint("worker", name=op.f("uq_workers_worker")),
    )
    _create_views(with_specimen=True)


def downgrade() -> None:
    _drop_views()
    op.drop_table("workers")
    op.drop_index(op.f("ix_images_specimen"), table_name="images")
    op.execute("ALTER TABLE images DROP COLUMN specimen")  # in place (SQLite 3.35+): no batch copy of images
    _create_views(with_specimen=False)
