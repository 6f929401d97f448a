"""Drift per site: does a week's output look like the site's baseline? (The `weekly_drift` view, daemon/lab/views.py.)

A site's baseline is the weeks up to its validation (``sites.validated_at``: the period its recipe was judged on),
or, for a site not validated yet, its first ``[lab] drift_baseline_weeks`` weeks. Every later week with at least
``DRIFT_MIN_CELLS`` cells is compared with the pooled baseline: a class whose share moved more than ``[lab]
drift_share_points`` percentage points, a mean (calibrated) confidence lower by more than ``[lab]
drift_confidence_drop``, or a share of cells flagged for review higher by more than ``drift_share_points`` points
raises an alert with its reasons. The report lists every alert; `stainbridge status` and the metric
``stainbridge_drift_alert{site}`` say whether the site's latest week has one.

The stain: every received image's median CIE L*a*b* per stain region (background, other stained pixels, nucleus:
``images.stain_*``), averaged per week in the ``weekly_stain`` view. A week with at least ``DRIFT_MIN_CELLS`` measured
cells whose background or nucleus colour lies more than ``[lab] drift_stain_delta_e`` (CIE76 Delta E) from the
baseline's alerts. The other stained pixels (red cells and cytoplasm together) are shown but not judged: their colour
follows which cells arrive as much as the stain (a class mix of the same lab moves them by 18, docs/lab.md). Where the
baseline weeks predate the measurement (migration 0012), the first ``drift_baseline_weeks`` measured weeks stand in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from stainbridge.daemon.config import LabSettings
from stainbridge.daemon.store import STAIN_REGIONS

DRIFT_MIN_CELLS = 30  # weeks with fewer cells are shown but not judged
STAIN_JUDGED = ("background", "nucleus")  # the regions whose colour is the stain's (module text)

Lab = tuple[float, float, float]


@dataclass
class Week:
    week: str  # its Monday, YYYY-MM-DD (UTC)
    cells: int
    mean_confidence: float | None
    share_flagged: float
    shares: dict[str, float] = field(default_factory=dict)
    stain_cells: int = 0  # cells whose stain was measured
    stain: dict[str, Lab] = field(default_factory=dict)  # region -> mean of the cells' median L*, a*, b*


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
    stain_baseline: dict[str, Lab] = field(default_factory=dict)  # region -> L*, a*, b* of the stain baseline
    stain_delta_e: dict[str, dict[str, float]] = field(default_factory=dict)  # week -> region -> Delta E from it
    stain_bound: float | None = None  # [lab] drift_stain_delta_e

    @property
    def latest_alert(self) -> DriftAlert | None:
        """The alert of the site's latest week, if it has one."""
        return self.alerts[-1] if self.alerts and self.weeks and self.alerts[-1].week == self.weeks[-1].week else None

    @property
    def latest_stain_delta_e(self) -> dict[str, float]:
        """Region -> Delta E from the stain baseline of the site's latest week with DRIFT_MIN_CELLS measured cells."""
        judged = [w.week for w in self.weeks if w.stain_cells >= DRIFT_MIN_CELLS and w.week in self.stain_delta_e]
        return self.stain_delta_e[judged[-1]] if judged else {}


def _pooled(weeks: list[Week]) -> Week:
    cells = sum(w.cells for w in weeks)
    labels = {label for w in weeks for label in w.shares}
    confident = [w for w in weeks if w.mean_confidence is not None]
    return Week("baseline", cells,
                sum(w.mean_confidence * w.cells for w in confident) / max(1, sum(w.cells for w in confident))
                if confident else None,
                sum(w.share_flagged * w.cells for w in weeks) / max(1, cells),
                {label: sum(w.shares.get(label, 0.0) * w.cells for w in weeks) / max(1, cells) for label in labels})


def _pooled_stain(weeks: list[Week]) -> dict[str, Lab]:
    """Region -> the cell-weighted mean colour of `weeks`."""
    pooled: dict[str, Lab] = {}
    for region in STAIN_REGIONS:
        having = [w for w in weeks if region in w.stain and w.stain_cells]
        total = sum(w.stain_cells for w in having)
        if total:
            pooled[region] = tuple(sum(w.stain[region][i] * w.stain_cells for w in having) / total  # type: ignore[assignment]
                                   for i in range(3))
    return pooled


def delta_e(one: Lab, other: Lab) -> float:
    """CIE76 colour difference (about 2.3 is just noticeable)."""
    return math.dist(one, other)


def stain_reasons(week: Week, base: dict[str, Lab], lab: LabSettings) -> list[str]:
    """Why `week`'s stain is unlike the baseline's (judged regions only), in words (empty: it is not)."""
    reasons = []
    for region in STAIN_JUDGED:
        if region in week.stain and region in base and week.stain_cells >= DRIFT_MIN_CELLS:
            moved = delta_e(week.stain[region], base[region])
            if moved > lab.drift_stain_delta_e:
                now, then = (" ".join(f"{v:.0f}" for v in c) for c in (week.stain[region], base[region]))
                reasons.append(f"{region} stain Delta E {moved:.1f} (L*a*b* {now}; baseline {then})")
    return reasons


def _stain_baseline(baseline: list[Week], judged: list[Week], lab: LabSettings) -> list[Week]:
    """The baseline's measured weeks, or, where they predate the measurement, the first measured weeks."""
    measured = [w for w in baseline if w.stain_cells]
    if sum(w.stain_cells for w in measured) >= DRIFT_MIN_CELLS:
        return measured
    return [w for w in judged if w.stain_cells >= DRIFT_MIN_CELLS][:lab.drift_baseline_weeks]


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
    stain_weeks = _stain_baseline(baseline, judged, lab)
    stain_base = _pooled_stain(stain_weeks)
    alerts = []
    if baseline:
        base = _pooled(baseline)
        for week in judged:
            reasons = compare(week, base, lab) if week.week > baseline[-1].week else []
            if stain_weeks and week.week > stain_weeks[-1].week:
                reasons += stain_reasons(week, stain_base, lab)
            if reasons:
                alerts.append(DriftAlert(site, week.week, reasons))
    moved = {w.week: {r: delta_e(w.stain[r], stain_base[r]) for r in STAIN_REGIONS if r in w.stain and r in stain_base}
             for w in weeks if w.stain_cells}
    return SiteDrift(site, weeks, [w.week for w in baseline], alerts, stain_base, moved, lab.drift_stain_delta_e)


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
    columns = ", ".join(f"{region}_{axis}" for region in STAIN_REGIONS for axis in "lab")
    for r in query(f"SELECT site, week, cells, {columns} FROM weekly_stain {only}"):
        week = by_site.get(r.site, {}).get(str(r.week)[:10])
        if week is not None:
            week.stain_cells = int(r.cells)
            week.stain = {region: (float(values[0]), float(values[1]), float(values[2])) for region in STAIN_REGIONS
                          if None not in (values := [getattr(r, f"{region}_{axis}") for axis in "lab"])}
    return [site_drift(name, list(weeks.values()), lab, validated.get(name)) for name, weeks in sorted(by_site.items())]
