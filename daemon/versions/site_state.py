"""A site's row in ``sites``: created when it is first served, its validation state read and described.

The state itself (``unvalidated`` / ``validated``) changes only through ``stainbridge sites validate``
(``daemon.retraining.validation``); this module creates the rows, keeps ``reviews_needed`` in step
with ``[site] validation_reviews`` and reads what ``status``, ``sites``, the report and the export
show: the ``site_validation`` view (daemon/lab/views.py), whose ``validation`` column is the one
line that says it ("unvalidated (12 of 50 reviews)", "validated: 0.91 [0.86-0.95] on 50 cells").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from stainbridge.daemon.store import Site, SiteState

__all__ = ["SiteSummary", "ensure_site", "site_summaries", "sync_reviews_needed"]


def ensure_site(session: Session, name: str, reviews_needed: int) -> Site:
    """The site's row, created ``unvalidated`` if it has none (two workers at once: one insert wins)."""
    site = session.scalars(select(Site).where(Site.name == name)).one_or_none()
    if site is not None:
        return site
    try:
        with session.begin_nested():
            site = Site(name=name, state=SiteState.unvalidated, reviews_needed=reviews_needed, validation={})
            session.add(site)
            session.flush()
    except IntegrityError:
        site = session.scalars(select(Site).where(Site.name == name)).one()
    return site


def sync_reviews_needed(session: Session, reviews_needed: int) -> int:
    """Unvalidated sites need ``[site] validation_reviews`` reviews (the setting may have changed); returns
    how many rows changed."""
    return session.execute(
        update(Site).where(Site.state == SiteState.unvalidated, Site.reviews_needed != reviews_needed)
        .values(reviews_needed=reviews_needed).execution_options(synchronize_session=False)
    ).rowcount


@dataclass(frozen=True)
class SiteSummary:
    """One site as `stainbridge sites --json` prints it (``as_json``), with the view's line beside it."""

    site: str
    validated: bool
    reviews: int
    reviews_needed: int
    recipe: str | None
    balanced_accuracy: float | None
    ci_low: float | None
    ci_high: float | None
    validation: str  # the site_validation view's line

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("validation")
        return out

    def describe(self) -> str:
        return f"site {self.site}: {self.validation}"


def site_summaries(session: Session) -> list[SiteSummary]:
    """Every site, by name, from the ``site_validation`` view."""
    rows = session.execute(text(
        "SELECT site, state, reviews, reviews_needed, recipe, balanced_accuracy, ci_low, ci_high, validation "
        "FROM site_validation ORDER BY site")).all()
    return [SiteSummary(site=r.site, validated=r.state == SiteState.validated.value, reviews=int(r.reviews),
                        reviews_needed=int(r.reviews_needed), recipe=r.recipe,
                        balanced_accuracy=r.balanced_accuracy, ci_low=r.ci_low, ci_high=r.ci_high,
                        validation=r.validation) for r in rows]
