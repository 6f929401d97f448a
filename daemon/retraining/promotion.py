"""The promotion gate: a candidate serves only on labelled evidence from its site that it was not trained on.

A candidate (a standardizer in front of the active classifier, or a classifier behind the active
standardizer) is compared with what serves the site now on the site's **reviewed cells** (the latest
review of each image; the validation sample of ``sites`` and every later review), leaving out the
cells whose labels it was fine-tuned on (``trained_on``). Standardizers never see labels, so every
reviewed cell is evidence for them. Decisions:

1. fewer than ``[retraining] min_gate_reviews`` such cells: refused ("needs N reviewed cells, has M");
2. ``balanced_accuracy``: active and candidate classify the same cells; the paired bootstrap 95 %
   interval of balanced accuracy(candidate) - balanced accuracy(active) must lie above ``-margin``
   (non-inferiority shown, not merely not disproved);
3. ``validated_baseline``: the same comparison against the site's validated recipe (the versions
   ``sites validate`` chose), a fixed point: nightly steps of ``margin`` each cannot add up. An
   unvalidated site has no baseline, and the reason says so;
4. guards on recent unlabelled cells of the site, which can only refuse: ``predicted_classes`` (the
   candidate's predictions collapse into far fewer classes than the active version's, or than the
   reviewed cells hold while no better spread than the active version's) and
   ``changed_class`` (the candidate changes the class of many more recent cells than of the reviewed
   ones: the reviews do not cover what it changes). Both compare candidate with active, never with the
   unstandardized image: agreement with the raw image rewards a standardizer for doing nothing.

Why a bootstrap of balanced accuracy rather than an exact McNemar test: the sites issue chose recipes
on balanced accuracy (a classifier that calls every cell the commonest class keeps a high accuracy on
a skewed differential), the bootstrap gives the interval of the difference that a non-inferiority
margin needs (McNemar gives a p-value against "no difference" on plain accuracy), and it reuses the
interval ``models.validation`` computes for ``sites``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from PIL import Image as PILImage
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from stainbridge.daemon.config import Settings
from stainbridge.daemon.intake import decoding
from stainbridge.daemon.logs import get_logger
from stainbridge.daemon.retraining import runs
from stainbridge.daemon.store import (
    GateVerdict,
    ModelKind,
    ModelVersion,
    Site,
    SiteState,
    VersionState,
    utcnow,
)
from stainbridge.daemon.versions import registry
from stainbridge.models.inference import (
    Classifier,
    Standardizer,
    balanced_accuracy,
    paired_difference_interval,
    run_batch,
)

log = get_logger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".dcm"}
# Guards: the candidate's effective number of predicted classes (exp of the entropy of its class mix) below
# this share of the active version's (or of the reviewed cells' classes, when no better than the active) is a collapse; changing the class of this much larger a share of the
# recent cells than of the reviewed cells means the reviews do not cover what it does.
COLLAPSE_RATIO = 0.5
CHANGE_SLACK = 0.25

Side = tuple[Standardizer, Classifier]


class GateError(Exception):
    """The gate cannot run (no such version, no active version to compare with); the message says why."""


@dataclass
class Check:
    """One comparison: ``active`` and ``candidate`` scores on ``images`` cells, and for the labelled checks
    the 95 % interval of candidate - active (``ci_low``, ``ci_high``)."""

    name: str
    active: float
    candidate: float
    images: int
    ci_low: float | None = None
    ci_high: float | None = None
    passed: bool = True


@dataclass
class GateResult:
    passed: bool
    reason: str
    checks: list[Check] = field(default_factory=list)
    site_profile: dict[str, Any] | None = None  # {"active": ..., "candidate": ...} for standardizers
    awaiting_evidence: bool = False  # refused only for too few reviewed cells: the service shadows it meanwhile

    @property
    def verdict(self) -> GateVerdict:
        """What ``model_versions.gate_verdict`` records."""
        if self.passed:
            return GateVerdict.passed
        return GateVerdict.awaiting_evidence if self.awaiting_evidence else GateVerdict.refused

    def metrics(self) -> dict[str, Any]:
        out = {"passed": self.passed, "reason": self.reason, "verdict": self.verdict.value,
               "checks": {c.name: {k: v for k, v in asdict(c).items() if k != "name"} for c in self.checks}}
        if self.site_profile is not None:
            out["site_profile"] = self.site_profile
        return out

    def as_json(self) -> dict[str, Any]:
        """What `stainbridge models gate ID --json` prints."""
        keys = ("name", "active", "candidate", "images", "ci_low", "ci_high")
        return {"passed": self.passed, "reason": self.reason,
                "checks": [{k: getattr(c, k) for k in keys} for c in self.checks]}


def site_profiles(active: Standardizer, candidate: Standardizer) -> dict[str, Any]:
    """The site profile (magnification, colour model...) each standardizer's header carries, or None.
    Each is scored with its own: ``run_batch`` takes the geometry from the standardizer's profile."""
    return {"active": active.header.get("site_profile"), "candidate": candidate.header.get("site_profile")}


