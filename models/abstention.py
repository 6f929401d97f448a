"""Calibrated confidence and "not one of the five": when a cell goes to a person instead of a count.

Two scores, both fitted on the reference lab's own split (never on incoming labels):

- **Calibrated confidence**: temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural
  Networks", Sec. 4.2): one scalar T divides the logits, chosen to minimize the negative
  log-likelihood on the reference validation split. The predicted class never changes; a calibrated
  confidence of 0.7 means about 7 in 10 such cells are right on the reference lab. With test-time
  augmentation the service averages softmax(z_v / T) over the 8 views, so T is fitted for that
  average separately ("tta" mode next to "plain").
- **Out-of-distribution score**: the relative Mahalanobis distance of the classifier's penultimate
  features (Ren et al. 2021, "A Simple Fix to Mahalanobis Distance for Improving Near-OOD
  Detection", Eq. 3): the squared distance to the nearest class mean under one covariance shared by
  the classes (Lee et al. 2018, Eq. 2), minus the distance to the mean of all training cells under
  their own covariance, both fitted on the reference training split (Ledoit-Wolf shrinkage). With the
  8 views the features are averaged first. Its threshold is the score that ``ood_val_rate`` of the
  validation cells exceed. Chosen by measurement (``stainbridge bench abstain``, docs/lab.md): on
  PBC's own cells of other types it separated best among max softmax, energy, the plain Mahalanobis
  distance (per stage of the network too) and the k-nearest-neighbour distance.

A cell ``needs_review`` when its OOD score is above the threshold (reason ``not_a_known_class``,
checked first) or its calibrated confidence is below ``confidence_below`` (``low_confidence``).

The checkpoint carries all of it: ``header["abstention"]`` (temperatures, thresholds, ECE before and
after, what it was fitted on) and the tensors ``abstention.class_means``, ``abstention.precision``,
``abstention.background_mean`` and ``abstention.background_precision`` next to the network's weights (safetensors, never pickle). A checkpoint without them keeps working:
temperature 1, no OOD score, ``calibrated: false`` in the record.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "CONFIDENCE_BELOW",
    "MODES",
    "OOD_VAL_RATE",
    "REASONS",
    "TENSOR_PREFIX",
    "Abstention",
    "AbstentionError",
    "FeatureDensity",
    "Scores",
    "calibration_error",
    "expected_calibration_error",
    "fit_abstention",
    "fit_temperature",
    "network_state",
    "tempered_probabilities",
]

TENSOR_PREFIX = "abstention."
MODES = ("plain", "tta")  # one fit per way the service scores a cell ([models] tta)
REASONS = ("not_a_known_class", "low_confidence")  # in the order they are checked
# Calibrated: below it the classifier expects to be wrong on more than 3 cells in 10. With the OOD rate, what kept
# the reference's own test cells flagged at <= 0.05 in `bench abstain` (docs/lab.md) with both [models] tta modes.
CONFIDENCE_BELOW = 0.7
OOD_VAL_RATE = 0.02  # share of the reference validation cells above the OOD threshold
ECE_BINS = 15
_LOG_T_RANGE = (math.log(0.05), math.log(20.0))


class AbstentionError(ValueError):
    """The data cannot fit the scores (too few cells, a class without training cells...)."""


# --------------------------------------------------------------------------- calibration


def tempered_probabilities(view_logits: Tensor, temperature: float) -> Tensor:
    """mean over views of softmax(logits / T): [V,N,C] (or [N,C]) -> [N,C] float64."""
    z = view_logits.double()
    if z.ndim == 2:
        z = z.unsqueeze(0)
    return torch.softmax(z / temperature, dim=2).mean(0)


def _nll(view_logits: Tensor, labels: Tensor, temperature: float) -> float:
    p = tempered_probabilities(view_logits, temperature).gather(1, labels.view(-1, 1)).squeeze(1)
    return float(-torch.log(p.clamp_min(1e-12)).mean())


def fit_temperature(view_logits: Tensor, labels: Tensor, *, iterations: int = 60) -> float:
    """The T in [0.05, 20] minimizing the validation NLL of mean_v softmax(z_v / T) (golden-section
    search on log T; the NLL is unimodal in log T for one view and in practice for the 8-view mean)."""
    if labels.numel() == 0:
        raise AbstentionError("temperature scaling needs at least one labeled validation cell")
    a, b = _LOG_T_RANGE
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = _nll(view_logits, labels, math.exp(c)), _nll(view_logits, labels, math.exp(d))
    for _ in range(iterations):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = _nll(view_logits, labels, math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = _nll(view_logits, labels, math.exp(d))
    return math.exp((a + b) / 2)


def expected_calibration_error(probabilities: Tensor, labels: Tensor, *, bins: int = ECE_BINS) -> float:
    """ECE (Guo et al. 2017, Eq. 3): over equal-width bins of the top probability, the cell-weighted mean
    of |accuracy - mean confidence|."""
    confidence, predicted = probabilities.double().max(1)
    return calibration_error(confidence, predicted == labels, bins=bins)


def calibration_error(confidence: Tensor, correct: Tensor, *, bins: int = ECE_BINS) -> float:
    """The ECE of answers given with ``confidence`` [N] that were ``correct`` [N] (bool)."""
    if correct.numel() == 0:
        raise AbstentionError("the expected calibration error needs at least one labeled cell")
    confidence, correct = confidence.double(), correct.double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    index = torch.bucketize(confidence, edges[1:-1], right=True)  # bin b holds (edge b, edge b+1]
    total = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            total += float(members.sum()) * abs(float(correct[members].mean() - confidence[members].mean()))
    return total / correct.numel()


# --------------------------------------------------------------------------- out-of-distribution


def ledoit_wolf(centred: Tensor) -> Tensor:
    """The covariance of centred rows [N,D] shrunk towards mu * I (Ledoit & Wolf 2004, "A well-conditioned
    estimator for large-dimensional covariance matrices", Lemma 3.2-3.4 with their sample estimates)."""
    n, d = centred.shape
    sample = centred.T @ centred / n
    mu = float(sample.diagonal().mean())
    target_distance = float(((sample - mu * torch.eye(d, dtype=sample.dtype)) ** 2).sum()) / d
    # mean over rows of ||x x^T - S||_F^2 = |x|^4 - 2 x^T S x + ||S||_F^2, scaled as in the paper
    norms = (centred ** 2).sum(1)
    spread = float((norms ** 2 - 2 * ((centred @ sample) * centred).sum(1) + (sample ** 2).sum()).sum()) / (n * n * d)
    shrinkage = 1.0 if target_distance <= 0 else min(spread, target_distance) / target_distance
    return shrinkage * mu * torch.eye(d, dtype=sample.dtype) + (1 - shrinkage) * sample


@dataclass(frozen=True)
class FeatureDensity:
    """Penultimate features of the reference training cells: class means [C,D] with the inverse of their shared
    covariance [D,D], and the mean [D] and inverse covariance of all of them (the "background")."""

    class_means: Tensor
    precision: Tensor
    background_mean: Tensor
    background_precision: Tensor

    TENSORS = ("class_means", "precision", "background_mean", "background_precision")

    @classmethod
    def fit(cls, features: Tensor, labels: Tensor, num_classes: int) -> FeatureDensity:
        """Means per class and the pooled within-class covariance, and the mean and covariance of all cells, each
        shrunk towards a multiple of the identity by the Ledoit-Wolf (2004) amount, so that they invert even with
        fewer cells than feature dimensions."""
        x = features.double()
        counts = torch.bincount(labels, minlength=num_classes)
        if int(counts.min()) < 2:
            missing = [k for k in range(num_classes) if counts[k] < 2]
            raise AbstentionError(f"classes {missing} have fewer than 2 training cells: no class mean to measure against")
        means = torch.stack([x[labels == k].mean(0) for k in range(num_classes)])
        background = x.mean(0)
        return cls(class_means=means.float(), precision=torch.linalg.inv(ledoit_wolf(x - means[labels])).float(),
                   background_mean=background.float(),
                   background_precision=torch.linalg.inv(ledoit_wolf(x - background)).float())

    def class_distance(self, features: Tensor) -> Tensor:
        """[N] squared Mahalanobis distance to the nearest class mean (Lee et al. 2018)."""
        diff = features.double().unsqueeze(1) - self.class_means.double().unsqueeze(0)  # [N,C,D]
        return torch.einsum("ncd,de,nce->nc", diff, self.precision.double(), diff).min(1).values

    def score(self, features: Tensor) -> Tensor:
        """[N] relative Mahalanobis distance (Ren et al. 2021): nearest class minus background; higher is less
        like any of the classes."""
        diff = features.double() - self.background_mean.double()
        return self.class_distance(features) - torch.einsum("nd,de,ne->n", diff, self.background_precision.double(), diff)

    def tensors(self) -> dict[str, Tensor]:
        return {f"{TENSOR_PREFIX}{name}": getattr(self, name) for name in self.TENSORS}


# --------------------------------------------------------------------------- the decision


@dataclass(frozen=True)
class Scores:
    """One micro-batch's scores: raw softmax (the label and ``confidence``), calibrated softmax, and the
    OOD score (None when the classifier carries no feature statistics)."""

    probabilities: Tensor  # [N,C] float32
    calibrated: Tensor  # [N,C] float32
    ood: Tensor | None  # [N] float32


@dataclass(frozen=True)
class Abstention:
    """What a classifier checkpoint says about flagging its cells (see the module docstring)."""

    temperatures: dict[str, float] = field(default_factory=lambda: {m: 1.0 for m in MODES})
    ood_thresholds: dict[str, float] = field(default_factory=dict)
    density: FeatureDensity | None = None
    confidence_below: float = CONFIDENCE_BELOW
    record: dict[str, Any] = field(default_factory=dict)  # the header entry, as written

    @property
    def calibrated(self) -> bool:
        return bool(self.record)

    @classmethod
    def from_checkpoint(cls, header: dict[str, Any], tensors: dict[str, Tensor], where: str = "") -> Abstention:
        """From ``header["abstention"]`` and the ``abstention.*`` tensors; an uncalibrated default when the
        header has no entry (checkpoints from before calibration). A half-present entry is an error."""
        entry = header.get("abstention")
        if not entry:
            return cls()
        try:
            modes = entry["modes"]
            temperatures = {m: float(modes[m]["temperature"]) for m in MODES}
            thresholds = {m: float(modes[m]["ood_threshold"]) for m in MODES if modes[m].get("ood_threshold") is not None}
            confidence_below = float(entry["confidence_below"])
        except (KeyError, TypeError, ValueError) as exc:
            raise AbstentionError(f"{where}: header 'abstention' is incomplete ({exc!r}); "
                                  "write it again with `stainbridge train calibrate`") from None
        density = None
        if thresholds:
            names = {name: f"{TENSOR_PREFIX}{name}" for name in FeatureDensity.TENSORS}
            if not all(n in tensors for n in names.values()):
                raise AbstentionError(f"{where}: the header has OOD thresholds but the tensors {list(names.values())} "
                                      "are missing; write it again with `stainbridge train calibrate`")
            density = FeatureDensity(**{name: tensors[key].float() for name, key in names.items()})
        if not all(t > 0 for t in temperatures.values()):
            raise AbstentionError(f"{where}: temperatures must be positive, got {temperatures}")
        return cls(temperatures=temperatures, ood_thresholds=thresholds, density=density,
                   confidence_below=confidence_below, record=dict(entry))

    def scores(self, view_logits: Tensor, view_features: Tensor, *, tta: bool) -> Scores:
        """[V,N,C] logits and [V,N,D] features of the same cells (V = 1, or the 8 views) -> Scores."""
        mode = "tta" if tta else "plain"
        probabilities = tempered_probabilities(view_logits, 1.0).float()
        calibrated = tempered_probabilities(view_logits, self.temperatures[mode]).float()
        ood = None
        if self.density is not None and mode in self.ood_thresholds:
            ood = self.density.score(view_features.double().mean(0)).float()
        return Scores(probabilities=probabilities, calibrated=calibrated, ood=ood)

    def reasons(self, scores: Scores, *, tta: bool) -> list[str | None]:
        """Per cell: "not_a_known_class", "low_confidence" or None (counted as a normal answer)."""
        top = scores.probabilities.argmax(1)
        confidence = scores.calibrated.gather(1, top.view(-1, 1)).squeeze(1)
        threshold = self.ood_thresholds.get("tta" if tta else "plain")
        out: list[str | None] = []
        for i in range(len(top)):
            if scores.ood is not None and threshold is not None and float(scores.ood[i]) > threshold:
                out.append("not_a_known_class")
            elif float(confidence[i]) < self.confidence_below:
                out.append("low_confidence")
            else:
                out.append(None)
        return out

    def describe(self) -> str:
        """A short line for logs: the temperatures, or that there are none."""
        if not self.calibrated:
            return "uncalibrated (temperature 1, no OOD score; run `stainbridge train calibrate`)"
        t = ", ".join(f"{m} T={self.temperatures[m]:.2f}" for m in MODES)
        return f"{t}; OOD {'on' if self.density is not None else 'off'}; confidence below {self.confidence_below}"


def network_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A classifier checkpoint's tensors without the abstention statistics: what the network loads."""
    return {k: v for k, v in state.items() if not k.startswith(TENSOR_PREFIX)}


# --------------------------------------------------------------------------- fitting


def _quantile(values: Tensor, q: float) -> float:
    return float(torch.quantile(values.double(), q))


def fit_abstention(*, train_features: Tensor, train_labels: Tensor, val_logits: dict[str, Tensor],
                   val_features: dict[str, Tensor], val_labels: Tensor, num_classes: int,
                   confidence_below: float = CONFIDENCE_BELOW, ood_val_rate: float = OOD_VAL_RATE,
                   fitted_on: dict[str, Any] | None = None) -> tuple[Abstention, dict[str, Tensor], dict[str, Any]]:
    """Fit temperatures and OOD thresholds per mode on the validation cells, the feature density on the
    training cells. ``val_logits[mode]`` is [V,N,C], ``val_features[mode]`` [V,N,D] (V = 1 for "plain",
    8 for "tta"). Returns (the Abstention, the tensors to store, the header entry)."""
    if not 0 < confidence_below < 1:
        raise AbstentionError(f"confidence_below must be between 0 and 1, got {confidence_below}")
    if not 0 < ood_val_rate < 1:
        raise AbstentionError(f"ood_val_rate must be between 0 and 1, got {ood_val_rate}")
    density = FeatureDensity.fit(train_features, train_labels, num_classes)
    modes: dict[str, dict[str, Any]] = {}
    for mode in MODES:
        logits, features = val_logits[mode], val_features[mode]
        temperature = fit_temperature(logits, val_labels)
        before, after = tempered_probabilities(logits, 1.0), tempered_probabilities(logits, temperature)
        val_ood = density.score(features.double().mean(0))
        threshold = _quantile(val_ood, 1 - ood_val_rate)
        entry = {"temperature": round(temperature, 6),
                 "ece_before": round(expected_calibration_error(before, val_labels), 6),
                 "ece_after": round(expected_calibration_error(after, val_labels), 6),
                 "ood_threshold": threshold}
        abstention = Abstention(temperatures={mode: temperature, **{m: 1.0 for m in MODES if m != mode}},
                                ood_thresholds={mode: threshold}, density=density, confidence_below=confidence_below)
        reasons = abstention.reasons(Scores(before.float(), after.float(), val_ood.float()), tta=mode == "tta")
        entry["val_flagged"] = {r: round(sum(x == r for x in reasons) / len(reasons), 6) for r in REASONS}
        modes[mode] = entry
    record = {
        "method": "temperature scaling (Guo et al. 2017) + relative Mahalanobis distance of the penultimate "
                  "features (nearest class, shared covariance, minus all cells; Ren et al. 2021)",
        "confidence_below": confidence_below,
        "ood_val_rate": ood_val_rate,
        "feature_dim": int(train_features.shape[1]),
        "fitted_on": {"train_cells": len(train_labels), "val_cells": len(val_labels), **(fitted_on or {})},
        "modes": modes,
    }
    fitted = Abstention.from_checkpoint({"abstention": record}, density.tensors())
    return fitted, density.tensors(), record
