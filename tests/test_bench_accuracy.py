"""`stainbridge bench accuracy`: the cross-hospital benchmark on small synthetic labs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from stainbridge.models import checkpoint, inference
from stainbridge.models.bench import accuracy as bench_accuracy
from stainbridge.models.imaging import site_geometry, stain_augment, synthetic
from stainbridge.models.training import semantic

torch.set_num_threads(1)

EVAL_KEYS = {"classes", "n", "accuracy", "balanced_accuracy", "balanced_accuracy_min10", "per_class_recall",
             "confusion_matrix"}


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, int]:
    base = tmp_path_factory.mktemp("bench")
    synthetic.write_dataset(base / "reference", protocol="reference", per_class=10, size=64, seed=0)
    synthetic.write_dataset(base / "incoming", protocol="incoming", per_class=4, size=64, seed=1)
    out = base / "out"
    args = bench_accuracy.get_args_parser().parse_args(
        ["--reference", str(base / "reference"), "--target", str(base / "incoming"), "--preset", "tiny",
         "--out-dir", str(out), "--json", str(out / "r.json"), "--gan-steps", "3", "--threads", "1"])
    code = bench_accuracy.run(args)
    return out, json.loads((out / "r.json").read_text()), code


@pytest.mark.slow
def test_tiny_preset_writes_every_method_with_eval_keys(bench: tuple[Path, dict, int]) -> None:
    """The tiny preset exits 0 and reports raw, the classical baselines and the CycleGAN variants, each with the eval keys."""
    _, result, code = bench
    assert code == 0
    methods = result["methods"]
    for name in ("raw", "reinhard", "macenko", "cyclegan_semantic",
                 "cyclegan_semantic_adapted", "cyclegan_semantic_inductive", "raw_tta", "cyclegan_semantic_tta",
                 "cyclegan_colour", "cyclegan_colour_tta", "cyclegan_colour_inductive", "cyclegan_colour_inductive_tta",
                 "colorization", "colorization_tta", "colorization_inductive", "colorization_inductive_tta",
                 "raw_im", "raw_im_tta", "reinhard_im", "reinhard_im_tta", "raw_im_inductive", "reinhard_im_inductive_tta",
                 "colour_map", "colour_map_tta", "colour_map_inductive", "colour_map_inductive_tta",
                 "colour_map_im", "colour_map_im_tta", "colour_map_im_inductive_tta"):
        assert EVAL_KEYS <= set(methods[name]), name
        assert methods[name]["n"] == 20
    setup = result["setup"]
    assert setup["resolution_px"] == 32 and setup["mode"] == "both" and setup["preset"] == "tiny"
    assert setup["target_labels_used_for"] == "scoring only"
    assert {"prepare_s", "classifier_s", "total_s"} <= set(setup["times"])
    assert setup["geometry"]["magnification"] > 0
    # estimated without labels; the profile says from which cue (red cells, else nucleus areas)
    assert setup["geometry"]["method"] in ("red_cell_diameter", "nucleus_area")
    assert setup["geometry"]["profile"]["method"] == setup["geometry"]["method"]
    assert "cyclegan_colour_adapted" not in methods  # the colour variant does not fine-tune the classifier


@pytest.mark.slow
def test_probabilities_file_holds_every_row_as_scored(bench: tuple[Path, dict, int]) -> None:
    """probabilities.safetensors gives each row's softmax; its argmax reproduces the row's confusion matrix."""
    out, result, _ = bench
    tensors, header = checkpoint.load_checkpoint(out / "probabilities.safetensors")
    assert header["kind"] == "bench_probabilities" and len(header["target_files"]) == 20
    labels = tensors.pop("target_labels")
    assert set(tensors) == set(result["methods"])
    for name, probs in tensors.items():
        assert probs.shape == (20, len(header["classes"]))
        matrix = torch.zeros(len(header["classes"]), len(header["classes"]), dtype=torch.long)
        matrix.index_put_((labels, probs.argmax(1)), torch.ones(20, dtype=torch.long), accumulate=True)
        assert matrix.tolist() == result["methods"][name]["confusion_matrix"], name


def test_inductive_halves_keep_each_slide_on_one_side() -> None:
    """With slide groups, no slide has crops on both sides, every image is scored once, and the halves are near even."""
    from stainbridge.models.bench import learned

    groups = [f"slide-{i % 7}" if i < 60 else f"single-{i}" for i in range(80)]
    for seed in (0, 1):
        (fit, held), (fit2, held2) = learned.folds(len(groups), "inductive", seed, groups)
        assert torch.equal(fit, held2) and torch.equal(held, fit2)
        assert sorted(fit.tolist() + held.tolist()) == list(range(80))
        assert not {groups[i] for i in fit.tolist()} & {groups[i] for i in held.tolist()}
        assert abs(len(fit) - len(held)) <= 9  # at most one slide's worth apart
    every = [f"file-{i}" for i in range(80)]  # one image per group: the plain seeded halves, as before
    assert torch.equal(learned.folds(80, "inductive", 3, every)[0][0], learned.folds(80, "inductive", 3)[0][0])


@pytest.mark.slow
def test_colour_variant_checkpoint_is_a_pointwise_colour_standardizer(bench: tuple[Path, dict, int]) -> None:
    """cyclegan_colour writes a pointwise_colour standardizer (pooled tiny D, raw-teacher KL weight 5) that loads."""
    out, _, _ = bench
    path = out / "standardizer_cyclegan_colour_transductive.safetensors"
    _, sh = checkpoint.load_checkpoint(path)
    assert sh["architecture"] == "pointwise_colour" and sh["arch_args"] == {"hidden": 32, "layers": 2}
    assert sh["discriminator_args"] == {"ndf": 16, "n_layers": 2, "pool": 2}  # tiny preset (32 px); cpu/full: 4
    assert bench_accuracy.PRESETS["cpu"]["colour_pool"] == 4
    assert sh["training_options"]["generator_lr"] == 1e-3 and sh["training_options"]["discriminator_lr"] == 2e-4
    assert sh["semantic"]["weight"] == 5.0 and sh["semantic"]["teacher"] == "raw"
    assert sh["semantic"]["pairs"] == ["x_to_y"] and sh["training_data"]["labels_used"] is False
    assert_standardizes(inference.load_standardizer(str(path)), sh["architecture"])


@pytest.mark.slow
def test_report_grid_and_checkpoints_are_written(bench: tuple[Path, dict, int]) -> None:
    """results.md lists every method, grid.png has one row per shown method, checkpoint headers carry data and metrics."""
    out, result, _ = bench
    table = (out / "results.md").read_text()
    assert all(f"| {name} |" in table for name in result["methods"])
    with Image.open(out / "grid.png") as grid:
        assert grid.width > 150 and grid.height > 72 * 5
    _, header = checkpoint.load_checkpoint(out / "classifier.safetensors")
    assert header["training_data"]["counts"] and "test_accuracy" in header["metrics"]
    _, sh = checkpoint.load_checkpoint(out / "standardizer_cyclegan_semantic_inductive_fold0.safetensors")
    assert sh["training_data"]["labels_used"] is False
    assert sh["training_data"]["source"]["scored_images_seen"] is False and sh["training_data"]["source"]["images"] == 10
    assert_standardizes(inference.load_standardizer(str(out / "standardizer_cyclegan_semantic_transductive.safetensors")),
                        None)


@pytest.mark.slow
def test_colorization_variant_is_trained_on_the_reference_only(bench: tuple[Path, dict, int]) -> None:
    """The colorization rows come from one pix2pix L -> ab model that saw no target image, saved per mode
    with the site profile, loadable by the service like any standardizer."""
    out, result, _ = bench
    for mode in ("transductive", "inductive"):
        path = out / f"standardizer_colorization_{mode}.safetensors"
        _, header = checkpoint.load_checkpoint(path)
        assert header["training_data"]["source"] is None and header["training_data"]["labels_used"] is False
        assert header["site_profile"]["magnification"] == pytest.approx(result["setup"]["geometry"]["magnification"])
        assert_standardizes(inference.load_standardizer(str(path)), "colorization")
    runs = result["setup"]["standardizer_runs"]
    assert runs["colorization_transductive"][0]["target_images_seen"] == 0
    transductive, _ = checkpoint.load_checkpoint(out / "standardizer_colorization_transductive.safetensors")
    inductive, _ = checkpoint.load_checkpoint(out / "standardizer_colorization_inductive.safetensors")
    assert all(torch.equal(transductive[k], inductive[k]) for k in transductive)  # one model, trained once
    methods = result["methods"]
    assert methods["colorization"]["confusion_matrix"] == methods["colorization_inductive"]["confusion_matrix"]


def assert_standardizes(standardizer: inference.Standardizer, architecture: str | None) -> None:
    """The loaded standardizer maps a batch to the same shape in [0, 1] and says what it is."""
    batch = torch.rand(2, 3, 32, 32)
    out = standardizer(batch)
    assert out.shape == batch.shape and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert standardizer.sha256 and len(standardizer.sha256) == 64
    if architecture is not None:
        assert standardizer.header["architecture"] == architecture


@pytest.mark.slow
def test_existing_classifier_is_reused(bench: tuple[Path, dict, int], tmp_path: Path) -> None:
    """A second run over the same out-dir reuses the classifier instead of training it again."""
    out, result, _ = bench
    ref = Path(result["setup"]["reference"])
    args = bench_accuracy.get_args_parser().parse_args(
        ["--reference", str(ref), "--target", result["setup"]["target"], "--preset", "tiny", "--out-dir", str(out),
         "--json", str(tmp_path / "again.json"), "--markdown", str(tmp_path / "again.md"),
         "--grid", str(tmp_path / "again.png"), "--mode", "transductive", "--variants", "cyclegan_colour",
         "--colour-steps", "1", "--threads", "1"])
    again = bench_accuracy.main(args)
    assert again["setup"]["classifier"]["reused"] is True
    assert again["methods"]["raw"] == result["methods"]["raw"]
    assert "cyclegan_semantic_inductive" not in again["methods"]
    assert "cyclegan_colour" in again["methods"] and "cyclegan_semantic" not in again["methods"]
    assert (tmp_path / "again.md").exists() and (tmp_path / "again.png").exists()


def test_stain_augment_keeps_range_and_varies_per_image() -> None:
    """Stain augmentation returns images in [0,1] and gives two copies of one image different colours."""
    x = torch.rand(1, 3, 16, 16).repeat(2, 1, 1, 1)
    y = stain_augment.stain_augment(x, 1.0, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1
    assert not torch.allclose(y[0], y[1])


def test_lab_jitter_moves_each_image_to_its_own_stain_template() -> None:
    """The L*a*b* template jitter keeps [0,1], keeps the image's layout, and moves two copies' colour means apart."""
    x = torch.rand(1, 3, 16, 16).repeat(2, 1, 1, 1) * 0.6 + 0.2
    y = stain_augment.lab_jitter(x, 1.0, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1
    assert (y[0].mean((1, 2)) - y[1].mean((1, 2))).abs().max() > 0.02
    layout = torch.corrcoef(torch.stack([x[0, 1].flatten(), y[0, 1].flatten()]))[0, 1]
    assert layout > 0.8


def test_tight_crop_pads_a_centred_square_with_its_border_colour() -> None:
    """A tight-crop image keeps a centred square of the original and is flat outside it, as the service pads."""
    x = torch.rand(6, 3, 32, 32)
    y = stain_augment.tight_crop(x, 1.0, torch.Generator().manual_seed(0))
    for original, framed in zip(x, y):
        assert torch.equal(framed[:, 15:17, 15:17], original[:, 15:17, 15:17])
        corner = framed[:, 0, 0].view(3, 1, 1)
        assert torch.equal(framed[:, 0], corner.expand(3, 1, 32)[:, 0])  # the top row is the pad colour
    assert not torch.equal(x, y)
    assert torch.equal(stain_augment.tight_crop(x, 0.0, torch.Generator().manual_seed(0)), x)


@pytest.mark.slow
def test_a_classifier_trained_with_another_augmentation_is_not_reused(bench: tuple[Path, dict, int],
                                                                       tmp_path: Path) -> None:
    """--lab-jitter trains its own reference classifier rather than reusing one trained without it."""
    out, result, _ = bench
    run = tmp_path / "run"
    run.mkdir()
    for name in ("classifier.safetensors", "classifier.safetensors.split.json"):
        (run / name).write_bytes((out / name).read_bytes())
    args = bench_accuracy.get_args_parser().parse_args(
        ["--reference", result["setup"]["reference"], "--target", result["setup"]["target"], "--preset", "tiny",
         "--out-dir", str(run), "--mode", "transductive", "--variants", "im", "--lab-jitter", "1", "--threads", "1"])
    again = bench_accuracy.main(args)
    assert again["setup"]["classifier"]["reused"] is False
    _, header = checkpoint.load_checkpoint(run / "classifier.safetensors")
    assert header["training_data"]["augmentation"] == "models.imaging.stain_augment strength 1.0 lab 1.0"


def test_structure_loss_ignores_colour_but_not_texture() -> None:
    """The structure term is ~0 for a recoloured cell and clearly positive for the same cell with invented texture."""
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    cell = torch.sigmoid(8 - ((yy - 16) ** 2 + (xx - 16) ** 2).sqrt())  # a soft dark disc
    x = (0.9 - 0.6 * cell).expand(1, 3, 32, 32)
    recoloured = x * torch.tensor([0.8, 0.6, 1.0]).view(1, 3, 1, 1) + torch.tensor([0.1, 0.0, 0.0]).view(1, 3, 1, 1)
    textured = (x + 0.2 * torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * cell).clamp(0, 1)
    assert semantic.structure_loss(x, recoloured) < 0.1 * semantic.structure_loss(x, textured)


def test_site_magnification_from_nucleus_areas() -> None:
    """Twice the nucleus area in native pixels means half the linear magnification, and crops keep the window."""
    assert site_geometry.site_magnification(100.0, 400.0) == pytest.approx(0.5)
    img = Image.new("RGB", (100, 100), "white")
    assert site_geometry.crop_window(img, window_px=150, out_size=32).size == (32, 32)
    with pytest.raises(site_geometry.GeometryEstimateError):
        site_geometry.site_magnification(0.0, 1.0)


@pytest.mark.slow
def test_service_ingest_and_eval_score_exactly_what_the_bench_scores(bench: tuple[Path, dict, int], tmp_path: Path,
                                                                     run_stainbridge) -> None:
    """One path: the bench's classifier and colour standardizer, run through `stainbridge ingest` into SQL
    (the service's pipeline, geometry from the standardizer's site profile) and through `stainbridge eval`,
    label every target image as the bench did, so all three report the same accuracy."""
    out, result, _ = bench
    target = out.parent / "incoming"
    classifier = out / "classifier.safetensors"
    standardizer = out / "standardizer_cyclegan_colour_transductive.safetensors"
    _, header = checkpoint.load_checkpoint(standardizer)
    assert header["site_profile"]["magnification"] == pytest.approx(result["setup"]["geometry"]["magnification"])
    assert header["site_profile"]["method"] == result["setup"]["geometry"]["method"]
    _, cls_header = checkpoint.load_checkpoint(classifier)
    assert "reference_red_cell_diameter_px" in cls_header["geometry"]  # what site profiles measure against
    expected = result["methods"]["cyclegan_colour"]

    evaluated = run_stainbridge("eval", "--classifier", str(classifier), "--data", str(target), "--standardizer",
                                str(standardizer), "--split", "all", "--device", "cpu", "--json", str(tmp_path / "e.json"))
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads((tmp_path / "e.json").read_text())["confusion_matrix"] == expected["confusion_matrix"]

    classes = result["methods"]["raw"]["classes"]
    # the service's option `[models] tta` gives the bench's `_tta` row, also exactly
    confidences: dict[bool, dict[str, float]] = {}
    for tta, row in ((False, "cyclegan_colour"), (True, "cyclegan_colour_tta")):
        rows = _ingest_labels(run_stainbridge, tmp_path / f"tta-{tta}", target, classifier, standardizer, tta=tta,
                              magnification=header["site_profile"]["magnification"])
        matrix = [[0] * len(classes) for _ in classes]
        for source, label, _ in rows:
            matrix[classes.index(Path(source).parent.name)][classes.index(label)] += 1
        assert len(rows) == result["methods"][row]["n"]
        assert matrix == result["methods"][row]["confusion_matrix"], row
        confidences[tta] = {source: confidence for source, _, confidence in rows}
    # and it is really the 8-view mean: the confidences are run_batch(tta=True)'s, not the plain ones
    clf = inference.load_classifier(classifier, device="cpu")
    std = inference.load_standardizer(str(standardizer), classifier=clf, device="cpu")
    names = sorted(confidences[True])
    images = [Image.open(target / name).convert("RGB") for name in names]
    viewed = inference.run_batch(images, std, clf, tta=True)
    assert [r.confidence for r in viewed] == pytest.approx([confidences[True][n] for n in names], abs=1e-5)
    assert any(abs(confidences[True][n] - confidences[False][n]) > 1e-4 for n in names)


def _ingest_labels(run_stainbridge, folder: Path, target: Path, classifier: Path, standardizer: Path | str, *,
                   tta: bool, magnification: float, scale: str | None = None) -> list[tuple[str, str, float]]:
    """`stainbridge ingest` of the labelled target into a fresh SQLite database; (source_name, label, confidence).
    Every result row must record how it was computed: ``tta`` and the window's ``magnification``."""
    folder.mkdir()
    db, config = folder / "one-path.db", folder / "one-path.toml"
    config.write_text(f"""[paths]
state = "{folder / 'state'}"
drop = "{folder / 'drop'}"
archive = "{folder / 'archive'}"
quarantine = "{folder / 'quarantine'}"
[database]
url = "sqlite:///{db}"
[models]
classifier = "{classifier}"
standardizer = "{standardizer}"
device = "cpu"
tta = {str(tta).lower()}
[site]
name = "synthetic-incoming"
""" + (f'scale = "{scale}"\n' if scale else ""), encoding="utf-8")
    ingested = run_stainbridge("ingest", "--config", str(config), str(target), timeout=300)
    assert ingested.returncode == 0, ingested.stderr + ingested.stdout
    from sqlalchemy import create_engine, text
    engine = create_engine(f"sqlite:///{db}")
    with engine.connect() as connection:
        rows = connection.execute(
            text("SELECT source_name, label, confidence, tta, magnification FROM results WHERE status = 'done'")).all()
    engine.dispose()
    assert rows and {bool(row.tta) for row in rows} == {tta}
    assert [row.magnification for row in rows] == pytest.approx([magnification] * len(rows))
    return [(source, label, confidence) for source, label, confidence, _, _ in rows]


