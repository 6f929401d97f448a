"""Training and evaluation transforms: PIL image -> float tensor [3, size, size] in [0, 1].

Evaluation only normalizes the geometry (:func:`stainbridge.models.imaging.data.normalize_geometry`);
training adds a random zoom, flips, 90-degree turns and, optionally, colour and stain jitter.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import torch
from PIL import Image
from torchvision import transforms as T

from stainbridge.models.imaging.data import normalize_geometry


class RandomGeometry:
    """Square crop of size px at a random zoom drawn log-uniformly from scale_range."""

    def __init__(self, size: int, scale_range: tuple[float, float] = (1.0, 1.0), base_scale: float = 1.0) -> None:
        self.size, self.scale_range, self.base_scale = size, scale_range, base_scale

    def __call__(self, img: Image.Image) -> Image.Image:
        lo, hi = self.scale_range
        factor = math.exp(random.uniform(math.log(lo), math.log(hi))) if hi > lo else lo
        return normalize_geometry(img, scale=self.base_scale * factor, out_size=self.size)


class RandomRot90:
    """Rotation by a random multiple of 90 degrees (cells have no orientation)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.rot90(x, random.randrange(4), dims=(-2, -1))


class StainJitter:
    """Random per-channel scaling and shift in optical-density space (stain strength and cast)."""

    def __init__(self, sigma: float = 0.15, bias: float = 0.05) -> None:
        self.sigma, self.bias = sigma, bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        od = -torch.log(x.clamp(min=1 / 255))
        alpha = 1 + (torch.rand(3, 1, 1) * 2 - 1) * self.sigma
        beta = (torch.rand(3, 1, 1) * 2 - 1) * self.bias
        return torch.exp(-(od * alpha + beta).clamp(min=0)).clamp(0, 1)


def train_transform(
    size: int,
    *,
    color_augment: bool = False,
    scale_augment: tuple[float, float] | None = (0.8, 1.25),
    base_scale: float = 1.0,
) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> augmented float tensor [3,size,size] in [0,1]: zoom, flips, 90-degree turns, colour."""
    steps: list[Callable] = [RandomGeometry(size, scale_augment or (1.0, 1.0), base_scale)]
    if color_augment:
        steps.append(T.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.4, hue=0.08))
    steps += [T.ToTensor(), T.RandomHorizontalFlip(), T.RandomVerticalFlip(), RandomRot90()]
    if color_augment:
        steps.append(StainJitter())
    return T.Compose(steps)


class _EvalGeometry:
    def __init__(self, size: int, scale: float | str, reference_cell_fraction: float | None) -> None:
        self.size, self.scale, self.reference = size, scale, reference_cell_fraction

    def __call__(self, img: Image.Image) -> Image.Image:
        return normalize_geometry(img, scale=self.scale, out_size=self.size, reference_cell_fraction=self.reference)


def eval_transform(
    size: int, *, scale: float | str = 1.0, reference_cell_fraction: float | None = None
) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> float tensor [3,size,size] in [0,1] after geometry normalization (no randomness)."""
    return T.Compose([_EvalGeometry(size, scale, reference_cell_fraction), T.ToTensor()])
