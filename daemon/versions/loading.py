"""Loading the configured models: verify the checkpoints, record them in the registry, serve the active ones.

`load_models` is what the service, `ingest`, `reprocess` and the hot swap share: the classifier and
standardizer named in ``[models]`` are loaded (a file at a registered path must still hold the
registered bytes), recorded with their sha256 in ``model_versions``, and the registry's active
versions are what is served (promotions stick across restarts).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from stainbridge.daemon.config import Settings
from stainbridge.daemon.logs import get_logger
from stainbridge.daemon.store import ModelKind, ModelVersion, VersionState
from stainbridge.daemon.versions import registry
from stainbridge.models.inference import (
    CheckpointError,
    Classifier,
    DeviceUnavailable,
    ModelMismatch,
    Standardizer,
    load_classifier,
    load_standardizer,
)

log = get_logger(__name__)


class ModelConfigError(Exception):
    """The configured models cannot be loaded; the message says which setting to fix."""



@dataclass(frozen=True)
class LoadedModels:
    classifier: Classifier
    standardizer: Standardizer
    classifier_version_id: int
    standardizer_version_id: int


def builtin_sha256(header: dict[str, Any]) -> str:
    """Identity of a built-in standardizer (none, reinhard, ...): the hash of its parameters."""
    return hashlib.sha256(json.dumps(header, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def load_models(settings: Settings, sessions: sessionmaker) -> LoadedModels:
    """Load and verify the configured checkpoints; record them (sha256) as the active versions."""
    spec = settings.models.classifier
    if not spec:
        raise ModelConfigError("no classifier configured; set [models] classifier to a checkpoint "
                               "(train one with `stainbridge train classifier`)")
    if not Path(spec).is_file():
        raise ModelConfigError(f"classifier checkpoint {spec} does not exist; fix [models] classifier "
                               "(or STAINBRIDGE_MODELS_CLASSIFIER)")
    std_spec = settings.models.standardizer
    try:
        # A file at a registered path must still be the registered bytes: overwriting the checkpoint
        # in place is refused, not silently taken as a new version.
        with sessions() as session:
            c_expected = _registered_sha256(session, ModelKind.classifier, spec)
            s_expected = _registered_sha256(session, ModelKind.standardizer, std_spec)
        classifier = load_classifier(spec, device=settings.models.device, expected_sha256=c_expected)
        standardizer = load_standardizer(std_spec, device=settings.models.device, classifier=classifier,
                                         expected_sha256=s_expected)
    except (CheckpointError, ModelMismatch, DeviceUnavailable, FileNotFoundError, OSError, ValueError) as exc:
        raise ModelConfigError(f"cannot load the configured models: {exc}") from None
    s_path = std_spec if standardizer.sha256 is None else str(Path(std_spec).resolve())
    s_sha = standardizer.sha256 or builtin_sha256(standardizer.header)
    with sessions.begin() as session:
        # A new configured file becomes active; a known one defers to the registry (promotions stick).
        registry.register_configured(session, ModelKind.classifier, str(Path(spec).resolve()), classifier.sha256,
                                     classifier.header)
        registry.register_configured(session, ModelKind.standardizer, s_path, s_sha, standardizer.header)
        c_active = registry.active_version(session, ModelKind.classifier)
        s_active = registry.active_version(session, ModelKind.standardizer)
    if c_active is None or s_active is None:
        raise ModelConfigError("the registry has no active model to serve; fix [models] or run "
                               "`stainbridge models promote ID`")
    try:
        if c_active.sha256 != classifier.sha256:
            classifier = registry.load_version(c_active, device=settings.models.device)
        if s_active.sha256 != s_sha:
            standardizer = registry.load_version(s_active, device=settings.models.device, classifier=classifier)
    except (registry.RegistryError, ModelMismatch, DeviceUnavailable, OSError, ValueError) as exc:
        raise ModelConfigError(f"cannot load the active registry version: {exc}") from None
    log.info("models_loaded", classifier=classifier.name, classifier_sha256=classifier.sha256[:12],
             standardizer=standardizer.name, standardizer_sha256=s_active.sha256[:12], device=str(classifier.device),
             classifier_version=c_active.id, standardizer_version=s_active.id,
             calibration=classifier.abstention.describe())
    return LoadedModels(classifier, standardizer, c_active.id, s_active.id)


def _registered_sha256(session: Session, kind: ModelKind, spec: str) -> str | None:
    """The sha256 the registry holds for the active checkpoint of `kind` at `spec`'s path, if any."""
    if not spec or not Path(spec).is_file():
        return None  # built-in standardizers (none, reinhard, ...) have no file
    return session.scalars(
        select(ModelVersion.sha256).where(ModelVersion.kind == kind, ModelVersion.path == str(Path(spec).resolve()),
                                          ModelVersion.state == VersionState.active).limit(1)
    ).first()
