"""Reviews (import all or nothing, export of the low-confidence queue) and reprocess (new rows, old rows stay)."""

from __future__ import annotations

import csv
import json

import pytest

from stainbridge.daemon import cli
from stainbridge.daemon.schema import upgrade_database
from stainbridge.daemon.store import Image, ImageStatus, Prediction, make_engine, make_sessionmaker, utcnow
from stainbridge.daemon.versions.loading import load_models
from stainbridge.models.inference import resolve_geometry
from tests.daemon_helpers import build_tiny_models, query, write_cell


@pytest.fixture
def world(tmp_path, monkeypatch, restore_logging):
    """Three archived, classified images (confidence 0.3, 0.5, 0.9) and a quarantined transient failure."""
    tiny = build_tiny_models(tmp_path / "m")
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    for key, value in {"DATABASE_URL": url, "PATHS_STATE": tmp_path / "state", "MODELS_CLASSIFIER": tiny.classifier,
                       "MODELS_STANDARDIZER": tiny.standardizer, "MODELS_DEVICE": "cpu"}.items():
        monkeypatch.setenv(f"STAINBRIDGE_{key}", str(value))
    from stainbridge.daemon.config import load_settings

    settings = load_settings()
    upgrade_database(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    models = load_models(settings, sessions)
    with sessions.begin() as s:
        for i, confidence in enumerate((0.3, 0.5, 0.9)):
            path = write_cell(tmp_path / "archive" / f"{i}.png", seed=i)
            image = Image(sha256=f"{i}" * 64, source_name=path.name, site="s", status=ImageStatus.done,
                          archive_path=str(path), received_at=utcnow())
            s.add(image)
            s.flush()
            s.add(Prediction(image_id=image.id, label="neutrophil", confidence=confidence, probabilities={},
                             standardizer_version_id=models.standardizer_version_id,
                             classifier_version_id=models.classifier_version_id, latency_ms=1.0))
        path = write_cell(tmp_path / "quarantine" / "f.png", seed=9)
        s.add(Image(sha256="f" * 64, source_name="f.png", site="s", status=ImageStatus.failed, archive_path=str(path),
                    error="inference: the models failed on this image", received_at=utcnow()))
    yield url, tmp_path, models
    engine.dispose()


def test_review_export_lists_the_least_confident_unreviewed_images(world, tmp_path, capsys) -> None:
    """`review export` writes images below [retraining] review_below, least confident first, with an empty label."""
    out = tmp_path / "queue.csv"
    assert cli.main(["review", "export", "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [(r["image"], r["confidence"], r["label"]) for r in rows] == [("1", "0.3", ""), ("2", "0.5", "")]


def test_review_import_is_all_or_nothing(world, tmp_path, capsys) -> None:
    """A file with an unknown image and an unknown label imports nothing and names both; a good file imports."""
    url, _, _ = world
    bad = tmp_path / "bad.csv"
    bad.write_text("image,label,reviewer\n1,lymphocyte,dr a\n77,lymphocyte,dr a\n2,megakaryocyte,dr a\n")
    assert cli.main(["review", "import", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "unknown image '77'" in err and "unknown label 'megakaryocyte'" in err and "nothing imported" in err
    assert query(url, "SELECT count(*) FROM reviews") == [(0,)]
    good = tmp_path / "good.csv"
    good.write_text(f"image,label,reviewer,time\n1,lymphocyte,dr a,2026-12-01T09:30\n{'2' * 64},monocyte,dr b,\n3,,,\n")
    assert cli.main(["review", "import", str(good)]) == 0
    assert query(url, "SELECT image_id, reviewed_label, reviewer FROM results WHERE reviewed_label IS NOT NULL "
                      "ORDER BY image_id") == [(1, "lymphocyte", "dr a"), (3, "monocyte", "dr b")]


def test_reprocess_adds_rows_and_keeps_the_old_ones(world, capsys) -> None:
    """`reprocess` adds a prediction per archived image; `--status failed` retries transient failures, which become done."""
    url, _, models = world
    assert cli.main(["reprocess", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["selected"], summary["classified"]) == (3, 3)
    assert query(url, "SELECT count(*) FROM predictions") == [(6,)]
    # each new row records how it was computed (the default [models] tta = true, the window's magnification);
    # the rows from before say nothing (NULL: unknown), and `results` shows the newest
    # (the tiny test classifier has no reference window: it sees the whole frame, so no magnification;
    # the bench's classifiers record theirs, test_bench_accuracy)
    assert resolve_geometry(models.classifier, models.standardizer).magnification is None
    provenance = query(url, "SELECT tta, magnification FROM predictions ORDER BY id")
    assert provenance == [(None, None)] * 3 + [(1, None)] * 3
    assert query(url, "SELECT DISTINCT tta FROM results WHERE status = 'done'") == [(1,)]
    assert cli.main(["reprocess", "--status", "failed", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["classified"] == 1
    assert query(url, "SELECT status, error FROM images WHERE sha256 = :s", s="f" * 64) == [("done", None)]
    assert cli.main(["reprocess", "--since", "2999-01-01", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["selected"] == 0
