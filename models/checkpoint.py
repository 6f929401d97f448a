"""Checkpoint files: safetensors tensors plus a JSON header, never pickle.

The header (the checkpoint's contract, like torchvision's ``Weights.meta``) is stored as the
safetensors metadata key ``"stainbridge"`` holding JSON. Keys used across stainbridge:

    kind           "classifier" | "standardizer"
    architecture   a key of models.classifier.ARCHITECTURES or models.cyclegan.GENERATORS
    arch_args      keyword arguments of that builder (dict)
    classes        list[str] (classifier)
    input_size     int pixels
    normalization  {"mean": [3 floats], "std": [3 floats]} (classifier)
    geometry       dict (see models.geometry)
    reference_stain  dict of stats for the classical baselines (classifier; see models.imaging.classical)
    training_data, metrics   dicts
    code_version   stainbridge version that wrote it   (filled in by save_checkpoint if absent)
    created        ISO-8601 UTC time                   (filled in by save_checkpoint if absent)

Writing goes to a temporary file in the destination folder, is fsynced and hashed, then
``os.replace``d into place, so readers never see a half-written checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

__all__ = ["HEADER_KEY", "CheckpointError", "ModelMismatch", "save_checkpoint", "load_checkpoint", "file_sha256", "code_version"]

HEADER_KEY = "stainbridge"
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save since 1.6
_PICKLE_PROTO = 0x80  # PROTO opcode: first byte of a pickle stream (legacy torch.save, pickle.dump)


class CheckpointError(Exception):
    """A checkpoint file is unreadable, not a stainbridge checkpoint, or not the expected file."""


class ModelMismatch(Exception):
    """A checkpoint's kind, architecture, classes, size or tensors do not fit how it is used
    (re-exported by ``models.inference``, where the service catches it)."""


def code_version() -> str:
    """The installed stainbridge version, or ``"0+unknown"`` when running from an uninstalled tree."""
    try:
        return metadata.version("stainbridge")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(path: str | Path, state_dict: dict[str, Tensor], header: dict) -> str:
    """Write ``state_dict`` and ``header`` to ``path`` atomically; return the file's sha256.

    Tensors are moved to CPU and cloned contiguous (safetensors refuses shared storage, e.g.
    tied weights). ``code_version`` and ``created`` are added to the header when absent.
    """
    path = Path(path)
    header = dict(header)
    header.setdefault("code_version", code_version())
    header.setdefault("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    try:
        header_json = json.dumps(header, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint header for {path} is not plain JSON ({exc}); convert values to str/int/float/list/dict") from exc
    tensors: dict[str, Tensor] = {}
    for name, value in state_dict.items():
        if not isinstance(value, Tensor):
            raise CheckpointError(f"state_dict[{name!r}] is {type(value).__name__}, not a Tensor; put non-tensor values in the header")
        tensors[name] = value.detach().to("cpu").contiguous().clone()
    data = st_save(tensors, metadata={HEADER_KEY: header_json})
    sha = hashlib.sha256(data).hexdigest()

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp creates 0600; the service may run as another user
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return sha


def load_checkpoint(path: str | Path, *, expected_sha256: str | None = None) -> tuple[dict[str, Tensor], dict]:
    """Read a checkpoint written by :func:`save_checkpoint`: ``(state_dict on CPU, header)``.

    The file is read once; its sha256 is checked against ``expected_sha256`` (the registry's
    value) before anything is parsed. Pickle-based files are refused, never unpickled.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from exc
    if expected_sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected_sha256.lower():
            raise CheckpointError(
                f"checkpoint {path} has changed since it was registered: its sha256 is {actual}, "
                f"the registry expects {expected_sha256}. Restore the registered file or register this one as a new version"
            )
    if data.startswith(_ZIP_MAGIC) or (_looks_like_pickle(data) and not _has_safetensors_preamble(data)):
        raise CheckpointError(
            f"{path} is a pickle-based PyTorch file; stainbridge never unpickles checkpoints. "
            "Convert it with: python -c \"import torch; from stainbridge.models.checkpoint import save_checkpoint; "
            f"save_checkpoint('OUT.safetensors', torch.load('{path}', weights_only=True), HEADER)\" "
            "where HEADER is the dict described in models/checkpoint.py (kind, architecture, arch_args, ...)"
        )
    header = _read_header(path, data)
    try:
        tensors = st_load(data)
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{path} is not a valid safetensors file ({exc}); re-export the checkpoint") from exc
    return tensors, header


# --------------------------------------------------------------------------- helpers


def _looks_like_pickle(data: bytes) -> bool:
    # PROTO opcode then protocol 2..5 (what torch's legacy format and pickle.dump write).
    return len(data) >= 2 and data[0] == _PICKLE_PROTO and 2 <= data[1] <= 5


def _has_safetensors_preamble(data: bytes) -> bool:
    # A safetensors length prefix can start with byte 0x80 too; it is one if a JSON object follows.
    if len(data) < 9:
        return False
    (n,) = struct.unpack("<Q", data[:8])
    return 0 < n <= _MAX_HEADER_BYTES and 8 + n <= len(data) and data[8:9] == b"{"


def _read_header(path: Path, data: bytes) -> dict:
    """Parse the safetensors preamble (u64 little-endian length + JSON) and return our header."""
    not_st = f"{path} is not a safetensors checkpoint; stainbridge checkpoints are written by models.checkpoint.save_checkpoint"
    if len(data) < 8:
        raise CheckpointError(not_st + " (file too short)")
    (n,) = struct.unpack("<Q", data[:8])
    if n == 0 or n > _MAX_HEADER_BYTES or 8 + n > len(data):
        raise CheckpointError(not_st)
    try:
        st_header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(not_st) from None
    meta = st_header.get("__metadata__") if isinstance(st_header, dict) else None
    raw = meta.get(HEADER_KEY) if isinstance(meta, dict) else None
    if raw is None:
        raise CheckpointError(
            f"{path} is a safetensors file without a stainbridge header (metadata key {HEADER_KEY!r}); "
            "it was not written by stainbridge. Re-save it with models.checkpoint.save_checkpoint and a header"
        )
    try:
        header = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} has a corrupt stainbridge header ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a stainbridge header that is not a JSON object")
    return header


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Make a rename or a new entry in ``folder`` durable: fsync the directory itself (a no-op where the
    platform or filesystem cannot). Shared with the daemon's filing through the inference surface."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
