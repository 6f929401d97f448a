"""Loading models: the configured day-0 recipe, each site's active versions, one copy per checkpoint.

``load_day0`` loads and verifies the checkpoints named in ``[models]`` (a file at a registered path
must still hold the registered bytes): the day-0 ``Recipe`` every new site starts on (docs/sites.md).
``load_site`` records them for a site that has never seen them (a validated site keeps its recipe)
and loads the site's active versions from the registry, through a ``NetworkCache`` that loads each
checkpoint once, however many sites it serves (by sha256). ``load_models`` is both for the one site
``[site] name``: what ``reprocess`` and the tests use; the service, ``ingest`` and the hot swap go
through ``daemon.versions.site_models``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from stainbridge.daemon.config import Settings
from stainbridge.daemon.logs import get_logger
from stainbridge.daemon.store import ModelKind, ModelVersion, SiteState, VersionState
from stainbridge.daemon.versions import registry
from stainbridge.daemon.versions.site_state import ensure_site
from stainbridge.models.inference import (
    CheckpointError,
    Classifier,
    DeviceUnavailable,
    ModelMismatch,
    Standardizer,
    file_sha256,
    load_classifier,
    load_standardizer,
)

log = get_logger(__name__)


class ModelConfigError(Exception):
    """The configured models cannot be loaded; the message says which setting to fix."""


@dataclass(frozen=True)
class LoadedModels:
    """The pair of networks that serves one site, and the registry versions its predictions name."""

    classifier: Classifier
    standardizer: Standardizer
    classifier_version_id: int
    standardizer_version_id: int
    site: str


@dataclass(frozen=True)
class Recipe:
    """A standardizer and the classifier behind it, loaded and verified, with where they came from: the
    day-0 recipe (``[models]``), a ``[site] recipes`` entry, or a site's active versions."""

    classifier: Classifier
    standardizer: Standardizer
    classifier_path: str
    standardizer_path: str  # resolved, or a built-in name (none, reinhard, macenko)
    standardizer_sha256: str  # of the file, or of a built-in's parameters

    @property
    def name(self) -> str:
        """"<standardizer> + <classifier>", in the registry's names."""
        return (f"{registry.model_name(ModelKind.standardizer, self.standardizer_path, self.standardizer.header)} + "
                f"{registry.model_name(ModelKind.classifier, self.classifier_path, self.classifier.header)}")

    @property
    def key(self) -> tuple[str, str]:
        return self.classifier.sha256, self.standardizer_sha256

    def register(self, session: Session, site: str) -> None:
        """Record both for ``site``: a file the site has never seen becomes its active version."""
        registry.register_configured(session, ModelKind.classifier, self.classifier_path, self.classifier.sha256,
                                     self.classifier.header, site=site)
        registry.register_configured(session, ModelKind.standardizer, self.standardizer_path,
                                     self.standardizer_sha256, self.standardizer.header, site=site)

    def activate(self, session: Session, site: str, *, reason: str) -> tuple[ModelVersion, ModelVersion]:
        """Make both ``site``'s active versions (registered if new); returns (classifier, standardizer)."""
        versions = (registry.register_model(session, ModelKind.classifier, self.classifier_path, self.classifier.sha256,
                                            self.classifier.header, site=site, actor="site validation", reason=reason),
                    registry.register_model(session, ModelKind.standardizer, self.standardizer_path,
                                            self.standardizer_sha256, self.standardizer.header, site=site,
                                            actor="site validation", reason=reason))
        for version in versions:
            version.reason = reason
        return versions


