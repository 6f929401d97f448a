"""Alembic from code: the migrations build exactly the ORM schema, on SQLite and PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from stainbridge.daemon.schema import current_revision, downgrade_database, head_revision, upgrade_database
from stainbridge.daemon.store import RESULTS_VIEW_SQL, Base, make_engine

TABLES = {"images", "predictions", "model_versions", "training_runs", "reviews"}


def schema_diff(url: str) -> list:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()


def test_upgrade_builds_the_orm_schema(database_url: str) -> None:
    """After `upgrade head`, autogenerate finds no difference between the database and the ORM."""
    assert current_revision(database_url) is None
    upgrade_database(database_url)
    assert current_revision(database_url) == head_revision()
    assert schema_diff(database_url) == []


def test_upgrade_twice_is_a_no_op(database_url: str) -> None:
    """A second upgrade changes nothing and keeps the data."""
    upgrade_database(database_url)
    engine = make_engine(database_url)
    try:
        with engine.begin() as connection:
            connection.execute(text(
                "INSERT INTO images (source_name, site, status, received_at) VALUES ('a.png', 's', 'done', :t)"),
                {"t": datetime.now(timezone.utc)})
        upgrade_database(database_url)
        with engine.connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM images")).scalar() == 1
    finally:
        engine.dispose()
    assert current_revision(database_url) == head_revision()
    assert schema_diff(database_url) == []


def test_downgrade_to_base_removes_everything(database_url: str) -> None:
    """`downgrade base` drops every table and the results view."""
    upgrade_database(database_url)
    downgrade_database(database_url, "base")
    engine = make_engine(database_url)
    try:
        inspector = inspect(engine)
        assert not TABLES & set(inspector.get_table_names())
        assert "results" not in inspector.get_view_names()
    finally:
        engine.dispose()
    assert current_revision(database_url) is None


def test_results_view_joins_latest_prediction_and_review(database_url: str) -> None:
    """The results view shows one row per image with its newest prediction, models and review."""
    upgrade_database(database_url)
    now = datetime.now(timezone.utc)
    engine = make_engine(database_url)
    try:
        with engine.begin() as c:
            c.execute(text(
                "INSERT INTO model_versions (id, kind, site, name, path, sha256, header, metrics, state, created_at) VALUES "
                "(1, 'classifier', 'hospital-x', 'resnet18-v1', '/m/c1', 'c1', '{}', '{}', 'retired', :t), "
                "(2, 'classifier', 'hospital-x', 'resnet18-v2', '/m/c2', 'c2', '{}', '{}', 'active', :t), "
                "(3, 'standardizer', 'hospital-x', 'cyclegan-v1', '/m/s1', 's1', '{}', '{}', 'active', :t)"), {"t": now})
            c.execute(text(
                "INSERT INTO images (id, sha256, source_name, site, status, received_at) VALUES "
                "(1, 'aa', 'one.png', 'hospital-x', 'done', :t), (2, 'bb', 'two.png', 'hospital-x', 'pending', :t)"),
                {"t": now})
            prediction = ("INSERT INTO predictions (id, image_id, label, confidence, probabilities, "
                          "standardizer_version_id, classifier_version_id, latency_ms, created_at) VALUES "
                          "(:id, 1, :label, :conf, '{}', :std, :clf, 2.0, :t)")
            c.execute(text(prediction), {"id": 1, "label": "monocyte", "conf": 0.6, "std": None, "clf": 1, "t": now})
            c.execute(text(prediction), {"id": 2, "label": "lymphocyte", "conf": 0.9, "std": 3, "clf": 2,
                                         "t": now + timedelta(seconds=1)})
            review = ("INSERT INTO reviews (id, image_id, label, reviewer, created_at, superseded_at) "
                      "VALUES (:id, 1, :label, 'dr', :t, :gone)")
            c.execute(text(review), {"id": 1, "label": "monocyte", "t": now, "gone": now})  # corrected by the next
            c.execute(text(review), {"id": 2, "label": "lymphocyte", "t": now, "gone": None})
        with engine.connect() as c:
            rows = c.execute(text(
                "SELECT image_id, label, confidence, standardizer, classifier, classifier_sha256, reviewed_label "
                "FROM results ORDER BY image_id")).all()
    finally:
        engine.dispose()
    assert [tuple(r) for r in rows] == [
        (1, "lymphocyte", 0.9, "cyclegan-v1", "resnet18-v2", "c2", "lymphocyte"),
        (2, None, None, None, None, None, None),
    ]


def test_migrated_view_matches_the_store_definition(sqlite_url: str, tmp_path) -> None:
    """The frozen view in the migrations has the columns of store.RESULTS_VIEW_SQL (update both together)."""
    upgrade_database(sqlite_url)
    reference_url = f"sqlite:///{tmp_path / 'reference.db'}"
    reference = make_engine(reference_url)
    migrated = make_engine(sqlite_url)
    try:
        Base.metadata.create_all(reference)
        with reference.begin() as connection:
            connection.exec_driver_sql(RESULTS_VIEW_SQL)
        columns = [[col["name"] for col in inspect(engine).get_columns("results")] for engine in (reference, migrated)]
    finally:
        reference.dispose()
        migrated.dispose()
    assert columns[0] == columns[1]



def test_0005_keeps_earlier_predictions_as_unknown_and_goes_back(database_url: str) -> None:
    """Upgrading a database with results to 0005 keeps every prediction (tta and magnification NULL: unknown) and
    the lab views; downgrading to 0004 drops the two columns and keeps the rows."""
    upgrade_database(database_url, "0004")
    engine = make_engine(database_url)
    now = datetime.now(timezone.utc)
    try:
        with engine.begin() as connection:
            connection.execute(text(
                "INSERT INTO model_versions (id, kind, name, path, sha256, header, metrics, state, created_at) "
                "VALUES (1, 'classifier', 'resnet-v1', '/m/c', 'c1', '{}', '{}', 'active', :t)"), {"t": now})
            connection.execute(text("INSERT INTO images (id, source_name, site, status, received_at) "
                                    "VALUES (1, 'a.png', 's', 'done', :t)"), {"t": now})
            connection.execute(text(
                "INSERT INTO predictions (image_id, label, confidence, probabilities, classifier_version_id, "
                "latency_ms, created_at) VALUES (1, 'monocyte', 0.8, '{}', 1, 5.0, :t)"), {"t": now})
        upgrade_database(database_url)
        with engine.connect() as connection:
            assert connection.execute(text("SELECT label, tta, magnification FROM results")).all() == [
                ("monocyte", None, None)]
            assert connection.execute(text("SELECT label FROM latest_results")).all() == [("monocyte",)]
        downgrade_database(database_url, "0004")
        columns = {c["name"] for c in inspect(engine).get_columns("predictions")}
        assert not {"tta", "magnification"} & columns
        with engine.connect() as connection:
            assert connection.execute(text("SELECT label, confidence FROM latest_results")).all() == [("monocyte", 0.8)]
    finally:
        engine.dispose()
    assert current_revision(database_url) == "0004"


def test_0009_keeps_earlier_predictions_as_not_assessed_and_goes_back(database_url: str) -> None:
    """Upgrading to 0009 keeps every prediction with the review columns NULL (not assessed) in results and
    latest_results; a flagged row reads back; downgrading to 0008 drops the four columns and keeps the rows."""
    upgrade_database(database_url, "0008")
    engine = make_engine(database_url)
    now = datetime.now(timezone.utc)
    columns = "calibrated_confidence, ood_score, needs_review, review_reason"
    try:
        with engine.begin() as connection:
            connection.execute(text(
                "INSERT INTO model_versions (id, kind, name, path, sha256, header, metrics, state, created_at, site) "
                "VALUES (1, 'classifier', 'resnet-v1', '/m/c', 'c1', '{}', '{}', 'active', :t, 's')"), {"t": now})
            connection.execute(text("INSERT INTO images (id, source_name, site, status, received_at) "
                                    "VALUES (1, 'a.png', 's', 'done', :t), (2, 'b.png', 's', 'done', :t)"), {"t": now})
            connection.execute(text(
                "INSERT INTO predictions (image_id, label, confidence, probabilities, classifier_version_id, "
                "latency_ms, created_at) VALUES (1, 'monocyte', 0.8, '{}', 1, 5.0, :t)"), {"t": now})
        upgrade_database(database_url)
        with engine.begin() as connection:
            connection.execute(text(
                f"INSERT INTO predictions (image_id, label, confidence, probabilities, classifier_version_id, "
                f"latency_ms, created_at, {columns}) VALUES (2, 'lymphocyte', 0.9, '{{}}', 1, 5.0, :t, "
                f"0.7, 412.5, :flag, 'not_a_known_class')"), {"t": now, "flag": True})
        with engine.connect() as connection:
            assert connection.execute(text(f"SELECT image_id, {columns} FROM latest_results ORDER BY image_id")).all() == [
                (1, None, None, None, None), (2, 0.7, 412.5, True, "not_a_known_class")]
            assert connection.execute(text("SELECT count(*) FROM results WHERE needs_review")).scalar() == 1
        downgrade_database(database_url, "0008")
        assert not set(columns.split(", ")) & {c["name"] for c in inspect(engine).get_columns("predictions")}
        with engine.connect() as connection:
            assert connection.execute(text("SELECT label FROM latest_results ORDER BY image_id")).all() == [
                ("monocyte",), ("lymphocyte",)]
    finally:
        engine.dispose()
    assert current_revision(database_url) == "0008"


CRASH_AFTER_SECOND_TABLE = """
import os, sys
from sqlalchemy import event
from sqlalchemy.engine import Engine
from stainbridge.daemon.schema import upgrade_database