@pytest.mark.slow
def test_adapted_classifier_rows_are_label_free_and_what_the_service_scores(bench: tuple[Path, dict, int],
                                                                           tmp_path: Path, run_stainbridge) -> None:
    """The `_im` rows: one classifier per standardizer and mode, adapted without target labels (inductive:
    on the other half only); the transductive Reinhard one, run by `stainbridge ingest` behind
    `standardizer = "reinhard"` at the bench's magnification, labels every image as the bench did."""
    out, result, _ = bench
    runs = result["setup"]["standardizer_runs"]
    assert [r["target_images_seen"] for r in runs["im_transductive"]] == [20, 20, 20]  # raw, reinhard, colour map
    assert [r["target_images_seen"] for r in runs["im_inductive"]] == [10] * 6
    # what adapting cost at home is reported per checkpoint (the reference's own test windows)
    assert all(0.0 <= r["reference_test_balanced_accuracy"] <= 1.0 for r in runs["im_transductive"])
    path = out / "classifier_im_reinhard_transductive.safetensors"
    state, header = checkpoint.load_checkpoint(path)
    base, _ = checkpoint.load_checkpoint(out / "classifier.safetensors")
    assert header["adaptation"]["labels_used"] is False and header["adaptation"]["standardizer"] == "reinhard"
    assert header["classes"] == result["methods"]["raw"]["classes"]
    assert any(not torch.equal(state[k], base[k]) for k in state if k.endswith("weight"))  # it did move
    magnification = result["setup"]["geometry"]["magnification"]
    rows = _ingest_labels(run_stainbridge, tmp_path / "im", out.parent / "incoming", path, "reinhard", tta=True,
                          magnification=magnification, scale=repr(magnification))
    classes = result["methods"]["raw"]["classes"]
    matrix = [[0] * len(classes) for _ in classes]
    for source, label, _ in rows:
        matrix[classes.index(Path(source).parent.name)][classes.index(label)] += 1
    assert matrix == result["methods"]["reinhard_im_tta"]["confusion_matrix"]


