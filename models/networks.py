"""Loaded networks: the service's Classifier and Standardizer, and the checkpoint loaders that build them.

Networks are rebuilt from the checkpoint header (``architecture`` + ``arch_args``, looked up in
explicit dicts) and any inconsistency raises :class:`ModelMismatch`. On CUDA the networks run
channels_last under bf16 autocast (unless :func:`full_precision`); on CPU in float32. The daemon
imports all of this through ``models.inference``, the one inference path.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stainbridge.models.abstention import Abstention, AbstentionError, network_state
from stainbridge.models.checkpoint import CheckpointError, ModelMismatch, file_sha256, load_checkpoint
from stainbridge.models.classifier import ARCHITECTURES, FeaturesAndLogits, build_classifier
from stainbridge.models.cyclegan import GENERATORS
from stainbridge.models.imaging import classical, colour_map

CLASSICAL_STANDARDIZERS = ("reinhard", "macenko")
# What `stainbridge train site-profile --method` writes: a classical method, or the site's colour map
# (fitted to the site's images, so it exists only as a checkpoint, never as a name in the configuration).
SITE_PROFILE_METHODS = (*CLASSICAL_STANDARDIZERS, colour_map.ARCHITECTURE)

class DeviceUnavailable(RuntimeError):
    """The configured device cannot be used on this machine."""


# --------------------------------------------------------------------------- helpers


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> cuda when available else cpu; ``"cpu"``; ``"cuda"`` (raises if there is none)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailable('device "cuda" was requested but no CUDA GPU is available; set [models] device = "auto" or "cpu"')
        return torch.device("cuda")
    raise ValueError(f'unknown device {name!r}; use "auto", "cpu" or "cuda"')


_FULL_PRECISION: contextvars.ContextVar[bool] = contextvars.ContextVar("full_precision", default=False)


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """Run the networks in float32 even on CUDA inside this block (the naive baseline of
    `bench throughput`, and numerical checks); outside it, CUDA runs under bf16 autocast."""
    token = _FULL_PRECISION.set(True)
    try:
        yield
    finally:
        _FULL_PRECISION.reset(token)


def _autocast(device: torch.device):
    # bf16 on CUDA only (unless full_precision()); a disabled autocast context on CPU keeps float32.
    enabled = device.type == "cuda" and not _FULL_PRECISION.get()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def _memory_format(device: torch.device) -> torch.memory_format:
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def place_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Move a network to ``device`` for inference (channels_last on CUDA, eval, no gradients)."""
    return model.to(device=device, memory_format=_memory_format(device)).eval().requires_grad_(False)


def _load_state(model: nn.Module, state: dict[str, Tensor], path: Path) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # missing/unexpected keys or shape mismatches
        raise ModelMismatch(f"{path}: the tensors do not fit the architecture its header names: {exc}") from exc


def _require_kind(header: dict, kind: str, path: Path) -> None:
    if header.get("kind") != kind:
        raise ModelMismatch(
            f"{path} is a {header.get('kind')!r} checkpoint, not a {kind!r}; "
            f"check that [models] classifier and standardizer point at the right files"
        )


def _check_normalization(header: dict, path: Path) -> tuple[list[float], list[float]]:
    norm = header.get("normalization")
    try:
        mean, std = [float(v) for v in norm["mean"]], [float(v) for v in norm["std"]]
    except (TypeError, KeyError, ValueError):
        raise ModelMismatch(f"{path}: header 'normalization' must be {{'mean': [3 floats], 'std': [3 floats]}}, got {norm!r}") from None
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ModelMismatch(f"{path}: header 'normalization' needs 3 means and 3 positive stds, got {norm!r}")
    return mean, std


# --------------------------------------------------------------------------- models


class Classifier:
    """A loaded classifier checkpoint. ``predict`` takes [N,3,H,W] RGB in [0,1] and returns softmax
    probabilities [N,C] (float32, on CPU) in the order of ``classes``; ``logits_and_features`` also gives
    the penultimate features that ``abstention`` (calibration and the out-of-distribution score) reads.
    ``network`` is what runs (``model`` with its features exposed; ``compile_networks`` compiles it)."""

    def __init__(self, model: nn.Module, header: dict, *, name: str, sha256: str, device: torch.device,
                 abstention: Abstention | None = None) -> None:
        self.model, self.header, self.name, self.sha256, self.device = model, header, name, sha256, device
        self.network: nn.Module = FeaturesAndLogits(model)
        self.abstention = abstention if abstention is not None else Abstention()
        self.classes: list[str] = list(header["classes"])
        self.input_size: int = int(header["input_size"])
        mean, std = _check_normalization(header, Path(name))
        self._mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, device=device).view(1, 3, 1, 1)

    @torch.inference_mode()
    def logits_and_features(self, batch: Tensor) -> tuple[Tensor, Tensor]:
        """(logits [N,C], penultimate features [N,D]), float32 on the CPU."""
        x = batch.to(self.device, torch.float32, non_blocking=True)
        x = ((x - self._mean) / self._std).contiguous(memory_format=_memory_format(self.device))
        with _autocast(self.device):
            features, logits = self.network(x)
        return logits.float().cpu(), features.float().cpu()

    def predict(self, batch: Tensor) -> Tensor:
        return torch.softmax(self.logits_and_features(batch)[0], dim=1)

    def __repr__(self) -> str:
        return f"Classifier({self.name!r}, {self.header.get('architecture')}, classes={self.classes}, sha256={self.sha256[:12]})"


