"""The promotion gate: a candidate standardizer serves only if it is not worse than the active one.

Every check scores the active and the candidate standardizer with the active classifier, through
the one inference path (``run_batch``), on the same images; the candidate passes a check when it
is at most ``[retraining] margin`` worse. It must pass every check that has images:

- ``reviewed_accuracy``: accuracy on incoming images with an expert review (only when there are
  at least ``[retraining] min_reviews``): the one check with labels from the incoming hospital;
- ``reference_accuracy``: accuracy on the reference validation split (every fifth file of the
  ``[retraining] reference`` folder by name hash). A standardizer must leave reference-style
  images classifiable; a broken one (constant, inverted, noisy output) fails here;
- label-free checks on held-out recent images (never trained on):
  ``tta_agreement`` (share of images whose label equals the classifier's 8-view TTA prediction
  on the raw image), ``distribution_shift`` (total variation distance between the predicted
  class mix and the raw-TTA class mix; lower is better) and ``mean_confidence`` (the mean
  probability given to the raw-TTA label: a constant or black output can be very confident, but
  not in the labels the raw images support).

A candidate classifier (fine-tuned on reviews by the nightly job) is compared with the active one
behind the active standardizer (``evaluate_classifier``): ``reviewed_accuracy`` on the reviews held
out of its fine-tuning must not drop at all, ``reference_accuracy`` not by more than the margin.
The label-free checks do not apply: they measure a standardizer against the classifier's own
raw-image prediction, which a new classifier changes too.

What it cannot catch without labels: a candidate that moves images towards a plausible but wrong
class as consistently as the raw image does (agreement with the raw TTA prediction rewards
leaving the raw prediction alone, so the label-free checks bound harm, not prove gains), or a
drift of the hospital's class mix (the shift check compares with the raw images, not with truth).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image as PILImage

from stainbridge.daemon.config import Settings
from stainbridge.daemon.intake import decoding
from stainbridge.daemon.logs import get_logger
from stainbridge.models.inference import Classifier, Standardizer, load_standardizer, run_batch

log = get_logger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".dcm"}
# The 8 dihedral views of a square image (TTA), as PIL transpositions (None: the image itself).
DIHEDRAL = (None, PILImage.Transpose.ROTATE_90, PILImage.Transpose.ROTATE_180, PILImage.Transpose.ROTATE_270,
            PILImage.Transpose.FLIP_LEFT_RIGHT, PILImage.Transpose.FLIP_TOP_BOTTOM, PILImage.Transpose.TRANSPOSE,
            PILImage.Transpose.TRANSVERSE)


@dataclass
class Check:
    name: str
    active: float
    candidate: float
    images: int
    higher_is_better: bool = True
    passed: bool = True
    margin: float | None = None  # None: [retraining] margin


@dataclass
class GateResult:
    passed: bool
    reason: str
    checks: list[Check] = field(default_factory=list)
    site_profile: dict[str, Any] | None = None  # {"active": ..., "candidate": ...} for standardizers

    def metrics(self) -> dict[str, Any]:
        out = {"passed": self.passed, "reason": self.reason,
               "checks": {c.name: {k: v for k, v in asdict(c).items() if k != "name"} for c in self.checks}}
        if self.site_profile is not None:
            out["site_profile"] = self.site_profile
        return out


def site_profiles(active: Standardizer, candidate: Standardizer) -> dict[str, Any]:
    """The site profile (magnification, colour model...) each standardizer's header carries, or None.
    Each is scored with its own: ``run_batch`` takes the geometry from the standardizer's profile."""
    return {"active": active.header.get("site_profile"), "candidate": candidate.header.get("site_profile")}


def in_reference_validation(path: Path) -> bool:
    """Whether a reference file belongs to the gate's validation split (every fifth, by name hash)."""
    return int(hashlib.sha256(path.name.encode()).hexdigest(), 16) % 5 == 0


