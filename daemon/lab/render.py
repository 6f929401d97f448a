"""Turn a ReportData into one self-contained HTML file: matplotlib plots and JPEG thumbnails as
data URIs, laid out by the Jinja2 template daemon/lab/templates/report.html.j2 (autoescaped).

The page loads nothing from anywhere (its Content-Security-Policy allows only inline styles and
data: images), so it can be mailed or opened on a workstation without network access.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stainbridge.daemon.lab.report import HISTOGRAM_BINS, ReportData, Shown

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

THUMBNAIL_PX = 96
MAX_DAY_BARS = 62  # longer periods are drawn as stacked bands
TEMPLATES = Path(__file__).resolve().parent / "templates"


def _data_uri(payload: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}"


def read_picture(path: Path) -> "PILImage | None":
    """The archived file's pixels decoded as the service decodes them (DICOM too, bombs refused; a DICOM's
    identifiers are not read, so no pseudonym secret is needed); None when unreadable."""
    from stainbridge.daemon.config import WatchSettings
    from stainbridge.daemon.intake.decoding import decode_image
    from stainbridge.daemon.intake.errors import IntakeError

    limits = WatchSettings()
    try:
        return decode_image(path, max_pixels=limits.max_pixels, max_bytes=int(limits.max_file_mb * 2**20),
                            metadata=False).image
    except (IntakeError, OSError):
        return None


def thumbnail_of(picture: "PILImage") -> str:
    """A small JPEG of `picture` as a data URI."""
    small = picture.convert("RGB")
    small.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    out = io.BytesIO()
    small.save(out, format="JPEG", quality=80)
    return _data_uri(out.getvalue(), "image/jpeg")


def thumbnail(path: Path) -> str | None:
    """A small JPEG of the image at `path` as a data URI; None when it cannot be read (moved, deleted)."""
    picture = read_picture(path)
    return thumbnail_of(picture) if picture is not None else None


def standardized_path(archive_path: Path) -> Path:
    """Where the service saved the standardized copy (`[watch] save_standardized`), see filing.save_standardized."""
    return archive_path.with_name(f"{archive_path.stem}.standardized.png")


def _pictures(shown: list[Shown], redone: dict[int, str]) -> list[dict[str, Any]]:
    out = []
    for item in shown:
        original = Path(item.archive_path) if item.archive_path else None
        saved = thumbnail(standardized_path(original)) if original else None
        out.append({
            "item": item,
            "before": thumbnail(original) if original else None,
            "after": saved or redone.get(item.image_id),
            "redone": saved is None and item.image_id in redone,
        })
    return out


def _figure_uri(fig: Any) -> str:
    import matplotlib.pyplot as plt

    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return _data_uri(out.getvalue(), "image/png")


def _plots(data: ReportData) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots: dict[str, str] = {}
    if data.class_counts:
        fig, ax = plt.subplots(figsize=(5, 2.6))
        labels, counts = zip(*data.class_counts)
        ax.barh(labels[::-1], counts[::-1], color="#4a6fa5")
        ax.set_xlabel("images")
        ax.set_title("predicted class")
        plots["classes"] = _figure_uri(fig)
    if data.daily:
        days = sorted({d for d, _, _ in data.daily})
        fig, ax = plt.subplots(figsize=(7, 2.8))
        labels = sorted({lb for _, lb, _ in data.daily})
        counts = {(d, lb): n for d, lb, n in data.daily}
        series = [[counts.get((d, label), 0) for d in days] for label in labels]
        if len(days) <= MAX_DAY_BARS:
            bottom = [0] * len(days)
            for label, heights in zip(labels, series):
                ax.bar(range(len(days)), heights, bottom=bottom, label=label)
                bottom = [b + h for b, h in zip(bottom, heights)]
        else:  # a year of days: one filled band per class (a bar per day and class costs seconds to draw)
            ax.stackplot(range(len(days)), series, labels=labels, step="mid")
        step = max(1, len(days) // 12)
        ax.set_xticks(range(0, len(days), step), [days[i] for i in range(0, len(days), step)], rotation=45, ha="right")
        ax.set_ylabel("images")
        ax.legend(fontsize=7, ncols=2)
        ax.set_title("per day")
        plots["daily"] = _figure_uri(fig)
    if sum(data.histogram):
        fig, ax = plt.subplots(figsize=(5, 2.6))
        width = 1 / HISTOGRAM_BINS
        ax.bar([i * width for i in range(HISTOGRAM_BINS)], data.histogram, width=width, align="edge",
               color="#6a994e", edgecolor="white")
        ax.set_xlim(0, 1)
        ax.set_xlabel("confidence of the predicted class")
        ax.set_ylabel("images")
        plots["confidence"] = _figure_uri(fig)
    if data.confusion:
        labels = sorted({t for t, _, _ in data.confusion} | {p for _, p, _ in data.confusion})
        index = {label: i for i, label in enumerate(labels)}
        matrix = [[0] * len(labels) for _ in labels]
        for truth, predicted, n in data.confusion:
            matrix[index[truth]][index[predicted]] += n
        fig, ax = plt.subplots(figsize=(1 + 0.6 * len(labels), 1 + 0.5 * len(labels)))
        ax.imshow(matrix, cmap="Blues")
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("reviewed")
        for i, row in enumerate(matrix):
            for j, n in enumerate(row):
                ax.text(j, i, str(n), ha="center", va="center", fontsize=8)
        plots["confusion"] = _figure_uri(fig)
    for drift in data.drift:
        if drift.weeks:
            plots[f"drift:{drift.site}"] = _drift_plot(drift)
    return plots


def _drift_plot(drift: Any) -> str:
    """Weekly class shares (stacked bars), mean confidence and share flagged (lines) of one site, on one 0-1 axis;
    below it, where the stain was measured, each region's Delta E from the baseline's stain with the alert bound.
    Baseline weeks hatched, weeks with an alert marked; the legends below their plots, never over the data."""
    import matplotlib.pyplot as plt

    weeks = [w.week for w in drift.weeks]
    labels = sorted({label for w in drift.weeks for label in w.shares})
    stained = bool(drift.stain_delta_e)
    if stained:
        fig, (ax, low) = plt.subplots(2, 1, figsize=(7, 5.4), sharex=True, gridspec_kw={"height_ratios": [3, 1.6]})
    else:
        fig, ax = plt.subplots(figsize=(7, 3.2))
    bottom = [0.0] * len(weeks)
    baseline, alerted = set(drift.baseline), {a.week for a in drift.alerts}
    for label in labels:
        heights = [w.shares.get(label, 0.0) for w in drift.weeks]
        ax.bar(range(len(weeks)), heights, bottom=bottom, width=0.85, label=label,
               hatch=["//" if w in baseline else "" for w in weeks])
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ax.plot(range(len(weeks)), [w.mean_confidence for w in drift.weeks], color="black", marker=".",
            label="mean confidence")
    ax.plot(range(len(weeks)), [w.share_flagged for w in drift.weeks], color="#a33", linestyle="--", marker=".",
            label="share flagged")
    for i, week in enumerate(weeks):
        if week in alerted:
            ax.annotate("!", (i, 1.02), ha="center", color="#a33", fontweight="bold", annotation_clip=False)
    step = max(1, len(weeks) // 12)
    bottom_axis = low if stained else ax
    bottom_axis.set_xticks(range(0, len(weeks), step), [weeks[i] for i in range(0, len(weeks), step)], rotation=45,
                           ha="right")
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("share of the week's cells")
    ax.set_title(f"site {drift.site}, per week (hatched: baseline; !: alert)")
    if stained:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        styles = {"background": ("#777", "-"), "nucleus": ("#5b3f99", "-"), "other_stained": ("#c77", ":")}
        for region, (colour, line) in styles.items():
            values = [drift.stain_delta_e.get(w, {}).get(region, float("nan")) for w in weeks]
            low.plot(range(len(weeks)), values, color=colour, linestyle=line, marker=".",
                     label=region + (" (not judged)" if region == "other_stained" else ""))
        if drift.stain_bound is not None:
            low.axhline(drift.stain_bound, color="#a33", linestyle="--", linewidth=0.8, label="alert bound")
        low.set_ylim(bottom=0)
        low.set_ylabel("stain Delta E\nfrom baseline")
        low.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=7, ncols=4, loc="upper center", bbox_to_anchor=(0.5, -0.32))
    return _figure_uri(fig)


def _when(value: Any) -> str:
    """A timestamp to the minute, whether the database returned a datetime or text (SQLite)."""
    if value is None:
        return ""
    text = value.strftime("%Y-%m-%d %H:%M") if hasattr(value, "strftime") else str(value)
    return text[:16]


def render(data: ReportData, redone: dict[int, str] | None = None) -> str:
    """The report as one HTML document; `redone`: image id -> standardized thumbnail made now (--restandardize)."""
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["when"] = _when
    template = env.get_template("report.html.j2")
    plots = {name: None for name in ("classes", "daily", "confidence", "confusion")} | _plots(data)
    return template.render(data=data, plots=plots, grid=_pictures(data.grid, redone or {}),
                           lowest=_pictures(data.lowest, redone or {}), total=sum(data.status_counts.values()))
