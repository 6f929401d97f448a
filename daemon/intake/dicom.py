"""DICOM intake: pixel data through pydicom's installed handlers, metadata with pseudonyms.

Files are read without ``force``; the patient ID (and the accession number, as the specimen) is kept only
as an HMAC-SHA256 pseudonym keyed with the site secret, and the patient name is never stored (it is read only to be masked
in log lines). A deflated file is inflated once, bounded, before pydicom reads it: pydicom would
inflate all of it in one call, so a 1 MiB file could take gigabytes.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import zlib
from datetime import datetime
from typing import Any, BinaryIO

import numpy as np
from PIL import Image as PILImage
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.pixels import apply_color_lut
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pydicom.valuerep import DT

from stainbridge.daemon.config import ConfigError
from stainbridge.daemon.intake.errors import RefusedFile, UnreadableImage, UnsupportedFormat
from stainbridge.daemon.intake.failures import storable_text
from stainbridge.daemon.logs import mask_in_free_text


class PseudonymSecretMissing(ConfigError):
    """A DICOM file carries a patient ID but no pseudonym secret is configured."""


def scale_to_uint8(array: np.ndarray, max_value: float) -> np.ndarray:
    scaled = array.astype(np.float64) * (255.0 / max(max_value, 1.0))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def pseudonymize(patient_id: str, secret: str) -> str:
    """HMAC-SHA256 of the patient ID keyed with the site secret (hex)."""
    return hmac.new(secret.encode("utf-8"), patient_id.encode("utf-8"), hashlib.sha256).hexdigest()


def require_secret(secret: str) -> str:
    if not secret:
        raise PseudonymSecretMissing(
            "a DICOM file carries a patient ID but no pseudonym secret is configured; set [site] pseudonym_secret "
            "(or STAINBRIDGE_SITE_PSEUDONYM_SECRET) to a long random string and keep it stable: patient IDs "
            "are stored only as HMAC-SHA256 pseudonyms keyed with it"
        )
    return secret


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.astimezone()


def _dicom_text(ds: Any, keyword: str, limit: int) -> str | None:
    value = ds.get(keyword)
    text = str(value).replace("\x00", " ").strip() if value is not None else ""  # NUL padding
    return storable_text(text, limit) or None


def _dicom_time(ds: Any) -> datetime | None:
    """AcquisitionDateTime, else AcquisitionDate+Time, else ContentDate+Time, as an aware datetime.

    A value without a UTC offset takes TimezoneOffsetFromUTC, else this machine's local zone
    (DICOM times are local to the site that acquired them).
    """
    candidates = [ds.get("AcquisitionDateTime")]
    for date_kw, time_kw in (("AcquisitionDate", "AcquisitionTime"), ("ContentDate", "ContentTime")):
        if ds.get(date_kw):
            candidates.append(f"{ds.get(date_kw)}{ds.get(time_kw) or ''}")
    offset = str(ds.get("TimezoneOffsetFromUTC") or "").strip()
    for raw in candidates:
        text = str(raw or "").strip()
        if not text:
            continue
        if offset and "+" not in text and "-" not in text:
            text += offset
        try:
            value = DT(text)
        except ValueError:
            continue
        return _aware(datetime.combine(value.date(), value.timetz()))
    return None


SPECIMEN_PSEUDONYM_CHARS = 16  # of the HMAC's hex: 64 bits, no collision among a lab's specimens


def _specimen(ds: Any, pseudonym_secret: str) -> str | None:
    """The specimen: ``acc-`` + the AccessionNumber's pseudonym (it names a patient's order in the lab system, so
    it is keyed like the patient ID), else ``study-`` + the StudyInstanceUID (stored as it is in ``study_uid``)."""
    accession = str(ds.get("AccessionNumber") or "").replace("\x00", " ").strip()
    if accession:
        return "acc-" + pseudonymize(accession, require_secret(pseudonym_secret))[:SPECIMEN_PSEUDONYM_CHARS]
    study = _dicom_text(ds, "StudyInstanceUID", 64)
    return f"study-{study}" if study else None


def _dicom_metadata(ds: Any, pseudonym_secret: str) -> dict[str, Any]:
    patient_id = str(ds.get("PatientID") or "").strip()  # the patient name is never read
    return {
        "specimen": _specimen(ds, pseudonym_secret),
        "study_uid": _dicom_text(ds, "StudyInstanceUID", 64),
        "series_uid": _dicom_text(ds, "SeriesInstanceUID", 64),
        "sop_instance_uid": _dicom_text(ds, "SOPInstanceUID", 64),
        "acquisition_time": _dicom_time(ds),
        "institution": _dicom_text(ds, "InstitutionName", 256),
        "patient_pseudonym": pseudonymize(patient_id, require_secret(pseudonym_secret)) if patient_id else None,
    }


INFLATE_STEP = 8 << 20  # bytes inflated per step while measuring a deflated file
MAX_DEFLATE_RATIO = 50  # inflated / file size beyond which a deflated DICOM is refused
MIN_INFLATE_LIMIT = 16 << 20  # ...unless it inflates to less than this


def refuse_deflate_bomb(handle: BinaryIO, name: str, max_inflated_bytes: int) -> None:
    """Raise RefusedFile if a deflated-transfer-syntax file inflates past `max_inflated_bytes`.

    Reads the file meta header; for any other transfer syntax it returns at once. The handle is
    left at its starting position.
    """
    start = handle.tell()
    try:
        try:
            read_preamble(handle, False)
            meta = _read_file_meta_info(handle)
        except Exception:  # noqa: BLE001 - not our question here: dcmread reports a damaged header
            return
        if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
            return
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        total = 0
        while chunk := handle.read(1 << 20):
            while chunk:
                total += len(inflater.decompress(chunk, min(INFLATE_STEP, max_inflated_bytes + 1 - total)))
                if total > max_inflated_bytes:
                    raise RefusedFile(f"{name} is a deflated DICOM file that inflates to more than "
                                      f"{max_inflated_bytes / 2**20:.0f} MiB (a bomb: over {MAX_DEFLATE_RATIO}x its size, or over [watch] max_file_mb); refused",
                                      reason="decompression_bomb")
                chunk = inflater.unconsumed_tail
    except zlib.error:
        raise UnreadableImage(f"{name}: the deflated DICOM data is damaged", reason="corrupt") from None
    finally:
        handle.seek(start)


def decode_dicom(handle: BinaryIO, name: str, *, max_pixels: int, pseudonym_secret: str,
                 max_inflated_bytes: int | None = None, metadata: bool = True) -> tuple[PILImage.Image, dict[str, Any]]:
    """The RGB picture and the `images` metadata columns of a single-frame DICOM file (``metadata=False``:
    none, and no pseudonym secret needed)."""
    limit = max_inflated_bytes if max_inflated_bytes is not None else max_pixels * 6 + (1 << 20)
    start = handle.tell()
    size = handle.seek(0, os.SEEK_END)
    handle.seek(start)
    # Pixel data deflates 2-5x; a ratio past MAX_DEFLATE_RATIO is a bomb, whatever the absolute limit.
    refuse_deflate_bomb(handle, name, min(limit, max(MIN_INFLATE_LIMIT, size * MAX_DEFLATE_RATIO)))
    try:
        ds = dcmread(handle, stop_before_pixels=True)
        # Masked in every later log line: exception texts and tracebacks may quote them.
        mask_in_free_text(str(ds.get("PatientID") or ""), str(ds.get("PatientName") or ""),
                          str(ds.get("AccessionNumber") or ""))
        handle.seek(0)
        ds = dcmread(handle)
    except MemoryError:
        raise  # not the file's fault (failures.is_transient)
    except InvalidDicomError:
        raise UnsupportedFormat(f"{name} is not a DICOM Part 10 file (no 'DICM' marker after the 128-byte preamble); "
                                "export it with a file meta header") from None
    except Exception as exc:  # pydicom raises many types on damaged headers
        raise UnreadableImage(f"{name}: the DICOM file cannot be parsed (damaged or cut short; "
                              f"{type(exc).__name__})") from None
    columns = _dicom_metadata(ds, pseudonym_secret) if metadata else {}
    if "PixelData" not in ds:
        raise UnreadableImage(f"{name} is a DICOM file without pixel data (not an image)", reason="dicom_no_pixels")
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise UnsupportedFormat(f"{name} has {frames} frames: multi-frame not supported, split frames into "
                                "single-frame files", reason="multi_frame")
    rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if rows * cols > max_pixels:
        raise RefusedFile(f"{name} is {cols}x{rows} pixels, over the {max_pixels} limit ([watch] max_pixels)",
                          reason="decompression_bomb")
    photometric = str(ds.get("PhotometricInterpretation") or "").strip().upper()
    try:
        ds.pixel_array_options(as_rgb=True)  # YBR_FULL / YBR_FULL_422 are converted to RGB by pydicom
        array = ds.pixel_array
    except MemoryError:
        raise
    except (NotImplementedError, RuntimeError):
        syntax = ds.file_meta.get("TransferSyntaxUID")
        raise UnsupportedFormat(f"{name}: no installed decoder for transfer syntax {syntax} "
                                f"({getattr(syntax, 'name', '?')})", reason="unsupported_transfer_syntax") from None
    except Exception as exc:
        text = str(exc) or type(exc).__name__
        reason = "truncated" if any(k in text.lower() for k in ("truncat", "less than expected")) else "corrupt"
        # The decoder's own text may quote header values: keep only its class in images.error.
        raise UnreadableImage(f"{name}: the DICOM pixel data cannot be decoded ({reason}; {type(exc).__name__})",
                              reason=reason) from None
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 8)
    if photometric in ("MONOCHROME1", "MONOCHROME2") and array.ndim == 2:
        if int(ds.get("PixelRepresentation") or 0) == 1:
            array = array.astype(np.int64) + (1 << (bits - 1))
        gray = scale_to_uint8(array, float((1 << bits) - 1))
        if photometric == "MONOCHROME1":
            gray = 255 - gray
        rgb = np.dstack([gray] * 3)
    elif photometric == "PALETTE COLOR":
        mapped = apply_color_lut(array, ds)
        rgb = mapped if mapped.dtype == np.uint8 else scale_to_uint8(mapped, 65535.0)
    elif photometric in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT") and array.ndim == 3:
        rgb = array if array.dtype == np.uint8 else scale_to_uint8(array, float((1 << bits) - 1))
    else:
        raise UnsupportedFormat(f"{name}: photometric interpretation {photometric or 'missing'} with pixel shape "
                                f"{array.shape} is not supported", reason="unsupported_photometric")
    image = PILImage.fromarray(np.ascontiguousarray(rgb[..., :3], dtype=np.uint8), "RGB")
    return image, columns
