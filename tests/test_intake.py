"""Intake: hashing, claims in SQL, and decoding of every accepted format (and the refusals)."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import struct
import threading
import time
import zlib
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from sqlalchemy import select, text

from stainbridge.daemon.config import ConfigError
from stainbridge.daemon.intake import claims
from stainbridge.daemon.intake.claims import ClaimOutcome, claim, claim_owner, release_stale_claims
from stainbridge.daemon.intake.decoding import decode_image
from stainbridge.daemon.intake.dicom import PseudonymSecretMissing, pseudonymize
from stainbridge.daemon.intake.errors import IntakeError, RefusedFile, UnreadableImage, UnsupportedFormat
from stainbridge.daemon.intake.reading import sha256_file
from stainbridge.daemon.store import Base, Image, ImageStatus, make_engine, make_sessionmaker, utcnow
from tests import dicom_factory
from tests.daemon_helpers import scalar, wait_for

LIMITS = {"max_pixels": 50_000_000, "max_bytes": 200 * 2**20}
SECRET = "test-site-secret"


def decode(path: Path, **overrides):
    return decode_image(path, **{**LIMITS, "pseudonym_secret": SECRET, **overrides})


def pattern(width: int = 40, height: int = 30) -> np.ndarray:
    return dicom_factory.rgb_pattern(width, height)


@pytest.fixture
def db(database_url):
    """A session on a fresh database, SQLite then PostgreSQL."""
    engine = make_engine(database_url)
    Base.metadata.create_all(engine)
    session = make_sessionmaker(engine)()
    yield session
    session.close()
    engine.dispose()


# --- hashing and claims --------------------------------------------------------------------


def test_sha256_matches_hashlib(tmp_path):
    """The streamed hash equals hashlib over the whole content, across several chunks."""
    data = os.urandom(3 * 2**20 + 17)
    path = tmp_path / "a.bin"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_sha256_refuses_symlink(tmp_path):
    """Hashing never follows a symlink."""
    (tmp_path / "real.png").write_bytes(b"x")
    (tmp_path / "link.png").symlink_to(tmp_path / "real.png")
    with pytest.raises(RefusedFile) as err:
        sha256_file(tmp_path / "link.png")
    assert err.value.reason == "symlink"


def test_claim_first_arrival_is_processing(db):
    """The first claim of a content creates a processing row owned by host:pid."""
    result = claim(db, sha256="a" * 64, source_name="x.png", site="clinic", size_bytes=10)
    db.commit()
    row = db.get(Image, result.image_id)
    assert result.outcome is ClaimOutcome.claimed and not result.is_duplicate
    assert row.status is ImageStatus.processing and row.claimed_by == claim_owner() and row.claimed_at is not None


def test_duplicate_claim_recorded_as_duplicate(db):
    """The same bytes arriving again become a duplicate row pointing at the original."""
    first = claim(db, sha256="b" * 64, source_name="x.png", site="clinic", size_bytes=10)
    db.commit()
    db.get(Image, first.image_id).status = ImageStatus.done
    db.get(Image, first.image_id).archive_path = "/archive/x.png"
    db.commit()
    second = claim(db, sha256="b" * 64, source_name="copy of x.png", site="clinic", size_bytes=10)
    db.commit()
    assert second.outcome is ClaimOutcome.duplicate and second.duplicate_of_id == first.image_id
    row = db.get(Image, second.image_id)
    assert row.status is ImageStatus.duplicate and row.duplicate_of_id == first.image_id
    assert len(db.scalars(select(Image).where(Image.sha256 == "b" * 64)).all()) == 2


def test_concurrent_claims_one_wins(database_url):
    """Two workers claiming the same bytes at once: exactly one claims, the other records a duplicate. The second
    claim is shown to wait on the first's open transaction (PostgreSQL: its backend waits on a lock; SQLite: its
    INSERT was issued before the first commit and returned after it), so the race really happened."""
    from sqlalchemy import event

    engine = make_engine(database_url)
    Base.metadata.create_all(engine)
    make = make_sessionmaker(engine)
    outcomes: list[ClaimOutcome] = []
    moments: dict[str, float] = {}
    first = make()
    outcomes.append(claim(first, sha256="9" * 64, source_name="a.png", site="s", size_bytes=1).outcome)

    def other_worker() -> None:
        with make() as second:
            connection = second.connection()
            event.listen(connection, "before_cursor_execute", lambda *a: moments.setdefault(
                "issued", time.monotonic()) if a[2].lstrip().upper().startswith("INSERT") else None)
            outcomes.append(claim(second, sha256="9" * 64, source_name="b.png", site="s", size_bytes=1).outcome)
            moments["returned"] = time.monotonic()
            second.commit()

    thread = threading.Thread(target=other_worker)
    thread.start()
    wait_for(lambda: "issued" in moments, 30, "the second worker's INSERT")
    if database_url.startswith("postgresql"):
        wait_for(lambda: scalar(database_url, "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                              "AND datname = current_database()"), 30, "the second INSERT to wait")
    else:
        time.sleep(0.2)  # SQLite's busy wait cannot be seen; 0.2 s is ample for the issued INSERT to reach it
    committed = time.monotonic()
    first.commit()
    first.close()
    thread.join(timeout=30)
    engine.dispose()
    assert moments["issued"] < committed < moments["returned"]
    assert sorted(o.value for o in outcomes) == ["claimed", "duplicate"]


@pytest.mark.postgres
def test_two_workers_seeing_one_duplicate_file_record_it_once(postgres_url):
    """Two workers claiming the same copy of known content at the same moment: one duplicate row, every
    round (the other worker finds it in progress or already recorded, never records a second one)."""
    engine = make_engine(postgres_url)
    Base.metadata.create_all(engine)
    make = make_sessionmaker(engine)
    rounds = 25
    with make() as setup:
        for n in range(rounds):
            claim(setup, sha256=f"{n:064x}", source_name=f"cell-{n}.png", site="s", size_bytes=1)
        setup.commit()
    outcomes: list[str] = []
    barrier = threading.Barrier(2)

    def worker() -> None:
        with make() as session:
            for n in range(rounds):
                barrier.wait(timeout=30)
                outcomes.append(claim(session, sha256=f"{n:064x}", source_name=f"copy-{n}.png", site="s",
                                      size_bytes=1).outcome.value)
                session.commit()

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    with make() as check:
        copies = check.scalars(select(Image.source_name).where(Image.status == ImageStatus.duplicate)).all()
    engine.dispose()
    assert sorted(copies) == sorted(f"copy-{n}.png" for n in range(rounds))
    assert outcomes.count("duplicate") == rounds and set(outcomes) <= {"duplicate", "unfiled", "in_progress"}


def test_same_file_while_processing_is_left_alone(db):
    """A file seen again while its own claim is live is reported in progress, not duplicated."""
    first = claim(db, sha256="c" * 64, source_name="x.png", site="clinic", size_bytes=10)
    db.commit()
    again = claim(db, sha256="c" * 64, source_name="x.png", site="clinic", size_bytes=10)
    db.commit()
    assert again.outcome is ClaimOutcome.in_progress and again.image_id == first.image_id
    assert len(db.scalars(select(Image)).all()) == 1


def test_processed_but_unfiled_file_is_only_filed(db):
    """After a crash between commit and move, the same file is filed, not counted twice."""
    first = claim(db, sha256="d" * 64, source_name="x.png", site="clinic", size_bytes=10)
    db.get(Image, first.image_id).status = ImageStatus.done
    db.commit()
    again = claim(db, sha256="d" * 64, source_name="x.png", site="clinic", size_bytes=10)
    assert again.outcome is ClaimOutcome.unfiled and again.original_status is ImageStatus.done


def test_file_already_recorded_as_duplicate_is_only_filed(db):
    """A file another worker recorded as a duplicate and has not filed yet (or a crash left unfiled) gets
    no second duplicate row, and a released original is not taken over under the copy's name."""
    original = claim(db, sha256="7" * 64, source_name="x.png", site="clinic", size_bytes=10)
    db.commit()
    first = claim(db, sha256="7" * 64, source_name="copy.png", site="clinic", size_bytes=10)
    db.commit()
    assert first.outcome is ClaimOutcome.duplicate
    again = claim(db, sha256="7" * 64, source_name="copy.png", site="clinic", size_bytes=10)
    db.commit()
    assert again.outcome is ClaimOutcome.unfiled and again.image_id == first.image_id
    assert again.original_status is ImageStatus.duplicate
    db.get(Image, original.image_id).status = ImageStatus.pending  # its worker died: released
    db.commit()
    after_release = claim(db, sha256="7" * 64, source_name="copy.png", site="clinic", size_bytes=10)
    db.commit()
    assert after_release.outcome is ClaimOutcome.unfiled and after_release.image_id == first.image_id
    rows = {r.source_name: r.status for r in db.scalars(select(Image).where(Image.sha256 == "7" * 64))}
    assert rows == {"x.png": ImageStatus.pending, "copy.png": ImageStatus.duplicate}


