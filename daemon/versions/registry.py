"""The model registry: every checkpoint the service may use, and which one serves each site.

Each site (incoming hospital, see docs/sites.md) has its own versions: a checkpoint is one
``model_versions`` row per (site, kind, sha256), in one of three states: ``candidate`` (registered,
not serving), ``active`` (serving the site's new predictions) and ``retired`` (served once). The
database allows exactly one active version per kind and site (a partial unique index), so two
workers promoting at once cannot both win. Predictions point at the versions that made them, so a
result can always be traced to the exact file bytes and the site it served.

The sha256 is checked on every load (``load_version``): a file changed at the same path is
refused with a ``checkpoint_changed`` log line, never silently registered as something else.

The configured files (``[models]``, the day-0 recipe) and the registry meet when a site is first
served in a process (``register_configured``): a file the site has never seen becomes its active
version (a new site, or the operator changed the configuration); a file it knows changes nothing, so
a version promoted by the nightly job, by ``stainbridge models promote`` or chosen by validation stays
active across restarts.
"""

from __future__ import annotations

import getpass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from stainbridge.daemon.config_values import STANDARDIZER_BUILTINS
from stainbridge.daemon.logs import get_logger
from stainbridge.daemon.store import ModelKind, ModelVersion, Promotion, PromotionAction, VersionState, utcnow

if TYPE_CHECKING:  # the inference path (torch) is imported only by what loads models, not by `status`
    from stainbridge.models.inference import Classifier, Standardizer

log = get_logger(__name__)

BUILTIN_STANDARDIZERS = STANDARDIZER_BUILTINS


class RegistryError(Exception):
    """A registry change or load is not possible; the message says what to do instead."""


def model_name(kind: ModelKind, path: str, header: dict[str, Any]) -> str:
    """The registry's name of a checkpoint: its file stem and architecture, or a built-in's name."""
    if path in BUILTIN_STANDARDIZERS:
        return path
    stem = Path(path).name
    for suffix in (".safetensors", ".pt"):
        stem = stem.removesuffix(suffix)
    architecture = header.get("architecture")
    return f"{stem} ({architecture})" if architecture else stem


def version_name(kind: ModelKind, path: str, header: dict[str, Any], *, site: str,
                 training_run_id: int | None = None) -> str:
    """A new version's registry name. A file registered by hand or configured keeps :func:`model_name`
    (the operator chose the file name); a checkpoint a retraining run produced (always ``run-N/<kind>``)
    is named by its kind, method, run, site and date, so that versions the nightly job made tell apart."""
    if training_run_id is None:
        return model_name(kind, path, header)[:128]
    method = header.get("architecture") or kind.value
    return f"{kind.value} {method} run {training_run_id} {site} {utcnow():%Y-%m-%d}"[:128]


def operator() -> str:
    """Who runs a `models` command: the login name, for the promotion history."""
    try:
        return f"{getpass.getuser()} (command line)"
    except (KeyError, OSError):  # no passwd entry for the uid (a container)
        return "command line"


def is_builtin(version: ModelVersion) -> bool:
    return version.kind is ModelKind.standardizer and version.path in BUILTIN_STANDARDIZERS


def find_version(session: Session, kind: ModelKind | str, sha256: str, site: str) -> ModelVersion | None:
    return session.scalars(
        select(ModelVersion).where(ModelVersion.kind == ModelKind(kind), ModelVersion.sha256 == sha256,
                                   ModelVersion.site == site)
    ).one_or_none()


def active_version(session: Session, kind: ModelKind | str, site: str) -> ModelVersion | None:
    return session.scalars(
        select(ModelVersion).where(ModelVersion.kind == ModelKind(kind), ModelVersion.site == site,
                                   ModelVersion.state == VersionState.active)
    ).one_or_none()


def active_versions(session: Session, site: str | None = None) -> list[ModelVersion]:
    """The active version of each kind of ``site`` (of every site when None), by site, standardizer first."""
    query = select(ModelVersion).where(ModelVersion.state == VersionState.active)
    if site is not None:
        query = query.where(ModelVersion.site == site)
    return sorted(session.scalars(query).all(), key=lambda v: (v.site, v.kind.value != "standardizer", v.id))


def list_versions(session: Session) -> list[ModelVersion]:
    return list(session.scalars(select(ModelVersion).order_by(ModelVersion.site, ModelVersion.kind, ModelVersion.id)).all())


