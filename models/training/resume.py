"""Resumable training state (``--resume``) without pickle.

The state is a safetensors checkpoint written through ``models.checkpoint``: module and optimizer
tensors are flattened into named tensors, and everything else (optimizer hyper-parameters, scheduler
state, epoch, extras) goes into the JSON header, so resuming never unpickles anything.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stainbridge.models import checkpoint
from stainbridge.models.training.runtime import jsonable, unwrap

STATE_KIND = "training_state"

class TrainingStateError(Exception):
    """A resume state file is missing, foreign, or does not match the run being resumed."""


def state_path(out: str | os.PathLike[str]) -> Path:
    """Where the resumable state of a run writing ``out`` lives: ``<out>.state``."""
    return Path(f"{os.fspath(out)}.state")


def _flatten_optimizer(name: str, opt: torch.optim.Optimizer,
                       tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    sd = opt.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for idx, per_param in sd["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{name}.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = jsonable(value)
    return {"param_groups": jsonable(sd["param_groups"]), "scalars": scalars}


def _unflatten_optimizer(name: str, meta: Mapping[str, Any],
                         tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    prefix = f"optim.{name}."
    for key, value in tensors.items():
        if key.startswith(prefix):
            idx, field = key[len(prefix):].split(".", 1)
            state.setdefault(int(idx), {})[field] = value
    for idx, fields in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(fields)
    groups = []
    for group in meta["param_groups"]:
        # JSON turned tuples (Adam betas) into lists; optimizers expect the tuples back.
        groups.append({k: (tuple(v) if isinstance(v, list) and k != "params" else v)
                       for k, v in group.items()})
    return {"state": state, "param_groups": groups}


def save_training_state(path: str | os.PathLike[str], *, modules: Mapping[str, nn.Module],
                        optimizers: Mapping[str, torch.optim.Optimizer],
                        schedulers: Mapping[str, Any] | None = None, epoch: int,
                        extra: Mapping[str, Any] | None = None) -> str:
    """Write everything needed to continue a run after ``epoch`` (completed epochs); returns sha256."""
    tensors: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        for key, value in unwrap(module).state_dict().items():
            tensors[f"model.{name}.{key}"] = value.detach().cpu().contiguous()
    optim_meta = {name: _flatten_optimizer(name, opt, tensors) for name, opt in optimizers.items()}
    tensors["rng.torch"] = torch.get_rng_state()
    header = {
        "kind": STATE_KIND,
        "epoch": int(epoch),
        "optimizers": optim_meta,
        "schedulers": {n: jsonable(s.state_dict()) for n, s in (schedulers or {}).items()},
        "modules": sorted(modules),
        "extra": jsonable(dict(extra or {})),
    }
    return checkpoint.save_checkpoint(path, tensors, header)


def load_training_state(path: str | os.PathLike[str], *, modules: Mapping[str, nn.Module],
                        optimizers: Mapping[str, torch.optim.Optimizer],
                        schedulers: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Restore modules/optimizers/schedulers in place; returns the header (``epoch``, ``extra``...)."""
    path = Path(path)
    if not path.exists():
        raise TrainingStateError(f"no training state at {path}; run once without --resume to create it")
    tensors, header = checkpoint.load_checkpoint(path)
    if header.get("kind") != STATE_KIND:
        raise TrainingStateError(f"{path} is a {header.get('kind')!r} checkpoint, not a training state")
    if sorted(modules) != header.get("modules"):
        raise TrainingStateError(
            f"{path} holds modules {header.get('modules')}, this run has {sorted(modules)}; "
            "delete the state file to start over")
    for name, module in modules.items():
        prefix = f"model.{name}."
        sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            unwrap(module).load_state_dict(sd, strict=True)
        except RuntimeError as exc:
            raise TrainingStateError(
                f"{path} does not fit this model ({exc}); resume with the same --arch/--preset "
                "or delete the state file") from exc
    for name, opt in optimizers.items():
        opt.load_state_dict(_unflatten_optimizer(name, header["optimizers"][name], tensors))
    for name, sched in (schedulers or {}).items():
        sched.load_state_dict(header["schedulers"][name])
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"].to(torch.uint8))
    return header