class Standardizer:
    """Maps [N,3,H,W] in [0,1] to the reference stain style, same shape, in [0,1].

    ``name`` is "none", a classical method name, or the checkpoint's file stem; ``sha256`` is
    the checkpoint's hash (None for built-in methods); ``header`` describes what it is.
    """

    def __init__(
        self, fn: Callable[[Tensor], Tensor], *, name: str, header: dict, sha256: str | None = None, device: torch.device | str = "cpu"
    ) -> None:
        self._fn, self.name, self.header, self.sha256 = fn, name, header, sha256
        self.device = torch.device(device)

    @torch.inference_mode()
    def __call__(self, batch: Tensor) -> Tensor:
        return self._fn(batch).clamp(0.0, 1.0)

    def __repr__(self) -> str:
        sha = self.sha256[:12] if self.sha256 else None
        return f"Standardizer({self.name!r}, sha256={sha})"


class GeneratorFn:
    """[0,1] -> [-1,1] -> reflection-pad to a multiple of 4 -> G -> crop -> [0,1]."""

    def __init__(self, generator: nn.Module, device: torch.device) -> None:
        self.generator, self.device = generator, device

    def __call__(self, batch: Tensor) -> Tensor:
        out_device = batch.device
        x = batch.to(self.device, torch.float32, non_blocking=True) * 2.0 - 1.0
        h, w = x.shape[-2:]
        pad_h, pad_w = -h % 4, -w % 4
        top, left = pad_h // 2, pad_w // 2
        if pad_h or pad_w:
            # reflect needs pad < size; replicate covers images smaller than the pad.
            mode = "reflect" if h > pad_h and w > pad_w else "replicate"
            x = F.pad(x, (left, pad_w - left, top, pad_h - top), mode=mode)
        x = x.contiguous(memory_format=_memory_format(self.device))
        with _autocast(self.device):
            y = self.generator(x)
        y = y[..., top : top + h, left : left + w].float().contiguous()
        return ((y + 1.0) / 2.0).to(out_device)


# --------------------------------------------------------------------------- loaders


def load_classifier(path: str | Path, *, device: str = "cpu", expected_sha256: str | None = None) -> Classifier:
    """Load a classifier checkpoint and build its network from the header."""
    path = Path(path)
    dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
    sha = _sha_of(path, expected_sha256)
    state, header = load_checkpoint(path, expected_sha256=sha)
    _require_kind(header, "classifier", path)
    arch = header.get("architecture")
    if arch not in ARCHITECTURES:
        raise ModelMismatch(f"{path}: unknown classifier architecture {arch!r}; this stainbridge knows {sorted(ARCHITECTURES)}")
    classes = header.get("classes")
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes) or len(set(classes)) != len(classes):
        raise ModelMismatch(f"{path}: header 'classes' must list at least two distinct class names, got {classes!r}")
    size = header.get("input_size")
    if not isinstance(size, int) or size < 8:
        raise ModelMismatch(f"{path}: header 'input_size' must be an integer number of pixels >= 8, got {size!r}")
    _check_normalization(header, path)
    arch_args = dict(header.get("arch_args") or {})
    num_classes = arch_args.pop("num_classes", len(classes))
    if num_classes != len(classes):
        raise ModelMismatch(f"{path}: arch_args num_classes={num_classes} but the header lists {len(classes)} classes")
    if arch_args:
        raise ModelMismatch(f"{path}: unsupported classifier arch_args {sorted(arch_args)}; only 'num_classes' is known")
    try:
        abstention = Abstention.from_checkpoint(header, state, str(path))
    except AbstentionError as exc:
        raise ModelMismatch(str(exc)) from None
    model = build_classifier(arch=arch, num_classes=len(classes))
    _load_state(model, network_state(state), path)
    return Classifier(place_model(model, dev), header, name=path.stem, sha256=sha, device=dev, abstention=abstention)


