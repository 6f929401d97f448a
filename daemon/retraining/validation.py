"""Site validation in the service: the sample a new site's experts review, then the recipe chosen on it.

The rule itself (which cells, how recipes are scored) is ``models.validation``, shared with
``bench accuracy --reviews N``; this module runs it on a site's cells in the database (docs/sites.md).

- **Recipes** (``load_recipes``): the site's current one (active standardizer + classifier), the day-0
  one (``[models]``) and every ``[site] recipes`` entry, loaded once each through the shared
  ``NetworkCache``; only the one validation chooses is registered (as the site's active versions).
- **The sample** (``choose_samples``, from the service loop through ``SampleChooser``): once an
  unvalidated site has ``POOL_FACTOR x [site] validation_reviews`` classified cells, its first ones
  are classified by every recipe and ``select_validation_sample`` picks ``validation_reviews`` of
  them; they are stored in ``validation_cells`` in review order and go first in
  ``stainbridge review export``.
- **Validation** (``validate_site``: ``stainbridge sites validate SITE`` and the nightly job): with enough
  reviewed cells of the site (any reviewed cell counts, the sample's first), every recipe is scored on
  them (balanced accuracy, bootstrap 95 % interval), the best becomes the site's active recipe and the
  site ``validated``, with its score and every recipe's in ``sites.validation``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image as PILImage
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

from stainbridge.daemon.config import Settings
from stainbridge.daemon.config_values import RECIPE_JOIN
from stainbridge.daemon.logs import get_logger
from stainbridge.daemon.retraining.promotion import load_images
from stainbridge.daemon.store import (
    Image,
    ImageStatus,
    ModelKind,
    Review,
    Site,
    SiteState,
    ValidationCell,
    utcnow,
)
from stainbridge.daemon.versions import registry
from stainbridge.daemon.versions.loading import NetworkCache, Recipe, load_day0
from stainbridge.daemon.versions.site_models import SiteModels
from stainbridge.daemon.versions.site_state import ensure_site
from stainbridge.models.inference import (
    choose_recipe,
    disagreement,
    pool_size,
    run_batch,
    score_recipes,
    select_validation_sample,
)

log = get_logger(__name__)

__all__ = ["SampleChooser", "ValidationError", "choose_samples", "load_recipes", "validate_ready_sites",
           "validate_site"]


class ValidationError(Exception):
    """A site cannot be validated now; the message says what is missing."""


def load_recipes(settings: Settings, sessions: sessionmaker, site: str, cache: NetworkCache,
                 day0: Recipe) -> list[Recipe]:
    """The site's current recipe first (its active versions; the day-0 one for a site never served), then the
    day-0 one and each ``[site] recipes`` entry, each once (by sha256). An entry that does not load is
    skipped and logged. Nothing is registered: only the recipe validation chooses becomes the site's."""
    with sessions() as session:
        active = (registry.active_version(session, ModelKind.classifier, site),
                  registry.active_version(session, ModelKind.standardizer, site))
    recipes = [day0 if None in active else cache.serving(*active), day0]  # type: ignore[arg-type]
    for spec in settings.site.recipes:
        std_spec, _, clf_spec = (part.strip() for part in spec.partition(RECIPE_JOIN.strip()))
        try:
            recipes.append(cache.recipe(std_spec, clf_spec or day0.classifier_path))
        except Exception as exc:  # noqa: BLE001 - one recipe that does not load leaves the others compared
            log.error("recipe_unavailable", site=site, recipe=spec, error=f"{type(exc).__name__}: {exc}",
                      action="fix or remove it in [site] recipes")
    unique: dict[tuple[str, str], Recipe] = {}
    for recipe in recipes:
        unique.setdefault(recipe.key, recipe)
    return list(unique.values())


def _labels(settings: Settings, images: list[PILImage.Image], recipe: Recipe) -> list[tuple[str, float]]:
    """(class, probability) per image through the recipe, on the service's path (geometry, TTA setting)."""
    out = []
    for start in range(0, len(images), settings.models.batch_size):
        out += [(r.label, r.confidence) for r in run_batch(images[start:start + settings.models.batch_size],
                                                          recipe.standardizer, recipe.classifier,
                                                          scale=settings.site.scale, tta=settings.models.tta)]
    return out


def _index(*label_lists: Sequence[str]) -> dict[str, int]:
    return {name: k for k, name in enumerate(sorted({label for labels in label_lists for label in labels}))}


