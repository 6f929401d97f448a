"""Fuzz the readers: whatever bytes arrive, decoding ends in a named IntakeError or an RGB picture.

Bounded: a fixed number of examples per test and no shrinking time limit beyond hypothesis' own;
the seeds are the formats the drop folder accepts, then mutated (flipped, cut, spliced bytes).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from stainbridge.daemon.intake.decoding import decode_image
from stainbridge.daemon.intake.errors import IntakeError
from tests import dicom_factory

LIMITS = {"max_pixels": 4_000_000, "max_bytes": 4 << 20, "pseudonym_secret": "fuzz-secret-0123456789"}
FUZZ = settings(max_examples=120, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _seeds(folder: Path) -> list[bytes]:
    out = []
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    for fmt in ("PNG", "JPEG", "TIFF", "BMP"):
        buffer = io.BytesIO()
        rgb.save(buffer, format=fmt)
        out.append(buffer.getvalue())
    dicom_factory.write_rgb(folder / "seed.dcm", np.zeros((8, 8, 3), dtype=np.uint8))
    out.append((folder / "seed.dcm").read_bytes())
    return out


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> list[bytes]:
    return _seeds(tmp_path_factory.mktemp("seeds"))


def decode_bytes(tmp_path: Path, data: bytes, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    try:
        decoded = decode_image(path, **LIMITS)
    except IntakeError as exc:
        assert exc.reason and "\x00" not in str(exc)
        return
    finally:
        path.unlink()
    assert decoded.image.mode == "RGB" and decoded.width * decoded.height <= LIMITS["max_pixels"]


@FUZZ
@given(data=st.binary(max_size=4096), dicom_name=st.booleans())
def test_random_bytes_never_escape_as_other_errors(tmp_path, data, dicom_name):
    """Random bytes (named .png or .dcm) decode or raise an IntakeError, never anything else."""
    decode_bytes(tmp_path, data, "f.dcm" if dicom_name else "f.png")


@FUZZ
@given(which=st.integers(0, 4), edits=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=8),
       cut=st.one_of(st.none(), st.integers(0, 1 << 16)))
def test_mutated_valid_files_never_escape_as_other_errors(tmp_path, seeds, which, edits, cut):
    """A valid PNG/JPEG/TIFF/BMP/DICOM with flipped bytes or cut short decodes or raises an IntakeError."""
    data = bytearray(seeds[which])
    for position, value in edits:
        data[position % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    decode_bytes(tmp_path, bytes(data), "f.dcm" if which == 4 else "f.img")
