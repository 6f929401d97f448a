"""CycleGAN networks (Zhu et al. 2017, "Unpaired Image-to-Image Translation
using Cycle-Consistent Adversarial Networks", https://arxiv.org/abs/1703.10593).

Layers, sizes and training constants follow the authors' reference implementation
(junyanz/pytorch-CycleGAN-and-pix2pix, ``models/networks.py``), so that parameter counts
match it exactly: 11,378,179 for the ResNet generator at its defaults (ngf 64, 9 blocks) and
2,764,737 for the 70x70 PatchGAN (ndf 64, 3 layers), both with instance norm.

Domains: X is the incoming hospital's stain, Y the reference hospital's. ``G_XY`` is the
standardizer used at inference; ``G_YX`` exists only for the cycle loss.

Read top-down: helpers, blocks named as in the paper, networks, builders. The objective and the
training helpers (image pool, optimizer, learning-rate schedule) are in ``models.training.gan``.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from stainbridge.models.colorization import build_colorization
from stainbridge.models.colour_generator import build_colour_generator

__all__ = [
    "NORM_LAYERS",
    "UPSAMPLERS",
    "GENERATOR_PRESETS",
    "DISCRIMINATOR_PRESETS",
    "GENERATORS",
    "ResnetBlock",
    "ResnetGenerator",
    "NLayerDiscriminator",
    "build_generator",
    "build_discriminator",
    "init_weights",
]

# --------------------------------------------------------------------------- helpers


def _instance_norm(channels: int) -> nn.Module:
    # As in the reference: no affine parameters, no running statistics.
    return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)


def _batch_norm(channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels, affine=True, track_running_stats=True)


def _no_norm(channels: int) -> nn.Module:
    return nn.Identity()


# name -> (factory, whether the preceding conv carries a bias). The reference gives convs
# a bias under instance norm (it has no affine shift) and none under batch norm.
NORM_LAYERS: dict[str, tuple[Callable[[int], nn.Module], bool]] = {
    "instance": (_instance_norm, True),
    "batch": (_batch_norm, False),
    "none": (_no_norm, True),
}


def _norm(name: str) -> tuple[Callable[[int], nn.Module], bool]:
    try:
        return NORM_LAYERS[name]
    except KeyError:
        raise ValueError(f"unknown norm {name!r}; choose one of {sorted(NORM_LAYERS)}") from None


def _transpose_up(in_ch: int, out_ch: int, bias: bool) -> nn.Module:
    # The reference's fractionally-strided convolution (can leave checkerboard artifacts).
    return nn.ConvTranspose2d(in_ch, out_ch, 3, stride=2, padding=1, output_padding=1, bias=bias)


def _resize_conv_up(mode: str) -> Callable[[int, int, bool], nn.Module]:
    # Resize then convolve (Odena et al. 2016, "Deconvolution and Checkerboard Artifacts").
    def make(in_ch: int, out_ch: int, bias: bool) -> nn.Module:
        resize = nn.Upsample(scale_factor=2, mode=mode, **({} if mode == "nearest" else {"align_corners": False}))
        return nn.Sequential(resize, nn.ReflectionPad2d(1), nn.Conv2d(in_ch, out_ch, 3, bias=bias))

    return make


UPSAMPLERS: dict[str, Callable[[int, int, bool], nn.Module]] = {
    "transpose": _transpose_up,
    "resize_conv": _resize_conv_up("nearest"),
    "resize_conv_bilinear": _resize_conv_up("bilinear"),
}


def init_weights(module: nn.Module, gain: float = 0.02) -> nn.Module:
    """Initialize as the reference's ``init_type="normal"``: conv/linear weights N(0, gain), biases 0,
    batch-norm weights N(1, gain). Returns ``module`` for chaining."""

    def init(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, gain)
            nn.init.zeros_(m.bias)

    module.apply(init)
    return module


# --------------------------------------------------------------------------- blocks


class ResnetBlock(nn.Module):
    """Residual block of the generator: x + [pad, conv3x3, norm, ReLU, pad, conv3x3, norm](x)."""

    def __init__(self, dim: int, *, norm: str = "instance", dropout: float = 0.0) -> None:
        super().__init__()
        norm_layer, bias = _norm(norm)
        layers: list[nn.Module] = [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=bias), norm_layer(dim), nn.ReLU(True)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers += [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=bias), norm_layer(dim)]
        self.conv_block = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv_block(x)


# --------------------------------------------------------------------------- networks


class ResnetGenerator(nn.Module):
    """Johnson et al. style generator: c7s1-ngf, two stride-2 downsamplings, ``n_blocks`` residual
    blocks, two upsamplings, c7s1-3 and Tanh. Fully convolutional: any H, W divisible by 4."""

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        *,
        ngf: int = 64,
        n_blocks: int = 9,
        norm: str = "instance",
        upsample: str = "transpose",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if n_blocks < 0:
            raise ValueError(f"n_blocks must be >= 0, got {n_blocks}")
        if upsample not in UPSAMPLERS:
            raise ValueError(f"unknown upsample {upsample!r}; choose one of {sorted(UPSAMPLERS)}")
        norm_layer, bias = _norm(norm)
        up = UPSAMPLERS[upsample]
        n_down = 2
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(in_channels, ngf, 7, bias=bias),
            norm_layer(ngf),
            nn.ReLU(True),
        ]
        for i in range(n_down):
            ch = ngf * 2**i
            layers += [nn.Conv2d(ch, ch * 2, 3, stride=2, padding=1, bias=bias), norm_layer(ch * 2), nn.ReLU(True)]
        layers += [ResnetBlock(ngf * 2**n_down, norm=norm, dropout=dropout) for _ in range(n_blocks)]
        for i in range(n_down):
            ch = ngf * 2 ** (n_down - i)
            layers += [up(ch, ch // 2, bias), norm_layer(ch // 2), nn.ReLU(True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, out_channels, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Map an image in [-1, 1] to an image in [-1, 1] of the same size (H, W multiples of 4)."""
        if x.shape[-2] % 4 or x.shape[-1] % 4:
            raise ValueError(
                f"ResnetGenerator needs height and width divisible by 4, got {tuple(x.shape[-2:])}; "
                "pad the input (models.inference pads with reflection and crops back)"
            )
        return self.model(x)


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator; with ``n_layers=3`` each output score sees a 70x70 input patch."""

    def __init__(self, in_channels: int = 3, *, ndf: int = 64, n_layers: int = 3, norm: str = "instance") -> None:
        super().__init__()
        norm_layer, bias = _norm(norm)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=2, padding=1, bias=bias),
                norm_layer(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        prev, mult = mult, min(2**n_layers, 8)
        layers += [
            nn.Conv2d(ndf * prev, ndf * mult, 4, stride=1, padding=1, bias=bias),
            norm_layer(ndf * mult),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1),
        ]
        self.model = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Return a map of real/fake scores (raw, no sigmoid: LSGAN regresses them to 1/0)."""
        return self.model(x)


