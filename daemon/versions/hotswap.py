"""Hot swap: the running service follows the registry's active versions between batches.

The service asks ``ModelSwapper.check(current)`` before each batch; at most every
``[models] poll_seconds`` it reads the active version ids. When they differ from what is
loaded, the new version is loaded through the inference path with its sha256 checked against
the registry. Only a complete, verified pair replaces the old one, so a batch is always scored
by one pair of models and its predictions name exactly those versions. A version that fails
to load is refused: logged once (``model_refused``) and remembered, and the old models stay.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

from sqlalchemy.orm import sessionmaker

from stainbridge.daemon.config import Settings
from stainbridge.daemon.logs import get_logger
from stainbridge.daemon.store import ModelKind
from stainbridge.daemon.versions import registry
from stainbridge.daemon.versions.loading import LoadedModels

log = get_logger(__name__)


class ModelSwapper:
    """Polls the registry; ``check(current)`` returns new LoadedModels to use, or None to keep them."""

    def __init__(self, settings: Settings, sessions: sessionmaker, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings, self.sessions, self.clock = settings, sessions, clock
        self.refused: set[int] = set()
        self._last_poll = clock()

    def check(self, current: LoadedModels, *, force: bool = False) -> LoadedModels | None:
        if not force and self.clock() - self._last_poll < self.settings.models.poll_seconds:
            return None
        self._last_poll = self.clock()
        with self.sessions() as session:
            c_active = registry.active_version(session, ModelKind.classifier)
            s_active = registry.active_version(session, ModelKind.standardizer)
        if c_active is None or s_active is None:
            return None
        if (c_active.id, s_active.id) == (current.classifier_version_id, current.standardizer_version_id):
            return None
        if c_active.id in self.refused or s_active.id in self.refused:
            return None
        device = self.settings.models.device
        new, trying = current, c_active.id
        try:
            if c_active.id != current.classifier_version_id:
                loaded = registry.load_version(c_active, device=device)
                new = replace(new, classifier=loaded, classifier_version_id=c_active.id)
            if s_active.id != current.standardizer_version_id or new.classifier is not current.classifier:
                trying = s_active.id
                loaded = registry.load_version(s_active, device=device, classifier=new.classifier)
                new = replace(new, standardizer=loaded, standardizer_version_id=s_active.id)
        except Exception as exc:  # noqa: BLE001 - whatever breaks a load, the old models keep serving
            self.refused.add(trying)
            log.error("model_refused", version=trying, error=f"{type(exc).__name__}: {exc}",
                      kept_classifier=current.classifier_version_id,
                      kept_standardizer=current.standardizer_version_id)
            return None
        log.info("models_swapped", classifier_version=new.classifier_version_id,
                 standardizer_version=new.standardizer_version_id, classifier=new.classifier.name,
                 standardizer=new.standardizer.name)
        return new