@pytest.mark.slow
def test_colour_map_rows_are_label_free_and_what_the_service_scores(bench: tuple[Path, dict, int], tmp_path: Path,
                                                                    run_stainbridge) -> None:
    """The site colour map: fitted per fold on unlabeled target windows only (inductive: the other half), far
    more reference-like than the raw images; its transductive checkpoint with the classifier adapted behind it,
    run by `stainbridge ingest` (geometry from the map's site profile), labels every image as the bench did."""
    out, result, _ = bench
    runs = result["setup"]["standardizer_runs"]
    assert [r["target_images_seen"] for r in runs["colour_map_transductive"]] == [20]
    assert [r["target_images_seen"] for r in runs["colour_map_inductive"]] == [10, 10]
    methods = result["methods"]
    assert methods["colour_map"]["delta_e"] < methods["raw"]["delta_e"] / 2
    standardizer = out / "standardizer_colour_map_transductive.safetensors"
    _, header = checkpoint.load_checkpoint(standardizer)
    assert header["architecture"] == "colour_map" and header["training_data"]["labels_used"] is False
    assert header["site_profile"]["magnification"] == pytest.approx(result["setup"]["geometry"]["magnification"])
    classifier = out / "classifier_im_colour_map_transductive.safetensors"
    rows = _ingest_labels(run_stainbridge, tmp_path / "cm", out.parent / "incoming", classifier, standardizer, tta=True,
                          magnification=header["site_profile"]["magnification"])
    classes = methods["raw"]["classes"]
    matrix = [[0] * len(classes) for _ in classes]
    for source, label, _ in rows:
        matrix[classes.index(Path(source).parent.name)][classes.index(label)] += 1
    assert matrix == methods["colour_map_im_tta"]["confusion_matrix"]
