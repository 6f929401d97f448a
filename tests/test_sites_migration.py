"""Migration 0008 (sites) on SQLite and PostgreSQL, with rows: up from a single-site database, and back down."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import text

from stainbridge.daemon.schema import current_revision, downgrade_database, head_revision, upgrade_database
from stainbridge.daemon.store import make_engine

NOW = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


def _single_site_history(url: str) -> None:
    """At 0007 (before sites): three versions (one retired), images of two sites (most of lab-a), predictions and a review."""
    upgrade_database(url, "0007")
    engine = make_engine(url)
    try:
        with engine.begin() as c:
            c.execute(text(
                "INSERT INTO model_versions (id, kind, name, path, sha256, header, metrics, state, created_at) VALUES "
                "(1, 'classifier', 'resnet-v1', '/m/c0', 'c0', '{}', '{}', 'retired', :t), "
                "(2, 'classifier', 'resnet-v2', '/m/c1', 'c1', '{}', '{}', 'active', :t), "
                "(3, 'standardizer', 'colour-map', '/m/s1', 's1', '{}', '{}', 'active', :t)"), {"t": NOW})
            c.execute(text(
                "INSERT INTO images (id, sha256, source_name, site, status, received_at) VALUES "
                "(1, 'a1', 'a1.png', 'lab-a', 'done', :t), (2, 'a2', 'a2.png', 'lab-a', 'done', :t), "
                "(3, 'b1', 'b1.png', 'lab-b', 'done', :t)"), {"t": NOW})
            c.execute(text(
                "INSERT INTO predictions (image_id, label, confidence, probabilities, standardizer_version_id, "
                "classifier_version_id, latency_ms, created_at) VALUES "
                "(1, 'monocyte', 0.8, '{}', 3, 1, 5.0, :t), (2, 'monocyte', 0.7, '{}', 3, 2, 5.0, :t), "
                "(3, 'lymphocyte', 0.9, '{}', 3, 2, 5.0, :t)"), {"t": NOW})
            c.execute(text("INSERT INTO reviews (image_id, label, reviewer, created_at) "
                           "VALUES (1, 'monocyte', 'dr', :t)"), {"t": NOW})
    finally:
        engine.dispose()


def test_upgrade_gives_existing_versions_to_the_default_site_and_starts_every_site_unvalidated(database_url) -> None:
    """Every version becomes [site] name's; each site in images gets an unvalidated row; the views say so."""
    _single_site_history(database_url)
    upgrade_database(database_url, default_site="lab-a")
    engine = make_engine(database_url)
    try:
        with engine.connect() as c:
            assert c.execute(text("SELECT id, site, state FROM model_versions ORDER BY id")).all() == [
                (1, "lab-a", "retired"), (2, "lab-a", "active"), (3, "lab-a", "active")]
            assert c.execute(text("SELECT site, state, reviews, reviews_needed, recipe, validation "
                                  "FROM site_validation ORDER BY site")).all() == [
                ("lab-a", "unvalidated", 1, 50, "colour-map + resnet-v2", "unvalidated (1 of 50 reviews)"),
                ("lab-b", "unvalidated", 0, 50, None, "unvalidated (0 of 50 reviews)")]
            assert c.execute(text("SELECT image_id, validation FROM latest_results ORDER BY image_id")).all() == [
                (1, "unvalidated (1 of 50 reviews)"), (2, "unvalidated (1 of 50 reviews)"),
                (3, "unvalidated (0 of 50 reviews)")]
    finally:
        engine.dispose()
    assert current_revision(database_url) == head_revision()


def test_without_a_configured_site_the_versions_go_to_the_site_of_most_images(database_url) -> None:
    """`alembic upgrade` run by hand (no [site] name given): the site most images were recorded under."""
    _single_site_history(database_url)
    upgrade_database(database_url)
    engine = make_engine(database_url)
    try:
        with engine.connect() as c:
            assert c.execute(text("SELECT DISTINCT site FROM model_versions")).all() == [("lab-a",)]
    finally:
        engine.dispose()


def test_downgrade_keeps_every_prediction_and_one_active_version_per_kind(database_url) -> None:
    """A checkpoint registered for two sites becomes one row the predictions point to; lab-a's actives stay active,
    the other site's are retired; upgrading again works."""
    _single_site_history(database_url)
    upgrade_database(database_url, default_site="lab-a")
    engine = make_engine(database_url)
    try:
        with engine.begin() as c:  # lab-b on its own recipe: resnet-v2 again (same sha256) and a site standardizer
            c.execute(text(
                "INSERT INTO model_versions (id, kind, site, name, path, sha256, header, metrics, state, created_at) "
                "VALUES (4, 'classifier', 'lab-b', 'resnet-v2', '/m/c1', 'c1', '{}', '{}', 'active', :t), "
                "(5, 'standardizer', 'lab-b', 'reinhard', 'reinhard', 's2', '{}', '{}', 'active', :t)"), {"t": NOW})
            c.execute(text("UPDATE predictions SET classifier_version_id = 4, standardizer_version_id = 5 "
                           "WHERE image_id = 3"))
            c.execute(text("UPDATE sites SET state = 'validated', recipe = 'reinhard + resnet-v2', "
                           "standardizer_version_id = 5, classifier_version_id = 4, balanced_accuracy = 0.9, "
                           "ci_low = 0.8, ci_high = 0.95, validated_cells = 50 WHERE name = 'lab-b'"))
        downgrade_database(database_url, "0007", default_site="lab-a")
        with engine.connect() as c:
            assert c.execute(text("SELECT id, kind, sha256, state FROM model_versions ORDER BY id")).all() == [
                (1, "classifier", "c0", "retired"), (2, "classifier", "c1", "active"),
                (3, "standardizer", "s1", "active"), (5, "standardizer", "s2", "retired")]
            assert c.execute(text("SELECT image_id, classifier_version_id, standardizer_version_id FROM predictions "
                                  "ORDER BY image_id")).all() == [(1, 1, 3), (2, 2, 3), (3, 2, 5)]
            assert c.execute(text("SELECT label FROM latest_results ORDER BY image_id")).all() == [
                ("monocyte",), ("monocyte",), ("lymphocyte",)]
        assert current_revision(database_url) == "0007"
        upgrade_database(database_url, default_site="lab-a")
        with engine.connect() as c:
            assert c.execute(text("SELECT count(*) FROM sites")).scalar_one() == 2
    finally:
        engine.dispose()
