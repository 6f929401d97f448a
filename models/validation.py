"""Site validation: which of a new site's first cells an expert reviews, and how recipes are judged on them.

One rule for the service (``stainbridge run`` chooses the sample, ``stainbridge sites validate`` scores
it) and the benchmark (``bench accuracy --reviews N`` simulates it), so that the bench measures what
a lab gets.

**The sample** (``select_validation_sample``): from the site's first ``POOL_FACTOR x N`` cells (in
arrival order), ``N`` cells spread over the predicted classes (each class that any candidate recipe
predicts adds one cell in turn, so that rare classes are reviewed too, and a class the day-0 recipe
never predicts at this site still is), and within each class the cells on which the recipes disagree
most first (they are the cells that tell the recipes apart; with equal disagreement the day-0
recipe's least confident first, then the earliest). The order of the picks is the review order: a
hematologist who stops early has still seen every predicted class.

**The scoring** (``score_recipes``): each recipe's balanced accuracy (mean recall over the classes
present among the reviewed cells) with a percentile bootstrap 95 % interval over the cells.
``choose_recipe`` takes the highest; a tie keeps the earlier recipe (the caller lists the day-0 or
current recipe first, so a recipe changes only on evidence).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["BOOTSTRAP_RESAMPLES", "CONFIDENCE_LEVEL", "POOL_FACTOR", "RecipeScore", "balanced_accuracy",
           "bootstrap_interval", "choose_recipe", "disagreement", "paired_difference_interval", "pool_size", "score_recipes",
           "select_validation_sample"]

POOL_FACTOR = 4  # the sample of N cells is chosen among the site's first POOL_FACTOR * N cells
BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE_LEVEL = 0.95


def pool_size(reviews: int) -> int:
    """How many of a site's first cells the validation sample of ``reviews`` cells is chosen from."""
    return POOL_FACTOR * reviews


def disagreement(recipe_labels: Sequence[Sequence[int]]) -> np.ndarray:
    """Per cell, how many recipes do not give the cell's most common label ([recipes, cells] -> [cells])."""
    labels = np.asarray(recipe_labels, dtype=np.int64)
    if labels.ndim != 2:
        raise ValueError("recipe_labels must be [recipes, cells]")
    if labels.shape[1] == 0:
        return np.zeros(0, dtype=np.int64)
    top = np.stack([(labels == k).sum(0) for k in np.unique(labels)]).max(0)
    return labels.shape[0] - top


def select_validation_sample(recipe_labels: Sequence[Sequence[int]], n: int, *,
                             confidence: Sequence[float] | None = None) -> list[int]:
    """Indices (into the pool, arrival order) of the ``n`` cells to review, in review order.

    ``recipe_labels``: every candidate recipe's class per pool cell ([recipes, cells]; the first is the
    site's current, day-0 recipe); ``confidence``: that recipe's top probability per cell (ties in
    disagreement go to the least confident). Every class that any recipe predicts takes its turn, in
    class order, adding the next cell not yet chosen among those predicted as that class: a class the
    day-0 recipe never predicts (a collapsed class at a new site) is still reviewed.
    """
    votes = np.asarray(recipe_labels, dtype=np.int64)
    if votes.ndim != 2:
        raise ValueError("recipe_labels must be [recipes, cells]")
    if n < 1:
        raise ValueError("a validation sample needs at least one cell")
    count = votes.shape[1]
    split = disagreement(votes)
    first = np.zeros(count) if confidence is None else np.asarray(confidence, dtype=np.float64)
    if len(first) != count:
        raise ValueError("confidence and recipe_labels cover different cells")
    # each class's queue: the cells some recipe calls that class, most disagreement, least confident, earliest first
    queues = {int(k): sorted(np.flatnonzero((votes == k).any(0)).tolist(), key=lambda i: (-split[i], first[i], i))
              for k in np.unique(votes)}
    picks: list[int] = []
    chosen: set[int] = set()
    while len(picks) < min(n, count):
        for k in sorted(queues):
            while queues[k] and queues[k][0] in chosen:
                queues[k].pop(0)
            if queues[k] and len(picks) < n:
                picks.append(queues[k].pop(0))
                chosen.add(picks[-1])
    return picks


