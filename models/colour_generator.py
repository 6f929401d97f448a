"""A colour-only CycleGAN generator: it can recolour a cell image but cannot change its morphology.

``PointwiseColourGenerator`` is a per-pixel MLP on RGB, built from 1x1 convolutions only
(3 -> hidden -> ... -> hidden -> 3, LeakyReLU 0.2): the output at a pixel depends on that pixel's
colour and nothing else, i.e. a learned, global, non-linear colour look-up table. No texture,
edge or shape can be created or removed, whatever the adversarial loss rewards.

Residual parameterisation: ``out = tanh(atanh(0.99 * x) + delta(x))`` on images in [-1, 1] (the
CycleGAN convention of ``models.cyclegan``). The last layer is zero-initialised, so an untrained
generator is (0.99-shrunk) identity. Any height and width work.

Research (exp5b, BCCD -> PBC): this generator only learns when the discriminators judge colour,
not texture or resolution, i.e. see the images through ``nn.AvgPool2d(4)``
(``build_discriminator(pool=4)``), with generator lr 1e-3 (discriminators 2e-4); it beat the
classical baselines only with the semantic KL term (weight 5) whose teacher is the frozen
classifier's 8-view dihedral TTA softmax on the untranslated source image ("raw" teacher).
``stainbridge train cyclegan --preset colour`` sets that recipe.

This module must not import ``models.cyclegan`` (which imports it to register the generator).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["PointwiseColourGenerator", "build_colour_generator", "dihedral_views"]

# Inputs are shrunk by this factor before atanh so that x = +-1 maps to a finite logit.
_SHRINK = 0.99


class PointwiseColourGenerator(nn.Module):
    """Per-pixel colour mapping: images [N, 3, H, W] in [-1, 1] -> same shape, in (-1, 1)."""

    def __init__(self, hidden: int = 32, layers: int = 2, *, slope: float = 0.2) -> None:
        super().__init__()
        if hidden < 1 or layers < 1:
            raise ValueError(f"hidden and layers must be >= 1, got hidden={hidden}, layers={layers}")
        body: list[nn.Module] = [nn.Conv2d(3, hidden, 1)]
        for _ in range(layers - 1):
            body += [nn.LeakyReLU(slope), nn.Conv2d(hidden, hidden, 1)]
        body += [nn.LeakyReLU(slope)]
        self.body = nn.Sequential(*body)
        self.out = nn.Conv2d(hidden, 3, 1)
        nn.init.zeros_(self.out.weight)  # start as the identity mapping
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Recolour ``x`` (in [-1, 1]); every output pixel is a function of the same input pixel only."""
        delta = self.out(self.body(x))
        return torch.tanh(torch.atanh(_SHRINK * x.clamp(-1.0, 1.0)) + delta)


def build_colour_generator(*, hidden: int = 32, layers: int = 2) -> PointwiseColourGenerator:
    """The colour generator; its keyword arguments are what a standardizer checkpoint stores as
    ``arch_args`` (with ``architecture="pointwise_colour"``)."""
    return PointwiseColourGenerator(hidden=hidden, layers=layers)


def dihedral_views(images: Tensor) -> list[Tensor]:
    """The 8 rotations/flips of a batch [N, C, H, W] (square images), for dihedral test-time augmentation."""
    views = [torch.rot90(images, k, (2, 3)) for k in range(4)]
    return views + [v.flip(3) for v in views]
