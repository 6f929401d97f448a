"""CycleGAN networks, losses and training helpers (models/cyclegan.py)."""

from __future__ import annotations

import random

import pytest
import torch

from stainbridge.models import cyclegan as cg
from stainbridge.models.training import gan


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def tiny_generator(**kw) -> cg.ResnetGenerator:
    return cg.build_generator(**{"ngf": 8, "n_blocks": 2, **kw})


def test_generator_parameter_count_matches_reference() -> None:
    """At its defaults the generator has exactly the reference implementation's 11,378,179 parameters."""
    assert n_params(cg.build_generator()) == 11_378_179


def test_discriminator_parameter_count_matches_reference() -> None:
    """At its defaults the 70x70 PatchGAN has exactly the reference's 2,764,737 parameters."""
    assert n_params(cg.build_discriminator()) == 2_764_737


def test_full_preset_is_the_reference_generator() -> None:
    """The "full" preset builds the reference-sized generator."""
    assert n_params(cg.build_generator(**cg.GENERATOR_PRESETS["full"])) == 11_378_179


@pytest.mark.parametrize("upsample", sorted(cg.UPSAMPLERS))
@pytest.mark.parametrize("size", [(64, 64), (68, 92)])
def test_generator_keeps_size_and_range(upsample: str, size: tuple[int, int]) -> None:
    """The generator is fully convolutional (any multiple of 4) and its Tanh output stays in [-1, 1]."""
    g = tiny_generator(upsample=upsample)
    x = torch.rand(2, 3, *size) * 2 - 1
    y = g(x)
    assert y.shape == x.shape
    assert y.min() >= -1 and y.max() <= 1


def test_generator_rejects_sizes_not_divisible_by_4() -> None:
    """A size that is not a multiple of 4 fails with a message saying to pad."""
    with pytest.raises(ValueError, match="divisible by 4"):
        tiny_generator()(torch.zeros(1, 3, 66, 64))


def test_discriminator_gives_patch_scores() -> None:
    """The PatchGAN returns a one-channel score map, for square and non-square inputs."""
    d = cg.build_discriminator(ndf=8)
    assert d(torch.zeros(1, 3, 64, 64)).shape == (1, 1, 6, 6)
    assert d(torch.zeros(2, 3, 68, 92)).shape[:2] == (2, 1)


def test_unknown_options_raise() -> None:
    """Unknown norm or upsample names raise instead of silently picking something."""
    with pytest.raises(ValueError, match="unknown norm"):
        cg.build_generator(ngf=8, n_blocks=1, norm="group")
    with pytest.raises(ValueError, match="unknown upsample"):
        cg.build_generator(ngf=8, n_blocks=1, upsample="pixelshuffle")
    with pytest.raises(ValueError, match="unknown norm"):
        cg.build_discriminator(ndf=8, norm="layer")


def test_builders_take_keyword_arguments_only() -> None:
    """Builders refuse positional arguments, so a checkpoint's arch_args map one-to-one."""
    with pytest.raises(TypeError):
        cg.build_generator(8, 2)  # type: ignore[misc]


def test_init_weights_normal_002() -> None:
    """Conv weights start N(0, 0.02) with zero biases."""
    torch.manual_seed(0)
    g = cg.build_generator(ngf=32, n_blocks=2)
    conv = g.model[1]
    assert abs(conv.weight.std().item() - 0.02) < 0.002
    assert torch.count_nonzero(conv.bias) == 0


def test_gan_loss_is_least_squares() -> None:
    """GANLoss is the MSE to 1 for real and to 0 for fake."""
    loss = gan.GANLoss()
    pred = torch.tensor([[0.5, 2.0]])
    assert torch.isclose(loss(pred, True), torch.tensor((0.25 + 1.0) / 2))
    assert torch.isclose(loss(pred, False), torch.tensor((0.25 + 4.0) / 2))


def tiny_cyclegan():
    torch.manual_seed(0)
    nets = dict(g_xy=tiny_generator(), g_yx=tiny_generator(), d_x=cg.build_discriminator(ndf=8, n_layers=2), d_y=cg.build_discriminator(ndf=8, n_layers=2))
    return nets, torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1


