"""Batch augmentation for a classifier that must survive another lab's stain and optics.

The classifier is trained on the reference lab only, so it has to learn the cell's shape and
texture rather than the exact colours of one staining protocol. These transforms work on whole
in-memory batches (float tensors [N,3,H,W] in [0,1]) with independent random parameters per image,
which is much faster on a CPU than per-image PIL transforms:

- geometry: random zoom, any rotation angle, flips and small shifts (cells have no orientation),
  resampled once from a base image that covers more than the output window;
- stain: HED-space jitter (Tellez et al. 2018, "Whole-slide mitosis detection in H&E breast
  histology using PHH3 as a reference to train distilled stain-invariant convolutional networks"),
  hue rotation, saturation, contrast, brightness, gamma, occasional grayscale; optionally
  (``lab`` > 0) each image moved to a random stain template in CIE L*a*b*, its channel means and
  spreads drawn around its own (in the spirit of RandStainNA, Shen et al. 2022, whose templates are
  drawn from the training labs' statistics: the reference is one lab, so the draw is widened to the
  casts other labs show, Delta E 20-27 raw on BCCD and LISC);
- optics: Gaussian blur (another microscope's focus and resolution) and a little sensor noise;
- framing (``tight_crops`` > 0): a share of the images cut to a smaller centred square and padded
  with its border colour, as ``data.normalize_geometry`` pads another lab's crop that is smaller than
  the window (87 % of BCCD's tight boxes, a quarter of Chula's crops, mostly its small lymphocytes; the
  reference's windows never are).

``AugmentedBatches`` turns uint8 tensors and labels into an iterable of augmented batches that
``models.training.classifier.train_one_epoch`` consumes like a DataLoader.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from stainbridge.models.colorization import lab_to_rgb, rgb_to_lab

__all__ = ["AugmentedBatches", "gaussian_blur", "hed_jitter", "hue_rotate", "lab_jitter", "random_geometry",
           "stain_augment", "tight_crop"]

# Ruifrok & Johnston's stain vectors (haematoxylin, eosin, DAB), rows normalized, as in scikit-image.
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_RGB_FROM_HED = _RGB_FROM_HED / _RGB_FROM_HED.norm(dim=1, keepdim=True)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


def _uniform(n: int, lo: float, hi: float, g: torch.Generator | None) -> Tensor:
    return torch.rand(n, generator=g) * (hi - lo) + lo


def _gray(x: Tensor) -> Tensor:
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def random_geometry(base: Tensor, out: int, *, zoom: tuple[float, float] = (0.85, 1.18), shift: float = 0.06,
                    cover: float = 1.3, g: torch.Generator | None = None) -> Tensor:
    """Random zoom/rotation/flip/shift of ``base`` [N,3,B,B] (covering ``cover`` times the output
    window) to [N,3,out,out]; zoom > 1 shows more of the surroundings (a smaller cell)."""
    n = base.shape[0]
    s = _uniform(n, *zoom, g) / cover
    theta = torch.rand(n, generator=g) * 2 * math.pi
    flip = (torch.rand(n, generator=g) < 0.5).float() * 2 - 1
    a = torch.zeros(n, 2, 3)
    a[:, 0, 0], a[:, 0, 1] = s * torch.cos(theta) * flip, -s * torch.sin(theta)
    a[:, 1, 0], a[:, 1, 1] = s * torch.sin(theta) * flip, s * torch.cos(theta)
    a[:, :, 2] = (torch.rand(n, 2, generator=g) * 2 - 1) * shift
    grid = F.affine_grid(a, [n, 3, out, out], align_corners=False)
    return F.grid_sample(base, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


TIGHT_CROP_SMALLEST = 0.5  # the smallest kept square, as a fraction of the window (BCCD's boxes: 0.5-1.4)


def tight_crop(x: Tensor, probability: float, g: torch.Generator | None = None) -> Tensor:
    """For a random ``probability`` share of the images, keep a centred square of a random fraction
    (``TIGHT_CROP_SMALLEST`` to 1) of the side and fill the rest with the median colour of that square's
    border: what the service's geometry makes of a crop smaller than the window."""
    n, _, size, _ = x.shape
    chosen = (torch.rand(n, generator=g) < probability).nonzero().flatten().tolist()
    fraction = _uniform(n, TIGHT_CROP_SMALLEST, 1.0, g)
    out = x.clone()
    for i in chosen:
        side = max(2, round(size * float(fraction[i])))
        o = (size - side) // 2
        box = x[i, :, o:o + side, o:o + side]
        border = torch.cat([box[:, 0], box[:, -1], box[:, :, 0], box[:, :, -1]], dim=1)
        out[i] = border.median(dim=1).values.view(3, 1, 1)
        out[i, :, o:o + side, o:o + side] = box
    return out


def hed_jitter(x: Tensor, sigma: float, bias: float, g: torch.Generator | None = None) -> Tensor:
    """Scale and shift each image's haematoxylin/eosin/DAB optical densities at random."""
    n = x.shape[0]
    od = -torch.log(x.clamp(1e-3, 1))
    hed = torch.einsum("nchw,cd->ndhw", od, _HED_FROM_RGB)
    hed = hed * (1 + (torch.rand(n, 3, 1, 1, generator=g) * 2 - 1) * sigma)
    hed = hed + (torch.rand(n, 3, 1, 1, generator=g) * 2 - 1) * bias
    return torch.exp(-torch.einsum("ndhw,dc->nchw", hed, _RGB_FROM_HED)).clamp(0, 1)


