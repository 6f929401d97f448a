"""CycleGAN networks and losses (Zhu et al. 2017, "Unpaired Image-to-Image Translation
using Cycle-Consistent Adversarial Networks", https://arxiv.org/abs/1703.10593).

Layers, sizes and training constants follow the authors' reference implementation
(junyanz/pytorch-CycleGAN-and-pix2pix, ``models/networks.py``), so that parameter counts
match it exactly: 11,378,179 for the ResNet generator at its defaults (ngf 64, 9 blocks) and
2,764,737 for the 70x70 PatchGAN (ndf 64, 3 layers), both with instance norm.

Domains: X is the incoming hospital's stain, Y the reference hospital's. ``G_XY`` is the
standardizer used at inference; ``G_YX`` exists only for the cycle loss.

Read top-down: helpers, blocks named as in the paper, networks, builders, then the losses
and training helpers (image pool, optimizer, learning-rate schedule).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
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
    "GANLoss",
    "cycle_loss",
    "identity_loss",
    "LossWeights",
    "SemanticTerm",
    "GeneratorStep",
    "generator_losses",
    "discriminator_loss",
    "ImagePool",
    "make_optimizer",
    "make_scheduler",
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


# --------------------------------------------------------------------------- losses


class GANLoss(nn.Module):
    """LSGAN objective (Mao et al. 2017; paper Sec. 4 "Training details"): mean squared error
    between the discriminator's score map and 1 (real) or 0 (fake)."""

    def __init__(self, real_label: float = 1.0, fake_label: float = 0.0) -> None:
        super().__init__()
        self.real_label = real_label
        self.fake_label = fake_label

    def forward(self, prediction: Tensor, target_is_real: bool) -> Tensor:
        target = torch.full_like(prediction, self.real_label if target_is_real else self.fake_label)
        return F.mse_loss(prediction, target)


def cycle_loss(reconstructed: Tensor, real: Tensor) -> Tensor:
    """Cycle-consistency L1 (paper Eq. 2): ||F(G(x)) - x||_1, mean over pixels."""
    return F.l1_loss(reconstructed, real)


def identity_loss(same: Tensor, real: Tensor) -> Tensor:
    """Identity mapping L1 (paper Sec. 5.2, from Taigman et al.): ||G(y) - y||_1."""
    return F.l1_loss(same, real)


@dataclass(frozen=True)
class LossWeights:
    """Weights of the generator objective. Defaults are the paper's: lambda 10, identity 0.5 * lambda."""

    cycle: float = 10.0  # lambda in Eq. 3
    identity: float = 0.5  # fraction of lambda; the reference's --lambda_identity


@dataclass(frozen=True)
class SemanticTerm:
    """Optional class-preservation term, e.g. KL between a frozen classifier's predictions.

    ``fn(real, translated) -> scalar loss`` is called on the pairs named in ``pairs``:
    ``"x_to_y"`` -> (real_x, G_XY(real_x)) and ``"y_cycle"`` -> (real_y, G_XY(G_YX(real_y))).
    ``"y_cycle"`` suits a classifier trained on the reference domain Y, which is reliable on real_y.
    """

    fn: Callable[[Tensor, Tensor], Tensor]
    weight: float = 1.0
    pairs: tuple[str, ...] = ("x_to_y",)


@dataclass
class GeneratorStep:
    """Everything one generator step produced: translated images (for the discriminators and for
    logging) and the named loss terms; ``total`` is their weighted sum, ready for ``backward()``."""

    fake_y: Tensor
    fake_x: Tensor
    rec_x: Tensor
    rec_y: Tensor
    losses: dict[str, Tensor]
    total: Tensor