def test_stale_claim_released_and_reclaimed(db):
    """An old processing claim goes back to pending and the next arrival re-claims that row."""
    first = claim(db, sha256="e" * 64, source_name="x.png", site="clinic", size_bytes=10)
    row = db.get(Image, first.image_id)
    row.claimed_by, row.claimed_at = "elsewhere:1", utcnow() - timedelta(hours=2)
    db.commit()
    assert release_stale_claims(db, older_than_s=3600) == 1
    db.commit()
    db.refresh(row)
    assert row.status is ImageStatus.pending and row.claimed_by is None
    again = claim(db, sha256="e" * 64, source_name="x.png", site="clinic", size_bytes=10)
    db.commit()
    assert again.outcome is ClaimOutcome.claimed and again.reclaimed and again.image_id == first.image_id


def test_dead_local_worker_claim_released(db):
    """A claim by a process on this host that no longer exists is stale at once."""
    first = claim(db, sha256="f" * 64, source_name="x.png", site="clinic", size_bytes=10)
    row = db.get(Image, first.image_id)
    row.claimed_by = claim_owner().rsplit(":", 1)[0] + ":999999999"
    db.commit()
    assert release_stale_claims(db, older_than_s=3600) == 1
    live = claim(db, sha256="0" * 64, source_name="y.png", site="clinic", size_bytes=10)
    db.commit()
    assert release_stale_claims(db, older_than_s=3600) == 0
    assert release_stale_claims(db, older_than_s=3600, startup=True) == 1
    assert db.get(Image, live.image_id).status is ImageStatus.pending


