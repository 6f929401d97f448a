"""End to end with DICOM: the real daemon classifies uncompressed and JPEG-baseline files, keeps
their UIDs, and never stores or logs the patient name or the raw patient ID."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.pool import NullPool

from stainbridge.daemon.intake.dicom import pseudonymize
from stainbridge.daemon.schema import upgrade_database
from tests import dicom_factory
from tests.daemon_helpers import (
    Daemon,
    query,
    scalar,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.slow

SECRET = "dicom-e2e-secret-5f2c"
FORBIDDEN = ("Doe", "Jane", dicom_factory.PATIENT_ID)


def every_text_value(url: str) -> list[str]:
    """Every non-null value of every column of every table, as text."""
    engine = create_engine(url, poolclass=NullPool)
    try:
        tables = inspect(engine).get_table_names()
        values: list[str] = []
        with engine.connect() as connection:
            for table in tables:
                for row in connection.execute(text(f'SELECT * FROM "{table}"')):
                    values += [str(v) for v in row if v is not None]
        return values
    finally:
        engine.dispose()


def test_dicom_files_are_classified_with_uids_and_no_patient_identity(tmp_path, tiny_models, database_url):
    """Uncompressed and JPEG-baseline DICOM: classified, UIDs and pseudonym stored, no name or raw ID in SQL or logs."""
    if database_url.startswith("postgresql"):
        upgrade_database(database_url)
    config = write_config(tmp_path / "stainbridge.toml", tmp_path, database_url, tiny_models,
                          site={"pseudonym_secret": SECRET})
    daemon = Daemon(config, tmp_path)
    try:
        daemon.start()
        drop = tmp_path / "drop"
        plain = dicom_factory.write_rgb(drop / "plain.dcm")
        jpeg = dicom_factory.write_jpeg_baseline(drop / "jpeg.dcm")
        wait_for(lambda: scalar(database_url, "SELECT count(*) FROM images WHERE status <> 'processing'") == 2, 60,
                 "both DICOM files handled")
        assert daemon.stop() == 0
    finally:
        daemon.close()

    rows = query(database_url, "SELECT source_name, status, label, study_uid, series_uid, sop_instance_uid, "
                               "patient_pseudonym FROM results ORDER BY source_name")
    expected = {"jpeg.dcm": jpeg, "plain.dcm": plain}
    assert [r[0] for r in rows] == sorted(expected)
    for source, status, label, study, series, sop, pseudonym in rows:
        ids = expected[source]
        assert status == "done" and label, f"{source} was not classified"
        assert (study, series, sop) == (ids.study_uid, ids.series_uid, ids.sop_instance_uid)
        assert pseudonym == pseudonymize(dicom_factory.PATIENT_ID, SECRET)
    assert scalar(database_url, "SELECT min(institution) FROM images") == dicom_factory.INSTITUTION

    stored = every_text_value(database_url)
    logs = daemon.log_text()
    for secret in FORBIDDEN:
        assert not [v for v in stored if secret in v], f"{secret!r} is stored in the database"
        assert secret not in logs, f"{secret!r} appears in the service log"
