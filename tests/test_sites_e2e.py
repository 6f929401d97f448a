"""A new site goes from unvalidated to validated through the real service (docs/sites.md).

`stainbridge run` receives two sites by drop sub-folder ([site] source = "folder"): the configured one
(files right in the drop folder) and a new hospital. The day-0 recipe is made clearly bad (a standardizer
that paints every cell black); [site] recipes offers the raw image in front of a classifier that knows
these cells, and the same classifier with its class names rotated (clearly wrong). The service chooses the
new site's validation sample from its first cells, `review export` lists it first with thumbnails, the
true labels are imported with `review import`, and `sites validate` must pick the raw + classifier recipe;
status, report, the SQL views, export and `sites --json` then say "validated", and the running service
serves the site with its new recipe while the other site keeps the day-0 one.
"""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from stainbridge.models.checkpoint import load_checkpoint, save_checkpoint
from stainbridge.models.imaging import synthetic
from tests.daemon_helpers import (
    CLASSES,
    STAINBRIDGE,
    Daemon,
    build_tiny_models,
    query,
    subprocess_env,
    wait_for,
    write_config,
)
from tests.retraining_helpers import broken_standardizer

pytestmark = pytest.mark.slow
REVIEWS = 10  # [site] validation_reviews: the sample is chosen among the site's first 4 x 10 cells
SITE = "hospital-b"


def _stainbridge(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(STAINBRIDGE), "--config", str(config), *args], env=subprocess_env(),
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, f"stainbridge {' '.join(args)}: {done.stderr[-3000:]}"
    return done