def _sites_waiting_for_a_sample(settings: Settings, sessions: sessionmaker) -> list[str]:
    need = pool_size(settings.site.validation_reviews)
    with sessions() as session:
        counts = session.execute(
            select(Site.name, func.count(Image.id)).join(Image, Image.site == Site.name)
            .where(Site.state == SiteState.unvalidated, Site.sample_chosen_at.is_(None),
                   Image.status == ImageStatus.done, Image.duplicate_of_id.is_(None), Image.archive_path.is_not(None))
            .group_by(Site.name)).all()
    return [name for name, n in counts if n >= need]


class SampleChooser:
    """The service loop's look, at most every ``[models] poll_seconds``, for new sites whose first cells are in."""

    def __init__(self, settings: Settings, sessions: sessionmaker, models: SiteModels, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings, self.sessions, self.models, self.clock = settings, sessions, models, clock
        self._last = -float("inf")

    def tick(self) -> list[str]:
        """Choose the samples that can be chosen now; never raises (a failure is logged and tried again later,
        classification goes on). Returns the sites whose sample was chosen."""
        if self.clock() - self._last < self.settings.models.poll_seconds:
            return []
        self._last = self.clock()
        try:
            return choose_samples(self.settings, self.sessions, self.models.cache, self.models.day0)
        except Exception as exc:  # noqa: BLE001 - the sample waits; the files do not
            log.error("validation_sample_failed", error=f"{type(exc).__name__}: {exc}")
            return []


def choose_samples(settings: Settings, sessions: sessionmaker, cache: NetworkCache, day0: Recipe) -> list[str]:
    """Choose the validation sample of every unvalidated site whose first cells are in; returns those sites."""
    chosen = []
    for site in _sites_waiting_for_a_sample(settings, sessions):
        if _choose_sample(settings, sessions, site, cache, day0):
            chosen.append(site)
    return chosen


def _choose_sample(settings: Settings, sessions: sessionmaker, site: str, cache: NetworkCache,
                   day0: Recipe) -> bool:
    n = settings.site.validation_reviews
    with sessions() as session:
        pool = session.execute(
            select(Image.id, Image.archive_path).where(
                Image.site == site, Image.status == ImageStatus.done, Image.duplicate_of_id.is_(None),
                Image.archive_path.is_not(None)).order_by(Image.received_at, Image.id).limit(pool_size(n))).all()
    images, kept = load_images(settings, [Path(path) for _, path in pool])
    if not images:
        log.warning("validation_sample_unreadable", site=site, pool=len(pool))
        return False
    recipes = load_recipes(settings, sessions, site, cache, day0)
    votes = [_labels(settings, images, recipe) for recipe in recipes]
    index = _index(*[[label for label, _ in v] for v in votes])
    labels = [[index[label] for label, _ in v] for v in votes]
    picks = select_validation_sample(labels, n, confidence=[p for _, p in votes[0]])
    split = disagreement(labels).tolist()
    now = utcnow()
    try:
        with sessions.begin() as session:
            row = session.scalars(select(Site).where(Site.name == site)).one()
            claimed = session.execute(update(Site).where(Site.id == row.id, Site.sample_chosen_at.is_(None))
                                      .values(sample_chosen_at=now).execution_options(synchronize_session=False))
            if not claimed.rowcount:
                return False  # another worker chose it first
            session.add_all(ValidationCell(site_id=row.id, image_id=pool[kept[i]][0], rank=rank,
                                           predicted=votes[0][i][0], disagreement=split[i])
                            for rank, i in enumerate(picks, start=1))
    except IntegrityError:
        return False
    log.info("validation_sample_chosen", site=site, cells=len(picks), pool=len(images),
             recipes=[r.name for r in recipes], disagreeing=sum(1 for i in picks if split[i]))
    return True


def _reviewed(sessions: sessionmaker, site: str) -> list[tuple[Path, str]]:
    """(archived file, latest reviewed label) of the site's reviewed cells, validation sample first."""
    with sessions() as session:
        latest = select(func.max(Review.id)).group_by(Review.image_id)
        rows = session.execute(
            select(Image.archive_path, Review.label, ValidationCell.rank).join(Review, Review.image_id == Image.id)
            .outerjoin(ValidationCell, ValidationCell.image_id == Image.id)
            .where(Review.id.in_(latest), Image.site == site, Image.status == ImageStatus.done,
                   Image.duplicate_of_id.is_(None), Image.archive_path.is_not(None))
            .order_by(ValidationCell.rank.is_(None), ValidationCell.rank, Image.id)).all()
    return [(Path(path), label) for path, label, _ in rows if Path(path).is_file()]


def validate_site(settings: Settings, sessions: sessionmaker, site: str, *, cache: NetworkCache | None = None,
                  day0: Recipe | None = None) -> dict[str, Any]:
    """Score every recipe on the site's reviewed cells, make the best the site's recipe, mark it validated.

    Returns the `sites --json` fields of the result and every recipe's score; raises ValidationError."""
    with sessions() as session:
        if session.scalar(select(Site.id).where(Site.name == site)) is None:
            known = ", ".join(session.scalars(select(Site.name).order_by(Site.name))) or "none yet"
            raise ValidationError(f"no site {site!r} (known sites: {known}); see `stainbridge sites`")
    needed = settings.site.validation_reviews
    reviewed = _reviewed(sessions, site)
    if len(reviewed) < needed:
        raise ValidationError(f"site {site}: {len(reviewed)} of {needed} reviews ([site] validation_reviews); review "
                              "the cells at the top of `stainbridge review export` and `stainbridge review import` them")
    day0 = day0 or load_day0(settings, sessions)
    cache = cache or NetworkCache(settings.models.device, day0)
    images, kept = load_images(settings, [path for path, _ in reviewed])
    truth = [reviewed[i][1] for i in kept]
    recipes = load_recipes(settings, sessions, site, cache, day0)
    predicted = {recipe.name: [label for label, _ in _labels(settings, images, recipe)] for recipe in recipes}
    if len(predicted) < len(recipes):
        raise ValidationError(f"site {site}: two recipes share the name {sorted(r.name for r in recipes)}; rename a "
                              "checkpoint file in [site] recipes")
    index = _index(truth, *predicted.values())
    scores = score_recipes([index[t] for t in truth], {name: [index[p] for p in labels]
                                                      for name, labels in predicted.items()})
    best = choose_recipe(scores)
    chosen = recipes[[s.recipe for s in scores].index(best.recipe)]
    reason = (f"validated on {best.cells} reviewed cells: balanced accuracy {best.balanced_accuracy:.2f} "
              f"[{best.ci_low:.2f}-{best.ci_high:.2f}]")
    report = {"recipes": [{**s.as_dict(), "classifier_sha256": r.classifier.sha256,
                           "standardizer_sha256": r.standardizer_sha256} for s, r in zip(scores, recipes, strict=True)],
              "chosen": best.recipe, "reviewed_cells": best.cells, "classes": sorted(set(truth))}
    with sessions.begin() as session:
        classifier, standardizer = chosen.activate(session, site, reason=reason)
        row = ensure_site(session, site, needed)
        row.state, row.recipe, row.validated_at = SiteState.validated, best.recipe, utcnow()
        row.standardizer_version_id, row.classifier_version_id = standardizer.id, classifier.id
        row.balanced_accuracy, row.ci_low, row.ci_high = best.balanced_accuracy, best.ci_low, best.ci_high
        row.validated_cells, row.validation = best.cells, report
    log.info("site_validated", site=site, recipe=best.recipe, balanced_accuracy=round(best.balanced_accuracy, 4),
             ci_low=round(best.ci_low, 4), ci_high=round(best.ci_high, 4), cells=best.cells)
    return {"site": site, "validated": True, "reviews": len(reviewed), "reviews_needed": needed,
            "recipe": best.recipe, "balanced_accuracy": best.balanced_accuracy, "ci_low": best.ci_low,
            "ci_high": best.ci_high, "cells": best.cells, "recipes": report["recipes"]}


def validate_ready_sites(settings: Settings, sessions: sessionmaker) -> dict[str, Any]:
    """The nightly job: validate every unvalidated site with enough reviews; site -> result or its error."""
    with sessions() as session:
        waiting = list(session.scalars(select(Site.name).where(Site.state == SiteState.unvalidated)
                                       .order_by(Site.name)))
    results: dict[str, Any] = {}
    for site in waiting:
        if len(_reviewed(sessions, site)) < settings.site.validation_reviews:
            continue
        try:
            results[site] = validate_site(settings, sessions, site)
        except Exception as exc:  # noqa: BLE001 - one site's failure leaves the others and the job running
            log.error("site_validation_failed", site=site, error=f"{type(exc).__name__}: {exc}")
            results[site] = {"error": f"{type(exc).__name__}: {exc}"}
    return results