def generator_losses(
    *,
    g_xy: nn.Module,
    g_yx: nn.Module,
    d_x: nn.Module,
    d_y: nn.Module,
    real_x: Tensor,
    real_y: Tensor,
    gan_loss: GANLoss,
    weights: LossWeights = LossWeights(),
    semantic: SemanticTerm | None = None,
) -> GeneratorStep:
    """The full generator objective of CycleGAN (paper Eq. 3 plus the identity term), computed
    and summed in this one place, as the reference's ``backward_G``. Images are in [-1, 1]."""
    fake_y = g_xy(real_x)  # G(x)
    rec_x = g_yx(fake_y)  # F(G(x))
    fake_x = g_yx(real_y)  # F(y)
    rec_y = g_xy(fake_x)  # G(F(y))
    lam = weights.cycle
    losses: dict[str, Tensor] = {
        # Eq. 1, LSGAN form: G tries to make D_Y score G(x) as real; F likewise against D_X.
        "adv_xy": gan_loss(d_y(fake_y), True),
        "adv_yx": gan_loss(d_x(fake_x), True),
        # Eq. 2: forward and backward cycle consistency, each weighted by lambda.
        "cycle_x": cycle_loss(rec_x, real_x) * lam,
        "cycle_y": cycle_loss(rec_y, real_y) * lam,
    }
    if weights.identity > 0:
        # Sec. 5.2: G should leave a real Y image unchanged (preserves colour composition).
        losses["idt_y"] = identity_loss(g_xy(real_y), real_y) * lam * weights.identity
        losses["idt_x"] = identity_loss(g_yx(real_x), real_x) * lam * weights.identity
    if semantic is not None:
        pairs = {"x_to_y": (real_x, fake_y), "y_cycle": (real_y, rec_y)}
        for name in semantic.pairs:
            if name not in pairs:
                raise ValueError(f"unknown semantic pair {name!r}; choose from {sorted(pairs)}")
            losses[f"semantic_{name}"] = semantic.fn(*pairs[name]) * semantic.weight
    total = torch.stack(list(losses.values())).sum()
    return GeneratorStep(fake_y=fake_y, fake_x=fake_x, rec_x=rec_x, rec_y=rec_y, losses=losses, total=total)


def discriminator_loss(d: nn.Module, real: Tensor, fake: Tensor, gan_loss: GANLoss) -> Tensor:
    """Discriminator objective, halved to slow D relative to G (paper Sec. 4, reference
    ``backward_D_basic``). ``fake`` is detached here; pass one drawn from an :class:`ImagePool`."""
    return 0.5 * (gan_loss(d(real), True) + gan_loss(d(fake.detach()), False))


# --------------------------------------------------------------------------- training helpers


class ImagePool:
    """History of generated images (Shrivastava et al. 2017; paper Sec. 4): the discriminators
    are updated with a mix of current and earlier fakes, as in the reference's ``ImagePool``.

    Until the pool holds ``pool_size`` images, each new image is stored and returned. After that,
    with probability 0.5 a stored image is returned and replaced by the new one, else the new one
    is returned. ``pool_size=0`` disables the pool.
    """

    def __init__(self, pool_size: int = 50, *, rng: random.Random | None = None) -> None:
        self.pool_size = pool_size
        self.images: list[Tensor] = []
        self._rng = rng or random.Random()

    def query(self, images: Tensor) -> Tensor:
        """Return a batch of the same shape as ``images`` (detached) drawn as described above."""
        if self.pool_size == 0:
            return images.detach()
        out: list[Tensor] = []
        for image in images.detach():
            image = image.unsqueeze(0)
            if len(self.images) < self.pool_size:
                self.images.append(image)
                out.append(image)
            elif self._rng.random() > 0.5:
                i = self._rng.randrange(self.pool_size)
                out.append(self.images[i].clone())
                self.images[i] = image
            else:
                out.append(image)
        return torch.cat(out, 0)


def make_optimizer(params, *, lr: float = 2e-4, betas: tuple[float, float] = (0.5, 0.999)) -> torch.optim.Adam:
    """Adam with the paper's settings (lr 0.0002, beta1 0.5)."""
    return torch.optim.Adam(params, lr=lr, betas=betas)


def make_scheduler(
    optimizer: torch.optim.Optimizer, *, n_epochs: int = 100, n_epochs_decay: int = 100
) -> torch.optim.lr_scheduler.LambdaLR:
    """Constant learning rate for ``n_epochs``, then linear decay towards 0 over ``n_epochs_decay``
    (paper Sec. 4). Call ``step()`` once per epoch. The factor is the reference's
    ``1 - max(0, epoch + 1 - n_epochs) / (n_epochs_decay + 1)``: it reaches 0 one epoch after
    the last decay epoch."""
    if n_epochs < 0 or n_epochs_decay < 0:
        raise ValueError(f"epochs must be >= 0, got n_epochs={n_epochs}, n_epochs_decay={n_epochs_decay}")

    def factor(epoch: int) -> float:
        return max(0.0, 1.0 - max(0, epoch + 1 - n_epochs) / float(n_epochs_decay + 1))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=factor)
