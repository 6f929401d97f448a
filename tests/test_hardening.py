"""Hostile inputs and privacy: deflate bombs, identifiers in tracebacks, replaced checkpoints, durability."""

from __future__ import annotations

import io
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import DeflatedExplicitVRLittleEndian

from stainbridge.daemon.intake.decoding import decode_image
from stainbridge.daemon.intake.errors import RefusedFile
from stainbridge.daemon.logs import configure_logging, get_logger
from stainbridge.daemon.schema import upgrade_database
from stainbridge.daemon.store import make_engine, make_sessionmaker
from stainbridge.daemon.versions.loading import ModelConfigError, load_models
from tests import dicom_factory
from tests.daemon_helpers import build_tiny_models


def deflate_bomb(path: Path, side: int = 3000) -> Path:
    """A deflated-transfer-syntax DICOM whose zero pixels inflate ~27 MB from a few tens of kB."""
    dicom_factory.write_rgb(path, np.zeros((8, 8, 3), dtype=np.uint8))
    ds = dcmread(path)
    ds.Rows = ds.Columns = side
    ds.PixelData = bytes(side * side * 3)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def test_deflate_bomb_is_refused_before_it_is_inflated(tmp_path):
    """A deflated DICOM that inflates past the file limit is refused, using a few MiB at most."""
    path = deflate_bomb(tmp_path / "bomb.dcm")
    assert path.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(RefusedFile) as err:
            decode_image(path, max_pixels=50_000_000, max_bytes=4 << 20, pseudonym_secret="x" * 16)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert err.value.reason == "decompression_bomb" and peak < 16 << 20


def test_small_deflated_dicom_is_still_decoded(tmp_path):
    """A deflated DICOM within the limit decodes as before."""
    path = deflate_bomb(tmp_path / "small.dcm", side=16)
    decoded = decode_image(path, max_pixels=50_000_000, max_bytes=4 << 20, pseudonym_secret="x" * 16)
    assert (decoded.width, decoded.height, decoded.format) == (16, 16, "DICOM")


def test_identifiers_in_tracebacks_and_free_text_are_masked(tmp_path, restore_logging):
    """After a DICOM is read, its patient ID and name are masked in exception text and tracebacks."""
    path = tmp_path / "a.dcm"
    dicom_factory.write_rgb(path)
    decode_image(path, max_pixels=50_000_000, max_bytes=4 << 20, pseudonym_secret="x" * 16)
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    try:
        raise ValueError(f"bad element for {dicom_factory.PATIENT_ID} owned by Jane Doe {dicom_factory.PATIENT_NAME}")
    except ValueError:
        get_logger("test").exception("decode_crashed", note=f"id {dicom_factory.PATIENT_ID}")
    line = stream.getvalue()
    assert dicom_factory.PATIENT_ID not in line and "Doe^Jane" not in line
    assert json.loads(line)["exception"].count("[redacted]") >= 2


def test_checkpoint_overwritten_in_place_is_refused(tmp_path, settings_factory):
    """Replacing the registered classifier file with other bytes is refused at load, not taken as a new version."""
    models = build_tiny_models(tmp_path / "models")
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade_database(url)
    settings = settings_factory(url, models_classifier=str(models.classifier), models_standardizer="none",
                                models_device="cpu")
    engine = make_engine(url)
    try:
        sessions = make_sessionmaker(engine)
        load_models(settings, sessions)
        other = build_tiny_models(tmp_path / "other")
        data = bytearray(other.classifier.read_bytes())
        data[-1] ^= 1  # other bytes, same header: a different checkpoint under the registered name
        models.classifier.write_bytes(bytes(data))
        with pytest.raises(ModelConfigError, match="changed since it was registered"):
            load_models(settings, sessions)
    finally:
        engine.dispose()


def test_sqlite_commits_are_durable(sqlite_url):
    """SQLite runs synchronous=FULL: a committed result is on disk before its file is moved."""
    engine = make_engine(sqlite_url)
    try:
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    finally:
        engine.dispose()
