"""`stainbridge train adapt`: label-free adaptation of the classifier to an incoming hospital."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from stainbridge.daemon.schema import upgrade_database
from stainbridge.models import checkpoint, inference
from stainbridge.models.imaging import synthetic
from stainbridge.models.training import adapt, finetune

torch.set_num_threads(1)


def test_information_maximization_prefers_confident_and_diverse_predictions() -> None:
    """Confident predictions spread over the classes score lowest; all cells in one class or unsure ones do not."""
    k = 5
    diverse = torch.eye(k).repeat(4, 1) * 20.0  # each cell sure, every class used
    collapsed = torch.zeros(20, k)
    collapsed[:, 2] = 20.0  # each cell sure, all in one class
    unsure = torch.zeros(20, k)
    losses = {name: adapt.information_maximization(logits, 1.0) for name, logits in
              (("diverse", diverse), ("collapsed", collapsed), ("unsure", unsure))}
    assert losses["diverse"][0].item() < 0.01
    assert losses["collapsed"][0].item() > math.log(k) - 0.01 and losses["unsure"][0].item() > math.log(k) - 0.01
    assert losses["unsure"][1]["entropy"] == pytest.approx(math.log(k), abs=1e-4)
    # without the diversity term, collapsing is as good as anything: the term is what prevents it
    assert adapt.information_maximization(collapsed, 0.0)[0].item() < 1e-3


def test_the_diversity_term_pulls_the_sites_mean_prediction_towards_the_prior() -> None:
    """A site of 60 % class 0 scores lower than an even one under a prior of 60 % class 0, higher under equal
    shares; with equal shares the loss is SHOT's (entropy - diversity x entropy of the mean) plus a constant."""
    k = 5
    skewed = torch.cat([torch.eye(k)[[0] * 12], torch.eye(k)[1:].repeat(2, 1)]) * 20.0  # shares .6 .1 .1 .1 .1
    even = torch.eye(k).repeat(4, 1) * 20.0
    majority = torch.tensor([0.6, 0.1, 0.1, 0.1, 0.1])
    im = adapt.information_maximization
    assert im(skewed, 1.0, majority)[0].item() < im(even, 1.0, majority)[0].item() - 0.1
    assert im(even, 1.0, None)[0].item() < im(skewed, 1.0, None)[0].item() - 0.1
    logits = torch.randn(16, k, generator=torch.Generator().manual_seed(0))
    loss, parts = im(logits, 0.7)
    shot = parts["entropy"] - 0.7 * parts["marginal_entropy"]
    assert loss.item() == pytest.approx(shot + 0.7 * math.log(k), abs=1e-4)


class _ConstantLogits(nn.Module):
    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(len(x), -1)


