"""Checkpoint files: safetensors + JSON header, atomic writes, sha256, no pickle (models/checkpoint.py)."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from stainbridge.models import checkpoint as ck

HEADER = {"kind": "classifier", "architecture": "resnet18", "arch_args": {}, "classes": ["a", "b"], "input_size": 64}


def state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"w": torch.randn(4, 3), "b": torch.zeros(4), "steps": torch.tensor(7)}


def test_roundtrip_keeps_tensors_and_header(tmp_path: Path) -> None:
    """What is saved loads back identically, with code_version and created filled in."""
    path = tmp_path / "m.safetensors"
    ck.save_checkpoint(path, state(), HEADER)
    tensors, header = ck.load_checkpoint(path)
    assert tensors.keys() == state().keys()
    assert all(torch.equal(tensors[k], v) for k, v in state().items())
    assert {k: header[k] for k in HEADER} == HEADER
    assert header["code_version"] == ck.code_version() and header["created"].endswith("+00:00")


def test_returned_sha_is_the_file_hash_and_is_verified(tmp_path: Path) -> None:
    """save returns the sha256 of the written bytes, and loading with that value succeeds."""
    path = tmp_path / "m.safetensors"
    sha = ck.save_checkpoint(path, state(), HEADER)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest() == ck.file_sha256(path)
    ck.load_checkpoint(path, expected_sha256=sha)


def test_tampered_file_is_rejected(tmp_path: Path) -> None:
    """A file whose bytes changed after registration is refused, naming the expected hash."""
    path = tmp_path / "m.safetensors"
    sha = ck.save_checkpoint(path, state(), HEADER)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ck.CheckpointError, match=f"changed.*{sha}"):
        ck.load_checkpoint(path, expected_sha256=sha)


def test_pickle_checkpoint_is_refused(tmp_path: Path) -> None:
    """A torch.save file is refused with a message saying stainbridge never unpickles it."""
    path = tmp_path / "old.pt"
    torch.save(state(), path)
    with pytest.raises(ck.CheckpointError, match="pickle-based PyTorch file; stainbridge never unpickles"):
        ck.load_checkpoint(path)


def test_legacy_pickle_is_refused(tmp_path: Path) -> None:
    """A raw pickle stream is refused the same way."""
    path = tmp_path / "old.pkl"
    path.write_bytes(pickle.dumps({"w": [1, 2]}, protocol=4))
    with pytest.raises(ck.CheckpointError, match="never unpickles"):
        ck.load_checkpoint(path)


def test_safetensors_without_header_is_refused(tmp_path: Path) -> None:
    """A safetensors file that lacks the stainbridge header is not accepted as a checkpoint."""
    path = tmp_path / "bare.safetensors"
    save_file(state(), str(path))
    with pytest.raises(ck.CheckpointError, match="without a stainbridge header"):
        ck.load_checkpoint(path)


def test_non_safetensors_file_is_refused(tmp_path: Path) -> None:
    """Arbitrary bytes raise CheckpointError, not a parser crash."""
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"hello, this is not a checkpoint at all")
    with pytest.raises(ck.CheckpointError, match="not a safetensors checkpoint"):
        ck.load_checkpoint(path)


def test_missing_file_raises_checkpoint_error(tmp_path: Path) -> None:
    """A missing checkpoint raises CheckpointError naming the path."""
    with pytest.raises(ck.CheckpointError, match="nope.safetensors"):
        ck.load_checkpoint(tmp_path / "nope.safetensors")


def test_shared_and_strided_tensors_are_saved(tmp_path: Path) -> None:
    """Tied weights and non-contiguous views are cloned contiguous instead of failing."""
    w = torch.randn(3, 4)
    path = tmp_path / "tied.safetensors"
    ck.save_checkpoint(path, {"a": w, "b": w, "t": w.t()}, HEADER)
    tensors, _ = ck.load_checkpoint(path)
    assert torch.equal(tensors["a"], w) and torch.equal(tensors["b"], w) and torch.equal(tensors["t"], w.t())


def test_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    """Overwriting a checkpoint replaces it whole and leaves no temporary file behind."""
    path = tmp_path / "m.safetensors"
    first = ck.save_checkpoint(path, state(), HEADER)
    second = ck.save_checkpoint(path, {"w": torch.ones(2)}, {**HEADER, "input_size": 32})
    assert first != second and ck.file_sha256(path) == second
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_header_must_be_json(tmp_path: Path) -> None:
    """A header value that JSON cannot hold is refused before anything is written."""
    with pytest.raises(ck.CheckpointError, match="not plain JSON"):
        ck.save_checkpoint(tmp_path / "m.safetensors", state(), {"kind": "classifier", "bad": {1, 2}})
    assert not list(tmp_path.iterdir())


def test_header_is_stored_as_json_metadata(tmp_path: Path) -> None:
    """The header travels in safetensors metadata under the single key "stainbridge"."""
    from safetensors import safe_open

    path = tmp_path / "m.safetensors"
    ck.save_checkpoint(path, state(), HEADER)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert list(meta) == ["stainbridge"] and json.loads(meta["stainbridge"])["classes"] == ["a", "b"]


def test_header_length_starting_like_pickle_is_not_mistaken(tmp_path: Path) -> None:
    """A safetensors file whose length prefix begins with byte 0x80 still loads (no false pickle alarm)."""
    path = tmp_path / "m.safetensors"
    ck.save_checkpoint(path, {"w": torch.zeros(2)}, {**HEADER, "pad": ""})
    pad = 0x280 - int.from_bytes(path.read_bytes()[:8], "little")  # JSON header of exactly 0x280 bytes
    ck.save_checkpoint(path, {"w": torch.zeros(2)}, {**HEADER, "pad": "x" * pad})
    assert path.read_bytes()[:2] == b"\x80\x02"  # what a protocol-2 pickle starts with
    _, header = ck.load_checkpoint(path)
    assert header["pad"] == "x" * pad