# lab = 1: per-image L*a*b* mean shifts drawn with these standard deviations, and the spreads scaled by exp(N(0, 0.3))
LAB_MEAN_SIGMA = (8.0, 6.0, 6.0)
LAB_SPREAD_SIGMA = 0.3


def lab_jitter(x: Tensor, amount: float, g: torch.Generator | None = None) -> Tensor:
    """Move each image's L*a*b* channel means and spreads to a random template around its own (Reinhard's
    transfer onto a drawn target): ``amount`` scales ``LAB_MEAN_SIGMA`` and ``LAB_SPREAD_SIGMA``."""
    n = x.shape[0]
    lab = rgb_to_lab(x)
    mean = lab.mean((2, 3), keepdim=True)
    spread = lab.std((2, 3), keepdim=True).clamp_min(1e-3)
    sigma = torch.tensor(LAB_MEAN_SIGMA).view(1, 3, 1, 1) * amount
    new_mean = mean + torch.randn(n, 3, 1, 1, generator=g) * sigma
    new_spread = spread * torch.exp(torch.randn(n, 3, 1, 1, generator=g) * LAB_SPREAD_SIGMA * amount)
    return lab_to_rgb((lab - mean) / spread * new_spread + new_mean)


def hue_rotate(x: Tensor, angle: Tensor) -> Tensor:
    """Rotate each image's hue by ``angle`` [N] radians (in YIQ, which keeps luminance)."""
    yiq = torch.einsum("nchw,dc->ndhw", x, _RGB_TO_YIQ)
    c, s = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    i, q = yiq[:, 1] * c - yiq[:, 2] * s, yiq[:, 1] * s + yiq[:, 2] * c
    return torch.einsum("nchw,dc->ndhw", torch.stack([yiq[:, 0], i, q], 1), _YIQ_TO_RGB).clamp(0, 1)


def gaussian_blur(x: Tensor, sigma: Tensor, radius: int = 3) -> Tensor:
    """Separable Gaussian blur with a per-image ``sigma`` [N] in pixels (0 leaves it sharp)."""
    n, c, h, w = x.shape
    r = torch.arange(-radius, radius + 1, dtype=x.dtype)
    sig = sigma.clamp(min=1e-3)[:, None]
    k = torch.exp(-(r[None] ** 2) / (2 * sig**2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)
    y = F.pad(x.reshape(1, n * c, h, w), (radius, radius, 0, 0), mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def stain_augment(x: Tensor, strength: float = 1.0, g: torch.Generator | None = None, *, lab: float = 0.0) -> Tensor:
    """Strong stain, colour and optics augmentation; ``strength`` 0 returns ``x`` unchanged; ``lab`` > 0 first
    moves each image to a random L*a*b* template (``lab_jitter``)."""
    if strength <= 0:
        return x
    n = x.shape[0]
    if lab > 0:
        x = lab_jitter(x, lab, g)

    def u(lo: float, hi: float) -> Tensor:
        return _uniform(n, lo, hi, g).view(n, 1, 1, 1)

    x = hed_jitter(x, 0.1 * strength, 0.06 * strength, g)
    x = hue_rotate(x, (torch.rand(n, generator=g) * 2 - 1) * 0.35 * strength)
    gray = _gray(x)
    x = (gray + (x - gray) * u(1 - 0.5 * strength, 1 + 0.5 * strength)).clamp(0, 1)  # saturation
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (mean + (x - mean) * u(1 - 0.35 * strength, 1 + 0.35 * strength)).clamp(0, 1)  # contrast
    x = (x * u(1 - 0.2 * strength, 1 + 0.2 * strength)).clamp(0, 1)  # brightness
    x = x.clamp(1e-4, 1) ** u(1 - 0.3 * strength, 1 + 0.3 * strength)  # gamma
    to_gray = (torch.rand(n, 1, 1, 1, generator=g) < 0.15 * strength).float()
    x = to_gray * _gray(x).expand_as(x) + (1 - to_gray) * x
    blurred = torch.rand(n, generator=g) < 0.5 * min(strength, 1.0)
    x = gaussian_blur(x, torch.where(blurred, _uniform(n, 0.3, 1.6, g), torch.zeros(n)))
    x = x + torch.randn(x.shape, generator=g) * 0.01 * strength
    return x.clamp(0, 1)


class AugmentedBatches:
    """An epoch of shuffled, augmented (images [B,3,out,out] in [0,1], labels [B]) batches from
    in-memory uint8 ``base`` images [N,3,S,S] that cover ``cover`` times the output window."""

    def __init__(self, base: Tensor, labels: Tensor, *, out: int, batch_size: int, strength: float = 1.0,
                 cover: float = 1.3, seed: int = 0, lab: float = 0.0, tight_crops: float = 0.0) -> None:
        if len(base) != len(labels) or len(base) == 0:
            raise ValueError(f"need as many labels as images, and at least one image; got {len(base)} and {len(labels)}")
        self.base, self.labels, self.out, self.batch_size = base, labels, out, batch_size
        self.strength, self.cover, self.lab, self.tight_crops = strength, cover, lab, tight_crops
        self.g = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return max(1, len(self.base) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = torch.randperm(len(self.base), generator=self.g)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = random_geometry(self.base[idx].float() / 255, self.out, cover=self.cover, g=self.g)
            if self.tight_crops > 0:
                x = tight_crop(x, self.tight_crops, self.g)
            yield stain_augment(x, self.strength, self.g, lab=self.lab), self.labels[idx]