def balanced_accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Mean recall over the classes present in ``y_true``."""
    truth, pred = np.asarray(y_true), np.asarray(y_pred)
    if len(truth) == 0:
        raise ValueError("balanced accuracy of no cells")
    return float(np.mean([np.mean(pred[truth == k] == k) for k in np.unique(truth)]))


def _resampled_balanced_accuracy(truth: np.ndarray, correct: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """Balanced accuracy of each resample (a row of ``draws``: cell indices); each resample averages recall
    over the classes it contains."""
    t, c = truth[draws], correct[draws]
    hits, support = [], []
    for k in np.unique(truth):
        member = t == k
        support.append(member.sum(1))
        hits.append((member & c).sum(1))
    support_a, hits_a = np.stack(support), np.stack(hits)
    present = support_a > 0
    recall = np.where(present, hits_a / np.maximum(support_a, 1), 0.0)
    return recall.sum(0) / present.sum(0)


def _draws(cells: int, resamples: int, seed: int) -> np.ndarray:
    if cells == 0:
        raise ValueError("bootstrap interval of no cells")
    return np.random.default_rng(seed).integers(0, cells, size=(resamples, cells))


def _percentiles(scores: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1.0 - level) / 2
    low, high = np.quantile(scores, [tail, 1.0 - tail])
    return float(low), float(high)


def bootstrap_interval(y_true: Sequence[int], y_pred: Sequence[int], *, resamples: int = BOOTSTRAP_RESAMPLES,
                       level: float = CONFIDENCE_LEVEL, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the balanced accuracy: the cells resampled with replacement
    ``resamples`` times (seeded); each resample averages recall over the classes it contains."""
    truth = np.asarray(y_true)
    draws = _draws(len(truth), resamples, seed)
    return _percentiles(_resampled_balanced_accuracy(truth, truth == np.asarray(y_pred), draws), level)


def paired_difference_interval(y_true: Sequence[int], candidate: Sequence[int], active: Sequence[int], *,
                               resamples: int = BOOTSTRAP_RESAMPLES, level: float = CONFIDENCE_LEVEL,
                               seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of balanced accuracy(candidate) - balanced accuracy(active) on the same
    cells: each resample scores both on the same cells, so what they share cancels (a paired comparison)."""
    truth = np.asarray(y_true)
    if not len(truth) == len(candidate) == len(active):
        raise ValueError("the two predictions and the truth cover different cells")
    draws = _draws(len(truth), resamples, seed)
    difference = (_resampled_balanced_accuracy(truth, truth == np.asarray(candidate), draws)
                  - _resampled_balanced_accuracy(truth, truth == np.asarray(active), draws))
    return _percentiles(difference, level)


@dataclass(frozen=True)
class RecipeScore:
    """One recipe on the reviewed cells."""

    recipe: str
    balanced_accuracy: float
    ci_low: float
    ci_high: float
    cells: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def score_recipes(y_true: Sequence[int], predictions: Mapping[str, Sequence[int]], *,
                  seed: int = 0) -> list[RecipeScore]:
    """Every recipe's balanced accuracy and bootstrap interval on the same reviewed cells (same resamples)."""
    scores = []
    for name, pred in predictions.items():
        if len(pred) != len(y_true):
            raise ValueError(f"recipe {name!r} has {len(pred)} predictions for {len(y_true)} reviewed cells")
        low, high = bootstrap_interval(y_true, pred, seed=seed)
        scores.append(RecipeScore(name, balanced_accuracy(y_true, pred), low, high, len(y_true)))
    return scores


def choose_recipe(scores: Sequence[RecipeScore]) -> RecipeScore:
    """The recipe with the highest balanced accuracy; on a tie the one listed first."""
    if not scores:
        raise ValueError("no recipe to choose from")
    return max(scores, key=lambda s: s.balanced_accuracy)  # max keeps the first of equal keys
