"""What every training run needs around its loop (`train classifier`, `train cyclegan`, the benchmarks):
seeding, device / autocast / channels_last set-up, torchrun (DDP) initialisation, a plain-text
progress line on stderr, and JSON output. Resumable state lives in ``training.resume``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from torch import nn

# ---------------------------------------------------------------------------------------------
# small helpers


def seed_everything(seed: int, *, rank: int = 0) -> None:
    """Seed python, numpy and torch; each DDP rank gets its own stream (seed + rank)."""
    s = int(seed) + int(rank)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


# ---------------------------------------------------------------------------------------------
# device, distributed, precision


@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join the process group that torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK).

    Outside torchrun, or with WORLD_SIZE=1, this is a no-op returning rank 0 of 1.
    NCCL on CUDA, gloo otherwise.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend, init_method="env://")
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank)


def cleanup_distributed(info: DistInfo) -> None:
    if info.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed and torch.distributed.is_initialized():
        torch.distributed.barrier()


def select_device(name: str, info: DistInfo) -> torch.device:
    """"auto" picks this rank's GPU when there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
        return torch.device("cuda", info.local_rank)
    return torch.device(name)


def autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA; full fp32 everywhere else."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def memory_format(device: torch.device) -> torch.memory_format:
    """channels_last on CUDA (tensor cores like NHWC); the default layout on CPU."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module inside a DistributedDataParallel wrapper (or the module itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ---------------------------------------------------------------------------------------------
# progress


class Progress:
    """A plain-text progress line on stderr: ``epoch 2/5  37/120  31%  loss 0.41  4.1 it/s  eta 0:20``.

    Prints at most every ``every_s`` seconds plus once at the end; silent on non-main ranks.
    Metrics are averaged over the updates since the start of the bar.
    """

    def __init__(self, total: int, *, desc: str, enabled: bool = True, every_s: float = 2.0,
                 stream: TextIO | None = None) -> None:
        self.total = max(int(total), 0)
        self.desc = desc
        self.enabled = enabled
        self.every_s = every_s
        self.stream = stream if stream is not None else sys.stderr
        self.count = 0
        self.sums: dict[str, float] = {}
        self.start = time.monotonic()
        self._last_print = 0.0

    def update(self, n: int = 1, **metrics: float) -> None:
        self.count += n
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value) * n
        now = time.monotonic()
        if self.enabled and (now - self._last_print >= self.every_s or self.count >= self.total):
            self._print(now)

    def averages(self) -> dict[str, float]:
        return {key: total / max(self.count, 1) for key, total in self.sums.items()}

    def _print(self, now: float) -> None:
        self._last_print = now
        elapsed = max(now - self.start, 1e-9)
        rate = self.count / elapsed
        parts = [self.desc, f"{self.count}/{self.total}"]
        if self.total:
            parts.append(f"{100 * self.count / self.total:3.0f}%")
        parts += [f"{k} {v:.4f}" for k, v in self.averages().items()]
        parts.append(f"{rate:.2f} it/s")
        if rate > 0 and self.total > self.count:
            eta = int((self.total - self.count) / rate)
            parts.append(f"eta {eta // 60}:{eta % 60:02d}")
        print("  ".join(parts), file=self.stream, flush=True)


# ---------------------------------------------------------------------------------------------
# resumable state (safetensors + JSON, never pickle)


def jsonable(value: Any) -> Any:
    """Plain JSON values (tensors to numbers/lists, tuples to lists, NaN/inf to strings) for a header."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        if isinstance(value, float) and not math.isfinite(value):
            return repr(value)
        return value
    raise TypeError(f"cannot store {type(value).__name__} in a JSON checkpoint header")


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write JSON atomically (temp file + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
