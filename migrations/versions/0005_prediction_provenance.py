"""Predictions record how they were computed: ``tta`` and ``magnification``.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01

Two results of the same image by the same model versions can differ because of the service's
settings: ``[models] tta`` (the mean over the 8 turns and flips) and the site magnification of the
window the cell was seen through (the standardizer's site profile or ``[site] scale``). Both are
now stored per prediction and shown in ``results``; rows written before this revision keep NULL
(unknown). ``magnification`` is also NULL for a classifier without a reference window (whole frame).

The columns are nullable, so both dialects add them in place. ``results`` is re-created from
revision 0004's frozen text with the two columns after ``latency_ms``; the lab views read it, so
they are dropped first and re-created unchanged from 0004 too (that file is frozen: no copies here).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from stainbridge.migrations import frozen_revision

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None

# The results view from this revision on: 0004's frozen text with the two columns after latency_ms.
_LATENCY = "    p.latency_ms,\n"


def _results_view_sql(before: str) -> str:
    if before.count(_LATENCY) != 1:
        raise RuntimeError("migration 0004's results view changed; revision 0005 builds on its frozen text")
    return before.replace(_LATENCY, _LATENCY + "    p.tta,\n    p.magnification,\n")


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
    _create_views(_results_view_sql(lab.RESULTS_VIEW_SQL), lab._views(op.get_bind().dialect.name))


def downgrade() -> None:
    lab = frozen_revision("0004_lab_views.py")
    _drop_views(lab.VIEW_NAMES)
    with op.batch_alter_table("predictions") as batch:  # SQLite drops columns by rebuilding the table
        batch.drop_column("magnification")
        batch.drop_column("tta")
    _create_views(lab.RESULTS_VIEW_SQL, lab._views(op.get_bind().dialect.name))
