"""The one inference path, shared by the service, `ingest`, `eval` and `bench accuracy`.

    images (PIL) -> prepare_batch (geometry: the site's magnification, [0,1] tensor)
                 -> classify_batch: Standardizer (stain -> reference style, [0,1])
                                    -> score_views: Classifier (header normalization, ResNet: logits and
                                       penultimate features; optionally all 8 dihedral views)
                                       -> Scores (``models.abstention``): softmax, calibrated softmax,
                                          out-of-distribution score
    run_batch = prepare_batch + classify_batch, with a BatchResult per image, including whether the
    cell needs a person's review and why (``needs_review``, ``review_reason``).

Geometry (``models.geometry``, re-exported here): every image is cut to the window of the
reference window's physical width, using the site magnification from the standardizer's site
profile (estimated without labels from red-cell diameters when it was trained) or ``[site] scale``.

The networks themselves (``Classifier``, ``Standardizer``) and their checkpoint loaders live in
``models.networks``, the site-validation rule (which cells to review, how recipes are scored) in
``models.validation``; everything the daemon needs is re-exported here, so this module is its whole
view of ``models/``. Everything runs in inference mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from stainbridge.models.abstention import REASONS as REVIEW_REASONS
from stainbridge.models.abstention import Abstention, Scores
from stainbridge.models.checkpoint import CheckpointError, ModelMismatch, file_sha256, fsync_dir
from stainbridge.models.geometry import SCALE_FROM_PROFILE, Geometry, resolve_geometry
from stainbridge.models.metrics import STAIN_REGIONS, stain_summary
from stainbridge.models.networks import (
    CLASSICAL_STANDARDIZERS,
    SITE_PROFILE_METHODS,
    Classifier,
    DeviceUnavailable,
    GeneratorFn,
    Standardizer,
    full_precision,
    load_classifier,
    load_standardizer,
    place_model,
    resolve_device,
    wrap_generator,
)
from stainbridge.models.validation import (
    RecipeScore,
    balanced_accuracy,
    choose_recipe,
    disagreement,
    paired_difference_interval,
    pool_size,
    score_recipes,
    select_validation_sample,
)

# The daemon's whole view of models/: everything it imports from the package is named here.
__all__ = [
    "CLASSICAL_STANDARDIZERS",
    "REVIEW_REASONS",
    "SCALE_FROM_PROFILE",
    "SITE_PROFILE_METHODS",
    "STAIN_REGIONS",
    "Abstention",
    "BatchResult",
    "CheckpointError",
    "Classifier",
    "DeviceUnavailable",
    "Geometry",
    "ModelMismatch",
    "RecipeScore",
    "Scores",
    "Standardizer",
    "balanced_accuracy",
    "choose_recipe",
    "classify_batch",
    "compile_networks",
    "disagreement",
    "file_sha256",
    "fsync_dir",
    "full_precision",
    "load_classifier",
    "load_standardizer",
    "paired_difference_interval",
    "place_model",
    "pool_size",
    "predict_views",
    "prepare_batch",
    "resolve_device",
    "resolve_geometry",
    "run_batch",
    "score_recipes",
    "score_views",
    "select_validation_sample",
    "stain_summary",
    "view_outputs",
    "wrap_generator",
]


def compile_networks(standardizer: Standardizer, classifier: Classifier, sample: Tensor) -> str:
    """``torch.compile`` the classifier and a generator standardizer, checked on ``sample`` (a
    prepared [N,3,S,S] batch); on any failure both stay eager. Returns "compiled" or
    "eager (<why>)" for the record."""
    fn = standardizer._fn
    eager = (classifier.network, fn.generator if isinstance(fn, GeneratorFn) else None)
    try:
        classifier.network = torch.compile(classifier.network)
        if isinstance(fn, GeneratorFn):
            fn.generator = torch.compile(fn.generator)
        classify_batch(sample, standardizer, classifier)
        return "compiled"
    except Exception as exc:  # noqa: BLE001 - any compiler failure means: run eager
        classifier.network = eager[0]
        if isinstance(fn, GeneratorFn):
            fn.generator = eager[1]
        return f"eager ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})"


# --------------------------------------------------------------------------- batches


@dataclass(frozen=True)
class BatchResult:
    """One image's outcome: top label, its probability, all probabilities, the image as classified, and
    how it was computed: ``tta`` (mean over the 8 turns and flips) and ``magnification`` (site pixels ->
    reference pixels of the window it was seen through; None for a classifier without a reference
    window, which sees the whole frame zoomed). Whether a person should look at it: the calibrated
    probability of the label (None for a checkpoint without calibration, whose flags then read the
    plain ``confidence``: temperature 1), the out-of-distribution score (None without feature
    statistics in the checkpoint), ``needs_review`` and its reason, one of ``REVIEW_REASONS``
    (``models.abstention``)."""

    label: str
    confidence: float
    probabilities: dict[str, float]
    standardized: Image.Image
    tta: bool
    magnification: float | None
    calibrated_confidence: float | None
    ood_score: float | None
    review_reason: str | None

    @property
    def needs_review(self) -> bool:
        return self.review_reason is not None


def _to_tensor(img: Image.Image) -> Tensor:
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def _to_images(batch: Tensor) -> list[Image.Image]:
    # Quantize on the batch's device, so only uint8 crosses back from a GPU.
    u8 = batch.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(arr) for arr in u8]


def prepare_batch(images: list[Image.Image], geometry: Geometry) -> Tensor:
    """Each image through ``geometry``, stacked as [N,3,size,size] in [0,1]."""
    if not images:
        raise ValueError("prepare_batch needs at least one image")
    return torch.stack([_to_tensor(geometry.apply(img)) for img in images])


def _dihedral(batch: Tensor) -> list[Tensor]:
    return [torch.rot90(batch, k, (2, 3)).flip(3) if flip else torch.rot90(batch, k, (2, 3))
            for k in range(4) for flip in (False, True)]


def view_outputs(classifier: Classifier, standardized: Tensor, *, tta: bool = False) -> tuple[Tensor, Tensor]:
    """(logits [V,N,C], penultimate features [V,N,D]) on the CPU; V = 8 with ``tta`` (the image itself
    first, then its turns and flips), else 1."""
    outputs = [classifier.logits_and_features(v) for v in (_dihedral(standardized) if tta else [standardized])]
    return torch.stack([o[0] for o in outputs]), torch.stack([o[1] for o in outputs])


def score_views(classifier: Classifier, standardized: Tensor, *, tta: bool = False) -> Scores:
    """The classifier's Scores (softmax, calibrated softmax, OOD score) on the CPU; with ``tta`` over the
    8 turns and flips (probabilities averaged, features averaged before the OOD score)."""
    logits, features = view_outputs(classifier, standardized, tta=tta)
    return classifier.abstention.scores(logits, features, tta=tta)


def predict_views(classifier: Classifier, standardized: Tensor, *, tta: bool = False) -> Tensor:
    """Softmax probabilities [N,C] on the CPU; with ``tta`` the mean over the 8 turns and flips."""
    return score_views(classifier, standardized, tta=tta).probabilities


def classify_batch(batch: Tensor, standardizer: Standardizer, classifier: Classifier, *,
                   tta: bool = False) -> tuple[Scores, Tensor]:
    """(Scores on the CPU, standardized batch) for a prepared [0,1] batch."""
    batch = batch.to(classifier.device, non_blocking=True)  # stays there through both networks
    standardized = standardizer(batch)
    return score_views(classifier, standardized, tta=tta), standardized


def run_batch(images: list[Image.Image], standardizer: Standardizer, classifier: Classifier, *,
              scale: str = SCALE_FROM_PROFILE, tta: bool = False) -> list[BatchResult]:
    """Geometry -> stain standardization -> classification (-> TTA), for one micro-batch."""
    geometry = resolve_geometry(classifier, standardizer, scale=scale)
    scores, standardized = classify_batch(prepare_batch(images, geometry), standardizer, classifier, tta=tta)
    reasons = classifier.abstention.reasons(scores, tta=tta)
    results = []
    for i, image in enumerate(_to_images(standardized)):
        p = scores.probabilities[i]
        top = int(torch.argmax(p))
        results.append(
            BatchResult(
                label=classifier.classes[top],
                confidence=float(p[top]),
                probabilities={c: float(v) for c, v in zip(classifier.classes, p.tolist())},
                standardized=image,
                tta=tta,
                magnification=geometry.magnification,
                calibrated_confidence=float(scores.calibrated[i, top]) if classifier.abstention.calibrated else None,
                ood_score=None if scores.ood is None else float(scores.ood[i]),
                review_reason=reasons[i],
            )
        )
    return results
