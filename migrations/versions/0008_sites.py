"""Sites: model versions per site (one active per kind and site), the validation state, its sample.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-08

One service may receive several hospitals (sites); each has its own recipe (active standardizer and
classifier) and validation state (docs/sites.md).

- ``model_versions.site``: every existing version becomes the default site's: ``[site] name`` when the
  code runs the migration (``default_site`` in the Alembic attributes), else the site most images were
  recorded under (it was ``[site] name``), else ``default``. The one-active index becomes one active per
  (site, kind); the same checkpoint may be registered for several sites: unique per (site, kind, sha256).
- ``sites``: one row per site, ``unvalidated`` until `stainbridge sites validate` records its recipe and
  score; a row for every site already in ``images`` and for the default site when it has versions.
- ``validation_cells``: the cells chosen for a site's expert review, in review order; ``images.site``
  gets an index (a site's cells are looked up on their own now).
- views: ``site_validation`` (per site, one line saying its state) and ``latest_results`` with that line
  as a last column, ``validation``. The lab views are dropped and re-created from 0004's frozen text
  (``results`` from 0005's), since SQLite rebuilds ``model_versions`` in batch mode.

Downgrade keeps every prediction: versions of one checkpoint registered for several sites become one row
(the oldest) that the predictions and runs point to, and per kind only the default site's active version
stays active (the others are retired). The sites, their validation state and samples are dropped.
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import context, op

from stainbridge.migrations import frozen_revision

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None

SITE_STATES = ("unvalidated", "validated")
REVIEWS_NEEDED = 50  # [site] validation_reviews' default; the service writes the configured value at start-up
_TWO_DECIMALS = {"sqlite": "printf('%.2f', {col})", "postgresql": "to_char({col}, 'FM0.00')"}

# Frozen copies of the two views this revision adds or changes (daemon/lab/views.py as of this revision).
SITE_VALIDATION_VIEW_SQL = """CREATE VIEW site_validation AS
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
LATEST_RESULTS_VIEW_SQL = """CREATE VIEW latest_results AS
SELECT r.image_id, r.source_name, r.site, r.patient_pseudonym, r.study_uid, r.received_at, r.processed_at,
       r.label, r.confidence, r.standardizer, r.classifier, r.reviewed_label, r.reviewer, r.archive_path, r.tta,
       r.magnification, CASE WHEN v.state = 'validated'
            AND (COALESCE(r.standardizer_sha256, '') <> COALESCE(v.validated_standardizer_sha256, '')
                 OR COALESCE(r.classifier_sha256, '') <> COALESCE(v.validated_classifier_sha256, ''))
       THEN 'not the validated recipe (site ' || v.validation || ')'
       ELSE v.validation END AS validation
FROM results r
LEFT JOIN site_validation v ON v.site = r.site
WHERE r.status = 'done' AND r.duplicate_of_id IS NULL"""


def _site_validation_sql(dialect: str) -> str:
    number = _TWO_DECIMALS[dialect]
    return SITE_VALIDATION_VIEW_SQL.format(**{key: number.format(col=f"s.{col}") for key, col in (
        ("score", "balanced_accuracy"), ("low", "ci_low"), ("high", "ci_high"))})


def _default_site(bind: sa.engine.Connection) -> str:
    given = context.config.attributes.get("default_site")
    if given:
        return str(given)
    row = bind.execute(sa.text("SELECT site, COUNT(*) AS n FROM images GROUP BY site ORDER BY n DESC, site")).first()
    return row[0] if row else "default"


def _drop_views(names: tuple[str, ...]) -> None:
    for name in reversed(names):
        op.execute(f"DROP VIEW IF EXISTS {name}")
    op.execute("DROP VIEW IF EXISTS results")


def _create_views(dialect: str, *, with_sites: bool) -> None:
    lab = frozen_revision("0004_lab_views.py")
    op.execute(frozen_revision("0005_prediction_provenance.py")._results_view_sql(lab.RESULTS_VIEW_SQL))
    statements = lab._views(dialect)
    if with_sites:
        op.execute(_site_validation_sql(dialect))
        statements[0] = LATEST_RESULTS_VIEW_SQL
    else:
        statements[0] = frozen_revision("0006_latest_results_provenance.py").LATEST_RESULTS_VIEW_SQL
    for statement in statements:
        op.execute(statement)


