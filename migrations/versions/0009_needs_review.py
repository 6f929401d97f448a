"""Predictions say whether a person should look at the cell: calibrated confidence, OOD score, needs_review.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07

The classifier's checkpoint now carries a temperature and out-of-distribution statistics
(``models.abstention``); the one inference path turns them into a calibrated confidence, an
out-of-distribution score and a flag with its reason (``low_confidence`` or ``not_a_known_class``).
All four are stored per prediction, shown in ``results`` (after ``magnification``) and appended to
``latest_results`` (after 0008's ``validation``), so that a lab counts flagged cells apart with a plain ``WHERE needs_review``.
Rows from before this revision keep NULL (not assessed); ``ood_score`` is also NULL for a classifier
without OOD statistics.

The columns are nullable, so both dialects add them in place. The views are re-created from the
frozen text of revisions 0004, 0005 and 0008 (``site_validation``, ``latest_results``) with the new
columns inserted (no copies here).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from stainbridge.migrations import frozen_revision

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None

COLUMNS = ("calibrated_confidence", "ood_score", "needs_review", "review_reason")
_MAGNIFICATION = "    p.magnification,\n"
_LATEST_TAIL = "END AS validation\nFROM results r"


def _insert_once(text: str, anchor: str, addition: str, what: str) -> str:
    if text.count(anchor) != 1:
        raise RuntimeError(f"the frozen {what} changed; revision 0009 builds on its text")
    return text.replace(anchor, anchor + addition)


def _results_view_sql(before: str) -> str:
    return _insert_once(before, _MAGNIFICATION, "".join(f"    p.{c},\n" for c in COLUMNS), "results view")


def _latest_results_sql(before: str) -> str:
    tail = _LATEST_TAIL.replace("\nFROM", ",\n       " + ", ".join(f"r.{c}" for c in COLUMNS) + "\nFROM")
    if before.count(_LATEST_TAIL) != 1:
        raise RuntimeError("the frozen latest_results view changed; revision 0009 builds on its text")
    return before.replace(_LATEST_TAIL, tail)


def _views(with_columns: bool) -> tuple[str, list[str]]:
    """(the results view, the other views in creation order) as of 0008, with this revision's columns or not."""
    lab, provenance, sites = (frozen_revision(f) for f in ("0004_lab_views.py", "0005_prediction_provenance.py",
                                                          "0008_sites.py"))
    dialect = op.get_bind().dialect.name
    results = provenance._results_view_sql(lab.RESULTS_VIEW_SQL)
    statements = lab._views(dialect)
    statements[0] = sites.LATEST_RESULTS_VIEW_SQL
    if with_columns:
        results, statements[0] = _results_view_sql(results), _latest_results_sql(statements[0])
    return results, [sites._site_validation_sql(dialect), *statements]


def _drop_views() -> None:
    for name in reversed(("site_validation", *frozen_revision("0004_lab_views.py").VIEW_NAMES)):
        op.execute(f"DROP VIEW IF EXISTS {name}")
    op.execute("DROP VIEW IF EXISTS results")


def _create_views(with_columns: bool) -> None:
    results, views = _views(with_columns)
    for statement in (results, *views):
        op.execute(statement)


def upgrade() -> None:
    _drop_views()
    op.add_column("predictions", sa.Column("calibrated_confidence", sa.Float(), nullable=True))
    op.add_column("predictions", sa.Column("ood_score", sa.Float(), nullable=True))
    op.add_column("predictions", sa.Column("needs_review", sa.Boolean(), nullable=True))
    op.add_column("predictions", sa.Column("review_reason", sa.String(length=32), nullable=True))
    _create_views(with_columns=True)


def downgrade() -> None:
    _drop_views()
    with op.batch_alter_table("predictions") as batch:  # SQLite drops columns by rebuilding the table
        for column in reversed(COLUMNS):
            batch.drop_column(column)
    _create_views(with_columns=False)