def reference_items(folder: Path, classes: Sequence[str], *, validation: bool) -> list[tuple[Path, str]]:
    """(file, class) of the reference folder's validation split, or (``validation=False``) of the rest."""
    items = []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir() and p.name in classes):
        for path in sorted(class_dir.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES and in_reference_validation(path) == validation:
                items.append((path, class_dir.name))
    return items


def reference_split(folder: Path, classes: Sequence[str], limit: int) -> list[tuple[Path, str]]:
    """The reference validation split: every fifth labeled file (by name hash), at most ``limit``."""
    items = reference_items(folder, classes, validation=True)
    step = max(1, len(items) // limit) if limit else 1
    return items[::step][:limit]


def load_images(settings: Settings, paths: Sequence[Path]) -> tuple[list[PILImage.Image], list[int]]:
    """Decode what can be decoded (as the service does); returns the images and their indices."""
    images, kept = [], []
    for i, path in enumerate(paths):
        try:
            decoded = decoding.decode_image(path, max_pixels=settings.watch.max_pixels,
                                          max_bytes=int(settings.watch.max_file_mb * 2**20),
                                          pseudonym_secret=settings.site.pseudonym_secret or "gate")
        except Exception as exc:  # noqa: BLE001 - an unreadable file only leaves the gate's sample
            log.warning("gate_image_skipped", path=str(path), error=str(exc))
            continue
        images.append(decoded.image)
        kept.append(i)
    return images, kept


def _probabilities(settings: Settings, images: list[PILImage.Image], standardizer: Standardizer,
                   classifier: Classifier, *, scale: str | None = None) -> list[list[float]]:
    out: list[list[float]] = []
    size = settings.models.batch_size
    for start in range(0, len(images), size):
        for result in run_batch(images[start:start + size], standardizer, classifier,
                                scale=scale or settings.site.scale, tta=settings.models.tta):
            out.append([result.probabilities[c] for c in classifier.classes])
    return out


def _argmax(p: list[float]) -> int:
    return max(range(len(p)), key=p.__getitem__)


def _accuracy(probs: list[list[float]], labels: list[int]) -> float:
    return sum(_argmax(p) == y for p, y in zip(probs, labels, strict=True)) / max(1, len(labels))


def _class_mix(labels: list[int], n: int) -> list[float]:
    return [labels.count(k) / max(1, len(labels)) for k in range(n)]


def _tta_raw(settings: Settings, images: list[PILImage.Image], classifier: Classifier) -> list[int]:
    """The classifier's mean prediction over 8 dihedral views of the raw (unstandardized) image."""
    none = load_standardizer("none")
    total: list[list[float]] | None = None
    for view in DIHEDRAL:
        viewed = images if view is None else [img.transpose(view) for img in images]
        probs = _probabilities(settings, viewed, none, classifier)
        total = probs if total is None else [[a + b for a, b in zip(t, p)] for t, p in zip(total, probs)]
    return [_argmax(p) for p in total or []]


def evaluate(settings: Settings, classifier: Classifier, active: Standardizer, candidate: Standardizer, *,
             held_out: Sequence[Path], reviewed: Sequence[tuple[Path, str]],
             reference: Path | None) -> GateResult:
    """Score active and candidate on every check that has images; pass only if none is worse by > margin."""
    cfg = settings.retraining
    checks: list[Check] = []
    index = {c: k for k, c in enumerate(classifier.classes)}

    pairs = [(active, classifier), (candidate, classifier)]
    if len(reviewed) >= cfg.min_reviews:
        _labeled(settings, checks, "reviewed_accuracy", list(reviewed)[: cfg.max_gate_images], pairs)
    if reference is not None and reference.is_dir():
        # reference images are at the reference's own magnification (1.0), not at the site profile's
        _labeled(settings, checks, "reference_accuracy",
                 reference_split(reference, classifier.classes, cfg.max_gate_images), pairs, scale="1.0")
    images, _ = load_images(settings, list(held_out)[: cfg.max_gate_images])
    if images:
        raw = _tta_raw(settings, images, classifier)
        raw_mix = _class_mix(raw, len(index))
        per: dict[str, list[float]] = {"tta_agreement": [], "distribution_shift": [], "mean_confidence": []}
        for standardizer in (active, candidate):
            probs = _probabilities(settings, images, standardizer, classifier)
            labels = [_argmax(p) for p in probs]
            per["tta_agreement"].append(sum(a == b for a, b in zip(labels, raw)) / len(raw))
            mix = _class_mix(labels, len(index))
            per["distribution_shift"].append(0.5 * sum(abs(a - b) for a, b in zip(mix, raw_mix)))
            per["mean_confidence"].append(sum(p[k] for p, k in zip(probs, raw)) / len(probs))
        for name, (a, c) in per.items():
            checks.append(Check(name, a, c, images=len(images), higher_is_better=name != "distribution_shift"))

    if not checks:
        return GateResult(False, "no images to compare on: configure [retraining] reference or wait for "
                                 "held-out recent images", checks, site_profiles(active, candidate))
    result = _decide(checks, cfg.margin)
    result.site_profile = site_profiles(active, candidate)
    return result


def evaluate_classifier(settings: Settings, standardizer: Standardizer, active: Classifier, candidate: Classifier, *,
                        reviewed: Sequence[tuple[Path, str]], reference: Path | None) -> GateResult:
    """A fine-tuned classifier against the active one, both behind ``standardizer``: on ``reviewed``
    (held out of its fine-tuning; no drop allowed) and the reference split (at most the margin)."""
    cfg = settings.retraining
    if candidate.classes != active.classes:
        return GateResult(False, f"the candidate's classes {candidate.classes} differ from the active "
                                 f"classifier's {active.classes}")
    checks: list[Check] = []
    pairs = [(standardizer, active), (standardizer, candidate)]
    _labeled(settings, checks, "reviewed_accuracy", list(reviewed)[: cfg.max_gate_images], pairs, margin=0.0)
    if not checks:
        return GateResult(False, "no held-out reviewed images to compare on: import more reviews "
                                 "(`stainbridge review import`)", checks)
    if reference is not None and reference.is_dir():
        _labeled(settings, checks, "reference_accuracy",
                 reference_split(reference, active.classes, cfg.max_gate_images), pairs, scale="1.0")
    return _decide(checks, cfg.margin)


def _labeled(settings: Settings, checks: list[Check], name: str, items: Sequence[tuple[Path, str]],
             pairs: Sequence[tuple[Standardizer, Classifier]], *, margin: float | None = None,
             scale: str | None = None) -> None:
    """Append the accuracy of (active, candidate) pairs on the labeled ``items`` (none: no check)."""
    index = {c: k for k, c in enumerate(pairs[0][1].classes)}
    items = [(p, label) for p, label in items if label in index]
    images, kept = load_images(settings, [p for p, _ in items])
    if not images:
        return
    labels = [index[items[i][1]] for i in kept]
    scores = [_accuracy(_probabilities(settings, images, s, c, scale=scale), labels) for s, c in pairs]
    checks.append(Check(name, *scores, images=len(images), margin=margin))


def _decide(checks: list[Check], margin: float) -> GateResult:
    """Passed when no check is worse than the active version by more than its margin."""
    failed = []
    for check in checks:
        check.active, check.candidate = round(check.active, 4), round(check.candidate, 4)
        allowed = margin if check.margin is None else check.margin
        worse = check.active - check.candidate if check.higher_is_better else check.candidate - check.active
        check.passed = worse <= allowed + 1e-9
        if not check.passed:
            failed.append(f"{check.name} {check.candidate:.3f} vs active {check.active:.3f} (margin {allowed})")
    if failed:
        return GateResult(False, "worse than the active version by more than the margin: " + "; ".join(failed),
                          checks)
    return GateResult(True, "not worse than the active version on " + ", ".join(c.name for c in checks), checks)