def activate(session: Session, version: ModelVersion, *, reason: str | None = None,
             actor: str = "stainbridge") -> ModelVersion:
    """Make ``version`` the active one of its kind for its site; the previous active one is retired, and the
    change is recorded in the promotion history (by ``actor``, for ``reason``).

    The old row is retired (and flushed) before the new one is marked, so the one-active index
    never sees two. The caller commits.
    """
    if version.state is VersionState.active:
        return version
    previous = active_version(session, version.kind, version.site)
    session.execute(
        update(ModelVersion)
        .where(ModelVersion.kind == version.kind, ModelVersion.site == version.site, ModelVersion.id != version.id,
               ModelVersion.state == VersionState.active)
        .values(state=VersionState.retired)
        .execution_options(synchronize_session="fetch")
    )
    session.flush()
    version.state = VersionState.active
    version.promoted_at = utcnow()
    if reason:
        version.reason = reason
    _record(session, version, previous, PromotionAction.promote, actor, reason)
    session.flush()
    return version


def _record(session: Session, to: ModelVersion, previous: ModelVersion | None, action: PromotionAction,
            actor: str, reason: str | None) -> None:
    session.add(Promotion(kind=to.kind, site=to.site, from_version_id=previous.id if previous else None,
                          to_version_id=to.id, action=action, actor=actor[:128], reason=reason))


def register_model(
    session: Session, kind: ModelKind | str, path: str, sha256: str, header: dict[str, Any], *, site: str,
    state: VersionState = VersionState.active, training_run_id: int | None = None, actor: str = "configuration",
    reason: str | None = None,
) -> ModelVersion:
    """Record a checkpoint once per site, kind and sha256; ``state=active`` (the default) also activates it.

    The caller commits. A concurrent worker registering the same file at the same time is
    handled: the unique index decides and the existing row is reused.
    """
    kind = ModelKind(kind)
    version = find_version(session, kind, sha256, site)
    if version is None:
        try:
            with session.begin_nested():
                version = ModelVersion(
                    kind=kind, site=site, path=str(path)[:1024], sha256=sha256,
                    name=version_name(kind, path, header, site=site, training_run_id=training_run_id),
                    header=header, metrics=dict(header.get("metrics") or {}), state=VersionState.candidate,
                    training_run_id=training_run_id,
                )
                session.add(version)
                session.flush()
        except IntegrityError:
            version = find_version(session, kind, sha256, site)
            assert version is not None
    version.path = str(path)[:1024]
    if state is VersionState.active:
        activate(session, version, actor=actor, reason=reason)
    session.flush()
    return version


def register_configured(session: Session, kind: ModelKind, path: str, sha256: str,
                        header: dict[str, Any], *, site: str) -> ModelVersion | None:
    """A site served for the first time in this process: a configured checkpoint the site has never seen
    becomes its active version; a known one changes nothing. A file whose bytes changed at a registered
    path is refused (None, logged)."""
    known = find_version(session, kind, sha256, site)
    if known is not None:
        if active_version(session, kind, site) is None:
            activate(session, known, actor="configuration", reason="[models] names it and the site had none active")
        return known
    if path not in BUILTIN_STANDARDIZERS:
        same_path = session.scalars(
            select(ModelVersion).where(ModelVersion.kind == kind, ModelVersion.path == str(path)[:1024],
                                       ModelVersion.sha256 != sha256)
        ).first()
        if same_path is not None:
            log.error("checkpoint_changed", kind=kind.value, path=path, registered_version=same_path.id,
                      registered_sha256=same_path.sha256[:12], file_sha256=sha256[:12],
                      action="refused; restore the file, or copy it to a new name and set [models] to it, "
                             "or run `stainbridge models register PATH`")
            return None
    return register_model(session, kind, path, sha256, header, site=site, actor="configuration",
                          reason="[models] names it and the site had not served it")


def verify_file(version: ModelVersion) -> None:
    """Raise RegistryError unless the version's file still has its registered sha256."""
    if is_builtin(version):
        return
    from stainbridge.models.inference import file_sha256

    try:
        actual = file_sha256(version.path)
    except OSError as exc:
        raise RegistryError(f"version {version.id} ({version.name}): cannot read {version.path}: "
                            f"{exc.strerror or exc}; restore the file or roll back with "
                            f"`stainbridge models rollback {version.kind.value} --site {version.site}`") from None
    if actual != version.sha256:
        log.error("checkpoint_changed", kind=version.kind.value, path=version.path, version=version.id,
                  registered_sha256=version.sha256[:12], file_sha256=actual[:12])
        raise RegistryError(f"version {version.id} ({version.name}): {version.path} has changed since it was "
                            f"registered (sha256 {actual[:12]}, registered {version.sha256[:12]}); restore the "
                            "file, or register the new file as a new version with `stainbridge models register`")


