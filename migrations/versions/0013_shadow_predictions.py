"""Shadow predictions of a candidate awaiting evidence, the gate's verdict, and the review queue's first tier.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-08

- ``model_versions.gate_verdict``: the promotion gate's last verdict on a version (``passed``, ``refused``,
  ``awaiting_evidence``: refused only for too few reviewed cells; NULL: never gated). Existing candidates whose
  recorded refusal is the gate's "needs N reviewed cells, has M" are marked ``awaiting_evidence``; every other row
  stays NULL (the reason text stays as it was).
- ``shadow_predictions``: per image and candidate version, the candidate's label, plain and calibrated confidence
  and when (``[retraining] shadow_share`` of new cells, scored by the site's shadowed candidate). Never a result.
- ``candidate_disagreements``: unreviewed classified cells where the site's shadowed candidate disagrees with the
  current answer (frozen copy of ``daemon.lab.views.CANDIDATE_DISAGREEMENTS_SQL`` as of this revision).

No existing view changes. Downgrade drops the view, the table and the column (in place, SQLite 3.35+).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None

CANDIDATE_DISAGREEMENTS_VIEW_SQL = """CREATE VIEW candidate_disagreements AS
SELECT r.image_id, r.source_name, r.site, r.received_at, r.label, r.confidence, r.calibrated_confidence,
       sp.label AS candidate_label, sp.confidence AS candidate_confidence,
       sp.calibrated_confidence AS candidate_calibrated_confidence,
       c.id AS candidate_version_id, c.kind AS candidate_kind, c.name AS candidate, r.archive_path
FROM latest_results r
JOIN shadow_predictions sp ON sp.image_id = r.image_id
JOIN (SELECT v.id, v.site, v.kind, v.name
FROM model_versions v
JOIN (SELECT site, MAX(id) AS id FROM model_versions GROUP BY site) n ON n.id = v.id
WHERE v.state = 'candidate' AND v.gate_verdict = 'awaiting_evidence') c ON c.id = sp.model_version_id AND c.site = r.site
WHERE r.reviewed_label IS NULL AND sp.label <> r.label"""


def upgrade() -> None:
    op.add_column("model_versions", sa.Column("gate_verdict", sa.String(length=32), nullable=True))
    op.execute("UPDATE model_versions SET gate_verdict = 'awaiting_evidence' "
               "WHERE state = 'candidate' AND reason LIKE 'needs % reviewed cells, has %'")
    op.create_table(
        "shadow_predictions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("model_version_id", sa.Integer(), nullable=False),
        sa.Column("label", sa.String(length=64), nullable=False),
        sa.Column("confidence", sa.Float(), nullable=False),
        sa.Column("calibrated_confidence", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["image_id"], ["images.id"], name=op.f("fk_shadow_predictions_image_id_images"),
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["model_version_id"], ["model_versions.id"],
                                name=op.f("fk_shadow_predictions_model_version_id_model_versions")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_shadow_predictions")),
    )
    op.create_index(op.f("ix_shadow_predictions_model_version_id"), "shadow_predictions", ["model_version_id"])
    op.create_index(op.f("uq_shadow_predictions_image_id_version"), "shadow_predictions",
                    ["image_id", "model_version_id"], unique=True)
    op.execute(CANDIDATE_DISAGREEMENTS_VIEW_SQL)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS candidate_disagreements")
    op.drop_index(op.f("uq_shadow_predictions_image_id_version"), table_name="shadow_predictions")
    op.drop_index(op.f("ix_shadow_predictions_model_version_id"), table_name="shadow_predictions")
    op.drop_table("shadow_predictions")
    op.execute("ALTER TABLE model_versions DROP COLUMN gate_verdict")  # in place: no batch copy of model_versions
