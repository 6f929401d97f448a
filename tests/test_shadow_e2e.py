"""Shadow through the real service (issue 23): a candidate awaiting evidence scores a share of new cells, never as
their result, its disagreements lead the review queue, and once they are reviewed the gate decides.

`stainbridge run` serves the tiny random-weight models of tests/daemon_helpers.py; the candidate is the same
classifier with its last layer negated, so it never agrees with the active one (its best class is the active
one's worst). It is registered and gated by the CLI while the service runs ("needs 8 reviewed cells"); the
service starts shadowing at its next registry poll.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from stainbridge.daemon import cli
from stainbridge.daemon.versions.shadow import in_shadow_sample
from stainbridge.models.checkpoint import load_checkpoint, save_checkpoint
from tests.daemon_helpers import Daemon, build_tiny_models, query, wait_for, write_cell, write_config

pytestmark = pytest.mark.slow
SHARE, CELLS, NEEDED = 0.5, 16, 6


@pytest.fixture
def stainbridge(capsys, restore_logging):
    """The operator's commands, in this process (the service is the real subprocess): stdout of a successful one."""
    def run(config: Path, *args: str) -> str:
        capsys.readouterr()
        code = cli.main(["--config", str(config), *args])
        out, err = capsys.readouterr()
        assert code == 0, f"stainbridge {' '.join(args)}: {err[-3000:]}"
        return out

    return run


def _opposite(classifier: Path, out: Path) -> Path:
    """The classifier with its last layer negated: its top class is the original's bottom one."""
    state, header = load_checkpoint(classifier)
    state["fc.weight"], state["fc.bias"] = -state["fc.weight"], -state["fc.bias"]
    save_checkpoint(out, state, {**header, "note": "negated last layer"})
    return out


def test_a_candidate_awaiting_evidence_is_shadowed_until_the_gate_decides(tmp_path, stainbridge) -> None:
    """New cells get shadow rows for exactly the hashed share, results stay the active version's, `review export`
    lists the disagreements first, status counts them; with those cells reviewed `models gate` decides on evidence
    and the candidate leaves the shadow."""
    tiny = build_tiny_models(tmp_path / "m")
    candidate_file = _opposite(tiny.classifier, tmp_path / "m" / "opposite.safetensors")
    url = f"sqlite:///{tmp_path / 'state' / 'stainbridge.db'}"
    config = write_config(tmp_path / "stainbridge.toml", tmp_path, url, tiny, models={"poll_seconds": 0.2, "tta": False},
                          retraining={"shadow_share": SHARE, "min_gate_reviews": NEEDED})
    daemon = Daemon(config, tmp_path).start()
    try:
        registered = stainbridge(config, "models", "register", str(candidate_file))
        candidate = int(registered.split("version ")[1].split()[0])
        verdict = json.loads(stainbridge(config, "models", "gate", str(candidate), "--json"))
        assert verdict["reason"].startswith(f"needs {NEEDED} reviewed cells, has 0")
        wait_for(lambda: any(e.get("event") == "shadow_started" for e in daemon.events()), 30, "shadow_started")

        for n in range(CELLS):
            write_cell(tmp_path / "drop" / f"cell-{n:02d}.png", seed=100 + n)
        wait_for(lambda: query(url, "SELECT COUNT(*) FROM images WHERE status = 'done'")[0][0] == CELLS, 120,
                 f"{CELLS} cells classified")
        images = dict(query(url, "SELECT sha256, id FROM images"))
        shadowed = {image for (image,) in query(url, "SELECT image_id FROM shadow_predictions "
                                                     "WHERE model_version_id = :v", v=candidate)}
        assert shadowed == {i for sha, i in images.items() if in_shadow_sample(sha, SHARE)} and 0 < len(shadowed) < CELLS
        active = query(url, "SELECT id FROM model_versions WHERE kind = 'classifier' AND state = 'active'")[0][0]
        assert {c for (c,) in query(url, "SELECT classifier_version_id FROM predictions")} == {active}
        assert {c for (c,) in query(url, "SELECT DISTINCT classifier FROM latest_results")} == {
            query(url, "SELECT name FROM model_versions WHERE id = :v", v=active)[0][0]}

        queue = tmp_path / "queue.csv"
        stainbridge(config, "review", "export", "--out", str(queue))
        rows = list(csv.DictReader(queue.open(encoding="utf-8-sig")))
        first = [int(r["image"]) for r in rows if r["tier"] == "candidate_disagrees"]
        assert rows[:len(first)] == [r for r in rows if r["tier"] == "candidate_disagrees"]
        assert len(first) == min(NEEDED, len(shadowed)) and set(first) <= shadowed
        assert set(first) == {i for (i,) in query(url, "SELECT image_id FROM candidate_disagreements")} or \
            len(shadowed) > NEEDED
        status = json.loads(stainbridge(config, "status", "--json"))["shadow"]
        assert status == [{"site": "test-site", "version": candidate, "kind": "classifier",
                           "name": status[0]["name"], "share": SHARE, "cells": len(shadowed),
                           "disagreements": len(shadowed), "disagreement_share": 1.0, "reviews": 0,
                           "reviews_needed": NEEDED}]

        reviews = tmp_path / "reviews.csv"  # the hematologist agrees with the active version
        reviews.write_text("image,label,reviewer\n" + "".join(f"{r['image']},{r['predicted']},dr-a\n"
                                                              for r in rows if r["tier"] == "candidate_disagrees"))
        stainbridge(config, "review", "import", str(reviews))
        decided = json.loads(stainbridge(config, "models", "gate", str(candidate), "--json"))
        evidence = decided["checks"][0]
        assert not decided["passed"] and evidence["name"] == "balanced_accuracy" and evidence["images"] == len(first)
        assert evidence["candidate"] < evidence["active"]
        assert json.loads(stainbridge(config, "status", "--json"))["shadow"] == []
        wait_for(lambda: any(e.get("event") == "shadow_stopped" for e in daemon.events()), 30, "shadow_stopped")
        assert daemon.stop() == 0
    finally:
        daemon.close()