created = []

@event.listens_for(Engine, "after_cursor_execute")
def crash(conn, cursor, statement, *args):
    if statement.lstrip().upper().startswith("CREATE TABLE") and "alembic_version" not in statement:
        created.append(statement)
        if len(created) == 2:
            os._exit(9)  # as kill -9: no rollback, no clean-up

upgrade_database(sys.argv[1])
"""


def test_sqlite_upgrade_killed_midway_leaves_no_half_schema(tmp_path) -> None:
    """A first migration killed after two tables (start-up under kill -9) is undone; the next start migrates."""
    url = f"sqlite:///{tmp_path / 'state' / 'stainbridge.db'}"
    killed = subprocess.run([sys.executable, "-c", CRASH_AFTER_SECOND_TABLE, url], capture_output=True, text=True,
                            timeout=120, check=False)
    assert killed.returncode == 9, killed.stderr[-2000:]
    engine = make_engine(url)
    try:
        assert [t for t in inspect(engine).get_table_names() if t != "alembic_version"] == []
    finally:
        engine.dispose()
    upgrade_database(url)  # before: "table images already exists", at every start
    assert current_revision(url) == head_revision()


def _revisions() -> list[str]:
    """Every revision, oldest first."""
    from alembic.script import ScriptDirectory

    from stainbridge.daemon.schema import alembic_config

    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    return [r.revision for r in reversed(list(script.walk_revisions()))]


SEEDED = ("images", "predictions", "model_versions", "reviews", "training_runs")


def _seed(connection, revision: str, n: int, when: datetime) -> None:
    """One row in each table, written as code of `revision` would write it (model_versions.active before 0003,
    its site from 0008)."""
    state_column, state = ("active", "false") if revision < "0003" else ("state", "'retired'")
    site_column, site = (", site", ", 's'") if revision >= "0008" else ("", "")
    connection.execute(text(
        f"INSERT INTO model_versions (id, kind, name, path, sha256, header, metrics, {state_column}, created_at"
        f"{site_column}) VALUES ({n}, 'classifier', 'v{n}', '/m/c{n}', 'sha-{n}', '{{}}', '{{}}', {state}, :t{site})"),
        {"t": when})
    connection.execute(text(
        "INSERT INTO images (id, sha256, source_name, site, status, received_at, processed_at, archive_path) "
        f"VALUES ({n}, '{n:064x}', 'seeded-at-{revision}.png', 's', 'done', :t, :t, '/a/{n}.png')"), {"t": when})
    connection.execute(text(
        "INSERT INTO predictions (id, image_id, label, confidence, probabilities, classifier_version_id, latency_ms, "
        f"created_at) VALUES ({n}, {n}, 'monocyte', 0.5, '{{}}', {n}, 1.0, :t)"), {"t": when})
    connection.execute(text(f"INSERT INTO reviews (id, image_id, label, reviewer, created_at) "
                            f"VALUES ({n}, {n}, 'monocyte', 'dr', :t)"), {"t": when})
    connection.execute(text(
        "INSERT INTO training_runs (id, kind, status, trigger, params, metrics, started_at) "
        f"VALUES ({n}, 'standardizer', 'failed', 'manual', '{{}}', '{{}}', :t)"), {"t": when})


def _kept(engine, seeded: int) -> None:
    """Every seeded row is still there, in each table and through the results view."""
    with engine.connect() as connection:
        for table in SEEDED:
            assert connection.execute(text(f"SELECT count(*) FROM {table}")).scalar() == seeded, table
        assert connection.execute(text("SELECT count(*) FROM results WHERE label = 'monocyte'")).scalar() == seeded


def test_every_revision_walks_up_and_down_keeping_the_rows_of_each(database_url: str) -> None:
    """Up one revision at a time, with rows written at each one as that revision's code would, then down one at a
    time to base: every step keeps every row (and 0003's active flag becomes a state; 0007's crashes start at 0)."""
    revisions = _revisions()
    assert revisions[0] == "0001" and revisions[-1] == head_revision()
    when = datetime.now(UTC)
    engine = make_engine(database_url)
    try:
        for n, revision in enumerate(revisions, start=1):
            upgrade_database(database_url, revision)
            _kept(engine, n - 1)
            with engine.begin() as connection:
                _seed(connection, revision, n, when)
            _kept(engine, n)
        with engine.connect() as connection:
            assert set(connection.execute(text("SELECT state FROM model_versions")).scalars()) == {"retired"}
            assert set(connection.execute(text("SELECT crashes FROM images")).scalars()) == {0}
        for revision in reversed(revisions[:-1]):
            downgrade_database(database_url, revision)
            assert current_revision(database_url) == revision
            _kept(engine, len(revisions))
        downgrade_database(database_url, "base")
        assert not TABLES & set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_0010_keeps_reviews_as_history_and_seeds_the_promotion_history(database_url: str) -> None:
    """Upgrading to 0010 marks all but the newest review of an image and reviewer superseded and records past
    promotions in order (the active version last); downgrading to 0009 keeps every review row."""
    upgrade_database(database_url, "0009")
    when = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
    engine = make_engine(database_url)
    try:
        with engine.begin() as c:
            c.execute(text(
                "INSERT INTO model_versions (id, kind, site, name, path, sha256, header, metrics, state, created_at, "
                "promoted_at) VALUES (1, 'classifier', 's', 'v1', '/m/1', 'a', '{}', '{}', 'retired', :t, :t1), "
                "(4, 'classifier', 's', 'v4', '/m/4', 'b', '{}', '{}', 'active', :t, :t1), "
                "(5, 'classifier', 's', 'v5', '/m/5', 'c', '{}', '{}', 'retired', :t, :t5)"),
                {"t": when, "t1": when + timedelta(hours=1), "t5": when + timedelta(hours=5)})
            c.execute(text("INSERT INTO images (id, source_name, site, status, received_at) "
                           "VALUES (1, 'a.png', 's', 'done', :t)"), {"t": when})
            for n, (label, reviewer) in enumerate([("monocyte", "dr a"), ("lymphocyte", "dr a"),
                                                   ("monocyte", "dr b")], start=1):
                c.execute(text("INSERT INTO reviews (id, image_id, label, reviewer, created_at) "
                               "VALUES (:id, 1, :label, :who, :t)"),
                          {"id": n, "label": label, "who": reviewer, "t": when + timedelta(minutes=n)})
        upgrade_database(database_url, "0010")
        with engine.connect() as c:
            current = c.execute(text("SELECT id FROM reviews WHERE superseded_at IS NULL ORDER BY id")).scalars().all()
            history = c.execute(text("SELECT from_version_id, to_version_id, action FROM promotions "
                                     "ORDER BY id")).all()
        assert current == [2, 3]
        assert [tuple(row) for row in history] == [(None, 1, "promote"), (1, 5, "promote"), (5, 4, "promote")]
        downgrade_database(database_url, "0009")
        with engine.connect() as c:
            assert c.execute(text("SELECT count(*) FROM reviews")).scalar() == 3
            assert "superseded_at" not in {col["name"] for col in inspect(engine).get_columns("reviews")}
            assert "promotions" not in inspect(engine).get_table_names()
    finally:
        engine.dispose()