def test_claim_owner_pids_are_checked_only_in_their_own_pid_namespace_and_boot(db):
    """A pid means something only in its PID namespace and boot: a claim from another namespace on this host
    (containers sharing a hostname) is left to the age cutoff even if that pid is unknown here; one from an
    earlier boot is released even if that pid is alive now; one from this namespace is checked as before."""
    host, scope = socket.gethostname(), claims._pid_scope()
    boot, namespace = scope.split(".")
    owners = {
        "other_namespace": f"{host}@{boot}.{int(namespace) + 1}:999999999",
        "earlier_boot": f"{host}@{'f' * 8 if boot != 'f' * 8 else 'e' * 8}.{namespace}:{os.getpid()}",
        "here_dead": f"{host}@{scope}:999999999",
        "here_alive": f"{host}@{scope}:{os.getppid()}",
    }
    ids = {}
    for n, (name, owner) in enumerate(owners.items()):
        ids[name] = claim(db, sha256=f"{n}" * 64, source_name=f"{name}.png", site="s", size_bytes=1).image_id
        db.get(Image, ids[name]).claimed_by = owner
    db.commit()
    assert claim_owner() == f"{host}@{scope}:{os.getpid()}"
    assert release_stale_claims(db, older_than_s=3600) == 2
    db.commit()
    released = {name for name, image_id in ids.items() if db.get(Image, image_id).status is ImageStatus.pending}
    assert released == {"earlier_boot", "here_dead"}


