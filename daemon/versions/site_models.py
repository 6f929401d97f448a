"""The models each site is served with: loaded when its first file arrives, shared by sha256, swapped per site.

``SiteModels.start`` loads the day-0 recipe (``[models]``) and serves ``[site] name`` at once, so a
broken configuration stops the service at start-up. A site seen later gets its row in ``sites``
(``unvalidated``), the day-0 recipe in the registry if it has no versions yet, and its active versions
loaded through the shared ``NetworkCache`` (a checkpoint that serves several sites is one network in
memory). ``check`` is the hot swap of every site served so far (``daemon.versions.hotswap``), and at the same
poll it follows which candidate each site shadows (``daemon.versions.shadow``; ``shadow(site)``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy.orm import sessionmaker

from stainbridge.daemon.config import Settings
from stainbridge.daemon.versions.hotswap import ModelSwapper
from stainbridge.daemon.versions.loading import LoadedModels, NetworkCache, Recipe, load_day0, load_site
from stainbridge.daemon.versions.serving import record_served
from stainbridge.daemon.versions.shadow import ShadowLoader, ShadowModels
from stainbridge.daemon.versions.site_state import sync_reviews_needed

__all__ = ["SiteModels"]


class SiteModels:
    """``for_site(site) -> LoadedModels``, loaded lazily; ``check()`` swaps in newly promoted versions."""

    def __init__(self, settings: Settings, sessions: sessionmaker, day0: Recipe, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings, self.sessions, self.day0 = settings, sessions, day0
        self.cache = NetworkCache(settings.models.device, day0)
        self.swapper = ModelSwapper(settings, sessions, cache=self.cache, clock=clock)
        self.loaded: dict[str, LoadedModels] = {}
        self.shadows = ShadowLoader(sessions, self.cache, settings.retraining.shadow_share)

    @classmethod
    def start(cls, settings: Settings, sessions: sessionmaker) -> SiteModels:
        """Load the day-0 recipe and serve ``[site] name``; raises ModelConfigError saying what to fix."""
        models = cls(settings, sessions, load_day0(settings, sessions))
        with sessions.begin() as session:
            sync_reviews_needed(session, settings.site.validation_reviews)
        models.for_site(settings.site.name)
        return models

    @property
    def default(self) -> LoadedModels:
        """The models of ``[site] name`` (the probe at start-up, the warm-up)."""
        return self.for_site(self.settings.site.name)

    def for_site(self, site: str) -> LoadedModels:
        if site not in self.loaded:
            self.loaded[site] = load_site(self.settings, self.sessions, self.day0, site, self.cache)
            record_served(self.sessions, self.loaded[site])
            self.shadows.refresh({site: self.loaded[site]})
        return self.loaded[site]

    def shadow(self, site: str) -> ShadowModels | None:
        """The candidate ``site`` shadows, loaded; None when none is (or ``[retraining] shadow_share`` is 0)."""
        return self.shadows.get(site)

    def check(self, *, force: bool = False) -> list[str]:
        """At a batch boundary, when a poll is due: every served site's newly active versions; returns the
        sites that switched."""
        if not force and not self.swapper.due():
            return []
        swapped = []
        for site, current in list(self.loaded.items()):
            new = self.swapper.swap(current)
            if new is not None:
                self.loaded[site] = new
                swapped.append(site)
        self.shadows.refresh(self.loaded)
        return swapped