# --------------------------------------------------------------------------- builders

GENERATOR_PRESETS: dict[str, dict] = {
    "tiny": dict(ngf=16, n_blocks=3, upsample="resize_conv"),
    "small": dict(ngf=32, n_blocks=6, upsample="resize_conv"),
    "full": dict(ngf=64, n_blocks=9),
}

DISCRIMINATOR_PRESETS: dict[str, dict] = {
    "tiny": dict(ndf=16, n_layers=2),
    "small": dict(ndf=32, n_layers=3),
    "full": dict(ndf=64, n_layers=3),
}


def build_generator(*, ngf: int = 64, n_blocks: int = 9, upsample: str = "transpose", norm: str = "instance") -> ResnetGenerator:
    """A ResNet generator, initialized N(0, 0.02). Its keyword arguments are what a standardizer
    checkpoint stores as ``arch_args`` (with ``architecture="resnet_generator"``)."""
    return init_weights(ResnetGenerator(ngf=ngf, n_blocks=n_blocks, upsample=upsample, norm=norm))


def build_discriminator(*, ndf: int = 64, n_layers: int = 3, norm: str = "instance", pool: int = 1) -> nn.Module:
    """A PatchGAN discriminator, initialized N(0, 0.02). ``pool > 1`` puts ``nn.AvgPool2d(pool)`` in
    front, so it judges colour rather than fine texture (needed by the colour-only generator)."""
    if pool < 1:
        raise ValueError(f"pool must be >= 1, got {pool}")
    disc = init_weights(NLayerDiscriminator(ndf=ndf, n_layers=n_layers, norm=norm))
    return nn.Sequential(nn.AvgPool2d(pool), disc) if pool > 1 else disc


# Architecture names a standardizer checkpoint's header may carry -> builder.
GENERATORS: dict[str, Callable[..., nn.Module]] = {
    "resnet_generator": build_generator,
    "pointwise_colour": build_colour_generator,
    "colorization": build_colorization,  # pix2pix L -> ab trained on the reference only (models.colorization)
}
