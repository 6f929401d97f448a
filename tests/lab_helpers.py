"""A small, fully known history in the database for the lab views, the report and export tests."""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import insert, text

from stainbridge.daemon.schema import upgrade_database
from stainbridge.daemon.store import Image, Review, ShadowPrediction, Site, make_engine, stain_columns

DAY1 = datetime(2026, 11, 2, 9, 0, tzinfo=timezone.utc)
DAY2 = datetime(2026, 11, 3, 15, 30, tzinfo=timezone.utc)
SPECIMENS = {"a.png": "BS-1", "b.png": "BS-1", "c.png": "BS-1", "c-copy.png": "BS-1", "g.png": "BS-2"}
# The classified images' stain as the service measures it (region -> median L*, a*, b*); week of 2026-11-02 means:
# background 82 2 8, nucleus 42 20 -28
STAINS = {"a.png": {"background": (80.0, 2.0, 8.0), "other_stained": (60.0, 20.0, 5.0), "nucleus": (40.0, 20.0, -30.0)},
          "b.png": {"background": (82.0, 4.0, 10.0), "other_stained": (62.0, 22.0, 6.0), "nucleus": (42.0, 22.0, -26.0)},
          "c.png": {"background": (84.0, 0.0, 6.0), "nucleus": (44.0, 18.0, -28.0)}}


def seed_known_history(url: str) -> None:
    """Three classified images (one re-classified, one reviewed in agreement, one in disagreement, one
    unreviewed at low confidence and flagged for it), a duplicate, three failures (two reasons) and a pending file;
    a.png, b.png and c.png (and its duplicate) are specimen BS-1, the pending g.png BS-2; a candidate classifier
    awaiting evidence shadowed a.png and c.png and disagrees on both."""
    upgrade_database(url)
    engine = make_engine(url)
    try:
        with engine.begin() as c:
            c.execute(text(
                "INSERT INTO model_versions (id, kind, site, name, path, sha256, header, metrics, state, created_at) VALUES "
                "(1, 'standardizer', 'hospital-x', 'cyclegan-a', '/m/s', 's1', :h, '{}', 'active', :t), "
                "(2, 'classifier', 'hospital-x', 'resnet-v1', '/m/c1', 'c1', '{}', '{}', 'retired', :t), "
                "(3, 'classifier', 'hospital-x', 'resnet-v2', '/m/c2', 'c2', '{}', '{}', 'active', :t)"),
                {"t": DAY1, "h": '{"site_profile": {"magnification": 1.25, "method": "test"}}'})
            images = [
                (1, "a.png", "done", None, None, DAY1), (2, "b.png", "done", None, None, DAY1),
                (3, "c.png", "done", None, None, DAY2), (4, "c-copy.png", "duplicate", None, 3, DAY2),
                (5, "d.png", "failed", "corrupt: d.png cannot be decoded (corrupt; OSError)", None, DAY2),
                (6, "e.png", "failed", "empty: e.png is empty (0 bytes); was the copy interrupted?", None, DAY2),
                (7, "f.png", "failed", "corrupt: f.png cannot be decoded (corrupt; OSError)", None, DAY1),
                (8, "g.png", "pending", None, None, DAY2),
            ]
            c.execute(insert(Image.__table__),  # typed: timestamps stored exactly as the service stores them
                      [{"id": i, "sha256": None if dup else f"sha{i}", "source_name": name, "site": "hospital-x",
                        "status": status, "error": error, "duplicate_of_id": dup, "received_at": t, "processed_at": t,
                        "specimen": SPECIMENS.get(name), **stain_columns(STAINS.get(name, {}))}
                       for i, name, status, error, dup, t in images])
            c.execute(text(
                "INSERT INTO predictions (id, image_id, label, confidence, probabilities, standardizer_version_id, "
                "classifier_version_id, latency_ms, tta, magnification, needs_review, review_reason, created_at) "
                "VALUES (:id, :img, :label, :conf, '{}', 1, :clf, 12.0, :tta, :mag, :flag, :why, :t)"),
                # the first from before predictions recorded tta and magnification (migration 0005)
                # and the last flagged for its low confidence (migration 0009)
                [{"id": 1, "img": 1, "label": "lymphocyte", "conf": 0.95, "clf": 2, "tta": None, "mag": None, "t": DAY1,
                  "flag": None, "why": None},
                 {"id": 2, "img": 1, "label": "monocyte", "conf": 0.55, "clf": 3, "tta": True, "mag": 1.25, "t": DAY2,
                  "flag": False, "why": None},
                 {"id": 3, "img": 2, "label": "neutrophil", "conf": 0.9, "clf": 3, "tta": True, "mag": 1.25, "t": DAY1,
                  "flag": False, "why": None},
                 {"id": 4, "img": 3, "label": "neutrophil", "conf": 0.4, "clf": 3, "tta": False, "mag": 1.25,
                  "t": DAY2, "flag": True, "why": "low_confidence"}])
            c.execute(insert(Site.__table__),  # as the service records a site it serves for the first time
                      [{"name": "hospital-x", "state": "unvalidated", "reviews_needed": 50, "validation": {},
                        "created_at": DAY1}])
            c.execute(insert(Review.__table__),
                      [{"image_id": 1, "label": "monocyte", "reviewer": "dr-a", "created_at": DAY2},
                       {"image_id": 2, "label": "lymphocyte", "reviewer": "dr-a", "created_at": DAY2}])
            # a candidate classifier awaiting evidence (the site's newest version), shadowing c.png (unreviewed, it
            # disagrees) and a.png (reviewed): only c.png is a candidate disagreement
            c.execute(text(
                "INSERT INTO model_versions (id, kind, site, name, path, sha256, header, metrics, state, gate_verdict, "
                "created_at) VALUES (4, 'classifier', 'hospital-x', 'resnet-v3', '/m/c3', 'c3', '{}', '{}', "
                "'candidate', 'awaiting_evidence', :t)"), {"t": DAY2})
            c.execute(insert(ShadowPrediction.__table__),
                      [{"image_id": 3, "model_version_id": 4, "label": "lymphocyte", "confidence": 0.7,
                        "calibrated_confidence": None, "created_at": DAY2},
                       {"image_id": 1, "model_version_id": 4, "label": "lymphocyte", "confidence": 0.8,
                        "calibrated_confidence": None, "created_at": DAY2}])
    finally:
        engine.dispose()


