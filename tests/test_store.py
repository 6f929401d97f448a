"""The SQL record: rows, the one-claim-per-content index, SQLite tuning, on both backends."""

from __future__ import annotations

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from stainbridge.daemon.schema import upgrade_database
from stainbridge.daemon.store import (
    Image,
    ImageStatus,
    ModelKind,
    ModelVersion,
    Prediction,
    make_engine,
    make_sessionmaker,
)

SHA = "ab" * 32


@pytest.fixture
def session(database_url: str):
    """A session on a freshly migrated database of each backend."""
    upgrade_database(database_url)
    engine = make_engine(database_url)
    with make_sessionmaker(engine)() as session:
        yield session
    engine.dispose()


def image(sha256: str | None = SHA, **kw) -> Image:
    return Image(sha256=sha256, source_name="cell.png", site="test", status=ImageStatus.pending, **kw)


def classifier_version(sha256: str = "cd" * 32) -> ModelVersion:
    return ModelVersion(kind=ModelKind.classifier, site="test", name="resnet18", path="/m/c.safetensors", sha256=sha256)


def test_insert_image_prediction_and_model_version(session: Session) -> None:
    """An image, a model version and a prediction round-trip with their enums, JSON and defaults."""
    img, model = image(), classifier_version()
    img.predictions.append(
        Prediction(label="lymphocyte", confidence=0.9, probabilities={"lymphocyte": 0.9, "monocyte": 0.1},
                   classifier_version=model, latency_ms=3.5)
    )
    session.add(img)
    session.commit()
    session.expire_all()
    stored = session.scalars(select(Image)).one()
    assert stored.status is ImageStatus.pending
    assert stored.received_at is not None
    prediction = stored.predictions[0]
    assert prediction.probabilities == {"lymphocyte": 0.9, "monocyte": 0.1}
    assert prediction.classifier_version.kind is ModelKind.classifier
    assert prediction.classifier_version.header == {} and prediction.classifier_version.active is False


def test_same_content_twice_is_refused(session: Session) -> None:
    """Two original rows with the same sha256 violate the unique claim."""
    session.add(image())
    session.commit()
    session.add(image())
    with pytest.raises(IntegrityError):
        session.commit()


def test_duplicate_row_may_repeat_the_sha256(session: Session) -> None:
    """A row marked duplicate_of the first may carry the same sha256."""
    first = image()
    session.add(first)
    session.commit()
    session.add(Image(sha256=SHA, source_name="again.png", site="test", status=ImageStatus.duplicate,
                      duplicate_of_id=first.id))
    session.commit()
    assert session.scalar(select(text("count(*)")).select_from(Image)) == 2


def test_rows_without_content_hash_do_not_collide(session: Session) -> None:
    """Rows whose sha256 is not known yet (NULL) never conflict with each other."""
    session.add_all([image(sha256=None), image(sha256=None)])
    session.commit()
    assert session.scalar(select(text("count(*)")).select_from(Image).where(Image.sha256.is_(None))) == 2


def test_status_outside_the_enum_is_refused(session: Session) -> None:
    """The CHECK constraint refuses a status the code does not know, even through raw SQL."""
    with pytest.raises(IntegrityError):
        session.execute(text(
            "INSERT INTO images (source_name, site, status, received_at) "
            "VALUES ('x.png', 'test', 'bogus', CURRENT_TIMESTAMP)"))
        session.commit()


def test_sqlite_engine_is_tuned(sqlite_url: str) -> None:
    """SQLite connections run in WAL mode with foreign keys and a busy timeout."""
    engine = make_engine(sqlite_url)
    try:
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    finally:
        engine.dispose()


def test_sqlite_enforces_foreign_keys(sqlite_url: str) -> None:
    """A prediction pointing at a missing image is refused on SQLite too."""
    upgrade_database(sqlite_url)
    engine = make_engine(sqlite_url)
    try:
        with make_sessionmaker(engine)() as session:
            session.add(classifier_version())
            session.commit()
            session.add(Prediction(image_id=999, label="x", confidence=1.0, probabilities={},
                                   classifier_version_id=1, latency_ms=1.0))
            with pytest.raises(IntegrityError):
                session.commit()
    finally:
        engine.dispose()
