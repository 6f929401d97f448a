"""A cell unlike the five classes, from the classifier's features to the service's record and the review queue.

One classifier is trained for the module as the benchmark trains its reference classifier (in-memory
synthetic reference cells, stain augmentation, calibrated at the end): about a minute and a half on
two loaded cores. Smudge cells (``synthetic.OTHER_CLASSES``: a ruptured cell's smear, no cytoplasm) are
none of the five.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from PIL import Image

from stainbridge.daemon import cli
from stainbridge.models import inference
from stainbridge.models.bench import data as bench_data
from stainbridge.models.bench import training as bench_train
from stainbridge.models.imaging import synthetic
from tests.daemon_helpers import Daemon, TinyModels, query, scalar, wait_for
from tests.test_service_e2e import make_daemon

pytestmark = pytest.mark.slow

FRAME = 128  # px of the synthetic frames; the classifier sees a 0.6 window of them at 64 px


def render(label: str, index: int, seed: int = 77) -> Image.Image:
    return synthetic.render_cell(label, protocol="reference", size=FRAME,
                                 rng=synthetic.image_rng(seed, "reference", label, index))


@pytest.fixture(scope="module")
def flagging_classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A calibrated classifier that tells the five synthetic classes apart (the bench's training, 10 epochs)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("flagging")
    synthetic.write_dataset(root / "reference", protocol="reference", per_class=40, size=FRAME, seed=1)
    synthetic.write_dataset(root / "incoming", protocol="incoming", per_class=2, size=FRAME, seed=2)
    d = bench_data.prepare(root / "reference", root / "incoming", size=64, window_fraction=0.6, seed=0,
                           magnification=1.0, log=lambda _: None)
    out = root / "classifier.safetensors"
    bench_train.train_reference_classifier(d, out, arch="resnet18_w16", epochs=10, batch_size=32, lr=2e-3, strength=1.0,
                                           seed=0, reference_root=root / "reference", device=torch.device("cpu"),
                                           log=lambda _: None)
    return out


@pytest.mark.parametrize("tta", [False, True])
def test_ood_score_flags_smudge_cells_and_not_the_five_classes(flagging_classifier: Path, tta: bool) -> None:
    """Through run_batch, most smudge cells are not_a_known_class (with a best guess) and almost no cell of the five."""
    clf = inference.load_classifier(flagging_classifier)
    none = inference.load_standardizer("none")
    smudges = inference.run_batch([render("smudge", i) for i in range(20)], none, clf, scale="1.0", tta=tta)
    assert sum(r.review_reason == "not_a_known_class" for r in smudges) >= 16
    assert all(r.label in synthetic.CLASSES and r.ood_score is not None for r in smudges)
    for label in synthetic.CLASSES:
        cells = inference.run_batch([render(label, i) for i in range(20)], none, clf, scale="1.0", tta=tta)
        assert sum(r.review_reason == "not_a_known_class" for r in cells) <= 2, label


def test_service_records_the_flag_and_review_export_lists_the_cell_first(
        flagging_classifier: Path, database_url: str, tmp_path: Path) -> None:
    """The real service records a smudge cell with its best guess, needs_review and not_a_known_class; in-class cells
    are not flagged; `review export` lists the smudge cell first after any validation sample, in its tier."""
    models = TinyModels(flagging_classifier, Path("none"), "", "")
    daemon: Daemon = make_daemon(tmp_path, database_url, models, models={"standardizer": "none"})
    drop = tmp_path / "drop"
    try:
        daemon.start()
        for label in ("lymphocyte", "neutrophil", "eosinophil"):
            render(label, 0).save(drop / f"{label}.png")
        render("smudge", 3).save(drop / "smudge.png")
        wait_for(lambda: scalar(database_url, "SELECT count(*) FROM images WHERE status = 'done'") == 4, 120,
                 "four classified images")
    finally:
        daemon.stop()
        daemon.close()
    rows = {r[0]: r[1:] for r in query(database_url, "SELECT source_name, label, needs_review, review_reason, "
                                                     "calibrated_confidence, ood_score FROM latest_results")}
    label, needs_review, reason, calibrated, ood = rows["smudge.png"]
    assert (bool(needs_review), reason) == (True, "not_a_known_class")
    assert label in synthetic.CLASSES and calibrated is not None and ood is not None
    assert [bool(rows[f"{c}.png"][1]) for c in ("lymphocyte", "neutrophil", "eosinophil")] == [False] * 3
    out = tmp_path / "queue.csv"
    assert cli.main(["--config", str(daemon.config), "review", "export", "--out", str(out)]) == 0
    queue = [row for row in csv.DictReader(out.open(encoding="utf-8-sig")) if row["tier"] != "validation_sample"]
    assert queue[0]["source_name"] == "smudge.png" and queue[0]["tier"] == "not_a_known_class"
    assert queue[0]["predicted"] == label