def load_version(version: ModelVersion, *, device: str,
                 classifier: Classifier | None = None) -> Classifier | Standardizer:
    """Load a registered version through the inference path, its bytes checked against the registry."""
    from stainbridge.models.inference import CheckpointError, load_classifier, load_standardizer

    verify_file(version)
    try:
        if version.kind is ModelKind.classifier:
            return load_classifier(version.path, device=device, expected_sha256=version.sha256)
        if is_builtin(version):
            return load_standardizer(version.path, device=device, classifier=classifier)
        return load_standardizer(version.path, device=device, classifier=classifier, expected_sha256=version.sha256)
    except CheckpointError as exc:
        log.error("checkpoint_changed", kind=version.kind.value, path=version.path, version=version.id,
                  error=str(exc))
        raise RegistryError(str(exc)) from None


def promote(session: Session, version_id: int, *, reason: str | None = None,
            actor: str | None = None) -> ModelVersion:
    """Make a registered version active after checking its file; the caller commits."""
    version = session.get(ModelVersion, version_id)
    if version is None:
        raise RegistryError(f"no model version {version_id}; see `stainbridge models list`")
    verify_file(version)
    return activate(session, version, reason=reason or "promoted by hand", actor=actor or operator())


def rollback_target(session: Session, current: ModelVersion) -> ModelVersion | None:
    """The version ``models rollback`` would re-activate in place of ``current``: the one it was promoted over."""
    promoted = session.scalars(
        select(Promotion).where(Promotion.kind == current.kind, Promotion.site == current.site,
                                Promotion.to_version_id == current.id, Promotion.action == PromotionAction.promote)
        .order_by(Promotion.id.desc()).limit(1)).first()
    if promoted is None or promoted.from_version_id in (None, current.id):
        return None
    return session.get(ModelVersion, promoted.from_version_id)


def rollback(session: Session, kind: ModelKind | str, site: str, *, actor: str | None = None,
             reason: str | None = None) -> tuple[ModelVersion, ModelVersion]:
    """Retire the active version of ``kind`` for ``site`` and re-activate the one that was active before it.

    "Before it" comes from the promotion history: the version the current one was promoted over (a version
    that came back by a rollback counts from its own promotion, so a second rollback walks further back).
    Returns (retired, now active); the caller commits.
    """
    kind = ModelKind(kind)
    current = active_version(session, kind, site)
    if current is None:
        raise RegistryError(f"no active {kind.value} of site {site!r} to roll back")
    previous = rollback_target(session, current)
    if previous is None:
        raise RegistryError(f"no earlier {kind.value} version of site {site!r} to roll back to (see `stainbridge "
                            "models history`); promote one with `stainbridge models promote ID`")
    verify_file(previous)
    current.state = VersionState.retired
    current.reason = "rolled back"
    session.flush()
    previous.state = VersionState.active
    session.flush()
    _record(session, previous, current, PromotionAction.rollback, actor or operator(),
            reason or f"rolled back from version {current.id}")
    session.flush()
    return current, previous


def history(session: Session, site: str | None = None) -> list[dict[str, Any]]:
    """The `models history --json` objects: every promotion and rollback, oldest first."""
    query = select(Promotion).order_by(Promotion.id)
    if site is not None:
        query = query.where(Promotion.site == site)
    events = session.scalars(query).all()
    ids = {e.to_version_id for e in events} | {e.from_version_id for e in events if e.from_version_id}
    names = dict(session.execute(select(ModelVersion.id, ModelVersion.name).where(ModelVersion.id.in_(ids))).all())
    return [{"id": e.id, "time": e.created_at.isoformat() if e.created_at else None, "site": e.site,
             "kind": e.kind.value, "action": e.action.value, "from_version": e.from_version_id,
             "from_name": names.get(e.from_version_id), "to_version": e.to_version_id,
             "to_name": names.get(e.to_version_id), "actor": e.actor, "reason": e.reason} for e in events]


def describe(version: ModelVersion) -> dict[str, Any]:
    """The `models list --json` object of one version."""
    return {
        "id": version.id, "kind": version.kind.value, "site": version.site, "name": version.name,
        "state": version.state.value,
        "sha256": version.sha256, "created_at": version.created_at.isoformat() if version.created_at else None,
        "metrics": version.metrics or {}, "path": version.path, "training_run_id": version.training_run_id,
        "reason": version.reason, "site_profile": (version.header or {}).get("site_profile"),
        "adaptation": _adaptation((version.header or {}).get("adaptation")),
    }


def _adaptation(adaptation: Any) -> dict[str, Any] | None:
    """What a classifier was adapted to without labels (`train adapt`): the site's folder and image
    count, the standardizer in front, the class prior it was kept near and the share of the site's images
    per class afterwards."""
    if not isinstance(adaptation, dict):
        return None
    return {k: adaptation.get(k) for k in ("source", "standardizer", "prior", "class_prior", "predicted_class_shares",
                                           "labels_used")}
