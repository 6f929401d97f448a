"""Calibrated confidence and the out-of-distribution flag (models.abstention), and checkpoints with and without them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stainbridge.daemon import cli
from stainbridge.models import abstention, checkpoint, inference
from stainbridge.models.imaging import data, synthetic
from tests.daemon_helpers import build_tiny_models

torch.set_num_threads(1)


def overconfident_case(n: int = 4000, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits `scale` times sharper than the labels were drawn from: a network that claims too much."""
    g = torch.Generator().manual_seed(0)
    honest = torch.randn(n, 5, generator=g) * 1.5
    labels = torch.multinomial(torch.softmax(honest, 1), 1, generator=g).squeeze(1)
    return honest * scale, labels


def test_temperature_scaling_lowers_the_calibration_error() -> None:
    """On logits 3x too sharp, the fitted temperature is about 3 and the ECE falls to a fraction of what it was."""
    logits, labels = overconfident_case()
    temperature = abstention.fit_temperature(logits.unsqueeze(0), labels)
    before = abstention.expected_calibration_error(torch.softmax(logits, 1), labels)
    after = abstention.expected_calibration_error(abstention.tempered_probabilities(logits, temperature), labels)
    assert 2.5 < temperature < 3.5
    assert before > 0.1 and after < before / 4


def test_calibration_error_of_a_calibrated_answer_is_small() -> None:
    """Answers right as often as their confidence says score an ECE near 0; always-wrong confident ones near 1."""
    g = torch.Generator().manual_seed(1)
    confidence = torch.rand(20000, generator=g) * 0.5 + 0.5
    correct = torch.rand(20000, generator=g) < confidence
    assert abstention.calibration_error(confidence, correct) < 0.02
    assert abstention.calibration_error(torch.full((100,), 0.99), torch.zeros(100, dtype=torch.bool)) > 0.98


def test_feature_density_scores_points_away_from_every_class_higher() -> None:
    """Relative Mahalanobis: held-out cells of the classes score low, points between and beyond the classes high."""
    g = torch.Generator().manual_seed(2)
    means = torch.randn(5, 16, generator=g) * 6
    labels = torch.arange(5).repeat(200)
    train = means[labels] + torch.randn(1000, 16, generator=g)
    held_out = means[labels[:250]] + torch.randn(250, 16, generator=g)
    outside = torch.cat([means[:2].mean(0) + torch.randn(25, 16, generator=g), torch.randn(25, 16, generator=g) + 30])
    density = abstention.FeatureDensity.fit(train, labels, 5)
    threshold = float(torch.quantile(density.score(held_out), 0.98))
    assert bool((density.score(outside) > threshold).all())
    assert float((density.score(held_out) > threshold).double().mean()) <= 0.02


def test_ledoit_wolf_inverts_with_fewer_cells_than_dimensions() -> None:
    """20 cells in 64 dimensions: the shrunk covariance is positive definite, so the density has a precision."""
    g = torch.Generator().manual_seed(3)
    density = abstention.FeatureDensity.fit(torch.randn(20, 64, generator=g), torch.arange(2).repeat(10), 2)
    assert bool(torch.isfinite(density.precision).all())
    assert float(torch.linalg.eigvalsh(density.precision.double()).min()) > 0


def test_not_a_known_class_is_checked_before_low_confidence() -> None:
    """A confident cell far from every class is not_a_known_class; an unsure in-class one low_confidence; else none."""
    density = abstention.FeatureDensity(class_means=torch.zeros(2, 2), precision=torch.eye(2),
                                        background_mean=torch.zeros(2), background_precision=torch.zeros(2, 2))
    flags = abstention.Abstention(temperatures={"plain": 1.0, "tta": 1.0}, ood_thresholds={"plain": 4.0},
                                  density=density, confidence_below=0.6, record={"fitted": True})
    logits = torch.tensor([[[8.0, 0.0], [0.1, 0.0], [8.0, 0.0], [0.1, 0.0]]])
    features = torch.tensor([[[5.0, 0.0], [0.5, 0.0], [0.5, 0.0], [5.0, 0.0]]])
    scores = flags.scores(logits, features, tta=False)
    assert flags.reasons(scores, tta=False) == ["not_a_known_class", "low_confidence", None, "not_a_known_class"]
    assert scores.ood.tolist() == pytest.approx([25.0, 0.25, 0.25, 25.0])