def in_reference_validation(path: Path) -> bool:
    """Whether a reference file is kept out of fine-tuning's reference mix (every fifth, by name hash)."""
    return int(hashlib.sha256(path.name.encode()).hexdigest(), 16) % 5 == 0


def reference_items(folder: Path, classes: Sequence[str], *, validation: bool) -> list[tuple[Path, str]]:
    """(file, class) of the reference folder's validation split, or (``validation=False``) of the rest."""
    items = []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir() and p.name in classes):
        for path in sorted(class_dir.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES and in_reference_validation(path) == validation:
                items.append((path, class_dir.name))
    return items


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


def _labels(settings: Settings, images: list[PILImage.Image], side: Side) -> list[str]:
    """The class of each image through (standardizer, classifier), on the service's path."""
    standardizer, classifier = side
    out: list[str] = []
    size = settings.models.batch_size
    for start in range(0, len(images), size):
        out += [r.label for r in run_batch(images[start:start + size], standardizer, classifier,
                                           scale=settings.site.scale, tta=settings.models.tta)]
    return out


def _effective_classes(labels: Sequence[str]) -> float:
    shares = [labels.count(k) / len(labels) for k in set(labels)]
    return math.exp(-sum(p * math.log(p) for p in shares))


def _compare(name: str, truth: list[str], candidate: list[str], other: list[str], margin: float) -> Check:
    index = {label: k for k, label in enumerate(sorted({*truth, *candidate, *other}))}
    t, c, o = ([index[x] for x in xs] for xs in (truth, candidate, other))
    low, high = paired_difference_interval(t, c, o)
    return Check(name, round(balanced_accuracy(t, o), 4), round(balanced_accuracy(t, c), 4), len(t),
                 round(low, 4), round(high, 4), passed=low > -margin)


def evaluate(settings: Settings, reviewed: Sequence[tuple[Path, str]], active: Side, candidate: Side, *,
             baseline: Side | None, baseline_note: str, recent: Sequence[Path]) -> GateResult:
    """The decision on loaded models: ``reviewed`` (file, label) cells not trained on; ``baseline`` the site's
    validated recipe (None: unvalidated, ``baseline_note`` says why); ``recent`` unlabelled cells for the guards."""
    cfg = settings.retraining
    if candidate[1].classes != active[1].classes:
        return GateResult(False, f"the candidate's classes {candidate[1].classes} differ from the active "
                                 f"classifier's {active[1].classes}")
    images, kept = load_images(settings, [p for p, _ in list(reviewed)[: cfg.max_gate_images]])
    if len(images) < cfg.min_gate_reviews:
        return GateResult(False, f"needs {cfg.min_gate_reviews} reviewed cells, has {len(images)} "
                                 "([retraining] min_gate_reviews; cells the candidate was trained on do not count): "
                                 "review the cells `stainbridge review export` lists and `stainbridge review import` them",
                          awaiting_evidence=True)
    truth = [reviewed[i][1] for i in kept]
    active_labels, candidate_labels = _labels(settings, images, active), _labels(settings, images, candidate)
    checks = [_compare("balanced_accuracy", truth, candidate_labels, active_labels, cfg.margin)]
    if baseline is not None:
        same = baseline[0] is active[0] and baseline[1] is active[1]
        baseline_labels = active_labels if same else _labels(settings, images, baseline)
        checks.append(_compare("validated_baseline", truth, candidate_labels, baseline_labels, cfg.margin))
    recent_images, _ = load_images(settings, list(recent)[: cfg.max_gate_images])
    if recent_images:
        a, c = _labels(settings, recent_images, active), _labels(settings, recent_images, candidate)
        a_classes, c_classes, reviewed_classes = _effective_classes(a), _effective_classes(c), _effective_classes(truth)
        # collapsed: far fewer classes than the active version predicts, or than the reviewed cells hold
        # without being any better spread than the active version (which may have collapsed already)
        collapsed = c_classes < COLLAPSE_RATIO * a_classes or (c_classes < COLLAPSE_RATIO * reviewed_classes
                                                               and c_classes <= a_classes)
        checks.append(Check("predicted_classes", round(a_classes, 4), round(c_classes, 4), len(a),
                            passed=not collapsed))
        on_reviewed = sum(x != y for x, y in zip(active_labels, candidate_labels)) / len(truth)
        on_recent = sum(x != y for x, y in zip(a, c)) / len(a)
        checks.append(Check("changed_class", round(on_reviewed, 4), round(on_recent, 4), len(a),
                            passed=on_recent <= on_reviewed + CHANGE_SLACK))
    return _decide(checks, cfg.margin, baseline_note)


def _decide(checks: list[Check], margin: float, baseline_note: str) -> GateResult:
    failed = []
    for check in checks:
        if check.passed:
            continue
        if check.name == "predicted_classes":
            failed.append(f"predictions collapse: {check.candidate:.2f} effective classes on {check.images} recent "
                          f"cells, the active version {check.active:.2f}")
        elif check.name == "changed_class":
            failed.append(f"it changes the class of {check.candidate:.0%} of {check.images} recent cells but of "
                          f"{check.active:.0%} of the reviewed cells: review more cells where it disagrees")
        else:
            than = "the active version" if check.name == "balanced_accuracy" else "the site's validated recipe"
            failed.append(f"not shown to be at most {margin} below {than}: balanced accuracy "
                          f"{check.candidate:.3f} vs {check.active:.3f} on {check.images} reviewed cells, "
                          f"difference 95 % interval [{check.ci_low:+.3f}, {check.ci_high:+.3f}]")
    if failed:
        return GateResult(False, "; ".join([*failed, baseline_note] if baseline_note else failed), checks)
    evidence = checks[0]
    reason = (f"balanced accuracy {evidence.candidate:.3f} vs active {evidence.active:.3f} on {evidence.images} "
              f"reviewed cells, difference 95 % interval [{evidence.ci_low:+.3f}, {evidence.ci_high:+.3f}] "
              f"above -{margin}")
    return GateResult(True, reason + ("; " + baseline_note if baseline_note else ""), checks)


def _baseline(session: Session, site: str, settings: Settings, active_versions: tuple[ModelVersion, ModelVersion],
              active: Side) -> tuple[Side | None, str]:
    """The site's validated recipe, loaded (the active models when they are it), and a note for the reason."""
    row = session.scalars(select(Site).where(Site.name == site)).one_or_none()
    if row is None or row.state is not SiteState.validated:
        return None, (f"site {site} is unvalidated: no validated baseline, compared with the active version only; "
                      f"validate it with `stainbridge sites validate {site}` once it has its reviews")
    note = (f"site {site}'s validated recipe scored {row.balanced_accuracy:.3f} [{row.ci_low:.3f}-{row.ci_high:.3f}] "
            f"on {row.validated_cells} cells when validated")
    ids = (row.standardizer_version_id, row.classifier_version_id)
    if ids == (active_versions[0].id, active_versions[1].id):
        return active, note
    s_version, c_version = session.get(ModelVersion, ids[0]), session.get(ModelVersion, ids[1])
    if s_version is None or c_version is None:
        raise GateError(f"site {site}'s validated recipe (versions {ids[0]}, {ids[1]}) is no longer registered; "
                        f"validate the site again with `stainbridge sites validate {site}`")
    try:
        classifier = registry.load_version(c_version, device=settings.models.device)
        return (registry.load_version(s_version, device=settings.models.device, classifier=classifier),
                classifier), note
    except (registry.RegistryError, OSError) as exc:
        raise GateError(f"site {site}'s validated recipe (versions {ids[0]}, {ids[1]}) does not load: {exc}; "
                        f"restore it or validate the site again with `stainbridge sites validate {site}`") from None


def record_verdict(version: ModelVersion, result: GateResult) -> None:
    """Keep the gate's verdict on a candidate (``gate_verdict``, ``metrics.gate``, the reason of a refusal): a candidate
    refused only for too few reviewed cells is shadowed by the service until a later verdict. The caller commits."""
    version.gate_verdict = result.verdict
    version.metrics = {**(version.metrics or {}), "gate": result.metrics()}
    if not result.passed:
        version.reason = result.reason


def record_verdict_of(sessions: sessionmaker, version_id: int, result: GateResult, site: str | None = None) -> bool:
    """`models gate`: record the verdict when ``version_id`` is still a candidate gated on its own site (``site``
    None or the version's); returns whether it did. Nothing is promoted."""
    with sessions.begin() as session:
        version = session.get(ModelVersion, version_id)
        if version is None or version.state is not VersionState.candidate or site not in (None, version.site):
            return False
        record_verdict(version, result)
    return True


def gate_version(settings: Settings, sessions: sessionmaker, version_id: int, *, site: str | None = None,
                 recent: Sequence[Path] | None = None, now: datetime | None = None) -> GateResult:
    """Run the gate on a registered version against the active versions of ``site`` (default: the version's
    own); ``recent``: unlabelled cells for the guards (default: the site's recent archived cells). Never promotes.
    Raises GateError when it cannot run."""
    device = settings.models.device
    with sessions() as session:
        version = session.get(ModelVersion, version_id)
        if version is None:
            raise GateError(f"no model version {version_id}; see `stainbridge models list`")
        site = site or version.site
        c_active = registry.active_version(session, ModelKind.classifier, site)
        s_active = registry.active_version(session, ModelKind.standardizer, site)
        if c_active is None or s_active is None:
            raise GateError(f"site {site!r} has no active classifier and standardizer to compare with; start the "
                            "service once or `stainbridge models promote ID`")
        if version.id in (c_active.id, s_active.id):
            raise GateError(f"version {version.id} is already the active {version.kind.value} of site {site}")
        classifier = registry.load_version(c_active, device=device)
        active: Side = (registry.load_version(s_active, device=device, classifier=classifier), classifier)
        if version.kind is ModelKind.classifier:
            candidate: Side = (active[0], registry.load_version(version, device=device))
        else:
            candidate = (registry.load_version(version, device=device, classifier=classifier), classifier)
        baseline, note = _baseline(session, site, settings, (s_active, c_active), active)
        excluded = runs.trained_on(session, version)
    reviewed = [(path, label) for sha, path, label, _ in runs.reviewed_images(sessions, site) if sha not in excluded]
    if recent is None:
        recent = [path for _, path in runs.recent_images(settings, sessions, now or utcnow(), site)]
    result = evaluate(settings, reviewed, active, candidate, baseline=baseline, baseline_note=note, recent=recent)
    if version.kind is ModelKind.standardizer:
        result.site_profile = site_profiles(active[0], candidate[0])
    log.info("gate_evaluated", version=version_id, site=site, passed=result.passed, reason=result.reason)
    return result
