"""`stainbridge eval`: metrics, the confusion matrix and which images are scored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from stainbridge.models import checkpoint, classifier, metrics
from stainbridge.models.bench import evaluate as ev
from stainbridge.models.imaging import classical, data, synthetic

torch.set_num_threads(1)

EVAL_KEYS = {"classes", "n", "accuracy", "balanced_accuracy", "per_class_recall", "confusion_matrix",
             "balanced_accuracy_min10", "balanced_accuracy_min10_classes"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A reference folder, its split manifest and an (untrained) classifier checkpoint that points at both."""
    base = tmp_path_factory.mktemp("eval")
    reference, incoming = base / "reference", base / "incoming"
    synthetic.write_dataset(reference, protocol="reference", per_class=10, size=64, seed=0)
    synthetic.write_dataset(incoming, protocol="incoming", per_class=3, size=64, seed=1,
                            classes=("lymphocyte", "neutrophil"))
    clf = base / "clf.safetensors"
    manifest = data.make_split(reference, seed=0)
    data.write_manifest(manifest, Path(f"{clf}.split.json"))
    torch.manual_seed(0)
    model = classifier.build_classifier(arch="resnet18", num_classes=5)
    images = [data.load_rgb(p) for p, _ in data.list_labeled(reference)[::5]]
    checkpoint.save_checkpoint(clf, model.state_dict(), {
        "kind": "classifier", "architecture": "resnet18", "arch_args": {"num_classes": 5},
        "classes": list(synthetic.CLASSES), "input_size": 64,
        "normalization": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        "geometry": {"reference_cell_fraction": 0.12},
        "reference_stain": classical.fit_reference_stats(images),
        "training_data": {"root": str(reference.resolve())}})
    return {"reference": reference, "incoming": incoming, "clf": clf, "base": base}


def evaluate(*argv: str) -> dict:
    return ev.main(ev.get_args_parser().parse_args(list(argv)))


def test_classification_metrics_balanced_accuracy_over_present_classes() -> None:
    """Balanced accuracy averages recall over classes present; the min10 variant only over classes with >= 10 images."""
    classes = ["a", "b", "c"]
    y_true = [0] * 10 + [1] * 2
    y_pred = [0] * 8 + [2] * 2 + [1, 0]
    m = metrics.classification_metrics(y_true, y_pred, classes)
    assert m["n"] == 12 and m["accuracy"] == pytest.approx(9 / 12)
    assert m["per_class_recall"] == {"a": 0.8, "b": 0.5, "c": None}
    assert m["balanced_accuracy"] == pytest.approx(0.65)
    assert m["balanced_accuracy_min10"] == pytest.approx(0.8) and m["balanced_accuracy_min10_classes"] == ["a"]
    assert m["confusion_matrix"] == [[8, 0, 2], [1, 1, 0], [0, 0, 0]]


@pytest.mark.slow
def test_eval_json_has_contract_keys_and_confusion_png(setup: dict[str, Path]) -> None:
    """The JSON holds the contract keys, the confusion matrix sums to n, and a PNG is drawn next to it."""
    out = setup["base"] / "raw.json"
    evaluate("--classifier", str(setup["clf"]), "--data", str(setup["incoming"]), "--json", str(out))
    result = json.loads(out.read_text())
    assert EVAL_KEYS <= set(result)
    assert result["n"] == 6 and result["split"] == "all"
    assert sum(map(sum, result["confusion_matrix"])) == result["n"]
    assert result["per_class_recall"]["basophil"] is None  # absent classes do not count as recall 0
    with Image.open(out.with_suffix(".confusion.png")) as png:
        assert png.width > 300 and png.height > 300


@pytest.mark.slow
def test_split_test_scores_only_held_out_images_of_the_training_folder(setup: dict[str, Path]) -> None:
    """On the training folder --split test scores exactly the manifest's test images; --split all scores every image."""
    manifest = data.read_manifest(Path(f"{setup['clf']}.split.json"))
    test = evaluate("--classifier", str(setup["clf"]), "--data", str(setup["reference"]))
    assert test["split"] == "test" and test["n"] == len(manifest["test"])
    everything = evaluate("--classifier", str(setup["clf"]), "--data", str(setup["reference"]), "--split", "all")
    assert everything["n"] == 50


@pytest.mark.slow
def test_missing_manifest_for_training_folder_is_an_error(setup: dict[str, Path], tmp_path: Path) -> None:
    """Without its split manifest, evaluating the training folder refuses instead of scoring training images."""
    lonely = tmp_path / "clf.safetensors"
    lonely.write_bytes(setup["clf"].read_bytes())
    args = ev.get_args_parser().parse_args(["--classifier", str(lonely), "--data", str(setup["reference"])])
    with pytest.raises(ev.EvaluationError, match="--split all"):
        ev.main(args)


@pytest.mark.slow
@pytest.mark.parametrize("standardizer", ["reinhard", "macenko"])
def test_classical_standardizers_and_auto_scale_run(setup: dict[str, Path], standardizer: str) -> None:
    """Each classical standardizer (stats from the classifier header) and --scale auto evaluate every image."""
    result = evaluate("--classifier", str(setup["clf"]), "--data", str(setup["incoming"]),
                      "--standardizer", standardizer, "--scale", "auto")
    assert result["standardizer"]["name"] == standardizer and result["scale"] == "auto" and result["n"] == 6


@pytest.mark.slow
def test_unknown_class_folder_exits_2(setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A class the classifier does not know is reported with exit code 2, not silently dropped."""
    synthetic.write_dataset(tmp_path / "odd", protocol="reference", per_class=1, size=64, classes=("lymphocyte",))
    (tmp_path / "odd" / "lymphocyte").rename(tmp_path / "odd" / "platelet")
    args = ev.get_args_parser().parse_args(["--classifier", str(setup["clf"]), "--data", str(tmp_path / "odd")])
    assert ev.run(args) == 2
    assert "platelet" in capsys.readouterr().err
