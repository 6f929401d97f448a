"""What each running worker actually serves, as opposed to what the registry says is active.

A promotion changes the registry at once; a service switches at its next poll, and only if the new
version loads. Until then (or for good, when the swap is refused) the two differ. Each worker records in
``served_models`` (one row per worker and site) the versions it serves and the version it refused, with
the reason; ``stainbridge status`` and the metrics read these rows. Rows of processes of this host that
are gone are removed when a worker writes its own, and ignored by readers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from stainbridge.daemon.intake import claims
from stainbridge.daemon.logs import get_logger
from stainbridge.daemon.store import ModelVersion, ServedModels, utcnow

if TYPE_CHECKING:  # loading imports torch (models.inference): `status` and the metrics need neither
    from stainbridge.daemon.versions.loading import LoadedModels

log = get_logger(__name__)


def record_served(sessions: sessionmaker, models: LoadedModels, *, refused_version: int | None = None,
                  refused_reason: str | None = None) -> None:
    """This worker serves ``models`` for their site (and refused ``refused_version``, if given). Never raises: the
    record is for people, and a database hiccup must not stop a batch."""
    worker = claims.claim_owner()
    try:
        with sessions.begin() as session:
            _forget_dead(session)
            row = session.scalars(select(ServedModels).where(ServedModels.worker == worker,
                                                             ServedModels.site == models.site)).one_or_none()
            if row is None:
                row = ServedModels(worker=worker, site=models.site, classifier_version_id=models.classifier_version_id,
                                   standardizer_version_id=models.standardizer_version_id)
                session.add(row)
            row.classifier_version_id = models.classifier_version_id
            row.standardizer_version_id = models.standardizer_version_id
            row.refused_version_id, row.refused_reason = refused_version, (refused_reason or None)
            row.updated_at = utcnow()
    except Exception as exc:  # noqa: BLE001 - see the docstring
        log.warning("served_models_not_recorded", site=models.site, error=f"{type(exc).__name__}: {exc}")


def _forget_dead(session: Session) -> None:
    dead = [w for w in session.scalars(select(ServedModels.worker).distinct()) if claims.owner_is_dead(w)]
    if dead:
        session.execute(delete(ServedModels).where(ServedModels.worker.in_(dead)))


def served(session: Session, worker: str | None = None) -> list[dict[str, Any]]:
    """The live workers' rows (only ``worker``'s when given): site, the served versions' ids and names, the refusal."""
    query = select(ServedModels).order_by(ServedModels.site, ServedModels.worker)
    if worker is not None:
        query = query.where(ServedModels.worker == worker)
    rows = [r for r in session.scalars(query) if not claims.owner_is_dead(r.worker)]
    ids = {i for r in rows for i in (r.classifier_version_id, r.standardizer_version_id, r.refused_version_id) if i}
    versions = {v.id: v for v in session.scalars(select(ModelVersion).where(ModelVersion.id.in_(ids)))}

    def version(version_id: int | None) -> dict[str, Any] | None:
        v = versions.get(version_id) if version_id is not None else None
        return None if v is None else {"id": v.id, "name": v.name, "sha256": v.sha256[:12]}

    return [{"worker": r.worker, "site": r.site, "classifier": version(r.classifier_version_id),
             "standardizer": version(r.standardizer_version_id), "refused": version(r.refused_version_id),
             "refused_reason": r.refused_reason, "since": r.updated_at.isoformat() if r.updated_at else None}
            for r in rows]
