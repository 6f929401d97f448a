"""The site-validation rule shared by the service and the bench (models.validation): the sample and the scoring."""

from __future__ import annotations

import numpy as np
import pytest

from stainbridge.models.validation import (
    POOL_FACTOR,
    RecipeScore,
    balanced_accuracy,
    bootstrap_interval,
    choose_recipe,
    disagreement,
    pool_size,
    score_recipes,
    select_validation_sample,
)


def test_disagreement_counts_the_recipes_outside_the_most_common_label() -> None:
    """Per cell: 0 when all recipes agree, recipes - largest group otherwise."""
    votes = [[0, 1, 2, 3], [0, 1, 1, 4], [0, 2, 1, 5]]
    assert disagreement(votes).tolist() == [0, 1, 1, 2]


def test_sample_takes_one_cell_per_predicted_class_in_turn() -> None:
    """A pool dominated by one class still gives every predicted class a cell among the first picks."""
    day0 = [0] * 20 + [1, 2, 3]
    picks = select_validation_sample([day0], 4)
    assert sorted(day0[i] for i in picks) == [0, 1, 2, 3]
    assert picks == [0, 20, 21, 22]  # class order; within a class the earliest (no disagreement, no confidence)


def test_sample_puts_the_disputed_cells_of_a_class_first() -> None:
    """Within a class the cells the recipes disagree on come first, then the least confident, then the earliest."""
    day0 = [0, 0, 0, 0]
    other = [0, 1, 0, 0]  # the recipes disagree on cell 1 only
    assert select_validation_sample([day0, day0], 2, confidence=[0.9, 0.9, 0.8, 0.3]) == [3, 2]
    assert select_validation_sample([day0, other], 1, confidence=[0.9, 0.9, 0.8, 0.3]) == [1]


def test_a_class_only_another_recipe_predicts_is_still_sampled() -> None:
    """A day-0 recipe that never predicts class 2 at this site does not keep that class out of review."""
    day0 = [0, 0, 1, 1, 0, 1]
    other = [0, 0, 1, 1, 2, 1]
    picks = select_validation_sample([day0, other], 3)
    assert 4 in picks


def test_sample_is_deterministic_and_never_longer_than_the_pool() -> None:
    """The same predictions give the same sample; asking for more cells than the pool holds returns all of them once."""
    rng = np.random.default_rng(0)
    votes = rng.integers(0, 5, size=(3, 60))
    confidence = rng.random(60)
    first = select_validation_sample(votes, 20, confidence=confidence)
    assert first == select_validation_sample(votes, 20, confidence=confidence)
    assert len(set(first)) == 20
    everything = select_validation_sample(votes, 100, confidence=confidence)
    assert sorted(everything) == list(range(60))


def test_pool_is_four_times_the_reviews() -> None:
    """The sample of N cells is chosen among the first POOL_FACTOR x N cells (service and bench alike)."""
    assert POOL_FACTOR == 4 and pool_size(50) == 200


def test_balanced_accuracy_averages_recall_over_the_classes_present() -> None:
    """A majority class right and a minority wrong is 0.5, whatever the proportions."""
    truth = [0] * 9 + [1]
    assert balanced_accuracy(truth, [0] * 10) == 0.5
    assert balanced_accuracy([2, 2, 3], [2, 2, 3]) == 1.0


def test_bootstrap_interval_brackets_the_estimate_and_narrows_with_more_cells() -> None:
    """The 95 % interval holds the point estimate, is reproducible by seed, and shrinks when the cells quadruple."""
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 5, 400)
    pred = np.where(rng.random(400) < 0.8, truth, (truth + 1) % 5)
    small = bootstrap_interval(truth[:50], pred[:50], seed=3)
    large = bootstrap_interval(truth, pred, seed=3)
    assert small[0] <= balanced_accuracy(truth[:50], pred[:50]) <= small[1]
    assert large[0] <= balanced_accuracy(truth, pred) <= large[1]
    assert large[1] - large[0] < (small[1] - small[0]) * 0.75
    assert small == bootstrap_interval(truth[:50], pred[:50], seed=3)


def test_bootstrap_interval_of_a_perfect_recipe_is_a_point() -> None:
    """Every resample of perfect predictions scores 1.0."""
    assert bootstrap_interval([0, 1, 2, 1], [0, 1, 2, 1]) == (1.0, 1.0)


def test_bootstrap_interval_covers_the_true_accuracy_about_95_percent_of_the_time() -> None:
    """Over many simulated review sets of 50 cells from a recipe whose balanced accuracy is 0.8, the interval
    contains 0.8 in roughly 95 % of them (percentile intervals run a little narrow at n = 50)."""
    rng = np.random.default_rng(2)
    covered = 0
    trials = 200
    for t in range(trials):
        truth = np.repeat(np.arange(5), 10)
        pred = np.where(rng.random(50) < 0.8, truth, (truth + 1 + rng.integers(0, 4, 50)) % 5)
        low, high = bootstrap_interval(truth, pred, resamples=500, seed=t)
        covered += low <= 0.8 <= high
    assert 0.88 <= covered / trials <= 0.99


def test_recipes_are_scored_on_the_same_cells_and_the_best_is_chosen() -> None:
    """score_recipes keeps the order given; choose_recipe takes the highest and, on a tie, the one listed first."""
    truth = [0, 1, 2, 0, 1, 2]
    scores = score_recipes(truth, {"day-0": [0, 0, 0, 0, 0, 0], "good": truth, "also good": truth})
    assert [s.recipe for s in scores] == ["day-0", "good", "also good"]
    assert scores[0].balanced_accuracy == pytest.approx(1 / 3) and scores[0].cells == 6
    assert choose_recipe(scores).recipe == "good"
    tie = [RecipeScore("current", 0.7, 0.5, 0.9, 10), RecipeScore("other", 0.7, 0.6, 0.8, 10)]
    assert choose_recipe(tie).recipe == "current"


def test_a_recipe_with_a_prediction_missing_is_refused() -> None:
    """Predictions for fewer cells than were reviewed are an error, not a silently shorter score."""
    with pytest.raises(ValueError, match="3 reviewed cells"):
        score_recipes([0, 1, 2], {"short": [0, 1]})
