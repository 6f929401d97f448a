"""Keeping a cell's identity through stain translation.

A plain CycleGAN recolours another lab's cells convincingly but invents chromatin texture, and a
reference classifier then calls lymphocytes something else (our BCCD probe: lymphocyte recall
0.03-0.09). Two terms, added to the generator objective through ``models.training.gan.SemanticTerm``:

- class preservation (:class:`ClassConsistency`): a frozen reference-lab classifier must give G(x)
  the class distribution it gives a colour-only (Reinhard) version of x (or, with the "raw" teacher,
  its 8-view prediction on x itself);
- structure: the luminance gradients of G(x) must follow those of x (each normalized by its mean
  magnitude, so contrast may change but edges may not move or appear), which forbids invented
  texture while leaving colour free.

Both are applied to (x, G(x)) and to (y, G(F(y))), the pairs of ``SemanticTerm.pairs``.
A third tool, :func:`translated_reference_batches`, turns labeled reference images into the
standardizer's output distribution (G(F(y)) with y's label), so the classifier can be fine-tuned on
exactly what it will see after standardization.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stainbridge.models import abstention, checkpoint, classifier
from stainbridge.models.colour_generator import dihedral_views
from stainbridge.models.imaging import classical, stain_augment

__all__ = ["TEACHERS", "ClassConsistency", "MixedBatches", "StructureAndClass", "TeacherError", "luminance_gradients",
           "structure_loss", "translate"]


def luminance_gradients(x: Tensor) -> tuple[Tensor, Tensor]:
    """Vertical and horizontal finite differences of the luminance of x [N,3,H,W]."""
    y = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    return y[..., 1:, :] - y[..., :-1, :], y[..., :, 1:] - y[..., :, :-1]


def structure_loss(real: Tensor, translated: Tensor) -> Tensor:
    """Mean L1 distance between magnitude-normalized luminance gradients (any value range)."""
    total = real.new_zeros(())
    for a, b in zip(luminance_gradients(real), luminance_gradients(translated), strict=True):
        a = a / (a.abs().mean((1, 2, 3), keepdim=True) + 1e-4)
        b = b / (b.abs().mean((1, 2, 3), keepdim=True) + 1e-4)
        total = total + (a - b).abs().mean()
    return total


class TeacherError(ValueError):
    """The checkpoint given as the frozen teacher classifier cannot serve as one."""


TEACHERS = ("reinhard", "raw")


class ClassConsistency:
    """KL(teacher(real) || p(translated)) under a frozen reference-lab classifier; images in [-1, 1].

    teacher "reinhard": p(anchor(real)), ``anchor`` a colour-only normalization to the reference
    stain (``classical.Reinhard``), applied to (x, G(x)) and (y, G(F(y))). teacher "raw": the mean
    softmax over the 8 dihedral views of the untranslated source, on (x, G(x)) only.
    Gradients flow into ``translated`` only.
    """

    def __init__(self, model: nn.Module, normalization: dict[str, list[float]], *, teacher: str = "reinhard",
                 anchor: Callable[[Tensor], Tensor] | None = None, input_size: int | None = None,
                 name: str = "", sha256: str | None = None) -> None:
        if teacher not in TEACHERS:
            raise TeacherError(f"unknown semantic teacher {teacher!r}; choose one of {', '.join(TEACHERS)}")
        if teacher == "reinhard" and anchor is None:
            raise TeacherError("the reinhard teacher needs the reference stain statistics (anchor)")
        self.model = model.eval().requires_grad_(False)
        device = next(model.parameters()).device
        self.mean = torch.tensor(normalization["mean"], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(normalization["std"], device=device).view(1, 3, 1, 1)
        self.teacher, self.anchor, self.size, self.name, self.sha256 = teacher, anchor, input_size, name, sha256
        self.pairs: tuple[str, ...] = ("x_to_y",) if teacher == "raw" else ("x_to_y", "y_cycle")

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: torch.device, *, teacher: str = "reinhard") -> ClassConsistency:
        """The teacher from a checkpoint written by `stainbridge train classifier` (its header carries the
        architecture, normalization, input size and the reference stain statistics)."""
        state, header = checkpoint.load_checkpoint(path)
        if header.get("kind") != "classifier":
            raise TeacherError(f"--semantic-classifier {path} is a {header.get('kind')!r} checkpoint, not a classifier")
        try:
            model = classifier.build_classifier(arch=header["architecture"], num_classes=len(header["classes"]))
            model.load_state_dict(abstention.network_state(state))
            anchor = classical.Reinhard.from_stats(header.get("reference_stain") or {}) if teacher == "reinhard" else None
            return cls(model.to(device), header["normalization"], teacher=teacher, anchor=anchor,
                       input_size=int(header["input_size"]), name=Path(path).name,
                       sha256=checkpoint.file_sha256(path))
        except (KeyError, TypeError, ValueError, RuntimeError, classical.BaselineError) as exc:
            raise TeacherError(f"--semantic-classifier {path} cannot serve as the frozen classifier ({exc}); "
                               "pass a checkpoint written by `stainbridge train classifier`") from exc

    def describe(self) -> dict[str, object]:
        """What a standardizer checkpoint records about the term (its weight is the caller's)."""
        loss = "kl(tta8(p(real)) || p(translated))" if self.teacher == "raw" else "kl(p(reinhard(real)) || p(translated))"
        return {"classifier": self.name, "sha256": self.sha256, "teacher": self.teacher, "loss": loss,
                "pairs": list(self.pairs)}

    def _logits(self, images01: Tensor) -> Tensor:
        if self.size and images01.shape[-1] != self.size:
            images01 = F.interpolate(images01, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.model((images01 - self.mean) / self.std).float()

    def target(self, real: Tensor) -> Tensor:
        """Teacher probabilities for real images in [-1, 1]."""
        images01 = (real.detach().float() + 1) / 2
        if self.teacher == "raw":
            return torch.stack([F.softmax(self._logits(v), dim=1) for v in dihedral_views(images01)]).mean(0)
        anchored = self.anchor(images01.cpu()).to(real.device)  # type: ignore[misc]
        return F.softmax(self._logits(anchored), dim=1)

    def __call__(self, real: Tensor, translated: Tensor) -> Tensor:
        with torch.no_grad():
            target = self.target(real)
        log_p = F.log_softmax(self._logits((translated.float() + 1) / 2), dim=1)
        return F.kl_div(log_p, target, reduction="batchmean")


class StructureAndClass:
    """``fn(real, translated)`` for ``models.training.gan.SemanticTerm``: class preservation (a callable
    such as ``ClassConsistency``, may be None) plus ``structure_weight`` times the structure loss."""

    def __init__(self, class_term: Callable[[Tensor, Tensor], Tensor] | None, *, structure_weight: float = 1.0,
                 class_weight: float = 1.0) -> None:
        if class_term is None and structure_weight <= 0:
            raise ValueError("StructureAndClass needs a class term or a positive structure weight")
        self.class_term, self.structure_weight, self.class_weight = class_term, structure_weight, class_weight

    def __call__(self, real: Tensor, translated: Tensor) -> Tensor:
        loss = real.new_zeros(()).float()
        if self.class_term is not None:
            loss = loss + self.class_weight * self.class_term(real, translated)
        if self.structure_weight > 0:
            loss = loss + self.structure_weight * structure_loss(real.float(), translated.float())
        return loss


@torch.no_grad()
def translate(generator: nn.Module, images01: Tensor, *, batch_size: int = 128) -> Tensor:
    """Run a [-1,1] generator over [0,1] images in batches; returns [0,1] images on the CPU."""
    generator.eval()
    device = next(generator.parameters()).device
    out = [(generator(images01[i:i + batch_size].to(device) * 2 - 1).float().cpu() + 1) / 2
           for i in range(0, len(images01), batch_size)]
    return torch.cat(out).clamp(0, 1)


class MixedBatches:
    """Fine-tuning batches, half translated reference images (e.g. G(F(y)), with y's labels, random
    dihedral turns and mild stain jitter) and half stain-augmented reference images, so that the
    classifier learns the standardizer's output without forgetting the reference lab."""

    def __init__(self, translated: Tensor, labels: Tensor, reference: stain_augment.AugmentedBatches, *,
                 jitter: float = 0.3, seed: int = 0) -> None:
        if len(translated) != len(labels):
            raise ValueError(f"{len(translated)} translated images but {len(labels)} labels")
        self.translated, self.labels, self.reference, self.jitter = translated, labels, reference, jitter
        self.g = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.reference)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        half = max(1, self.reference.batch_size // 2)
        for ref_x, ref_y in self.reference:
            idx = torch.randint(len(self.translated), (half,), generator=self.g)
            x = torch.rot90(self.translated[idx], int(torch.randint(4, (1,), generator=self.g)), (2, 3))
            if torch.rand(1, generator=self.g) < 0.5:
                x = x.flip(3)
            x = stain_augment.stain_augment(x, self.jitter, self.g)
            yield torch.cat([x, ref_x[:half]]), torch.cat([self.labels[idx], ref_y[:half]])
