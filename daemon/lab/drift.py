"""Drift per site: does a week's output look like the site's baseline? (The `weekly_drift` view, daemon/lab/views.py.)

A site's baseline is the weeks up to its validation (``sites.validated_at``: the period its recipe was judged on),
or, for a site not validated yet, its first ``[lab] drift_baseline_weeks`` weeks. Every later week with at least
``DRIFT_MIN_CELLS`` cells is compared with the pooled baseline: a class whose share moved more than ``[lab]
drift_share_points`` percentage points, a mean (calibrated) confidence lower by more than ``[lab]
drift_confidence_drop``, or a share of cells flagged for review higher by more than ``drift_share_points`` points
raises an alert with its reasons. The report lists every alert; `stainbridge status` and the metric
``stainbridge_drift_alert{site}`` say whether the site's latest week has one. The stain itself (Lab colour of
background, cytoplasm, nucleus) is not measured here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from stainbridge.daemon.config import LabSettings

DRIFT_MIN_CELLS = 30  # weeks with fewer cells are shown but not judged


@dataclass
class Week:
    week: str  # its Monday, YYYY-MM-DD (UTC)
    cells: int
    mean_confidence: float | None
    share_flagged: float
    shares: dict[str, float] = field(default_factory=dict)


@dataclass
class DriftAlert:
    site: str
    week: str
    reasons: list[str]

    def describe(self) -> str:
        return f"site {self.site}, week of {self.week}: {'; '.join(self.reasons)}"


@dataclass
class SiteDrift:
    site: str
    weeks: list[Week]
    baseline: list[str]  # the baseline's weeks
    alerts: list[DriftAlert]

    @property
    def latest_alert(self) -> DriftAlert | None:
        """The alert of the site's latest week, if it has one."""
        return self.alerts[-1] if self.alerts and self.weeks and self.alerts[-1].week == self.weeks[-1].week else None


def _pooled(weeks: list[Week]) -> Week:
    cells = sum(w.cells for w in weeks)
    labels = {label for w in weeks for label in w.shares}
    confident = [w for w in weeks if w.mean_confidence is not None]
    return Week("baseline", cells,
                sum(w.mean_confidence * w.cells for w in confident) / max(1, sum(w.cells for w in confident))
                if confident else None,
                sum(w.share_flagged * w.cells for w in weeks) / max(1, cells),
                {label: sum(w.shares.get(label, 0.0) * w.cells for w in weeks) / max(1, cells) for label in labels})


def compare(week: Week, base: Week, lab: LabSettings) -> list[str]:
    """Why `week` is unlike the baseline `base`, in words (empty: it is not)."""
    reasons = []
    for label in sorted(set(week.shares) | set(base.shares)):
        now, then = week.shares.get(label, 0.0), base.shares.get(label, 0.0)
        if abs(now - then) * 100 > lab.drift_share_points:
            reasons.append(f"{label} {now:.0%} (baseline {then:.0%})")
    if (week.mean_confidence is not None and base.mean_confidence is not None
            and base.mean_confidence - week.mean_confidence > lab.drift_confidence_drop):
        reasons.append(f"mean confidence {week.mean_confidence:.2f} (baseline {base.mean_confidence:.2f})")
    if (week.share_flagged - base.share_flagged) * 100 > lab.drift_share_points:
        reasons.append(f"flagged {week.share_flagged:.0%} (baseline {base.share_flagged:.0%})")
    return reasons


def site_drift(site: str, weeks: list[Week], lab: LabSettings, validated_at: str | None) -> SiteDrift:
    """Split `weeks` (oldest first) into the baseline and the weeks judged against it."""
    judged = [w for w in weeks if w.cells >= DRIFT_MIN_CELLS]
    if validated_at:
        baseline = [w for w in judged if w.week <= validated_at[:10]]
    else:
        baseline = judged[:lab.drift_baseline_weeks]
    alerts = []
    if baseline:
        base = _pooled(baseline)
        for week in judged:
            if week.week > baseline[-1].week:
                reasons = compare(week, base, lab)
                if reasons:
                    alerts.append(DriftAlert(site, week.week, reasons))
    return SiteDrift(site, weeks, [w.week for w in baseline], alerts)


def gather_drift(query: Callable[[str], list[Any]], lab: LabSettings, site: str | None = None) -> list[SiteDrift]:
    """Every site's weeks (or `site`'s) and their alerts. `query(sql)` runs a statement (``:site`` bound with
    `site`); the rows are sites x weeks x classes."""
    only = "WHERE site = :site" if site else ""
    validated = {name: (str(at) if at is not None else None)
                 for name, at in query(f"SELECT name, validated_at FROM sites {'WHERE name = :site' if site else ''}")}
    by_site: dict[str, dict[str, Week]] = {}
    for r in query("SELECT site, week, label, share, week_cells, mean_confidence, share_flagged FROM weekly_drift "
                   f"{only} ORDER BY site, week, label"):
        name = str(r.week)[:10]
        week = by_site.setdefault(r.site, {}).setdefault(name, Week(
            name, int(r.week_cells), None if r.mean_confidence is None else float(r.mean_confidence),
            float(r.share_flagged or 0.0)))
        week.shares[r.label] = float(r.share)
    return [site_drift(name, list(weeks.values()), lab, validated.get(name)) for name, weeks in sorted(by_site.items())]