def test_checkpoint_without_calibration_keeps_working(tmp_path: Path) -> None:
    """A checkpoint from before calibration runs at temperature 1 without an OOD score and says so."""
    tiny = build_tiny_models(tmp_path)
    clf = inference.load_classifier(tiny.classifier)
    assert not clf.abstention.calibrated and "uncalibrated" in clf.abstention.describe()
    images = [synthetic.render_cell("lymphocyte", size=48, rng=synthetic.image_rng(0, "reference", "lymphocyte", i))
              for i in range(4)]
    for result in inference.run_batch(images, inference.load_standardizer("none"), clf, tta=True):
        assert result.calibrated_confidence is None and result.ood_score is None
        assert result.review_reason == ("low_confidence" if result.confidence < abstention.CONFIDENCE_BELOW else None)
        assert result.needs_review == (result.review_reason is not None)


def test_calibration_without_its_tensors_is_a_mismatch(tmp_path: Path) -> None:
    """A header that promises OOD statistics the file does not hold is refused with the command that fixes it."""
    tiny = build_tiny_models(tmp_path)
    state, header = checkpoint.load_checkpoint(tiny.classifier)
    modes = {m: {"temperature": 1.5, "ood_threshold": 10.0} for m in abstention.MODES}
    broken = tmp_path / "broken.safetensors"
    checkpoint.save_checkpoint(broken, state, {**header, "abstention": {"modes": modes, "confidence_below": 0.5}})
    with pytest.raises(inference.ModelMismatch, match="train calibrate"):
        inference.load_classifier(broken)


def test_tta_temperature_is_fitted_on_the_view_mean() -> None:
    """With 8 views, T is chosen for the mean of the tempered softmaxes, the probabilities the service stores."""
    logits, labels = overconfident_case(n=2000)
    g = torch.Generator().manual_seed(4)
    views = torch.stack([logits + torch.randn(logits.shape, generator=g) * 2 for _ in range(8)])
    temperature = abstention.fit_temperature(views, labels)
    nll = [float(-abstention.tempered_probabilities(views, t)[torch.arange(len(labels)), labels].log().mean())
           for t in (temperature * 0.7, temperature, temperature * 1.4)]
    assert nll[1] <= nll[0] and nll[1] <= nll[2]


@pytest.mark.slow  # the session's lab classifier is trained in a subprocess
def test_train_classifier_stores_the_calibration_in_the_checkpoint(lab) -> None:
    """`train classifier` ends by fitting temperatures and OOD statistics on its split: header entry and tensors."""
    state, header = checkpoint.load_checkpoint(lab.classifier)
    record = header["abstention"]
    assert set(record["modes"]) == set(abstention.MODES)
    for fitted in record["modes"].values():
        assert fitted["temperature"] > 0 and {"ece_before", "ece_after", "ood_threshold"} <= set(fitted)
    assert {f"abstention.{name}" for name in abstention.FeatureDensity.TENSORS} <= set(state)
    assert inference.load_classifier(lab.classifier).abstention.calibrated


def test_train_calibrate_writes_a_new_checkpoint_with_the_same_weights(tmp_path: Path, capsys) -> None:
    """`train calibrate` on a checkpoint from before calibration writes a new file (new sha256) with the fit and the
    ECE before and after; the original is untouched and the network's weights are the same."""
    tiny = build_tiny_models(tmp_path / "m")
    reference = tmp_path / "reference"
    synthetic.write_dataset(reference, protocol="reference", per_class=12, size=48, seed=1)
    data.write_manifest(data.make_split(reference, seed=0), f"{tiny.classifier}.split.json")
    out = tmp_path / "calibrated.safetensors"
    assert cli.main(["train", "calibrate", "--classifier", str(tiny.classifier), "--reference", str(reference),
                     "--out", str(out), "--confidence-below", "0.6", "--device", "cpu"]) == 0
    assert checkpoint.file_sha256(tiny.classifier) == tiny.classifier_sha256
    assert capsys.readouterr().out.strip() == checkpoint.file_sha256(out) != tiny.classifier_sha256
    before, _ = checkpoint.load_checkpoint(tiny.classifier)
    after, header = checkpoint.load_checkpoint(out)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert header["abstention"]["confidence_below"] == 0.6
    assert {"ece_before", "ece_after"} <= set(header["abstention"]["modes"]["tta"])
    assert inference.load_classifier(out).abstention.calibrated


def test_train_calibrate_refuses_to_overwrite_its_input(tmp_path: Path, capsys) -> None:
    """Calibrating in place would change a registered file's bytes: refused, saying why."""
    tiny = build_tiny_models(tmp_path)
    assert cli.main(["train", "calibrate", "--classifier", str(tiny.classifier), "--reference", str(tmp_path),
                     "--out", str(tiny.classifier)]) == 2
    assert "new version" in capsys.readouterr().err
