"""The CycleGAN objective and training helpers (Zhu et al. 2017, https://arxiv.org/abs/1703.10593),
as in the authors' reference implementation (junyanz/pytorch-CycleGAN-and-pix2pix): the LSGAN loss,
cycle and identity terms summed in one place (``generator_losses``, the reference's ``backward_G``),
the halved discriminator loss, the image pool, Adam, the constant-then-linear schedule and one
epoch of alternating G/D steps (``train_one_epoch``, the reference's ``optimize_parameters``). The
networks are in ``models.cyclegan``; ``stainbridge train cyclegan`` and ``train colorization`` use these.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from stainbridge.models.training import runtime as tu

__all__ = [
    "GANLoss",
    "GeneratorStep",
    "ImagePool",
    "LossWeights",
    "SemanticTerm",
    "cycle_loss",
    "discriminator_loss",
    "forever",
    "generator_losses",
    "identity_loss",
    "make_optimizer",
    "make_scheduler",
    "train_one_epoch",
]


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


def forever(loader: DataLoader) -> Iterator[Tensor]:
    """Cycle a loader endlessly, reshuffling on every pass."""
    while True:
        yield from loader


def train_one_epoch(nets: dict[str, nn.Module], opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer,
                    xs: Iterator[Tensor], ys: Iterator[Tensor], steps: int, pools: dict[str, ImagePool],
                    semantic: SemanticTerm | None, device: torch.device, epoch: int,
                    epochs: int) -> dict[str, float]:
    """One CycleGAN epoch of ``steps`` batches (the reference's optimize_parameters): G and F against fixed
    discriminators, then both discriminators on real and pooled fake images. Returns the mean losses."""
    gan_loss = GANLoss().to(device)
    fmt = tu.memory_format(device)
    for net in nets.values():
        net.train()
    progress = tu.Progress(steps, desc=f"epoch {epoch + 1}/{epochs}")
    for _ in range(steps):
        real_x = (next(xs).to(device, non_blocking=True) * 2 - 1).contiguous(memory_format=fmt)
        real_y = (next(ys).to(device, non_blocking=True) * 2 - 1).contiguous(memory_format=fmt)
        # generators: the discriminators are held fixed while G and F learn to fool them
        nets["d_x"].requires_grad_(False)
        nets["d_y"].requires_grad_(False)
        with tu.autocast(device):
            step = generator_losses(g_xy=nets["g_xy"], g_yx=nets["g_yx"], d_x=nets["d_x"], d_y=nets["d_y"],
                                             real_x=real_x, real_y=real_y, gan_loss=gan_loss, semantic=semantic)
        opt_g.zero_grad(set_to_none=True)
        step.total.backward()
        opt_g.step()
        # discriminators, on a mix of current and pooled fakes
        nets["d_x"].requires_grad_(True)
        nets["d_y"].requires_grad_(True)
        with tu.autocast(device):
            loss_d_y = discriminator_loss(nets["d_y"], real_y, pools["y"].query(step.fake_y), gan_loss)
            loss_d_x = discriminator_loss(nets["d_x"], real_x, pools["x"].query(step.fake_x), gan_loss)
        opt_d.zero_grad(set_to_none=True)
        (loss_d_x + loss_d_y).backward()
        opt_d.step()
        progress.update(1, **{k: v.item() for k, v in step.losses.items()}, d_x=loss_d_x.item(), d_y=loss_d_y.item())
    return progress.averages()
