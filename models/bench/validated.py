"""``bench accuracy --reviews N``: a site's validation simulated on the target lab, by the service's own rule.

The target lab is a new site. Its cells arrive slide by slide (slides in a seeded order, a slide's cells
together, ``models.imaging.data.slide_of``; a file without a slide name is a slide of its own); its first
``POOL_FACTOR x N`` cells form the pool, and ``models.validation.select_validation_sample`` picks the N
cells a hematologist would review from every candidate recipe's predictions there (the day-0 recipe's
first). Their true labels are the reviews: ``score_recipes`` and ``choose_recipe`` pick the recipe, which
is then scored on the other cells only, leaving out every cell of a slide that had a reviewed cell (Chula
photographs one cell several times as the slide is swept, so a twin of a reviewed cell is not scored).

The candidates are the bench's label-free rows that saw no scored cell's label: every row but the
``_inductive`` ones (another protocol on the same images). The ``validated`` row holds the usual eval keys
on the scored cells, and ``recipe`` (the chosen row), ``reviews``, ``scored_cells``, ``review_score``
(its score on the reviewed cells with the bootstrap interval), ``candidates`` (every recipe's) and
``day0`` (the day-0 recipe on the same scored cells, for comparison).
"""

from __future__ import annotations

import random
from typing import Any

from torch import Tensor

from stainbridge.models.bench import learned
from stainbridge.models.imaging.data import slide_of
from stainbridge.models.validation import choose_recipe, pool_size, score_recipes, select_validation_sample

__all__ = ["DAY0_ROWS", "ValidationBenchError", "arrival_order", "validated_rows"]

# The day-0 recipe, the first of these the run has: what a new site is served before any review.
DAY0_ROWS = ("reinhard_im_tta", "colour_map_im_tta", "reinhard_tta", "raw_tta")


class ValidationBenchError(ValueError):
    """The run cannot simulate a validation with these options (too few cells, no day-0 row)."""


def _slide(path: str) -> str:
    """A cell's slide (``slide_of``'s token), else the file itself: LISC names its crops 0.png, 1.png ... in
    every class folder, and those are different cells."""
    group = slide_of(path)
    return group if group.startswith("slide-") else path


def arrival_order(paths: list[str], seed: int) -> list[int]:
    """Indices of the target cells in the order a site sends them: slides in a seeded order, each slide's
    cells together (in a seeded order too)."""
    rng = random.Random(seed + 7919)
    slides: dict[str, list[int]] = {}
    for i, path in enumerate(paths):
        slides.setdefault(_slide(path), []).append(i)
    names = sorted(slides)
    rng.shuffle(names)
    order = []
    for name in names:
        cells = list(slides[name])
        rng.shuffle(cells)
        order += cells
    return order


def validated_rows(outputs: dict[str, tuple[Tensor, Tensor]], labels: Tensor, classes: list[str], paths: list[str],
                   *, reviews: int, seed: int) -> dict[str, dict[str, Any]]:
    """{"validated": row}: N cells reviewed by the service's rule, the recipe chosen on them, scored on the rest."""
    candidates = {name: probs for name, (probs, _) in outputs.items() if "inductive" not in name}
    day0 = next((name for name in DAY0_ROWS if name in candidates), None)
    if day0 is None:
        raise ValidationBenchError(f"--reviews needs a day-0 row ({', '.join(DAY0_ROWS)}); this run has "
                                   f"{', '.join(candidates)}")
    pool = arrival_order(paths, seed)[:pool_size(reviews)]
    if len(pool) <= reviews:
        raise ValidationBenchError(f"--reviews {reviews} leaves no cell to score: the target has {len(paths)} cells")
    names = [day0, *(name for name in candidates if name != day0)]
    votes = [candidates[name][pool].argmax(1).tolist() for name in names]
    picks = select_validation_sample(votes, reviews, confidence=candidates[day0][pool].max(1).values.tolist())
    reviewed = [pool[i] for i in picks]
    truth = labels[reviewed].tolist()
    scores = score_recipes(truth, {name: candidates[name][reviewed].argmax(1).tolist() for name in names}, seed=seed)
    best = choose_recipe(scores)
    seen = {_slide(paths[i]) for i in reviewed}
    scored = [i for i in range(len(paths)) if _slide(paths[i]) not in seen]
    if not scored:
        raise ValidationBenchError(f"every slide of the target had a reviewed cell; --reviews {reviews} is too many")
    row = learned.metrics_of(candidates[best.recipe][scored], labels[scored], classes)
    baseline = learned.metrics_of(candidates[day0][scored], labels[scored], classes)
    row.update(recipe=best.recipe, reviews=len(reviewed), scored_cells=len(scored), review_score=best.as_dict(),
               candidates={s.recipe: s.as_dict() for s in scores},
               day0={"recipe": day0, **{k: baseline[k] for k in ("balanced_accuracy_min10", "balanced_accuracy",
                                                                 "accuracy")}})
    return {"validated": row}