def upgrade() -> None:
    bind = op.get_bind()
    dialect = bind.dialect.name
    site = _default_site(bind)
    _drop_views(("site_validation", *frozen_revision("0004_lab_views.py").VIEW_NAMES))
    # Dropped outside batch mode: SQLite's batch copy would lose the partial index's WHERE.
    op.drop_index(op.f("uq_model_versions_one_active"), table_name="model_versions")
    op.drop_index(op.f("uq_model_versions_kind_sha256"), table_name="model_versions")
    with op.batch_alter_table("model_versions") as batch:
        batch.add_column(sa.Column("site", sa.String(length=128), nullable=False, server_default=site))
    with op.batch_alter_table("model_versions") as batch:
        batch.alter_column("site", server_default=None)
    op.create_index(op.f("uq_model_versions_site_kind_sha256"), "model_versions", ["site", "kind", "sha256"],
                    unique=True)
    op.create_index(op.f("uq_model_versions_one_active_per_site"), "model_versions", ["site", "kind"], unique=True,
                    sqlite_where=sa.text("state = 'active'"), postgresql_where=sa.text("state = 'active'"))

    sites = op.create_table(
        "sites",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reviews_needed", sa.Integer(), nullable=False),
        sa.Column("sample_chosen_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("recipe", sa.String(length=512), nullable=True),
        sa.Column("standardizer_version_id", sa.Integer(), nullable=True),
        sa.Column("classifier_version_id", sa.Integer(), nullable=True),
        sa.Column("balanced_accuracy", sa.Float(), nullable=True),
        sa.Column("ci_low", sa.Float(), nullable=True),
        sa.Column("ci_high", sa.Float(), nullable=True),
        sa.Column("validated_cells", sa.Integer(), nullable=True),
        sa.Column("validation", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("validated_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["standardizer_version_id"], ["model_versions.id"],
                                name=op.f("fk_sites_standardizer_version_id_model_versions")),
        sa.ForeignKeyConstraint(["classifier_version_id"], ["model_versions.id"],
                                name=op.f("fk_sites_classifier_version_id_model_versions")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sites")),
        sa.UniqueConstraint("name", name=op.f("uq_sites_name")),
        sa.CheckConstraint(f"state IN ({', '.join(repr(s) for s in SITE_STATES)})", name=op.f("ck_sites_site_state")),
    )
    op.create_table(
        "validation_cells",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("site_id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("predicted", sa.String(length=64), nullable=False),
        sa.Column("disagreement", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["site_id"], ["sites.id"], name=op.f("fk_validation_cells_site_id_sites"),
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["image_id"], ["images.id"], name=op.f("fk_validation_cells_image_id_images"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_validation_cells")),
        sa.UniqueConstraint("image_id", name=op.f("uq_validation_cells_image_id")),
    )
    op.create_index(op.f("uq_validation_cells_site_id_rank"), "validation_cells", ["site_id", "rank"], unique=True)
    op.create_index(op.f("ix_images_site"), "images", ["site"])  # a site's cells: its sample, its reviews
    names = [row[0] for row in bind.execute(sa.text("SELECT DISTINCT site FROM images ORDER BY site"))]
    if bind.execute(sa.text("SELECT COUNT(*) FROM model_versions")).scalar_one():
        names = [site, *names]
    now = datetime.now(UTC)
    op.bulk_insert(sites, [{"name": name, "state": "unvalidated", "reviews_needed": REVIEWS_NEEDED, "validation": {},
                            "created_at": now} for name in dict.fromkeys(names)])
    _create_views(dialect, with_sites=True)


def _collapse_sites(bind: sa.engine.Connection, site: str) -> None:
    """One row per (kind, sha256), and per kind one active version: the default site's, else the oldest."""
    keep = {kind: bind.execute(sa.text(
        "SELECT m.kind, m.sha256 FROM model_versions m WHERE m.state = 'active' AND m.kind = :kind "
        "ORDER BY CASE WHEN m.site = :site THEN 0 ELSE 1 END, m.id"), {"kind": kind, "site": site}).first()
        for kind in ("standardizer", "classifier")}
    oldest = "(SELECT MIN(o.id) FROM model_versions o, model_versions m WHERE m.id = {col} AND o.kind = m.kind " \
             "AND o.sha256 = m.sha256)"
    for table, column in (("predictions", "classifier_version_id"), ("predictions", "standardizer_version_id"),
                          ("training_runs", "model_version_id")):
        bind.execute(sa.text(f"UPDATE {table} SET {column} = {oldest.format(col=f'{table}.{column}')} "
                             f"WHERE {column} IS NOT NULL"))
    bind.execute(sa.text("DELETE FROM model_versions WHERE id NOT IN "
                         "(SELECT MIN(o.id) FROM model_versions o GROUP BY o.kind, o.sha256)"))
    bind.execute(sa.text("UPDATE model_versions SET state = 'retired' WHERE state = 'active'"))
    for row in keep.values():
        if row is not None:
            bind.execute(sa.text("UPDATE model_versions SET state = 'active' WHERE kind = :kind AND sha256 = :sha"),
                         {"kind": row[0], "sha": row[1]})


def downgrade() -> None:
    bind = op.get_bind()
    site = _default_site(bind)
    _drop_views(("site_validation", *frozen_revision("0004_lab_views.py").VIEW_NAMES))
    op.drop_index(op.f("ix_images_site"), table_name="images")
    op.drop_index(op.f("uq_validation_cells_site_id_rank"), table_name="validation_cells")
    op.drop_table("validation_cells")
    op.drop_table("sites")
    op.drop_index(op.f("uq_model_versions_one_active_per_site"), table_name="model_versions")
    op.drop_index(op.f("uq_model_versions_site_kind_sha256"), table_name="model_versions")
    _collapse_sites(bind, site)
    with op.batch_alter_table("model_versions") as batch:
        batch.drop_column("site")
    op.create_index(op.f("uq_model_versions_kind_sha256"), "model_versions", ["kind", "sha256"], unique=True)
    op.create_index(op.f("uq_model_versions_one_active"), "model_versions", ["kind"], unique=True,
                    sqlite_where=sa.text("state = 'active'"), postgresql_where=sa.text("state = 'active'"))
    _create_views(bind.dialect.name, with_sites=False)