@pytest.mark.postgres
def test_claim_skips_a_row_another_worker_holds_instead_of_waiting(postgres_url):
    """On PostgreSQL, content whose row another worker holds locked is `in_progress` at once (SKIP
    LOCKED): the claim never waits behind the other worker's transaction (lock_timeout would fail it)."""
    engine = make_engine(postgres_url)
    Base.metadata.create_all(engine)
    make = make_sessionmaker(engine)
    sha = "a1" * 32
    with make() as setup:
        setup.add(Image(sha256=sha, source_name="a.png", site="s", status=ImageStatus.pending))
        setup.commit()
    with make() as first, make() as second:
        first.execute(select(Image).where(Image.sha256 == sha).with_for_update()).all()  # mid-claim elsewhere
        second.execute(text("SET LOCAL lock_timeout = '2s'"))
        result = claim(second, sha256=sha, source_name="a.png", site="s", size_bytes=1)
        second.rollback()
        first.rollback()
    engine.dispose()
    assert result.outcome is ClaimOutcome.in_progress


# --- Pillow formats ----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,suffix", [("PNG", ".png"), ("JPEG", ".jpg"), ("TIFF", ".tif"), ("BMP", ".bmp")])
def test_decode_rgb_formats(tmp_path, fmt, suffix):
    """Each accepted format decodes to an RGB picture of the right size and colours."""
    path = tmp_path / f"cell{suffix}"
    PILImage.fromarray(pattern(), "RGB").save(path, format=fmt)
    out = decode(path)
    assert (out.format, out.image.mode, out.width, out.height) == (fmt, "RGB", 40, 30)
    tolerance = 8 if fmt == "JPEG" else 0
    assert np.abs(np.asarray(out.image).astype(int) - pattern()).mean() <= tolerance
    assert out.metadata == {}


def test_decode_16bit_tiff_scaled_not_clipped(tmp_path):
    """A 16-bit grayscale TIFF maps 0..65535 onto 0..255 (mid-gray stays mid-gray)."""
    values = np.array([[0, 257 * 100, 32896, 65535]], dtype=np.uint16)
    path = tmp_path / "wide.tif"
    PILImage.fromarray(values).save(path, format="TIFF")
    out = decode(path)
    assert np.asarray(out.image)[0, :, 0].tolist() == [0, 100, 128, 255]
    assert out.image.mode == "RGB"


def test_decode_16bit_png_gray(tmp_path):
    """A 16-bit grayscale PNG is scaled, not clipped to white."""
    path = tmp_path / "wide.png"
    PILImage.fromarray(np.array([[1000, 30000]], dtype=np.uint16)).save(path)
    assert np.asarray(decode(path).image)[0, :, 0].tolist() == [4, 117]


def test_decode_rgba_composited_on_white(tmp_path):
    """Transparent pixels become white, opaque ones keep their colour."""
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (200, 10, 10, 255)
    path = tmp_path / "alpha.png"
    PILImage.fromarray(rgba, "RGBA").save(path)
    pixels = np.asarray(decode(path).image)
    assert pixels[0, 0].tolist() == [200, 10, 10] and pixels[1, 1].tolist() == [255, 255, 255]


@pytest.mark.parametrize("mode,fmt", [("P", "PNG"), ("L", "PNG"), ("CMYK", "TIFF"), ("LA", "PNG"), ("1", "BMP"), ("CMYK", "JPEG")])
def test_decode_other_modes_to_rgb(tmp_path, mode, fmt):
    """Palette, grayscale, CMYK, gray+alpha and bilevel pictures all come out RGB."""
    path = tmp_path / f"m.{fmt.lower()}"
    PILImage.fromarray(pattern(), "RGB").convert(mode).save(path, format=fmt)
    out = decode(path)
    assert out.image.mode == "RGB" and out.image.size == (40, 30)


