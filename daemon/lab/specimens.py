"""The report's specimen tables: the differential of each specimen (the `specimen_differentials` view), per site.

The view has one row per site, specimen and class; this module turns the newest ``SPECIMENS_SHOWN`` specimens of
each site (those with an image in the period) into one row per specimen with its percentages per class, and
flags what a hematologist must know before signing one out: fewer than ``[lab] min_cells`` cells counted, cells
set apart for review, and a class outside its ``[lab] reference_ranges``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from stainbridge.daemon.config import LabSettings

SPECIMENS_SHOWN = 100  # per site, newest first; `specimen_differentials` has them all


@dataclass
class SpecimenRow:
    """One specimen's differential: per class (cells counted, percent of the counted, flagged)."""

    site: str
    specimen: str
    counted: int
    flagged: int
    first_at: Any
    last_at: Any
    classes: dict[str, tuple[int, float | None, int]] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)


@dataclass
class SiteSpecimens:
    site: str
    total: int  # specimens of the site with an image in the period
    labels: list[str]  # the columns: every class seen in the shown specimens
    rows: list[SpecimenRow]


def flags_of(row: SpecimenRow, lab: LabSettings) -> list[str]:
    """What to check before reporting this specimen, in words."""
    flags = []
    if row.counted < lab.min_cells:
        flags.append(f"{row.counted} cells counted (fewer than {lab.min_cells})")
    if row.flagged:
        flags.append(f"{row.flagged} flagged for review")
    for label, low, high in lab.reference_ranges:
        percent = row.classes.get(label, (0, 0.0 if row.counted else None, 0))[1]
        if percent is not None and not low <= percent <= high:
            flags.append(f"{label} {percent:.1f} % outside {low:g}-{high:g} %")
    return flags


def gather_specimens(query: Callable[[str], list[Any]], lab: LabSettings, site: str | None = None) -> list[SiteSpecimens]:
    """The specimen tables of every site (or `site`), newest specimens first. `query(sql)` runs a statement with the
    report's bounds bound (``:since``, ``:until`` and, with `site`, ``:site``). One pass over the view (each
    evaluation of it groups latest_results twice): the rows are specimens x classes, ranked here."""
    only = "AND site = :site" if site else ""
    rows: dict[tuple[str, str], SpecimenRow] = {}
    for r in query("SELECT site, specimen, label, cells, percent, flagged, cells_counted, cells_flagged, first_at, "
                   f"last_at FROM specimen_differentials WHERE last_at >= :since AND first_at < :until {only}"):
        row = rows.setdefault((r.site, r.specimen), SpecimenRow(r.site, r.specimen, int(r.cells_counted),
                                                                int(r.cells_flagged), r.first_at, r.last_at))
        row.classes[r.label] = (int(r.cells), None if r.percent is None else float(r.percent), int(r.flagged))
    totals: dict[str, int] = {}
    for name, _ in rows:
        totals[name] = totals.get(name, 0) + 1
    out = []
    for name in sorted(totals):
        newest = sorted((row for (s, _), row in rows.items() if s == name),
                        key=lambda row: (str(row.last_at), row.specimen), reverse=True)
        shown = newest[:SPECIMENS_SHOWN]
        for row in shown:
            row.flags = flags_of(row, lab)
        labels = sorted({label for row in shown for label in row.classes})
        out.append(SiteSpecimens(name, int(totals[name]), labels, shown))
    return out

