"""The ColorizationGAN standardizer: the reference lab's colour predicted from an image's lightness.

pix2pix (Isola et al. 2017, "Image-to-Image Translation with Conditional Adversarial Networks",
https://arxiv.org/abs/1611.07004) trained as a colorization model on reference images only, as
the authors' reference implementation does (junyanz/pytorch-CycleGAN-and-pix2pix,
``models/colorization_model.py``): the generator sees the CIE L channel scaled to [-1, 1] and
predicts the a, b channels scaled by 1/110; the discriminator, a PatchGAN, judges (L, ab) pairs.

At inference the incoming image's L channel is first matched to the reference's lightness
statistics (per image: mean and standard deviation of L), then ab is predicted and the image is
rebuilt from (normalized L, predicted ab). The output carries the reference stain by
construction (every colour it can produce was learned from reference cells) and the incoming
cell's structure by construction (L passes through unchanged apart from an affine map); it needs
no incoming images to train.

:class:`ColorizationStandardizer` wraps conversion, normalization and the U-Net in one module that
maps RGB in [-1, 1] to RGB in [-1, 1], so the one inference path loads and runs it like a CycleGAN
generator (``models.cyclegan.GENERATORS["colorization"]``).

Read top-down: Lab conversions (torch, float32), the U-Net block and network as in the reference
``networks.py`` (``UnetSkipConnectionBlock``, ``UnetGenerator``), the standardizer, its builder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AB_SCALE", "UNET_PRESETS", "ColorizationStandardizer", "UnetGenerator", "build_colorization",
           "lab_to_rgb", "l_to_unit", "rgb_to_lab", "unit_to_l"]

AB_SCALE = 110.0  # ab / AB_SCALE in [-1, 1], as in the reference implementation

# sRGB (D65), as models.imaging.classical (numpy) does it; tests check that both agree.
_RGB_TO_XYZ = torch.tensor([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                            [0.019334, 0.119193, 0.950227]], dtype=torch.float64)
_XYZ_TO_RGB = torch.linalg.inv(_RGB_TO_XYZ)
_WHITE = _RGB_TO_XYZ.sum(dim=1)
_EPS = (6 / 29) ** 3


# --------------------------------------------------------------------------- colour space


def _mix(x: Tensor, matrix: Tensor) -> Tensor:
    return torch.einsum("ij,njhw->nihw", matrix.to(x), x)


def rgb_to_lab(rgb: Tensor) -> Tensor:
    """[N,3,H,W] sRGB in [0,1] -> CIE L*a*b* (D65), float32 whatever autocast says."""
    with torch.autocast(device_type=rgb.device.type, enabled=False):
        rgb = rgb.float().clamp(0, 1)
        lin = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
        xyz = _mix(lin, _RGB_TO_XYZ) / _WHITE.to(rgb).view(1, 3, 1, 1)
        f = torch.where(xyz > _EPS, xyz.clamp_min(_EPS) ** (1 / 3), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
        return torch.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], dim=1)


def lab_to_rgb(lab: Tensor) -> Tensor:
    """[N,3,H,W] CIE L*a*b* (D65) -> sRGB clipped to [0,1], float32."""
    with torch.autocast(device_type=lab.device.type, enabled=False):
        lab = lab.float()
        fy = (lab[:, 0] + 16) / 116
        f = torch.stack([fy + lab[:, 1] / 500, fy, fy - lab[:, 2] / 200], dim=1)
        xyz = torch.where(f > 6 / 29, f**3, 3 * (6 / 29) ** 2 * (f - 4 / 29)) * _WHITE.to(lab).view(1, 3, 1, 1)
        lin = _mix(xyz, _XYZ_TO_RGB).clamp(0, 1)
        return torch.where(lin > 0.0031308, 1.055 * lin.clamp_min(0.0031308) ** (1 / 2.4) - 0.055, 12.92 * lin).clamp(0, 1)


def l_to_unit(lightness: Tensor) -> Tensor:
    """L in [0, 100] -> [-1, 1] (the generator's input scale)."""
    return lightness / 50.0 - 1.0


def unit_to_l(x: Tensor) -> Tensor:
    return (x + 1.0) * 50.0


# --------------------------------------------------------------------------- U-Net (pix2pix)


def _norm_layer(name: str) -> type[nn.Module]:
    layers = {"batch": nn.BatchNorm2d, "instance": nn.InstanceNorm2d}
    if name not in layers:
        raise ValueError(f"unknown norm {name!r}; use one of {sorted(layers)}")
    return layers[name]


class UnetSkipConnectionBlock(nn.Module):
    """One level of the U-Net: down-convolution, the inner levels, up-convolution, and the skip
    connection that concatenates this level's input to its output (except at the outermost level)."""

    def __init__(self, outer_nc: int, inner_nc: int, *, input_nc: int | None = None,
                 submodule: nn.Module | None = None, outermost: bool = False, innermost: bool = False,
                 norm: str = "batch", dropout: bool = False) -> None:
        super().__init__()
        self.outermost = outermost
        norm_layer = _norm_layer(norm)
        use_bias = norm == "instance"  # batch norm has its own shift
        input_nc = outer_nc if input_nc is None else input_nc
        downconv = nn.Conv2d(input_nc, inner_nc, kernel_size=4, stride=2, padding=1, bias=use_bias)
        downrelu, uprelu = nn.LeakyReLU(0.2, True), nn.ReLU(True)
        if outermost:
            upconv = nn.ConvTranspose2d(inner_nc * 2, outer_nc, kernel_size=4, stride=2, padding=1)
            layers = [downconv, submodule, uprelu, upconv, nn.Tanh()]
        elif innermost:
            upconv = nn.ConvTranspose2d(inner_nc, outer_nc, kernel_size=4, stride=2, padding=1, bias=use_bias)
            layers = [downrelu, downconv, uprelu, upconv, norm_layer(outer_nc)]
        else:
            upconv = nn.ConvTranspose2d(inner_nc * 2, outer_nc, kernel_size=4, stride=2, padding=1, bias=use_bias)
            layers = [downrelu, downconv, norm_layer(inner_nc), submodule, uprelu, upconv, norm_layer(outer_nc)]
            if dropout:
                layers.append(nn.Dropout(0.5))
        self.model = nn.Sequential(*[m for m in layers if m is not None])

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x) if self.outermost else torch.cat([x, self.model(x)], 1)