def test_truncated_jpeg_refused(tmp_path):
    """A JPEG cut short fails with reason 'truncated' (no half-grey image is classified)."""
    buffer = io.BytesIO()
    PILImage.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(buffer, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(UnreadableImage) as err:
        decode(path)
    assert err.value.reason == "truncated"


def test_zero_byte_file_is_empty(tmp_path):
    """An empty file fails with reason 'empty'."""
    (tmp_path / "none.png").write_bytes(b"")
    with pytest.raises(IntakeError) as err:
        decode(tmp_path / "none.png")
    assert err.value.reason == "empty"


def test_text_named_png_is_unsupported(tmp_path):
    """A text file with an image extension is refused with a message about its content."""
    (tmp_path / "notes.png").write_text("patient list\n")
    with pytest.raises(UnsupportedFormat) as err:
        decode(tmp_path / "notes.png")
    assert err.value.reason == "unsupported_format" and "not a PNG, JPEG, TIFF, BMP or DICOM" in str(err.value)


def test_gif_is_unsupported(tmp_path):
    """Formats outside the allow-list are refused even though Pillow could read them."""
    PILImage.fromarray(pattern()).save(tmp_path / "a.gif")
    with pytest.raises(UnsupportedFormat):
        decode(tmp_path / "a.gif")


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and header claiming `width`x`height`, with a token of pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def test_decompression_bomb_header_refused(tmp_path):
    """A tiny PNG claiming 100000x100000 pixels is refused before any pixel is decoded."""
    (tmp_path / "bomb.png").write_bytes(_png_header_only(100_000, 100_000))
    with pytest.raises(RefusedFile) as err:
        decode(tmp_path / "bomb.png")
    assert err.value.reason == "decompression_bomb"


def test_real_image_over_pixel_limit_refused(tmp_path):
    """A real image larger than max_pixels is refused as a decompression bomb."""
    PILImage.fromarray(pattern(100, 100)).save(tmp_path / "big.png")
    with pytest.raises(RefusedFile) as err:
        decode(tmp_path / "big.png", max_pixels=5000)
    assert err.value.reason == "decompression_bomb"


def test_oversized_file_refused_before_reading(tmp_path):
    """A file over max_bytes is refused as too_large whatever its content."""
    (tmp_path / "huge.png").write_bytes(b"\0" * 4096)
    with pytest.raises(RefusedFile) as err:
        decode(tmp_path / "huge.png", max_bytes=1024)
    assert err.value.reason == "too_large"


def test_hard_link_refused(tmp_path):
    """A file with a second hard link is refused without decoding."""
    PILImage.fromarray(pattern()).save(tmp_path / "a.png")
    os.link(tmp_path / "a.png", tmp_path / "b.png")
    with pytest.raises(RefusedFile) as err:
        decode(tmp_path / "a.png")
    assert err.value.reason == "hard_link"


# --- DICOM -----------------------------------------------------------------------------------------


def test_dicom_uncompressed_with_metadata(tmp_path):
    """Uncompressed RGB DICOM decodes exactly, with UIDs, time, institution and a keyed pseudonym."""
    ids = dicom_factory.write_rgb(tmp_path / "a.dcm")
    out = decode(tmp_path / "a.dcm")
    assert out.format == "DICOM" and np.array_equal(np.asarray(out.image), dicom_factory.rgb_pattern())
    meta = out.metadata
    assert (meta["study_uid"], meta["series_uid"], meta["sop_instance_uid"]) == (ids.study_uid, ids.series_uid, ids.sop_instance_uid)
    assert meta["acquisition_time"] == datetime(2026, 11, 25, 13, 30, 0, 250000, tzinfo=timezone.utc)
    assert meta["institution"] == dicom_factory.INSTITUTION
    assert meta["patient_pseudonym"] == pseudonymize(dicom_factory.PATIENT_ID, SECRET)
    assert dicom_factory.PATIENT_ID not in meta["patient_pseudonym"]


def test_dicom_jpeg_baseline_without_extension(tmp_path):
    """JPEG baseline YBR_FULL_422 DICOM (found by its DICM magic) comes out as the right RGB colours."""
    ids = dicom_factory.write_jpeg_baseline(tmp_path / "IM0001")
    out = decode(tmp_path / "IM0001")
    assert out.metadata["sop_instance_uid"] == ids.sop_instance_uid
    assert np.abs(np.asarray(out.image).astype(int) - dicom_factory.rgb_pattern()).mean() < 4


def test_dicom_patient_name_never_returned(tmp_path):
    """Nothing the intake returns carries the patient name or the raw patient ID."""
    dicom_factory.write_rgb(tmp_path / "a.dcm")
    text = repr(decode(tmp_path / "a.dcm").metadata)
    for secret_part in ("Doe", "Jane", dicom_factory.PATIENT_ID):
        assert secret_part not in text


def test_dicom_date_and_time_fallback(tmp_path):
    """Without AcquisitionDateTime, ContentDate+ContentTime with the timezone offset is used."""
    tags = {"ContentDate": "20261124", "ContentTime": "080000", "TimezoneOffsetFromUTC": "-0500"}
    dicom_factory.write_rgb(tmp_path / "a.dcm", datetime_tags=tags)
    assert decode(tmp_path / "a.dcm").metadata["acquisition_time"] == datetime(2026, 11, 24, 13, 0, tzinfo=timezone.utc)


def test_dicom_without_secret_is_a_configuration_error(tmp_path):
    """A patient ID with no pseudonym secret configured stops with advice, never an unkeyed hash."""
    dicom_factory.write_rgb(tmp_path / "a.dcm")
    with pytest.raises(PseudonymSecretMissing, match="pseudonym_secret") as err:
        decode(tmp_path / "a.dcm", pseudonym_secret="")
    assert isinstance(err.value, ConfigError) and not isinstance(err.value, IntakeError)


def test_dicom_without_patient_id_needs_no_secret(tmp_path):
    """A DICOM file with no patient ID decodes without a secret and has no pseudonym."""
    dicom_factory.write_rgb(tmp_path / "a.dcm", patient_id=None)
    assert decode(tmp_path / "a.dcm", pseudonym_secret="").metadata["patient_pseudonym"] is None


@pytest.mark.parametrize("photometric,expected", [("MONOCHROME2", [0, 128, 255]), ("MONOCHROME1", [255, 127, 0])])
def test_dicom_16bit_monochrome(tmp_path, photometric, expected):
    """12-bit-stored grayscale is scaled by its stored range; MONOCHROME1 is inverted."""
    dicom_factory.write_monochrome(tmp_path / "m.dcm", np.array([[0, 2048, 4095]], dtype=np.uint16), bits=12, photometric=photometric)
    out = decode(tmp_path / "m.dcm")
    assert np.asarray(out.image)[0, :, 0].tolist() == expected


def test_dicom_multiframe_refused(tmp_path):
    """Multi-frame DICOM is refused with advice to split the frames."""
    dicom_factory.write_multiframe(tmp_path / "mf.dcm")
    with pytest.raises(UnsupportedFormat, match="split frames") as err:
        decode(tmp_path / "mf.dcm")
    assert err.value.reason == "multi_frame"


def test_dicom_without_pixels(tmp_path):
    """A DICOM object with no pixel data fails with reason dicom_no_pixels."""
    dicom_factory.write_without_pixels(tmp_path / "sr.dcm")
    with pytest.raises(UnreadableImage) as err:
        decode(tmp_path / "sr.dcm")
    assert err.value.reason == "dicom_no_pixels"


def test_dicom_cut_short_is_truncated(tmp_path):
    """An uncompressed DICOM file missing half its pixel bytes fails with reason 'truncated'."""
    path = tmp_path / "cut.dcm"
    dicom_factory.write_rgb(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(UnreadableImage) as err:
        decode(path)
    assert err.value.reason == "truncated"


def test_fake_dcm_is_unsupported(tmp_path):
    """A .dcm file without the DICM preamble is refused (pydicom is never forced)."""
    (tmp_path / "x.dcm").write_bytes(b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100" * 4)
    with pytest.raises(UnsupportedFormat, match="DICM"):
        decode(tmp_path / "x.dcm")