def load_standardizer(
    spec: str,
    *,
    device: str = "cpu",
    classifier: Classifier | None = None,
    expected_sha256: str | None = None,
) -> Standardizer:
    """``spec``: "none", "reinhard" | "macenko" (fitted to the reference stain stats
    in ``classifier.header["reference_stain"]``), or the path of a standardizer checkpoint: a
    generator (CycleGAN, colour-only, colorization), a classical method with its statistics and
    site profile, or a site's colour map (both ``stainbridge train site-profile``)."""
    spec = str(spec)
    if spec == "none":
        return Standardizer(lambda batch: batch, name="none", header={"kind": "standardizer", "architecture": "none"})
    if spec in CLASSICAL_STANDARDIZERS:
        return _classical(spec, classifier)
    path = Path(spec)
    if spec == colour_map.ARCHITECTURE and not path.exists():
        raise FileNotFoundError("the colour map is fitted to one site, so it is a checkpoint, not a name: write it with "
                                "`stainbridge train site-profile --method colour_map --source SITE_IMAGES --classifier "
                                "CLASSIFIER --reference REFERENCE_IMAGES --out FILE` and point the standardizer at FILE")
    if not path.exists():
        raise FileNotFoundError(
            f"standardizer {spec!r} is neither a checkpoint file nor one of none, {', '.join(CLASSICAL_STANDARDIZERS)}"
        )
    dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
    sha = _sha_of(path, expected_sha256)
    state, header = load_checkpoint(path, expected_sha256=sha)
    _require_kind(header, "standardizer", path)
    arch = header.get("architecture")
    if arch in CLASSICAL_STANDARDIZERS:
        # a classical method with its reference statistics and site profile (`stainbridge train site-profile`)
        return _classical(arch, None, stats=header.get("reference_stain"), header=header, name=path.stem, sha256=sha)
    if arch == colour_map.ARCHITECTURE:
        try:
            fn = colour_map.ColourMap.from_state(state)
        except classical.BaselineError as exc:
            raise ModelMismatch(f"{path}: {exc}") from exc
        return Standardizer(fn, name=path.stem, header=header, sha256=sha)
    if arch not in GENERATORS:
        raise ModelMismatch(f"{path}: unknown standardizer architecture {arch!r}; this stainbridge knows {sorted(GENERATORS)}")
    try:
        generator = GENERATORS[arch](**(header.get("arch_args") or {}))
    except (TypeError, ValueError) as exc:
        raise ModelMismatch(f"{path}: header arch_args {header.get('arch_args')!r} do not fit {arch}: {exc}") from exc
    _load_state(generator, state, path)
    return wrap_generator(generator, name=path.stem, header=header, sha256=sha, device=dev)


def wrap_generator(
    generator: nn.Module, *, name: str, header: dict, sha256: str | None = None, device: torch.device | str = "cpu"
) -> Standardizer:
    """A CycleGAN generator (X -> reference) as a Standardizer on ``device``."""
    dev = torch.device(device)
    return Standardizer(GeneratorFn(place_model(generator, dev), dev), name=name, header=header, sha256=sha256, device=dev)


def _classical(method: str, classifier: Classifier | None, *, stats: dict | None = None, header: dict | None = None,
               name: str | None = None, sha256: str | None = None) -> Standardizer:
    """A classical method fitted to the reference stain statistics of ``classifier``'s header, or to
    ``stats`` from a classical standardizer checkpoint (whose ``header`` also carries the site profile)."""
    owner = f"standardizer {name}" if header is not None else (f"classifier {classifier.name}" if classifier else None)
    if header is None:
        if classifier is None:
            raise ModelMismatch(f"standardizer {method!r} needs the classifier's reference stain statistics; pass classifier=")
        stats = classifier.header.get("reference_stain")
    if not isinstance(stats, dict) or not stats:
        raise ModelMismatch(
            f"{owner} carries no 'reference_stain' statistics, so {method!r} has no target; "
            "retrain it with this stainbridge version or use a CycleGAN standardizer"
        )
    try:
        fn = classical.build_standardizer(method, stats)
    except classical.BaselineError as exc:
        raise ModelMismatch(f"{owner}: its reference_stain statistics do not serve {method!r}: {exc}") from exc
    if header is None:
        header = {"kind": "standardizer", "architecture": method, "reference_stain": stats,
                  "classifier_sha256": classifier.sha256 if classifier else None}
    return Standardizer(fn, name=name or method, header=header, sha256=sha256)


def _sha_of(path: Path, expected: str | None) -> str:
    # The hash the loaded bytes must have: the registry's, else the file's now. Passing it to
    # load_checkpoint guarantees the reported sha256 is that of the tensors actually loaded.
    if expected is not None:
        return expected.lower()
    try:
        return file_sha256(path)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from exc