def test_generator_losses_are_named_weighted_and_summed() -> None:
    """The generator objective has adversarial, cycle (x10) and identity (x5) terms summing to total."""
    nets, x, y = tiny_cyclegan()
    step = gan.generator_losses(**nets, real_x=x, real_y=y, gan_loss=gan.GANLoss())
    assert set(step.losses) == {"adv_xy", "adv_yx", "cycle_x", "cycle_y", "idt_x", "idt_y"}
    assert torch.isclose(step.total, sum(step.losses.values()))
    expected_cycle = torch.nn.functional.l1_loss(nets["g_yx"](nets["g_xy"](x)), x) * 10
    assert torch.isclose(step.losses["cycle_x"], expected_cycle)
    expected_idt = torch.nn.functional.l1_loss(nets["g_xy"](y), y) * 5
    assert torch.isclose(step.losses["idt_y"], expected_idt)
    step.total.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in nets["g_xy"].parameters())


def test_identity_term_can_be_switched_off() -> None:
    """With identity weight 0 there are no identity terms."""
    nets, x, y = tiny_cyclegan()
    step = gan.generator_losses(**nets, real_x=x, real_y=y, gan_loss=gan.GANLoss(), weights=gan.LossWeights(identity=0))
    assert "idt_x" not in step.losses and "idt_y" not in step.losses


def test_semantic_term_is_added_with_its_weight() -> None:
    """A semantic term is called on the named (real, translated) pairs, weighted, and part of the total."""
    nets, x, y = tiny_cyclegan()
    seen = []

    def fn(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        seen.append(real)
        return (real - fake).abs().mean()

    term = gan.SemanticTerm(fn=fn, weight=3.0, pairs=("x_to_y", "y_cycle"))
    step = gan.generator_losses(**nets, real_x=x, real_y=y, gan_loss=gan.GANLoss(), semantic=term)
    assert seen[0] is x and seen[1] is y
    assert torch.isclose(step.losses["semantic_x_to_y"], (x - step.fake_y).abs().mean() * 3)
    assert torch.isclose(step.losses["semantic_y_cycle"], (y - step.rec_y).abs().mean() * 3)
    assert torch.isclose(step.total, sum(step.losses.values()))


def test_discriminator_loss_halves_and_detaches() -> None:
    """D's loss is half the LSGAN real+fake loss and sends no gradient into the generator."""
    nets, x, y = tiny_cyclegan()
    fake = nets["g_xy"](x)
    loss = gan.discriminator_loss(nets["d_y"], y, fake, gan.GANLoss())
    lsgan = gan.GANLoss()
    expected = 0.5 * (lsgan(nets["d_y"](y), True) + lsgan(nets["d_y"](fake.detach()), False))
    assert torch.isclose(loss, expected)
    loss.backward()
    assert all(p.grad is None for p in nets["g_xy"].parameters())


def test_image_pool_fills_then_mixes_history() -> None:
    """The pool returns new images until full, then sometimes returns stored older ones."""
    pool = gan.ImagePool(4, rng=random.Random(0))
    first = torch.arange(4.0).view(4, 1, 1, 1)
    assert torch.equal(pool.query(first), first)
    later = torch.full((64, 1, 1, 1), 100.0)
    out = pool.query(later)
    assert out.shape == later.shape
    old = (out < 100).sum().item()
    assert 0 < old <= 4  # some history came back, never more than was stored
    assert len(pool.images) == 4


def test_image_pool_size_zero_passes_through() -> None:
    """pool_size=0 disables the pool."""
    x = torch.rand(3, 3, 4, 4)
    assert torch.equal(gan.ImagePool(0).query(x), x)


def test_optimizer_and_linear_decay_schedule() -> None:
    """Adam(2e-4, (0.5, 0.999)); lr constant for n_epochs, then linear decay to 0."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = gan.make_optimizer([p])
    assert opt.defaults["lr"] == 2e-4 and opt.defaults["betas"] == (0.5, 0.999)
    sched = gan.make_scheduler(opt, n_epochs=3, n_epochs_decay=4)
    lrs = []
    for _ in range(3 + 4):  # n_epochs + n_epochs_decay
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:3] == [2e-4] * 3
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:]))
    assert lrs[-1] == pytest.approx(2e-4 / 5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0)


def test_presets_build() -> None:
    """Every preset builds a working generator and discriminator."""
    for name in cg.GENERATOR_PRESETS:
        if name == "full":
            continue
        g = cg.build_generator(**cg.GENERATOR_PRESETS[name])
        d = cg.build_discriminator(**cg.DISCRIMINATOR_PRESETS[name])
        x = torch.zeros(1, 3, 32, 32)
        assert g(x).shape == x.shape and d(x).ndim == 4
