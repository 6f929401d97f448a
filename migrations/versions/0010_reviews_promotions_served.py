"""Review history, the promotion history, and what each worker serves.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07

- ``reviews.superseded_at``: one current review per image and reviewer (a partial unique index over the
  rows where it is NULL); a changed label supersedes the old row, which stays as history. Existing
  duplicates: every row but the newest of an (image, reviewer) pair is marked superseded, at the time the
  next one was recorded.
- ``promotions``: every change of a site's active version of one kind (``promote`` or ``rollback``, from
  which version to which, by whom, why, when): `models rollback` goes back along it and `models history`
  lists it. Seeded from ``model_versions.promoted_at``: per site and kind, the versions ever promoted in
  that order (the active one last), each promoted from the one before (actor ``migration``).
- ``served_models``: per worker and site, the versions the service actually serves and a hot swap it
  refused (``status`` and the metrics report these, not only the registry's active versions).

Downgrade drops the two tables and the column: superseded reviews become ordinary rows again (the
``results`` view shows the newest review of an image, which is the current one).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None

KINDS = ("standardizer", "classifier")
ACTIONS = ("promote", "rollback")
CURRENT = sa.text("superseded_at IS NULL")


def _check(column: str, values: tuple[str, ...], name: str) -> sa.CheckConstraint:
    return sa.CheckConstraint(f"{column} IN ({', '.join(repr(v) for v in values)})", name=op.f(name))


def _version_fk(table: str, column: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint([column], ["model_versions.id"], name=op.f(f"fk_{table}_{column}_model_versions"))


def _supersede_duplicate_reviews(bind: sa.engine.Connection) -> None:
    later = "FROM reviews n WHERE n.image_id = reviews.image_id AND n.reviewer = reviews.reviewer AND n.id > reviews.id"
    bind.execute(sa.text(f"UPDATE reviews SET superseded_at = (SELECT MIN(n.created_at) {later}) "
                         f"WHERE EXISTS (SELECT 1 {later})"))


def _seed_promotions(bind: sa.engine.Connection) -> None:
    rows = bind.execute(sa.text(
        "SELECT id, kind, site, promoted_at FROM model_versions WHERE promoted_at IS NOT NULL "
        "ORDER BY site, kind, CASE WHEN state = 'active' THEN 1 ELSE 0 END, promoted_at, id")).all()
    history, previous = [], {}
    for version_id, kind, site, promoted_at in rows:
        history.append({"kind": kind, "site": site, "from_version_id": previous.get((site, kind)),
                        "to_version_id": version_id, "action": "promote", "actor": "migration",
                        "reason": "recorded before the promotion history was kept (model_versions.promoted_at)",
                        "created_at": promoted_at})  # as read: SQLite hands back text, written back as it was
        previous[(site, kind)] = version_id
    if history:
        bind.execute(sa.text("INSERT INTO promotions (kind, site, from_version_id, to_version_id, action, actor, "
                             "reason, created_at) VALUES (:kind, :site, :from_version_id, :to_version_id, :action, "
                             ":actor, :reason, :created_at)"), history)


def upgrade() -> None:
    bind = op.get_bind()
    op.add_column("reviews", sa.Column("superseded_at", sa.DateTime(timezone=True), nullable=True))
    _supersede_duplicate_reviews(bind)
    op.create_index(op.f("uq_reviews_current"), "reviews", ["image_id", "reviewer"], unique=True,
                    sqlite_where=CURRENT, postgresql_where=CURRENT)
    op.create_table(
        "promotions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("site", sa.String(length=128), nullable=False),
        sa.Column("from_version_id", sa.Integer(), nullable=True),
        sa.Column("to_version_id", sa.Integer(), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("actor", sa.String(length=128), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        _version_fk("promotions", "from_version_id"),
        _version_fk("promotions", "to_version_id"),
        _check("kind", KINDS, "ck_promotions_model_kind"),
        _check("action", ACTIONS, "ck_promotions_promotion_action"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_promotions")),
    )
    op.create_index(op.f("ix_promotions_site_kind"), "promotions", ["site", "kind"])
    op.create_table(
        "served_models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("worker", sa.String(length=128), nullable=False),
        sa.Column("site", sa.String(length=128), nullable=False),
        sa.Column("classifier_version_id", sa.Integer(), nullable=False),
        sa.Column("standardizer_version_id", sa.Integer(), nullable=False),
        sa.Column("refused_version_id", sa.Integer(), nullable=True),
        sa.Column("refused_reason", sa.Text(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        _version_fk("served_models", "classifier_version_id"),
        _version_fk("served_models", "standardizer_version_id"),
        _version_fk("served_models", "refused_version_id"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_served_models")),
    )
    op.create_index(op.f("uq_served_models_worker_site"), "served_models", ["worker", "site"], unique=True)
    _seed_promotions(bind)


def downgrade() -> None:
    op.drop_index(op.f("uq_served_models_worker_site"), table_name="served_models")
    op.drop_table("served_models")
    op.drop_index(op.f("ix_promotions_site_kind"), table_name="promotions")
    op.drop_table("promotions")
    op.drop_index(op.f("uq_reviews_current"), table_name="reviews")
    # Plain DROP COLUMN (SQLite >= 3.35): batch mode's table copy would break the views over reviews.
    op.execute("ALTER TABLE reviews DROP COLUMN superseded_at")
