"""`bench accuracy --reviews N`: the site validation simulated by the service's own rule (models.bench.validated)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stainbridge.models.bench import accuracy as bench_accuracy
from stainbridge.models.bench.validated import ValidationBenchError, arrival_order, validated_rows
from stainbridge.models.imaging import synthetic
from stainbridge.models.validation import pool_size

CLASSES = ["a", "b", "c"]


def _slides(n_slides: int, per_slide: int) -> list[str]:
    return [f"/lab/{'abc'[k % 3]}/slide-s{k:02d}_{j:04d}_0.jpg" for k in range(n_slides) for j in range(per_slide)]


def _outputs(labels: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A day-0 row that calls everything class 0, a perfect row, a row that is right on class 1 only, an inductive row."""
    n = len(labels)
    perfect = torch.nn.functional.one_hot(labels, 3).float()
    constant = torch.tensor([[0.6, 0.3, 0.1]]).repeat(n, 1)
    partial = torch.where((labels == 1)[:, None], perfect, torch.tensor([0.1, 0.1, 0.8]))
    images = torch.zeros(n, 3, 4, 4)
    return {"reinhard_tta": (constant, images), "colour_map": (perfect, images), "raw": (partial, images),
            "colour_map_inductive": (perfect, images)}


def test_cells_arrive_slide_by_slide_in_a_seeded_order() -> None:
    """Each slide's cells are contiguous; the order depends on the seed only; every cell comes once."""
    paths = _slides(6, 5)
    order = arrival_order(paths, seed=1)
    assert sorted(order) == list(range(30)) and order == arrival_order(paths, seed=1)
    assert order != arrival_order(paths, seed=2)
    slides = [paths[i].split("_")[0] for i in order]
    assert all(slides[k] == slides[k - 1] for k in range(1, 30) if k % 5)


def test_the_recipe_is_chosen_on_the_reviews_and_scored_on_the_other_slides_only() -> None:
    """The perfect row wins on the reviewed cells; no cell of a slide with a reviewed cell is scored; inductive rows
    are not candidates; the day-0 row is scored on the same cells for comparison."""
    paths = _slides(40, 3)  # 120 cells; 10 reviews from the first 40 (14 slides), the rest scored
    labels = torch.tensor([k % 3 for k in range(40) for _ in range(3)])
    row = validated_rows(_outputs(labels), labels, CLASSES, paths, reviews=10, seed=0)["validated"]
    assert row["recipe"] == "colour_map" and row["balanced_accuracy"] == 1.0
    assert row["reviews"] == 10 and set(row["candidates"]) == {"reinhard_tta", "colour_map", "raw"}
    assert row["day0"]["recipe"] == "reinhard_tta" and row["day0"]["balanced_accuracy"] == pytest.approx(1 / 3)
    pool_slides = {paths[i].split("_")[0] for i in arrival_order(paths, 0)[:pool_size(10)]}
    assert 120 - 3 * len(pool_slides) <= row["scored_cells"] <= 120 - 10
    assert row["n"] == row["scored_cells"] and row["review_score"]["cells"] == 10


def test_too_many_reviews_for_the_target_is_an_error() -> None:
    """Reviewing (nearly) every cell leaves nothing to score: a clear error, not a score on reviewed cells."""
    paths = _slides(2, 3)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    with pytest.raises(ValidationBenchError, match="no cell to score"):
        validated_rows(_outputs(labels), labels, CLASSES, paths, reviews=6, seed=0)


@pytest.mark.slow
def test_bench_accuracy_reviews_adds_a_validated_row(tmp_path: Path) -> None:
    """`bench accuracy --reviews 3` on synthetic labs writes a `validated` row with the eval keys and its recipe."""
    synthetic.write_dataset(tmp_path / "reference", protocol="reference", per_class=10, size=64, seed=0)
    synthetic.write_dataset(tmp_path / "incoming", protocol="incoming", per_class=4, size=64, seed=1)
    out = tmp_path / "out"
    args = bench_accuracy.get_args_parser().parse_args(
        ["--reference", str(tmp_path / "reference"), "--target", str(tmp_path / "incoming"), "--preset", "tiny",
         "--out-dir", str(out), "--variants", "im", "--mode", "transductive", "--threads", "1", "--reviews", "3"])
    assert bench_accuracy.run(args) == 0
    result = json.loads((out / "results.json").read_text())
    row = result["methods"]["validated"]
    assert {"balanced_accuracy_min10", "per_class_recall", "confusion_matrix", "recipe", "day0"} <= set(row)
    assert row["recipe"] in result["methods"] and row["reviews"] == 3 and row["scored_cells"] == 17
    assert result["setup"]["options"]["reviews"] == 3
    assert "| validated |" in (out / "results.md").read_text()
