"""Model versions: which checkpoints produced which results.

Every checkpoint the service loads is recorded once per (kind, sha256) in ``model_versions``;
predictions point at those rows, so a result can always be traced to the exact file bytes.
Registering a checkpoint makes it the active version of its kind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from stainbridge.daemon.store import ModelKind, ModelVersion, utcnow


def _model_name(kind: ModelKind, path: str, header: dict[str, Any]) -> str:
    if path in ("none", "reinhard", "macenko", "histmatch"):
        return path
    stem = Path(path).name
    for suffix in (".safetensors", ".pt"):
        stem = stem.removesuffix(suffix)
    architecture = header.get("architecture")
    return f"{stem} ({architecture})" if architecture else stem


def register_model(
    session: Session, kind: ModelKind | str, path: str, sha256: str, header: dict[str, Any]
) -> ModelVersion:
    """Record a checkpoint (once per kind and sha256), make it the active one of its kind.

    The caller commits. A concurrent worker registering the same file at the same time is
    handled: the unique index decides and the existing row is reused.
    """
    kind = ModelKind(kind)
    version = session.scalars(
        select(ModelVersion).where(ModelVersion.kind == kind, ModelVersion.sha256 == sha256)
    ).one_or_none()
    if version is None:
        try:
            with session.begin_nested():
                version = ModelVersion(
                    kind=kind,
                    name=_model_name(kind, path, header)[:128],
                    path=str(path)[:1024],
                    sha256=sha256,
                    header=header,
                    metrics=dict(header.get("metrics") or {}),
                    active=False,
                )
                session.add(version)
                session.flush()
        except IntegrityError:
            version = session.scalars(
                select(ModelVersion).where(ModelVersion.kind == kind, ModelVersion.sha256 == sha256)
            ).one()
    session.execute(
        update(ModelVersion)
        .where(ModelVersion.kind == kind, ModelVersion.id != version.id, ModelVersion.active.is_(True))
        .values(active=False)
    )
    if not version.active:
        version.active = True
        version.promoted_at = utcnow()
    version.path = str(path)[:1024]
    session.flush()
    return version


def active_versions(session: Session) -> list[ModelVersion]:
    """The active version of each kind (standardizer first), for status and reports."""
    rows = session.scalars(select(ModelVersion).where(ModelVersion.active.is_(True))).all()
    return sorted(rows, key=lambda v: (v.kind.value != "standardizer", v.id))
