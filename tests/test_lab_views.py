"""The lab views (migrations 0004, 0006) and the example queries of docs/lab.md and docs/database.md, on SQLite and
PostgreSQL."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from sqlalchemy import inspect, text

from stainbridge.daemon.lab.views import LAB_VIEW_NAMES, lab_views_sql
from stainbridge.daemon.schema import downgrade_database, upgrade_database
from stainbridge.daemon.store import RESULTS_VIEW_SQL, Base, make_engine
from tests.daemon_helpers import query
from tests.lab_helpers import DAY1, DAY2, doc_section, plain, seed_known_history, sql_blocks

DOCS = Path(__file__).resolve().parent.parent / "docs"

# What each example of docs/lab.md returns on the history of seed_known_history.
EXPECTED = {
    "latest_results": [("a.png", "monocyte", 0.55, "monocyte"), ("b.png", "neutrophil", 0.9, "lymphocyte"),
                       ("c.png", "neutrophil", 0.4, None)],
    "daily_counts": [("2026-11-02", "monocyte", 1), ("2026-11-02", "neutrophil", 1), ("2026-11-03", "neutrophil", 1)],
    "low_confidence_queue": [(3, "c.png", "neutrophil", 0.4)],
    "review_disagreements": [("b.png", "neutrophil", "lymphocyte", "dr-a", "resnet-v2")],
    "failures_by_reason": [("corrupt", 2), ("empty", 1)],
    "site_validation": [("hospital-x", "unvalidated", 2, 50, "unvalidated (2 of 50 reviews)")],
    # a.png and b.png counted, c.png (a neutrophil by its best guess) flagged and counted apart
    "specimen_differentials": [("BS-1", "monocyte", 1, 50.0, 0, 2, 1), ("BS-1", "neutrophil", 1, 50.0, 1, 2, 1)],
    # one week (Monday 2026-11-02): a.png monocyte 0.55, b.png neutrophil 0.9, c.png neutrophil 0.4 and flagged
    "weekly_drift": [("2026-11-02", "monocyte", 1, 0.333, 3, 0.617, 0.333),
                     ("2026-11-02", "neutrophil", 2, 0.667, 3, 0.617, 0.333)],
    # the same week's three cells: the mean of their medians (lab_helpers.STAINS)
    "weekly_stain": [("2026-11-02", 3, 82.0, 2.0, 8.0, 42.0, 20.0, -28.0)],
    # the candidate disagrees on a.png too, but a.png is reviewed: only c.png waits
    "candidate_disagreements": [(3, "c.png", "neutrophil", "lymphocyte", "resnet-v3")],
}


def test_lab_view_examples_answer_on_both_databases(database_url: str) -> None:
    """Every view has an example in docs/lab.md; each runs as printed and returns what the known history implies."""
    seed_known_history(database_url)
    examples = sql_blocks(doc_section(DOCS / "lab.md", "SQL views"))
    assert set(examples) >= set(LAB_VIEW_NAMES), f"docs/lab.md lacks examples for {set(LAB_VIEW_NAMES) - set(examples)}"
    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            answers = {name: [tuple(plain(v) for v in row) for row in connection.execute(text(examples[name]))]
                       for name in LAB_VIEW_NAMES}
    finally:
        engine.dispose()
    assert answers == EXPECTED


def test_failures_by_reason_times_carry_their_zone_on_both_databases(database_url: str) -> None:
    """first_at and last_at say their zone on SQLite too (ISO 8601 with +00:00, as `export` writes times) and name
    the same instants as on PostgreSQL; `corrupt` failed on both days, `empty` on the second."""
    seed_known_history(database_url)
    rows = query(database_url, "SELECT reason, first_at, last_at FROM failures_by_reason ORDER BY reason")
    if database_url.startswith("sqlite"):
        assert [tuple(r) for r in rows] == [("corrupt", "2026-11-02T09:00:00+00:00", "2026-11-03T15:30:00+00:00"),
                                            ("empty", "2026-11-03T15:30:00+00:00", "2026-11-03T15:30:00+00:00")]
    times = {reason: tuple(t if isinstance(t, datetime) else datetime.fromisoformat(t) for t in (first, last))
             for reason, first, last in rows}
    assert all(t.tzinfo is not None for pair in times.values() for t in pair)
    assert times == {"corrupt": (DAY1, DAY2), "empty": (DAY2, DAY2)}


def test_downgrade_to_0003_removes_the_lab_views_and_upgrade_restores_them(database_url: str) -> None:
    """0004 is reversible: the views go with it, `results` stays, and they come back on upgrade."""
    upgrade_database(database_url)
    downgrade_database(database_url, "0003")
    engine = make_engine(database_url)
    try:
        views = set(inspect(engine).get_view_names())
        assert "results" in views and not views & set(LAB_VIEW_NAMES)
        upgrade_database(database_url)
        assert set(inspect(engine).get_view_names()) >= {"results", *LAB_VIEW_NAMES}
    finally:
        engine.dispose()


def test_0006_adds_provenance_to_latest_results_and_goes_back(database_url: str) -> None:
    """0006 shows each current answer's tta and magnification in latest_results, the other views answer as before;
    downgrading to 0005 takes the two columns out of the view and keeps every row."""
    seed_known_history(database_url)
    engine = make_engine(database_url)
    ordered = "SELECT source_name, label, tta, magnification FROM latest_results ORDER BY source_name"
    try:
        with engine.connect() as connection:
            assert [tuple(map(plain, row)) for row in connection.execute(text(ordered))] == [
                ("a.png", "monocyte", True, 1.25), ("b.png", "neutrophil", True, 1.25),
                ("c.png", "neutrophil", False, 1.25)]
        downgrade_database(database_url, "0005")
        assert not {"tta", "magnification"} & {c["name"] for c in inspect(engine).get_columns("latest_results")}
        with engine.connect() as connection:
            assert connection.execute(text("SELECT COUNT(*) FROM latest_results")).scalar_one() == 3
            assert connection.execute(text("SELECT SUM(images) FROM daily_counts")).scalar_one() == 3
        upgrade_database(database_url)
        with engine.connect() as connection:
            assert len(connection.execute(text(ordered)).all()) == 3
    finally:
        engine.dispose()


def test_migrated_lab_views_match_daemon_views(sqlite_url: str, tmp_path) -> None:
    """The frozen copies (0004, 0006) have the columns of daemon/lab/views.py (update them together)."""
    upgrade_database(sqlite_url)
    reference = make_engine(f"sqlite:///{tmp_path / 'reference.db'}")
    migrated = make_engine(sqlite_url)
    try:
        Base.metadata.create_all(reference)
        with reference.begin() as connection:
            connection.exec_driver_sql(RESULTS_VIEW_SQL)
            for statement in lab_views_sql("sqlite"):
                connection.exec_driver_sql(statement)
        for name in LAB_VIEW_NAMES:
            assert ([c["name"] for c in inspect(reference).get_columns(name)]
                    == [c["name"] for c in inspect(migrated).get_columns(name)]), name
    finally:
        reference.dispose()
        migrated.dispose()


def test_results_view_examples_answer_on_both_databases(database_url: str) -> None:
    """The `results` examples of docs/database.md run as printed; the provenance one groups the current
    results by how they were computed (the re-classified image counts once, by its newest prediction)."""
    seed_known_history(database_url)
    examples = sql_blocks(doc_section(DOCS / "database.md", "The `results` view"))
    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            answers = {name: [tuple(plain(v) for v in row) for row in connection.execute(text(sql))]
                       for name, sql in examples.items()}
    finally:
        engine.dispose()
    assert answers["results"] == [("c.png", "neutrophil", 0.4, "resnet-v2", None),
                                  ("b.png", "neutrophil", 0.9, "resnet-v2", "lymphocyte")]
    assert answers["provenance"] == [(False, 1.25, "resnet-v2", 1, 0.4), (True, 1.25, "resnet-v2", 2, 0.725)]
