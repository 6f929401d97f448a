"""Decoding: bytes into an RGB picture, or an IntakeError saying why not.

PNG, JPEG, TIFF and BMP go through Pillow with bomb limits, DICOM through pydicom
(``intake.dicom``): the patient ID is kept only as a keyed HMAC pseudonym and the patient name is
never read.
"""


from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image as PILImage
from PIL import ImageFile, ImageOps, UnidentifiedImageError

from stainbridge.daemon.config import ConfigError
from stainbridge.daemon.intake.dicom import (
    decode_dicom,
    scale_to_uint8,
)
from stainbridge.daemon.intake.errors import IntakeError, RefusedFile, UnreadableImage, UnsupportedFormat
from stainbridge.daemon.intake.reading import open_regular

PILLOW_FORMATS = ("PNG", "JPEG", "TIFF", "BMP")




@dataclass
class DecodedImage:
    image: PILImage.Image  # RGB, 8 bits per channel
    format: str  # "PNG" | "JPEG" | "TIFF" | "BMP" | "DICOM"
    width: int
    height: int
    # Keys are `images` column names, ready for setattr: study_uid, series_uid, sop_instance_uid,
    # acquisition_time (aware datetime), institution, patient_pseudonym. Empty for non-DICOM.
    metadata: dict[str, Any] = field(default_factory=dict)


def decode_image(path: str | os.PathLike[str], *, max_pixels: int, max_bytes: int,
                 pseudonym_secret: str = "", reserve: Callable[[int], None] | None = None,
                 metadata: bool = True) -> DecodedImage:
    """Fully decode `path` into an RGB picture, or raise an :class:`IntakeError` saying why not."""
    with open_regular(path) as handle:
        return decode_open(handle, Path(path).name, max_pixels=max_pixels, max_bytes=max_bytes,
                           pseudonym_secret=pseudonym_secret, reserve=reserve, metadata=metadata)


def decode_open(handle: BinaryIO, name: str, *, max_pixels: int, max_bytes: int, pseudonym_secret: str = "",
                reserve: Callable[[int], None] | None = None, metadata: bool = True) -> DecodedImage:
    """Decode `handle` from its start: an open file, or the bytes that were hashed (``io.BytesIO``).

    `max_bytes` is checked before anything is read (``settings.watch.max_file_mb`` * 2**20),
    `max_pixels` before pixel data is decoded (``settings.watch.max_pixels``). `reserve(pixels)`
    is called once the size is known and before the pixels are decoded (PNG, JPEG, TIFF, BMP): the
    pipeline's in-flight pixel budget, which may block until earlier images are done.
    ``metadata=False``: the pixels only (a DICOM's identifiers are not read, so no pseudonym secret is
    needed: the report's thumbnails).
    """
    size = handle.seek(0, os.SEEK_END)
    if size == 0:
        raise UnreadableImage(f"{name} is empty (0 bytes); was the copy interrupted?", reason="empty")
    if size > max_bytes:
        raise RefusedFile(f"{name} is {size / 2**20:.1f} MiB, over the {max_bytes / 2**20:.1f} MiB limit "
                          "([watch] max_file_mb)", reason="too_large")
    handle.seek(0)
    head = handle.read(132)
    handle.seek(0)
    if head[128:132] == b"DICM" or name.lower().endswith(".dcm"):
        image, found = decode_dicom(handle, name, max_pixels=max_pixels, pseudonym_secret=pseudonym_secret,
                                    max_inflated_bytes=min(max_bytes, max_pixels * 6 + (1 << 20)), metadata=metadata)
        return DecodedImage(image, "DICOM", image.width, image.height, found)
    return _decode_pillow(handle, name, max_pixels=max_pixels, reserve=reserve)


# Pillow's bomb check reads a process-wide limit and warnings filter: ours are set around `open`
# (where the check runs) under a lock, since decoding runs in several threads.
_OPEN_LOCK = threading.Lock()


def _open_pillow(handle: BinaryIO, max_pixels: int) -> PILImage.Image:
    with _OPEN_LOCK:
        previous_limit, PILImage.MAX_IMAGE_PIXELS = PILImage.MAX_IMAGE_PIXELS, max_pixels
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", PILImage.DecompressionBombWarning)
                return PILImage.open(handle, formats=list(PILLOW_FORMATS))
        finally:
            PILImage.MAX_IMAGE_PIXELS = previous_limit


def _decode_pillow(handle: BinaryIO, name: str, *, max_pixels: int,
                   reserve: Callable[[int], None] | None = None) -> DecodedImage:
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise ConfigError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is on; stainbridge needs it off to refuse truncated files")
    try:
        img = _open_pillow(handle, max_pixels)
        if img.format not in PILLOW_FORMATS:
            raise UnsupportedFormat(f"{name}: {img.format} images are not accepted; "
                                    f"send {', '.join(PILLOW_FORMATS)} or DICOM")
        if img.width * img.height > max_pixels:
            raise RefusedFile(f"{name} is {img.width}x{img.height} pixels, over the {max_pixels} limit "
                              "([watch] max_pixels)", reason="decompression_bomb")
        if getattr(img, "n_frames", 1) > 1:
            raise UnsupportedFormat(f"{name} has {img.n_frames} frames/pages; multi-frame images are not "
                                    "supported, split the frames into separate files", reason="multi_frame")
        if reserve is not None:
            reserve(img.width * img.height)
        img.load()
    except IntakeError:
        raise
    except (PILImage.DecompressionBombError, PILImage.DecompressionBombWarning):
        raise RefusedFile(f"{name} is refused as a decompression bomb (over [watch] max_pixels)",
                          reason="decompression_bomb") from None
    except UnidentifiedImageError:
        raise UnsupportedFormat(f"{name} is not a PNG, JPEG, TIFF, BMP or DICOM file (its content is not "
                                "recognized, whatever its extension says)") from None
    except MemoryError:
        raise  # not the file's fault: the caller retries it later, alone (failures.is_transient)
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError) as exc:
        text = str(exc) or type(exc).__name__
        reason = "truncated" if "truncat" in text.lower() else "corrupt"
        # Only the error's class: decoder text can quote the file's own bytes (text chunks, EXIF).
        raise UnreadableImage(f"{name} cannot be decoded ({reason}; {type(exc).__name__})", reason=reason) from None
    fmt = img.format
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block must not lose an otherwise good image
        pass
    rgb = to_rgb(img)
    return DecodedImage(rgb, fmt, rgb.width, rgb.height, {})


def to_rgb(img: PILImage.Image) -> PILImage.Image:
    """Any Pillow mode as 8-bit RGB: wide grays scaled by their range, alpha composited on white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        array = np.asarray(img)
        if mode.startswith("I;16"):
            top = 65535.0
        elif mode == "I":
            top = 65535.0 if array.min() >= 0 and array.max() <= 65535 else None
        else:
            top = 1.0 if array.min() >= 0 and array.max() <= 1.0 else None
        if top is None:  # unusual ranges (signed 32-bit, HDR float): stretch min..max
            low = float(array.min())
            array, top = array.astype(np.float64) - low, max(float(array.max()) - low, 1e-12)
        gray = scale_to_uint8(array, top)
        return PILImage.fromarray(np.dstack([gray] * 3), "RGB")
    if mode == "P":
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = PILImage.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PILImage.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, RGBX


