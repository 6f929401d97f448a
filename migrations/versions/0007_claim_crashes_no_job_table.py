"""Crashes are counted per image in the database; the scheduler's pickled job table is dropped.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-08

- ``images.crashes``: how many times a worker died (killed, out of memory, a decoder crash, the
  systemd watchdog) while it held this image's claim, since the claim last ended otherwise. A claim
  released because its owner is dead adds one; at ``intake.claims.MAX_CRASHES`` the file is
  quarantined without being read again. Before, the count lived in the service's memory and a file
  that killed the process was retried until systemd gave up. Existing rows start at 0.
- ``apscheduler_jobs``: APScheduler's SQLAlchemy job store kept the nightly job there as a pickle
  and unpickled it at every start, so whoever could write to the database could run code on every
  worker. The job now lives in memory (its schedule comes from the configuration); the table goes.
  Downgrading does not bring it back: APScheduler creates it itself when an older version starts.

Both dialects add and drop the column in place (SQLite 3.35+ has ``DROP COLUMN``; no view names it).
"""

from __future__ import annotations

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None


def upgrade() -> None:
    op.execute("ALTER TABLE images ADD COLUMN crashes INTEGER NOT NULL DEFAULT 0")
    op.execute("DROP TABLE IF EXISTS apscheduler_jobs")


def downgrade() -> None:
    op.execute("ALTER TABLE images DROP COLUMN crashes")
