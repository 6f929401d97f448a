"""What shadowing has gathered so far, per site: for `stainbridge status` and the metrics (docs/retraining.md, "Shadow").

For each site's shadowed candidate (``daemon.versions.shadow.shadowed_candidates``): the cells it scored, how many
of those it labels otherwise than their current answer (the active version's), and the gate's evidence so far:
the site's reviewed, archived cells it was not trained on (``runs.trained_on``) against ``[retraining]
min_gate_reviews``. The gate itself also leaves out a reviewed cell whose archived file is gone or unreadable.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from stainbridge.daemon.config import RetrainingSettings
from stainbridge.daemon.retraining.runs import trained_on
from stainbridge.daemon.store import Image, ImageStatus, ModelVersion, Prediction, Review, ShadowPrediction
from stainbridge.daemon.versions.shadow import shadowed_candidates


@dataclass
class ShadowSummary:
    site: str
    version: int
    kind: str
    name: str
    share: float  # [retraining] shadow_share (0: the service does not shadow, even with a candidate waiting)
    cells: int  # shadow predictions recorded
    disagreements: int  # of those, labelled otherwise than the cell's current answer
    disagreement_share: float | None  # None before the first cell
    reviews: int  # reviewed cells that count as the gate's evidence for it
    reviews_needed: int  # [retraining] min_gate_reviews

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def _scored(session: Session, version: ModelVersion) -> tuple[int, int]:
    """(shadow predictions of ``version``, those whose label differs from the image's latest prediction)."""
    shadowed = select(ShadowPrediction.image_id).where(ShadowPrediction.model_version_id == version.id)
    latest = (select(Prediction.image_id, func.max(Prediction.id).label("pid"))
              .where(Prediction.image_id.in_(shadowed)).group_by(Prediction.image_id).subquery())
    cells, disagreements = session.execute(
        select(func.count(ShadowPrediction.id), func.sum(case((ShadowPrediction.label != Prediction.label, 1), else_=0)))
        .join(latest, latest.c.image_id == ShadowPrediction.image_id).join(Prediction, Prediction.id == latest.c.pid)
        .where(ShadowPrediction.model_version_id == version.id)).one()
    return int(cells or 0), int(disagreements or 0)


def evidence(session: Session, version: ModelVersion) -> int:
    """Reviewed, archived cells of the version's site that it was not trained on (the gate's evidence count)."""
    reviewed = session.scalars(
        select(Image.sha256).where(Image.site == version.site, Image.status == ImageStatus.done,
                                   Image.archive_path.is_not(None),
                                   Image.id.in_(select(Review.image_id).where(Review.superseded_at.is_(None))))
    ).all()
    excluded = trained_on(session, version)
    return sum(1 for sha in set(reviewed) if sha and sha not in excluded)


def shadow_summaries(session: Session, retraining: RetrainingSettings) -> list[ShadowSummary]:
    """One summary per site with a shadowed candidate, by site."""
    out = []
    for site, version in sorted(shadowed_candidates(session).items()):
        cells, disagreements = _scored(session, version)
        out.append(ShadowSummary(site, version.id, version.kind.value, version.name, retraining.shadow_share, cells,
                                 disagreements, round(disagreements / cells, 4) if cells else None,
                                 evidence(session, version), retraining.min_gate_reviews))
    return out
