"""Shadow: a candidate that awaits evidence also scores a share of its site's new cells, never as their result.

Which candidate (``shadowed_candidates``): per site, the site's newest registered version while it is a candidate
whose last gate verdict (``model_versions.gate_verdict``: the nightly job's, or `models gate`'s) is
``awaiting_evidence``, i.e. refused only for too few reviewed cells. So at most one per site; a newer version of
the site (either kind) supersedes it, and a promotion or a verdict on evidence ends it. ``daemon.lab.views``
states the same rule in SQL for the ``candidate_disagreements`` view.

Which cells (``in_shadow_sample``): a fixed share ``[retraining] shadow_share`` of the new cells, chosen by a
hash of each image's sha256, so a restart or a second worker picks the same cells.

How (``ShadowLoader``): the candidate in place of its kind of the active pair (a classifier candidate behind the
active standardizer, a standardizer candidate in front of the active classifier), loaded lazily through the
shared ``NetworkCache`` at the service's registry poll (the hot swap's), dropped when it is no longer shadowed.
A candidate that fails to load is logged and tried again at the next poll; results never wait for it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from stainbridge.daemon.logs import get_logger
from stainbridge.daemon.store import GateVerdict, ModelKind, ModelVersion, VersionState

if TYPE_CHECKING:  # the networks import torch; status asks which candidate is shadowed without them
    from stainbridge.daemon.versions.loading import LoadedModels, NetworkCache
    from stainbridge.models.inference import Classifier, Standardizer

log = get_logger(__name__)

_SCALE = 16**12


def in_shadow_sample(sha256: str, share: float) -> bool:
    """Whether the cell with this content is in the shadowed share (stable: a hash of its sha256, salted so that
    the sample is independent of the nightly job's held-out split, which uses the sha256's first digits)."""
    if share <= 0.0:
        return False
    digest = hashlib.sha256(b"shadow:" + sha256.encode("ascii")).hexdigest()
    return int(digest[:12], 16) < share * _SCALE


def shadowed_candidates(session: Session, site: str | None = None) -> dict[str, ModelVersion]:
    """The candidate each site shadows now (only ``site``'s when given): see the module's rule."""
    newest = select(ModelVersion.site, func.max(ModelVersion.id).label("id")).group_by(ModelVersion.site)
    if site is not None:
        newest = newest.where(ModelVersion.site == site)
    newest_ids = newest.subquery()
    rows = session.scalars(select(ModelVersion).join(newest_ids, newest_ids.c.id == ModelVersion.id)
                           .where(ModelVersion.state == VersionState.candidate,
                                  ModelVersion.gate_verdict == GateVerdict.awaiting_evidence)).all()
    return {version.site: version for version in rows}


@dataclass(frozen=True)
class ShadowModels:
    """The pair that scores a site's shadowed cells: the candidate in place of its kind of ``active``."""

    version_id: int
    kind: ModelKind
    name: str
    classifier: Classifier
    standardizer: Standardizer
    active: tuple[int, int]  # (classifier, standardizer) version ids it stands beside


class ShadowLoader:
    """``refresh(served)`` at each registry poll: per served site, the shadowed candidate loaded (or None)."""

    def __init__(self, sessions: sessionmaker, cache: NetworkCache, share: float) -> None:
        self.sessions, self.cache, self.share = sessions, cache, share
        self.shadows: dict[str, ShadowModels] = {}
        self.refused: dict[int, int] = {}  # candidate version id -> failed loads

    def get(self, site: str) -> ShadowModels | None:
        return self.shadows.get(site)

    def refresh(self, served: dict[str, LoadedModels]) -> None:
        """Follow the registry: load newly shadowed candidates, drop the ones no longer shadowed."""
        if self.share <= 0.0 or not served:
            return
        with self.sessions() as session:
            wanted = shadowed_candidates(session)
            if not wanted and not self.shadows:
                return
            standardizers = {site: session.get(ModelVersion, models.standardizer_version_id)
                             for site, models in served.items() if site in wanted}
        for site, current in served.items():
            candidate, loaded = wanted.get(site), self.shadows.get(site)
            pair = (current.classifier_version_id, current.standardizer_version_id)
            if loaded is not None and candidate is not None and (loaded.version_id, loaded.active) == (candidate.id, pair):
                continue
            if loaded is not None:  # the same candidate beside a newly swapped active pair keeps its networks
                self._drop(site, served, evict=candidate is None or candidate.id != loaded.version_id)
            if candidate is None:
                continue
            try:
                self.shadows[site] = self._load(candidate, current, standardizers[site])
            except Exception as exc:  # noqa: BLE001 - a shadow that does not load costs nothing but its sample
                self.shadows.pop(site, None)
                self.refused[candidate.id] = attempts = self.refused.get(candidate.id, 0) + 1
                log.error("shadow_refused", site=site, candidate_version=candidate.id, attempt=attempts,
                          error=f"{type(exc).__name__}: {exc}", action="tried again at the next registry poll")
                continue
            self.refused.pop(candidate.id, None)
            log.info("shadow_started", site=site, candidate_version=candidate.id, kind=candidate.kind.value,
                     candidate=candidate.name, share=self.share)

    def _drop(self, site: str, served: dict[str, LoadedModels], *, evict: bool) -> None:
        """Stop shadowing ``site`` and free its candidate's networks unless something still serves with them
        (a promoted candidate is the active version now: the hot swap has just loaded it from the cache)."""
        old = self.shadows.pop(site)
        if evict:
            keep = [n for m in [*served.values(), *self.shadows.values()] for n in (m.classifier, m.standardizer)]
            self.cache.evict((old.classifier, old.standardizer), keep=keep)
        log.info("shadow_stopped", site=site, candidate_version=old.version_id)

    def _load(self, candidate: ModelVersion, current: LoadedModels,
              active_standardizer: ModelVersion | None) -> ShadowModels:
        pair = (current.classifier_version_id, current.standardizer_version_id)
        if candidate.kind is ModelKind.standardizer:
            classifier = current.classifier
            standardizer = self.cache.standardizer(candidate, classifier)
        else:
            classifier = self.cache.classifier(candidate)
            if active_standardizer is None:
                raise LookupError(f"the active standardizer (version {pair[1]}) is no longer registered")
            # a built-in standardizer takes its reference stain from the classifier behind it
            standardizer = self.cache.standardizer(active_standardizer, classifier)
        return ShadowModels(candidate.id, candidate.kind, candidate.name, classifier, standardizer, pair)
