"""Build small, valid DICOM files with pydicom for the intake tests.

Every file carries a patient name, a patient ID, the study/series/instance UIDs, an
acquisition date-time and an institution, so that tests can check what the intake keeps
(UIDs, pseudonym, time, institution) and what it must never keep (the patient name).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    VLWholeSlideMicroscopyImageStorage,
    generate_uid,
)

PATIENT_NAME = "Doe^Jane^Q"
PATIENT_ID = "MRN-0042"
INSTITUTION = "Hospital Germans Trias i Pujol"
ACQUISITION_DATETIME = "20261125143000.250000+0100"


@dataclass(frozen=True)
class DicomIds:
    study_uid: str
    series_uid: str
    sop_instance_uid: str


def _dataset(path: Path, transfer_syntax: str, *, patient_id: str | None, datetime_tags: dict[str, str] | None) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = VLWholeSlideMicroscopyImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SM"
    ds.PatientName = PATIENT_NAME
    if patient_id is not None:
        ds.PatientID = patient_id
    ds.InstitutionName = INSTITUTION
    for keyword, value in (datetime_tags if datetime_tags is not None else {"AcquisitionDateTime": ACQUISITION_DATETIME}).items():
        setattr(ds, keyword, value)
    return ds


def _ids(ds: FileDataset) -> DicomIds:
    return DicomIds(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)


def _image_pixels(ds: FileDataset, rows: int, cols: int, samples: int, bits: int, photometric: str, frames: int = 1) -> None:
    ds.Rows = rows
    ds.Columns = cols
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16 if bits > 8 else 8
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    if samples > 1:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames


def rgb_pattern(width: int = 48, height: int = 32) -> np.ndarray:
    """A smooth colour gradient (uint8 HxWx3), easy to compare after lossy coding."""
    y, x = np.mgrid[0:height, 0:width]
    red = (x * 255 // max(width - 1, 1)).astype(np.uint8)
    green = (y * 255 // max(height - 1, 1)).astype(np.uint8)
    blue = np.full((height, width), 160, dtype=np.uint8)
    return np.dstack([red, green, blue])


def write_rgb(path: Path, pixels: np.ndarray | None = None, *, patient_id: str | None = PATIENT_ID,
              datetime_tags: dict[str, str] | None = None) -> DicomIds:
    """Uncompressed (explicit VR little endian) 8-bit RGB."""
    pixels = rgb_pattern() if pixels is None else pixels
    ds = _dataset(path, ExplicitVRLittleEndian, patient_id=patient_id, datetime_tags=datetime_tags)
    _image_pixels(ds, pixels.shape[0], pixels.shape[1], 3, 8, "RGB")
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return _ids(ds)


def write_jpeg_baseline(path: Path, pixels: np.ndarray | None = None, *, patient_id: str | None = PATIENT_ID) -> DicomIds:
    """JPEG baseline (1.2.840.10008.1.2.4.50), YBR_FULL_422, encoded with Pillow."""
    pixels = rgb_pattern() if pixels is None else pixels
    ds = _dataset(path, JPEGBaseline8Bit, patient_id=patient_id, datetime_tags=None)
    _image_pixels(ds, pixels.shape[0], pixels.shape[1], 3, 8, "YBR_FULL_422")
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="JPEG", quality=95, subsampling=1)
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.LossyImageCompression = "01"
    ds.save_as(path, enforce_file_format=True)
    return _ids(ds)


def write_monochrome(path: Path, pixels: np.ndarray, *, bits: int = 16, photometric: str = "MONOCHROME2",
                     patient_id: str | None = PATIENT_ID) -> DicomIds:
    """Uncompressed grayscale, 8 or 16 bits allocated, `bits` stored."""
    ds = _dataset(path, ExplicitVRLittleEndian, patient_id=patient_id, datetime_tags=None)
    _image_pixels(ds, pixels.shape[0], pixels.shape[1], 1, bits, photometric)
    dtype = np.uint16 if bits > 8 else np.uint8
    ds.PixelData = np.ascontiguousarray(pixels, dtype=dtype).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return _ids(ds)


def write_multiframe(path: Path, frames: int = 3) -> DicomIds:
    """Uncompressed 8-bit RGB with several frames (the intake refuses these)."""
    pixels = np.stack([rgb_pattern()] * frames)
    ds = _dataset(path, ExplicitVRLittleEndian, patient_id=PATIENT_ID, datetime_tags=None)
    _image_pixels(ds, pixels.shape[1], pixels.shape[2], 3, 8, "RGB", frames=frames)
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return _ids(ds)


def write_without_pixels(path: Path) -> DicomIds:
    """A valid DICOM file with no Pixel Data element (e.g. a structured report)."""
    ds = _dataset(path, ExplicitVRLittleEndian, patient_id=PATIENT_ID, datetime_tags=None)
    ds.save_as(path, enforce_file_format=True)
    return _ids(ds)