def test_the_site_prior_is_halfway_between_equal_shares_and_the_unadapted_mean_prediction() -> None:
    """site: halfway between equal shares and the mean prediction; predicted: that mean; an unknown kind is refused."""
    logits = torch.tensor([[2.0, 0.0, 0.0, -1.0, 1.0]])
    header = {"classes": list(synthetic.CLASSES), "input_size": 8,
              "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}}
    clf = inference.Classifier(_ConstantLogits(logits), header, name="constant", sha256="", device=torch.device("cpu"))
    images = torch.rand(300, 3, 8, 8)  # more than one inner batch
    site = adapt.class_prior("site", clf, images)
    assert torch.allclose(site, 0.5 * logits.softmax(1)[0] + 0.1, atol=1e-5)
    assert torch.allclose(adapt.class_prior("uniform", clf, images), torch.full((5,), 0.2))
    assert torch.allclose(adapt.class_prior("predicted", clf, images), logits.softmax(1)[0], atol=1e-5)
    with pytest.raises(adapt.AdaptError, match="site, predicted, uniform"):
        adapt.class_prior("natural", clf, images)


@pytest.mark.slow
def test_the_site_prior_keeps_a_skewed_sites_majority_that_equal_shares_spread(lab, tmp_path: Path) -> None:
    """A drop folder where one class is most of the cells, as neutrophils are in blood (eosinophils here, drawn in the
    reference stain): adapted for the default epochs towards the site prior, more of the site is still predicted
    that class than adapted towards equal shares, which spread it over the other classes."""
    # Eosinophils, not blood's neutrophils: the session's tiny classifier tells them by colour (recall 1.0 whatever
    # vector instructions the CPU's kernels use), while the share of this site it called neutrophil (or
    # lymphocyte) moved between 0.5 and 0.7 with them, and with it the skew the prior had to keep.
    majority = "eosinophil"
    site = tmp_path / "site"
    synthetic.write_dataset(site, protocol="reference", per_class=3, size=48, seed=7)
    synthetic.write_dataset(site / "more", protocol="reference", per_class=40, size=48, seed=8, classes=(majority,))
    items = [(path, "") for path in sorted(site.rglob("*.png"))]
    device = torch.device("cpu")
    shares = {}
    for kind in adapt.PRIORS:
        model, header, base, criterion = finetune.trainable_classifier(lab.classifier, device)
        target = finetune.standardize(items, base, inference.load_standardizer("none"), inference.SCALE_FROM_PROFILE)
        unadapted = inference.predict_views(base, target).argmax(1)
        # what the prior can keep is the classifier's own majority: without it there is nothing to prove
        assert (unadapted == base.classes.index(majority)).float().mean() > 0.6, f"the lab classifier lost {majority}s"
        prior = adapt.class_prior(kind, base, target)
        # batches of 8: 60 steps bring the shares near where the priors pull them; 30 (batches of 16) left one
        # adaptation seed in three short of the margin
        adapt.adapt(model, target, None, normalization=header["normalization"], criterion=criterion,
                    epochs=adapt.DEFAULTS["epochs"], lr=adapt.DEFAULTS["lr"], batch_size=8, diversity=1.0, prior=prior,
                    reference_weight=0.0, seed=0, device=device, log=lambda _: None)
        adapted = inference.Classifier(model.eval(), header, name=kind, sha256="", device=device)
        predicted = inference.predict_views(adapted, target).argmax(1)
        shares[kind] = round(float((predicted == base.classes.index(majority)).float().mean()), 3)
    assert shares["site"] > shares["uniform"] + 0.15, shares


@pytest.mark.slow
def test_adapt_writes_a_label_free_classifier_with_the_same_contract(lab, tmp_path: Path, run_stainbridge) -> None:
    """The real command: images are found recursively (class folders ignored), read through the service's
    geometry and standardizer; the checkpoint keeps the classifier's contract, records what it adapted on, and moved."""
    source = tmp_path / "drop-archive"
    synthetic.write_dataset(source / "2026" / "12", protocol="incoming", per_class=8, size=48, seed=5)
    out = tmp_path / "adapted.safetensors"
    done = run_stainbridge("train", "adapt", "--init-from", str(lab.classifier), "--source", str(source),
                           "--reference", str(lab.reference), "--standardizer", "reinhard", "--out", str(out),
                           "--epochs", "2", "--batch-size", "8", "--device", "cpu", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    before_state, before = checkpoint.load_checkpoint(lab.classifier)
    after_state, after = checkpoint.load_checkpoint(out)
    for key in ("architecture", "classes", "input_size", "normalization", "geometry", "reference_stain", "gamma"):
        assert after[key] == before[key], key
    adaptation = after["adaptation"]
    assert adaptation["labels_used"] is False and adaptation["source"]["images"] == 40
    assert adaptation["standardizer"]["name"] == "reinhard"
    assert adaptation["init_from"]["sha256"] == checkpoint.file_sha256(lab.classifier)
    assert sum(adaptation["predicted_class_shares"].values()) == pytest.approx(1.0, abs=1e-3)
    assert adaptation["prior"] == "site" and adaptation["diversity"] == 1.0
    assert sum(adaptation["class_prior"].values()) == pytest.approx(1.0, abs=1e-3)
    assert min(adaptation["class_prior"].values()) >= 0.1  # half of it is equal shares
    assert len(after["metrics"]["history"]) == 2
    assert any(not torch.equal(before_state[k], after_state[k]) for k in before_state if k.endswith("weight"))
    report = json.loads(done.stderr.strip().splitlines()[-1])
    assert report["sha256"] == done.stdout.strip() == inference.load_classifier(out).sha256


@pytest.mark.slow
def test_too_few_incoming_images_are_refused_with_the_fix(lab, tmp_path: Path, run_stainbridge) -> None:
    """A handful of images cannot stand for a site: exit 2, the count and the minimum, no checkpoint."""
    source = tmp_path / "few"
    source.mkdir()
    for i, path in enumerate(sorted(lab.incoming.rglob("*.png"))[:5]):
        shutil.copy(path, source / f"{i}.png")
    out = tmp_path / "x.safetensors"
    done = run_stainbridge("train", "adapt", "--init-from", str(lab.classifier), "--source", str(source),
                           "--reference", str(lab.reference), "--out", str(out), "--device", "cpu")
    assert done.returncode == 2
    assert "holds 5 images" in done.stderr and f"at least {adapt.MIN_SOURCE_IMAGES}" in done.stderr
    assert not out.exists()


@pytest.mark.slow
def test_models_list_says_a_classifier_was_adapted(lab, tmp_path: Path, run_stainbridge, sqlite_url: str) -> None:
    """`models register` + `models list` (real CLI) show the adaptation: the site's image count and class shares."""
    source = tmp_path / "site"
    synthetic.write_dataset(source, protocol="incoming", per_class=8, size=48, seed=6)
    out = tmp_path / "adapted.safetensors"
    done = run_stainbridge("train", "adapt", "--init-from", str(lab.classifier), "--source", str(source),
                           "--out", str(out), "--epochs", "1", "--batch-size", "8", "--prior", "uniform",
                           "--device", "cpu", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert set(checkpoint.load_checkpoint(out)[1]["adaptation"]["class_prior"].values()) == {0.2}
    env = {"STAINBRIDGE_DATABASE_URL": sqlite_url, "STAINBRIDGE_PATHS_STATE": str(tmp_path / "state")}
    upgrade_database(sqlite_url)
    registered = run_stainbridge("models", "register", str(out), env=env)
    assert registered.returncode == 0, registered.stderr
    listed = run_stainbridge("models", "list", env=env)
    assert "[adapted to 40 unlabeled site images]" in listed.stdout, listed.stdout
    as_json = json.loads(run_stainbridge("models", "list", "--json", env=env).stdout)
    adaptation = as_json[-1]["adaptation"]
    assert adaptation["labels_used"] is False and adaptation["standardizer"]["name"] == "none"
    assert set(adaptation["predicted_class_shares"]) == set(synthetic.CLASSES)
    assert adaptation["prior"] == "uniform" and set(adaptation["class_prior"].values()) == {0.2}