def plain(value: Any) -> Any:
    """A database value as the tests compare it, whichever backend returned it."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, float):
        return round(value, 3)
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def doc_section(path: Path, title: str) -> str:
    """The text of the Markdown section headed `title` (any level), up to the next heading of the same or a
    higher level; headings inside ``` blocks do not count."""
    lines = path.read_text(encoding="utf-8").splitlines()
    levels: list[int | None] = []
    fenced = False
    for line in lines:
        if line.startswith("```"):
            fenced = not fenced
        hashes = len(line) - len(line.lstrip("#"))
        is_heading = not fenced and 0 < hashes <= 6 and line[hashes:hashes + 1] == " "
        levels.append(hashes if is_heading else None)
    starts = [i for i, level in enumerate(levels) if level and lines[i][levels[i] + 1:].strip() == title]
    assert starts, f"{path.name} has no section headed {title!r}"
    start, level = starts[0], levels[starts[0]]
    end = next((i for i in range(start + 1, len(lines)) if levels[i] and levels[i] <= level), len(lines))
    return "\n".join(lines[start:end])


def sql_blocks(section: str) -> dict[str, str]:
    """The ```sql blocks of a docs section, keyed by their first line's comment (`-- name: ...`)."""
    blocks: dict[str, str] = {}
    for chunk in section.split("```sql\n")[1:]:
        body = chunk.split("```", 1)[0].strip()
        first = body.splitlines()[0]
        assert first.startswith("-- "), f"a docs SQL example must start with '-- view_name: ...': {first!r}"
        blocks[first[3:].split(":", 1)[0].strip()] = body
    return blocks