def builtin_sha256(header: dict[str, Any]) -> str:
    """Identity of a built-in standardizer (none, reinhard, ...): the hash of its parameters."""
    return hashlib.sha256(json.dumps(header, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def load_day0(settings: Settings, sessions: sessionmaker) -> Recipe:
    """Load and verify the configured checkpoints; raise ModelConfigError saying which setting to fix."""
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
    return Recipe(classifier, standardizer, str(Path(spec).resolve()), s_path,
                      standardizer.sha256 or builtin_sha256(standardizer.header))


class NetworkCache:
    """Loaded networks shared between sites: a classifier by its sha256, a standardizer by its sha256 and
    the classifier's (a built-in one takes the reference stain from the classifier it stands in front of)."""

    def __init__(self, device: str, day0: Recipe | None = None) -> None:
        self.device = device
        self._classifiers: dict[str, Classifier] = {}
        self._standardizers: dict[tuple[str, str], Standardizer] = {}
        self._pinned: set[int] = set()  # the day-0 recipe's networks: every new site starts on them
        if day0 is not None:
            self._classifiers[day0.classifier.sha256] = day0.classifier
            self._standardizers[(day0.standardizer_sha256, day0.classifier.sha256)] = day0.standardizer
            self._pinned = {id(day0.classifier), id(day0.standardizer)}

    def evict(self, networks: Iterable[Any], *, keep: Iterable[Any]) -> None:
        """Forget ``networks`` (a candidate no longer shadowed) unless one of ``keep`` (what serves) or day 0's is
        the same object: a long-running service must not hold every night's candidate in memory."""
        drop = {id(n) for n in networks} - {id(n) for n in keep} - self._pinned
        self._classifiers = {k: v for k, v in self._classifiers.items() if id(v) not in drop}
        self._standardizers = {k: v for k, v in self._standardizers.items() if id(v) not in drop}

    def recipe(self, standardizer: str, classifier: str) -> Recipe:
        """A recipe from a standardizer (checkpoint or built-in name) and a classifier checkpoint, loaded once."""
        clf_path = str(Path(classifier).resolve())
        clf_sha = file_sha256(clf_path)
        if clf_sha not in self._classifiers:
            self._classifiers[clf_sha] = load_classifier(clf_path, device=self.device, expected_sha256=clf_sha)
        clf = self._classifiers[clf_sha]
        builtin = standardizer in registry.BUILTIN_STANDARDIZERS
        std_path = standardizer if builtin else str(Path(standardizer).resolve())
        key = (std_path if builtin else file_sha256(std_path), clf_sha)
        if key not in self._standardizers:
            self._standardizers[key] = load_standardizer(std_path, device=self.device, classifier=clf,
                                                         expected_sha256=None if builtin else key[0])
        std = self._standardizers[key]
        return Recipe(clf, std, clf_path, std_path, std.sha256 or builtin_sha256(std.header))

    def serving(self, classifier: ModelVersion, standardizer: ModelVersion) -> Recipe:
        """The recipe of two registry versions (a site's active ones), loaded once and checked against the registry."""
        models = self.pair(classifier, standardizer, classifier.site)
        return Recipe(models.classifier, models.standardizer, classifier.path, standardizer.path, standardizer.sha256)

    def classifier(self, version: ModelVersion) -> Classifier:
        if version.sha256 not in self._classifiers:
            self._classifiers[version.sha256] = registry.load_version(version, device=self.device)
        return self._classifiers[version.sha256]

    def standardizer(self, version: ModelVersion, classifier: Classifier) -> Standardizer:
        key = (version.sha256, classifier.sha256)
        if key not in self._standardizers:
            self._standardizers[key] = registry.load_version(version, device=self.device, classifier=classifier)
        return self._standardizers[key]

    def pair(self, classifier: ModelVersion, standardizer: ModelVersion, site: str) -> LoadedModels:
        """The two versions loaded (or found loaded) as the LoadedModels of ``site``."""
        clf = self.classifier(classifier)
        return LoadedModels(clf, self.standardizer(standardizer, clf), classifier.id, standardizer.id, site)


def load_site(settings: Settings, sessions: sessionmaker, day0: Recipe, site: str,
              cache: NetworkCache) -> LoadedModels:
    """The active versions of ``site`` (the day-0 recipe for a site that has none), loaded through ``cache``."""
    with sessions.begin() as session:
        state = ensure_site(session, site, settings.site.validation_reviews).state
        if state is not SiteState.validated or registry.active_version(session, ModelKind.classifier, site) is None:
            day0.register(session, site)  # a validated site keeps the recipe validation chose
        c_active = registry.active_version(session, ModelKind.classifier, site)
        s_active = registry.active_version(session, ModelKind.standardizer, site)
    if c_active is None or s_active is None:
        raise ModelConfigError(f"the registry has no active model to serve site {site!r}; fix [models] or run "
                               "`stainbridge models promote ID`")
    try:
        loaded = cache.pair(c_active, s_active, site)
    except (registry.RegistryError, ModelMismatch, DeviceUnavailable, OSError, ValueError) as exc:
        raise ModelConfigError(f"cannot load the active registry version of site {site!r}: {exc}") from None
    log.info("models_loaded", site=site, state=state.value, classifier=loaded.classifier.name,
             classifier_sha256=c_active.sha256[:12], standardizer=loaded.standardizer.name,
             standardizer_sha256=s_active.sha256[:12], device=str(loaded.classifier.device),
             classifier_version=c_active.id, standardizer_version=s_active.id,
             calibration=loaded.classifier.abstention.describe())
    return loaded


def load_models(settings: Settings, sessions: sessionmaker, site: str | None = None) -> LoadedModels:
    """Load and verify the configured checkpoints; serve ``site``'s (default ``[site] name``) active versions."""
    day0 = load_day0(settings, sessions)
    return load_site(settings, sessions, day0, site or settings.site.name, NetworkCache(settings.models.device, day0))


def _registered_sha256(session: Session, kind: ModelKind, spec: str) -> str | None:
    """The sha256 the registry holds for an active checkpoint of `kind` at `spec`'s path (any site), if any."""
    if not spec or not Path(spec).is_file():
        return None  # built-in standardizers (none, reinhard, ...) have no file
    return session.scalars(
        select(ModelVersion.sha256).where(ModelVersion.kind == kind, ModelVersion.path == str(Path(spec).resolve()),
                                          ModelVersion.state == VersionState.active).limit(1)
    ).first()
