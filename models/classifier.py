"""Cell classifier: torchvision ResNet-18/34, and the multi-class focal loss it trains with.

Pretrained ImageNet weights are read only from a local file (``pretrained_file``); nothing is
ever downloaded. The focal loss is Lin et al. 2017 ("Focal Loss for Dense Object Detection",
Eq. 5) in its softmax form: FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import ResNet, resnet18, resnet34

from stainbridge.models import small_resnet

__all__ = [
    "ARCHITECTURES",
    "LOSSES",
    "FeaturesAndLogits",
    "FocalLoss",
    "PretrainedWeightsError",
    "build_classifier",
    "make_loss",
    "penultimate_features",
]

# Architecture names a classifier checkpoint's header may carry -> torchvision constructor.
# torchvision constructors (weights=None, fresh head); plus the CPU-sized width-16 ResNet-18 of
# models.small_resnet, which builds its own head and has no ImageNet weights.
ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    small_resnet.ARCHITECTURE: small_resnet.build_small_resnet18,
}


class PretrainedWeightsError(Exception):
    """The local pretrained-weights file is missing, unreadable, or not for this architecture."""


# --------------------------------------------------------------------------- helpers


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise PretrainedWeightsError(
            f"pretrained weights file {path} does not exist; pass a local ImageNet checkpoint "
            "(e.g. torchvision's resnet18-f37072fd.pth) or train without --pretrained"
        )
    if path.suffix != ".safetensors":
        # stainbridge never unpickles (docs/training.md): a .pth file is a pickle, even under weights_only=True.
        raise PretrainedWeightsError(
            f"{path} is not a .safetensors file; stainbridge never reads pickle-based files. Convert it once, "
            "on a machine you trust, and pass the result: python -c \"import torch, safetensors.torch as s; "
            f"s.save_file(torch.load('{path}', weights_only=True), '{path.with_suffix('.safetensors')}')\""
        )
    try:
        from safetensors.torch import load_file

        state = load_file(str(path))
    except Exception as exc:  # any reader failure means the same thing to the user
        raise PretrainedWeightsError(
            f"cannot read pretrained weights from {path}: {exc}. Use a plain .safetensors state-dict file"
        ) from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise PretrainedWeightsError(f"{path} does not hold a state dict of tensors")
    return state


def _load_backbone(model: ResNet, path: Path, arch: str) -> None:
    """Load every weight except the ImageNet head (``fc``) into ``model``."""
    state = {k.removeprefix("module."): v for k, v in _read_state_dict(path).items()}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch
        raise PretrainedWeightsError(f"{path} does not fit {arch}: {exc}") from exc
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise PretrainedWeightsError(
            f"{path} does not fit {arch}: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]}); is it the {arch} ImageNet file?"
        )


# --------------------------------------------------------------------------- builder


def build_classifier(*, arch: str, num_classes: int, pretrained_file: str | Path | None = None) -> nn.Module:
    """A torchvision ResNet with a fresh ``num_classes`` head; the backbone comes from
    ``pretrained_file`` (ImageNet weights on local disk) when given, else random init."""
    try:
        constructor = ARCHITECTURES[arch]
    except KeyError:
        raise ValueError(f"unknown classifier architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}") from None
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if arch == small_resnet.ARCHITECTURE:
        return constructor(num_classes=num_classes, pretrained_file=pretrained_file)
    model = constructor(weights=None)
    if pretrained_file is not None:
        _load_backbone(model, Path(pretrained_file), arch)
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def penultimate_features(model: nn.Module, x: Tensor) -> Tensor | None:
    """The pooled features [N, D] that the network's last layer ``fc`` turns into logits; None for a network
    of another kind (a test double), which then has no out-of-distribution score."""
    if isinstance(model, small_resnet.SmallResNet18):
        return model.features(x)
    if isinstance(model, ResNet):  # torchvision's _forward_impl up to fc
        x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        x = model.layer4(model.layer3(model.layer2(model.layer1(x))))
        return torch.flatten(model.avgpool(x), 1)
    return None


class FeaturesAndLogits(nn.Module):
    """A classifier network seen as (penultimate features, logits): what the out-of-distribution score reads
    next to the softmax, in one pass. Shares the network's parameters. A network whose features are not known
    here gives [N, 0] features."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = penultimate_features(self.model, x)
        if features is None:
            logits = self.model(x)
            return logits.new_zeros(len(x), 0), logits
        return features, self.model.fc(features)


# --------------------------------------------------------------------------- losses


class FocalLoss(nn.Module):
    """Multi-class softmax focal loss, FL = -alpha_t (1 - p_t)^gamma log(p_t) (Lin et al., Eq. 5).

    ``gamma=0`` without ``alpha`` is exactly cross-entropy. ``alpha`` is an optional per-class
    weight tensor of shape [C]; ``reduction="mean"`` averages over examples (it does not divide
    by the sum of alpha_t, unlike ``F.cross_entropy(weight=...)``).
    """

    def __init__(self, gamma: float = 2.0, alpha: Tensor | None = None, reduction: str = "mean") -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.gamma = float(gamma)
        self.reduction = reduction
        if alpha is not None:
            alpha = torch.as_tensor(alpha, dtype=torch.float32)
            if alpha.ndim != 1:
                raise ValueError(f"alpha must be a 1-D tensor with one weight per class, got shape {tuple(alpha.shape)}")
        self.register_buffer("alpha", alpha)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """``logits`` [N, C] (any float dtype; computed in float32), ``target`` [N] class indices."""
        log_p = F.log_softmax(logits.float(), dim=1)
        log_pt = log_p.gather(1, target.unsqueeze(1)).squeeze(1)
        loss = -log_pt
        if self.gamma > 0:
            # 1 - p_t via expm1 for precision; clamped so the gradient stays finite when p_t == 1.
            one_minus_pt = (-torch.expm1(log_pt)).clamp(min=torch.finfo(torch.float32).tiny)
            loss = one_minus_pt.pow(self.gamma) * loss
        if self.alpha is not None:
            if self.alpha.numel() != logits.shape[1]:
                raise ValueError(f"alpha has {self.alpha.numel()} weights but the logits have {logits.shape[1]} classes")
            loss = self.alpha.to(loss.device)[target] * loss
        if self.reduction == "mean":
            return loss.mean()
        if self.reduction == "sum":
            return loss.sum()
        return loss


def _focal(gamma: float, alpha: Tensor | None) -> nn.Module:
    return FocalLoss(gamma=gamma, alpha=alpha)


def _cross_entropy(gamma: float, alpha: Tensor | None) -> nn.Module:
    # gamma does not apply; alpha becomes CE's class weights (weighted mean).
    return nn.CrossEntropyLoss(weight=None if alpha is None else torch.as_tensor(alpha, dtype=torch.float32))


LOSSES: dict[str, Callable[[float, Tensor | None], nn.Module]] = {"focal": _focal, "ce": _cross_entropy}


def make_loss(name: str, gamma: float = 2.0, alpha: Tensor | None = None) -> nn.Module:
    """The training criterion by name: ``"focal"`` (FocalLoss(gamma, alpha)) or ``"ce"``
    (``nn.CrossEntropyLoss`` with ``alpha`` as class weights; ``gamma`` ignored)."""
    try:
        factory = LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}") from None
    return factory(gamma, alpha)