def _cell(path: Path, label: str, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    synthetic.render_cell(label, protocol="incoming", size=48, rng=np.random.default_rng(seed)).save(path)
    return path


@pytest.fixture(scope="module")
def site_models(tmp_path_factory) -> dict[str, Path]:
    """A classifier that knows the new site's cells, the same with its class names rotated, a black standardizer."""
    root = tmp_path_factory.mktemp("site-models")
    synthetic.write_dataset(root / "train", protocol="incoming", per_class=16, size=48, seed=5)
    good = root / "classifier.safetensors"
    subprocess.run([str(STAINBRIDGE), "train", "classifier", "--data", str(root / "train"), "--out", str(good),
                    "--preset", "tiny", "--size", "32", "--epochs", "12", "--batch-size", "16", "--device", "cpu"],
                   env=subprocess_env(), capture_output=True, text=True, timeout=900, check=True)
    state, header = load_checkpoint(good)
    rotated = root / "rotated.safetensors"
    save_checkpoint(rotated, state, {**header, "classes": header["classes"][1:] + header["classes"][:1]})
    return {"good": good, "rotated": rotated, "black": broken_standardizer(root / "black.safetensors")}


def test_a_new_site_is_validated_on_its_reviews_and_served_with_the_best_recipe(tmp_path, site_models) -> None:
    """Sample chosen and exported first, reviews imported, `sites validate` picks the truly best recipe; every
    surface shows the state; the running service switches the site's recipe and leaves the other site alone."""
    url = f"sqlite:///{tmp_path / 'state' / 'stainbridge.db'}"
    tiny = build_tiny_models(tmp_path / "tiny")  # only write_config's defaults; [models] is set below
    good, rotated = site_models["good"], site_models["rotated"]
    config = write_config(
        tmp_path / "stainbridge.toml", tmp_path, url, tiny,
        models={"classifier": good, "standardizer": site_models["black"], "tta": False, "poll_seconds": 0.3},
        site={"name": "home", "source": "folder", "validation_reviews": REVIEWS,
              "recipes": f"none, none + {rotated}"})
    drop, truth = tmp_path / "drop", {}
    daemon = Daemon(config, tmp_path).start()
    try:
        for i in range(4 * REVIEWS):
            label = CLASSES[i % len(CLASSES)]
            truth[f"{SITE}/cell-{i:03d}.png"] = label
            _cell(drop / SITE / f"cell-{i:03d}.png", label, seed=1000 + i)
        _cell(drop / "home-0.png", "lymphocyte", seed=7)
        wait_for(lambda: query(url, "SELECT count(*) FROM validation_cells")[0][0] == REVIEWS, 180,
                 "the new site's validation sample")
        assert query(url, "SELECT site, count(*) FROM images WHERE status = 'done' GROUP BY site ORDER BY site") == [
            ("home", 1), (SITE, 4 * REVIEWS)]

        unvalidated = json.loads(_stainbridge(config, "sites", "--json").stdout)
        assert [(s["site"], s["validated"], s["reviews"], s["reviews_needed"]) for s in unvalidated] == [
            ("home", False, 0, REVIEWS), (SITE, False, 0, REVIEWS)]
        assert set(unvalidated[0]) == {"site", "validated", "reviews", "reviews_needed", "recipe",
                                       "balanced_accuracy", "ci_low", "ci_high"}
        assert f"site {SITE}: unvalidated (0 of {REVIEWS} reviews)" in _stainbridge(config, "status").stdout

        queue, thumbs = tmp_path / "queue.csv", tmp_path / "thumbs"
        _stainbridge(config, "review", "export", "--out", str(queue), "--thumbnails", str(thumbs))
        rows = list(csv.DictReader(queue.open()))
        sample = rows[:REVIEWS]
        assert [int(r["validation_rank"]) for r in sample] == list(range(1, REVIEWS + 1))
        assert {r["site"] for r in sample} == {SITE} and all(Path(r["thumbnail"]).is_file() for r in sample)
        # spread over the classes the recipes predict (tests/test_validation_rule.py checks the rule itself; here
        # the black recipe's one class takes its turns from the most disputed cells, whatever they are)
        assert len({truth[r["source_name"]] for r in sample}) >= 3
        for row in sample:
            row.update(label=truth[row["source_name"]], reviewer="dr-test")
        with queue.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(sample)
        _stainbridge(config, "review", "import", str(queue))

        result = json.loads(_stainbridge(config, "sites", "validate", SITE, "--json").stdout)
        scores = {r["recipe"]: r["balanced_accuracy"] for r in result["recipes"]}
        assert len(scores) == 3, scores
        day0 = next(name for name in scores if name.startswith("black"))
        best = next(name for name in scores if name.startswith("none") and "rotated" not in name)
        worst = next(name for name in scores if "rotated" in name)
        assert result["recipe"] == best and scores[best] >= 0.5
        reviewed_classes = {truth[r["source_name"]] for r in sample}
        assert scores[day0] <= 1 / len(reviewed_classes) + 1e-9  # black cells: one class for all, one recall of 1
        assert scores[worst] < scores[best] - 0.4
        assert result["ci_low"] <= result["balanced_accuracy"] <= result["ci_high"]

        validated = {s["site"]: s for s in json.loads(_stainbridge(config, "sites", "--json").stdout)}
        assert validated[SITE]["validated"] and validated[SITE]["recipe"] == best
        assert validated[SITE]["reviews"] == REVIEWS and not validated["home"]["validated"]
        line = (f"validated: {result['balanced_accuracy']:.2f} [{result['ci_low']:.2f}-{result['ci_high']:.2f}] "
                f"on {REVIEWS} cells")
        assert f"site {SITE}: {line}" in _stainbridge(config, "status").stdout
        # the cells the day-0 recipe classified do not pass for validated output
        assert query(url, "SELECT DISTINCT validation FROM latest_results WHERE site = :s", s=SITE) == [
            (f"not the validated recipe (site {line})",)]
        assert query(url, "SELECT validation FROM site_validation WHERE site = 'home'") == [
            (f"unvalidated (0 of {REVIEWS} reviews)",)]
        _stainbridge(config, "report", "--out", str(tmp_path / "report.html"))
        assert line in (tmp_path / "report.html").read_text()
        exported = json.loads(_stainbridge(config, "export", "--format", "json").stdout)
        assert {row["validation"] for row in exported if row["site"] == SITE} == {f"not the validated recipe (site {line})"}

        # the running service serves the site with its validated recipe; the other site keeps the day-0 one
        _cell(drop / SITE / "after.png", "monocyte", seed=5000)
        _cell(drop / "home-1.png", "monocyte", seed=5001)
        wait_for(lambda: query(url, "SELECT count(*) FROM images WHERE status = 'done'")[0][0] == 4 * REVIEWS + 3,
                 120, "the files after validation")
        served = {name: (standardizer, validation) for name, standardizer, validation in query(
            url, "SELECT source_name, standardizer, validation FROM latest_results WHERE source_name IN (:a, :b)",
            a=f"{SITE}/after.png", b="home-1.png")}
        assert served[f"{SITE}/after.png"] == ("none", line)
        assert served["home-1.png"][0].startswith("black") and served["home-1.png"][1].startswith("unvalidated")
        assert any(e.get("event") == "models_swapped" and e.get("site") == SITE for e in daemon.events())
    finally:
        assert daemon.stop() == 0
        daemon.close()
