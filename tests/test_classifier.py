"""Classifier builder and focal loss (models/classifier.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torchvision.models import resnet18

from stainbridge.models import classifier as clf


def batch(n: int = 8, c: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * 3, torch.randint(0, c, (n,), generator=g)


def test_focal_gamma_zero_equals_cross_entropy() -> None:
    """With gamma=0 and no alpha the focal loss is exactly cross-entropy."""
    logits, target = batch()
    assert torch.allclose(clf.FocalLoss(gamma=0)(logits, target), F.cross_entropy(logits, target))


def test_focal_matches_formula() -> None:
    """The loss is mean(-alpha_t (1 - p_t)^gamma log p_t)."""
    logits, target = batch()
    alpha = torch.tensor([0.1, 0.2, 0.3, 0.25, 0.15])
    p_t = logits.softmax(1)[torch.arange(len(target)), target]
    expected = (-alpha[target] * (1 - p_t) ** 2 * p_t.log()).mean()
    assert torch.allclose(clf.FocalLoss(gamma=2, alpha=alpha)(logits, target), expected, atol=1e-6)


def test_focal_downweights_easy_examples() -> None:
    """Relative to CE, gamma > 0 gives a smaller share of the loss to the easy (high p_t) example."""
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.2, 0.0, 0.0]])  # first is easy, second hard
    target = torch.tensor([0, 0])
    ce = F.cross_entropy(logits, target, reduction="none")
    fl = clf.FocalLoss(gamma=2, reduction="none")(logits, target)
    assert (fl <= ce).all()
    assert fl[0] / fl.sum() < ce[0] / ce.sum()


def test_focal_gradients_flow_and_are_finite() -> None:
    """Gradients reach the logits and stay finite, even for a saturated (p_t == 1) example."""
    logits, target = batch()
    logits = torch.cat([logits, torch.tensor([[200.0, 0, 0, 0, 0]])]).requires_grad_()
    target = torch.cat([target, torch.tensor([0])])
    for gamma in (0.5, 2.0):
        logits.grad = None
        clf.FocalLoss(gamma=gamma)(logits, target).backward()
        assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_alpha_weights_scale_each_class() -> None:
    """alpha_t multiplies each example's loss by its class weight."""
    logits, target = batch()
    alpha = torch.arange(1.0, 6.0)
    plain = clf.FocalLoss(gamma=2, reduction="none")(logits, target)
    weighted = clf.FocalLoss(gamma=2, alpha=alpha, reduction="none")(logits, target)
    assert torch.allclose(weighted, plain * alpha[target])
    assert not torch.allclose(weighted.mean(), plain.mean())


def test_alpha_with_wrong_class_count_raises() -> None:
    """An alpha vector that does not match the number of classes is refused."""
    logits, target = batch()
    with pytest.raises(ValueError, match="alpha has 3 weights"):
        clf.FocalLoss(alpha=torch.ones(3))(logits, target)


def test_make_loss_by_name() -> None:
    """make_loss returns the focal loss or cross-entropy, and raises on an unknown name."""
    focal = clf.make_loss("focal", gamma=1.5)
    assert isinstance(focal, clf.FocalLoss) and focal.gamma == 1.5
    assert isinstance(clf.make_loss("ce"), torch.nn.CrossEntropyLoss)
    with pytest.raises(ValueError, match="unknown loss"):
        clf.make_loss("hinge")


@pytest.mark.parametrize("arch", sorted(clf.ARCHITECTURES))
def test_build_classifier_heads(arch: str) -> None:
    """Each architecture gets a num_classes head and runs at 64 px."""
    model = clf.build_classifier(arch=arch, num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, 64, 64)).shape == (2, 5)


def test_unknown_architecture_raises() -> None:
    """An architecture not in ARCHITECTURES raises with the allowed names."""
    with pytest.raises(ValueError, match="resnet18"):
        clf.build_classifier(arch="vgg16", num_classes=5)


def test_pretrained_backbone_loaded_from_local_file(tmp_path: Path) -> None:
    """A local ImageNet-style file fills the backbone and the fc head is replaced."""
    torch.manual_seed(1)
    imagenet = resnet18(weights=None)
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in imagenet.state_dict().items()}, str(path))
    model = clf.build_classifier(arch="resnet18", num_classes=4, pretrained_file=path)
    assert torch.equal(model.conv1.weight, imagenet.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_var, imagenet.layer4[1].bn2.running_var)
    assert model.fc.out_features == 4


def test_pretrained_file_for_other_arch_is_refused(tmp_path: Path) -> None:
    """Weights for a different architecture raise PretrainedWeightsError."""
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in resnet18(weights=None).state_dict().items()}, str(path))
    with pytest.raises(clf.PretrainedWeightsError, match="resnet34"):
        clf.build_classifier(arch="resnet34", num_classes=4, pretrained_file=path)


def test_pickle_pretrained_file_is_refused_unread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A .pth (pickle) file is refused with the conversion command; torch.load is never called."""
    path = tmp_path / "resnet18.pth"
    torch.save(resnet18(weights=None).state_dict(), path)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load must not be called"))
    with pytest.raises(clf.PretrainedWeightsError, match="never reads pickle"):
        clf.build_classifier(arch="resnet18", num_classes=4, pretrained_file=path)


def test_missing_pretrained_file_is_refused(tmp_path: Path) -> None:
    """A missing weights file raises PretrainedWeightsError saying what to pass instead."""
    with pytest.raises(clf.PretrainedWeightsError, match="does not exist"):
        clf.build_classifier(arch="resnet18", num_classes=4, pretrained_file=tmp_path / "nope.pth")
