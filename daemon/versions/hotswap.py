"""Hot swap: the running service follows each site's active versions in the registry, between batches.

Before each batch the service asks whether a poll is due (at most every ``[models] poll_seconds``);
then, for every site it serves, ``ModelSwapper.swap(current)`` reads the site's active version ids.
When they differ from what is loaded, the new version is loaded through the inference path with its
sha256 checked against the registry (through the shared ``NetworkCache``: a checkpoint another site
already uses is not loaded twice). Only a complete, verified pair replaces the old one, so a batch is
always scored by one pair of models per site and its predictions name exactly those versions. A
version that fails to load is refused (``model_refused``, with the attempt number) and the old models
stay; it is tried again at every poll (a file restored, a device freed: the swap then happens), and the
refusal is recorded for ``status`` (``daemon.versions.serving``) until a swap succeeds.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy.orm import sessionmaker

from stainbridge.daemon.config import Settings
from stainbridge.daemon.logs import get_logger
from stainbridge.daemon.store import ModelKind
from stainbridge.daemon.versions import registry
from stainbridge.daemon.versions.loading import LoadedModels, NetworkCache
from stainbridge.daemon.versions.serving import record_served

log = get_logger(__name__)


class ModelSwapper:
    """Polls the registry; ``check(current)`` returns new LoadedModels for current's site, or None to keep them."""

    def __init__(self, settings: Settings, sessions: sessionmaker, *, cache: NetworkCache | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings, self.sessions, self.clock = settings, sessions, clock
        self.cache = cache or NetworkCache(settings.models.device)
        self.refused: dict[int, int] = {}  # version id -> failed attempts; tried again at every poll
        self._last_poll = clock()

    def due(self) -> bool:
        """Whether ``[models] poll_seconds`` have passed since the last poll (and, if so, a poll starts now)."""
        if self.clock() - self._last_poll < self.settings.models.poll_seconds:
            return False
        self._last_poll = self.clock()
        return True

    def check(self, current: LoadedModels, *, force: bool = False) -> LoadedModels | None:
        if not force and not self.due():
            return None
        return self.swap(current)

    def swap(self, current: LoadedModels) -> LoadedModels | None:
        """The site's newly active pair, loaded and verified; None when nothing changed or it was refused."""
        site = current.site
        with self.sessions() as session:
            c_active = registry.active_version(session, ModelKind.classifier, site)
            s_active = registry.active_version(session, ModelKind.standardizer, site)
        if c_active is None or s_active is None:
            return None
        if (c_active.id, s_active.id) == (current.classifier_version_id, current.standardizer_version_id):
            return None
        trying = c_active.id
        try:
            classifier = (current.classifier if c_active.id == current.classifier_version_id
                          else self.cache.classifier(c_active))
            trying = s_active.id
            standardizer = (current.standardizer if (s_active.id, classifier) == (current.standardizer_version_id,
                                                                                 current.classifier)
                            else self.cache.standardizer(s_active, classifier))
            new = LoadedModels(classifier, standardizer, c_active.id, s_active.id, site)
        except Exception as exc:  # noqa: BLE001 - whatever breaks a load, the old models keep serving
            self.refused[trying] = attempts = self.refused.get(trying, 0) + 1
            error = f"{type(exc).__name__}: {exc}"
            log.error("model_refused", site=site, version=trying, error=error, attempt=attempts,
                      retry_in_s=self.settings.models.poll_seconds, kept_classifier=current.classifier_version_id,
                      kept_standardizer=current.standardizer_version_id)
            record_served(self.sessions, current, refused_version=trying,
                          refused_reason=f"{error} (attempt {attempts}; tried again at every poll)")
            return None
        for version_id in (c_active.id, s_active.id):
            self.refused.pop(version_id, None)
        log.info("models_swapped", site=site, classifier_version=new.classifier_version_id,
                 standardizer_version=new.standardizer_version_id, classifier=new.classifier.name,
                 standardizer=new.standardizer.name)
        record_served(self.sessions, new)
        return new
