"""The stain of each received image (``images.stain_*``), its weekly means (``weekly_stain``), and
``failures_by_reason``'s times with their zone on SQLite.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-08

- ``images.stain_{background,other_stained,nucleus}_{l,a,b}``: the median CIE L*a*b* of each stain region of the
  received (unstandardized) image, measured when the service records it (``models.metrics.stain_summary``); NULL for
  rows from before this revision and for a region too small to measure.
- ``weekly_stain``: per site and UTC week, the cells measured and the mean of their medians per region (frozen copy
  of ``daemon.lab.views.weekly_stain_sql`` as of this revision); drift compares it with the site's baseline.
- ``failures_by_reason``: on SQLite its ``first_at`` / ``last_at`` came out as stored, UTC text without a zone; they
  are now ISO 8601 with ``+00:00`` (PostgreSQL's timestamptz always carried its zone: its view is re-created as it was).

The new columns are added and dropped in place (SQLite 3.35+): a batch copy of ``images`` would lose its partial
unique index's WHERE, and no view reads them but ``weekly_stain``, which goes first.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None

REGIONS = ("background", "other_stained", "nucleus")
COLUMNS = tuple(f"stain_{region}_{axis}" for region in REGIONS for axis in "lab")

_WEEK = {"sqlite": "date(received_at, '-6 days', 'weekday 1')",
         "postgresql": "CAST(date_trunc('week', received_at AT TIME ZONE 'UTC') AS date)"}
WEEKLY_STAIN_VIEW_SQL = """CREATE VIEW weekly_stain AS
SELECT site, {week} AS week, COUNT(*) AS cells,
       CAST(AVG(stain_background_l) AS DOUBLE PRECISION) AS background_l,
       CAST(AVG(stain_background_a) AS DOUBLE PRECISION) AS background_a,
       CAST(AVG(stain_background_b) AS DOUBLE PRECISION) AS background_b,
       CAST(AVG(stain_other_stained_l) AS DOUBLE PRECISION) AS other_stained_l,
       CAST(AVG(stain_other_stained_a) AS DOUBLE PRECISION) AS other_stained_a,
       CAST(AVG(stain_other_stained_b) AS DOUBLE PRECISION) AS other_stained_b,
       CAST(AVG(stain_nucleus_l) AS DOUBLE PRECISION) AS nucleus_l,
       CAST(AVG(stain_nucleus_a) AS DOUBLE PRECISION) AS nucleus_a,
       CAST(AVG(stain_nucleus_b) AS DOUBLE PRECISION) AS nucleus_b
FROM images
WHERE status = 'done' AND duplicate_of_id IS NULL AND stain_background_l IS NOT NULL
GROUP BY site, {week}"""

_REASON = {
    "sqlite": "CASE WHEN instr(error, ':') > 0 THEN substr(error, 1, instr(error, ':') - 1) ELSE error END",
    "postgresql": "split_part(error, ':', 1)",
}
_TIMES = {  # (first_at, last_at) before this revision, and with it
    False: ("MIN(received_at)", "MAX(received_at)"),
    True: ("strftime('%Y-%m-%dT%H:%M:%S', MIN(received_at)) || '+00:00'",
           "strftime('%Y-%m-%dT%H:%M:%S', MAX(received_at)) || '+00:00'"),
}
FAILURES_BY_REASON_VIEW_SQL = """CREATE VIEW failures_by_reason AS
SELECT {reason} AS reason, site, COUNT(*) AS images, {first} AS first_at, {last} AS last_at
FROM images
WHERE status = 'failed'
GROUP BY {reason}, site"""


def _failures_by_reason(zoned: bool) -> None:
    dialect = op.get_bind().dialect.name
    if dialect != "sqlite":
        return  # PostgreSQL's view is unchanged
    first, last = _TIMES[zoned]
    op.execute("DROP VIEW IF EXISTS failures_by_reason")
    op.execute(FAILURES_BY_REASON_VIEW_SQL.format(reason=_REASON[dialect], first=first, last=last))


def upgrade() -> None:
    for column in COLUMNS:
        op.add_column("images", sa.Column(column, sa.Float(), nullable=True))
    op.execute(WEEKLY_STAIN_VIEW_SQL.format(week=_WEEK[op.get_bind().dialect.name]))
    _failures_by_reason(zoned=True)


def downgrade() -> None:
    _failures_by_reason(zoned=False)
    op.execute("DROP VIEW IF EXISTS weekly_stain")
    for column in reversed(COLUMNS):
        op.execute(f"ALTER TABLE images DROP COLUMN {column}")  # in place (SQLite 3.35+): no batch copy of images