class UnetGenerator(nn.Module):
    """The pix2pix U-Net: ``num_downs`` halvings (8 for 256 px, "unet_256"), ``ngf`` filters at the
    outermost level doubling to 8 * ngf; inputs must be multiples of 2**num_downs."""

    def __init__(self, input_nc: int = 1, output_nc: int = 2, *, num_downs: int = 8, ngf: int = 64,
                 norm: str = "batch", dropout: bool = True) -> None:
        super().__init__()
        if num_downs < 5:
            raise ValueError(f"num_downs must be >= 5 (the four outer levels plus the innermost), got {num_downs}")
        block = UnetSkipConnectionBlock(ngf * 8, ngf * 8, innermost=True, norm=norm)
        for _ in range(num_downs - 5):
            block = UnetSkipConnectionBlock(ngf * 8, ngf * 8, submodule=block, norm=norm, dropout=dropout)
        for outer, inner in ((ngf * 4, ngf * 8), (ngf * 2, ngf * 4), (ngf, ngf * 2)):
            block = UnetSkipConnectionBlock(outer, inner, submodule=block, norm=norm)
        self.model = UnetSkipConnectionBlock(output_nc, ngf, input_nc=input_nc, submodule=block, outermost=True,
                                             norm=norm)
        self.multiple = 2**num_downs

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


# --------------------------------------------------------------------------- standardizer


class ColorizationStandardizer(nn.Module):
    """RGB in [-1, 1] -> RGB in [-1, 1]: L matched to the reference's lightness statistics, ab
    predicted by the U-Net from that L. ``predict_ab`` is what training optimizes."""

    def __init__(self, unet: UnetGenerator, *, l_mean: float, l_std: float) -> None:
        super().__init__()
        self.unet, self.l_mean, self.l_std = unet, float(l_mean), float(l_std)

    def normalized_lightness(self, rgb01: Tensor) -> Tensor:
        """[N,1,H,W] L of each image, affinely matched to the reference's mean and std of L."""
        lightness = rgb_to_lab(rgb01)[:, :1]
        mu = lightness.mean(dim=(2, 3), keepdim=True)
        sd = lightness.std(dim=(2, 3), keepdim=True).clamp_min(1e-3)
        return ((lightness - mu) / sd * self.l_std + self.l_mean).clamp(0, 100)

    def predict_ab(self, l_unit: Tensor) -> Tensor:
        """ab / AB_SCALE in [-1, 1] for L in [-1, 1]; any size (padded by replication to the U-Net's multiple)."""
        h, w = l_unit.shape[-2:]
        m = self.unet.multiple
        pad_h, pad_w = -h % m, -w % m
        if pad_h or pad_w:
            l_unit = F.pad(l_unit, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), mode="replicate")
        ab = self.unet(l_unit)
        return ab[..., pad_h // 2: pad_h // 2 + h, pad_w // 2: pad_w // 2 + w]

    def forward(self, x: Tensor) -> Tensor:
        lightness = self.normalized_lightness((x.float() + 1.0) / 2.0)
        ab = self.predict_ab(l_to_unit(lightness)).float() * AB_SCALE
        return lab_to_rgb(torch.cat([lightness, ab], dim=1)) * 2.0 - 1.0


# U-Net sizes: unet_256 (the reference's colorization generator) and smaller ones for CPUs.
UNET_PRESETS: dict[str, dict[str, object]] = {
    "tiny": {"ngf": 8, "num_downs": 5},
    "cpu": {"ngf": 16, "num_downs": 6},
    "unet_128": {"ngf": 64, "num_downs": 7},
    "full": {"ngf": 64, "num_downs": 8},  # unet_256
}


def build_colorization(*, ngf: int = 64, num_downs: int = 8, norm: str = "batch", dropout: bool = True,
                       l_mean: float = 50.0, l_std: float = 20.0) -> ColorizationStandardizer:
    """The colorization standardizer, initialized N(0, 0.02) as pix2pix does. Its keyword arguments
    are what a standardizer checkpoint stores as ``arch_args`` (``architecture="colorization"``);
    ``l_mean``/``l_std`` are the reference images' lightness statistics."""
    unet = UnetGenerator(1, 2, num_downs=num_downs, ngf=ngf, norm=norm, dropout=dropout)
    for m in unet.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
    return ColorizationStandardizer(unet, l_mean=l_mean, l_std=l_std)
