"""`stainbridge train site-profile`: a classical standardizer that carries the site's geometry to the service."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from PIL import Image

from stainbridge.models import checkpoint, inference
from stainbridge.models.classifier import build_classifier
from stainbridge.models.imaging import classical, site_geometry, synthetic
from stainbridge.models.metrics import stain_distance, stain_region_colours


def _write_smears(folder: Path, protocol: str, fraction: float, n: int = 25) -> list:
    p = dataclasses.replace(synthetic.get_protocol(protocol), cell_fraction=fraction, red_cell_gap=0.1)
    folder.mkdir(parents=True)
    images = []
    for i in range(n):
        label = synthetic.CLASSES[i % 5]
        img = synthetic.render_cell(label, protocol=p, size=128, rng=synthetic.image_rng(7, protocol, label, i))
        img.save(folder / f"{i}.png")
        images.append(img)
    return images


def _site_and_classifier(tmp_path: Path) -> tuple[list, Path]:
    """Reference smears (red cells 40 px) in ref/, the site's (24 px) in src/, and an untrained classifier
    whose header records the reference stain and scale: (reference images, classifier path)."""
    reference = _write_smears(tmp_path / "ref", "reference", 0.3)
    _write_smears(tmp_path / "src", "incoming", 0.5)
    clf_path = tmp_path / "clf.safetensors"
    checkpoint.save_checkpoint(clf_path, build_classifier(arch="resnet18", num_classes=5).state_dict(), {
        "kind": "classifier", "architecture": "resnet18", "arch_args": {"num_classes": 5},
        "classes": list(synthetic.CLASSES), "input_size": 32, "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3},
        "reference_stain": classical.fit_reference_stats(reference[:8]),
        "geometry": {"reference_window_px": 128.0, **site_geometry.reference_geometry(reference)}})
    return reference, clf_path


@pytest.mark.slow
def test_reinhard_checkpoint_runs_reinhard_with_the_estimated_geometry(tmp_path: Path, run_stainbridge) -> None:
    """The checkpoint standardizes exactly as the built-in Reinhard does, and the service's geometry
    takes the magnification (red cells 24 px vs 40 px: k = 0.6) from its site profile."""
    _reference, clf_path = _site_and_classifier(tmp_path)
    out = tmp_path / "reinhard.safetensors"
    done = run_stainbridge("train", "site-profile", "--method", "reinhard", "--source", str(tmp_path / "src"),
                           "--classifier", str(clf_path), "--out", str(out))
    assert done.returncode == 0, done.stderr

    classifier = inference.load_classifier(clf_path)
    standardizer = inference.load_standardizer(str(out))
    assert standardizer.header["architecture"] == "reinhard" and standardizer.sha256 == checkpoint.file_sha256(out)
    batch = torch.rand(2, 3, 32, 32)
    builtin = inference.load_standardizer("reinhard", classifier=classifier)
    assert torch.allclose(standardizer(batch), builtin(batch))
    geometry = inference.resolve_geometry(classifier, standardizer)
    assert geometry.magnification == pytest.approx(0.6, rel=0.08) and "red_cell_diameter" in geometry.source


@pytest.mark.slow
def test_a_classifier_without_reference_scale_needs_the_reference_folder(tmp_path: Path, run_stainbridge) -> None:
    """Without a recorded reference red-cell diameter and without --reference, the command says what to pass."""
    _write_smears(tmp_path / "src", "incoming", 0.5, n=3)
    clf_path = tmp_path / "clf.safetensors"
    checkpoint.save_checkpoint(clf_path, build_classifier(arch="resnet18", num_classes=5).state_dict(), {
        "kind": "classifier", "architecture": "resnet18", "arch_args": {"num_classes": 5},
        "classes": list(synthetic.CLASSES), "input_size": 32, "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3},
        "reference_stain": {"reinhard": {"lab_mean": [70.0, 10.0, -5.0], "lab_std": [10.0, 5.0, 5.0]}},
        "geometry": {"reference_window_px": 128.0}})
    done = run_stainbridge("train", "site-profile", "--source", str(tmp_path / "src"), "--classifier", str(clf_path),
                           "--out", str(tmp_path / "r.safetensors"))
    assert done.returncode == 2 and "--reference DIR" in done.stderr


@pytest.mark.slow
def test_colour_map_checkpoint_maps_the_site_onto_the_reference_colours(tmp_path: Path, run_stainbridge) -> None:
    """`--method colour_map`: the checkpoint carries the site profile and the fitted map (tensors, no pickle);
    the service loads it, and it brings the site's windows (cut at the profile's magnification) close to the
    reference stain. Without --reference it says what to pass."""
    reference, clf_path = _site_and_classifier(tmp_path)
    refused = run_stainbridge("train", "site-profile", "--method", "colour_map", "--source", str(tmp_path / "src"),
                              "--classifier", str(clf_path), "--out", str(tmp_path / "no.safetensors"))
    assert refused.returncode == 2 and "--reference DIR" in refused.stderr
    out = tmp_path / "colour-map.safetensors"
    done = run_stainbridge("train", "site-profile", "--method", "colour_map", "--source", str(tmp_path / "src"),
                           "--classifier", str(clf_path), "--reference", str(tmp_path / "ref"), "--out", str(out))
    assert done.returncode == 0, done.stderr

    state, header = checkpoint.load_checkpoint(out)
    assert set(state) == {"rotations", "site_quantiles", "reference_quantiles"}
    assert header["colour_map"]["source_images"] == 25 and header["training_data"]["labels_used"] is False
    choice = header["colour_map"]["histogram_weight_choice"]  # chosen against the service's Reinhard
    assert choice["delta_e"][str(header["colour_map"]["histogram_weight"])] <= 0.9 * choice["baseline_delta_e"]
    by_hand = run_stainbridge("train", "site-profile", "--method", "colour_map", "--source", str(tmp_path / "src"),
                              "--classifier", str(clf_path), "--reference", str(tmp_path / "ref"),
                              "--histogram-weight", "1", "--out", str(tmp_path / "w1.safetensors"))
    assert by_hand.returncode == 0, by_hand.stderr
    manual = checkpoint.load_checkpoint(tmp_path / "w1.safetensors")[1]["colour_map"]
    assert manual["histogram_weight"] == 1.0 and "histogram_weight_choice" not in manual
    classifier = inference.load_classifier(clf_path)
    standardizer = inference.load_standardizer(str(out))
    geometry = inference.resolve_geometry(classifier, standardizer)
    assert geometry.magnification == pytest.approx(0.6, rel=0.08)
    site_windows = inference.prepare_batch([Image.open(p) for p in sorted((tmp_path / "src").glob("*.png"))], geometry)
    reference_windows = inference.prepare_batch(reference, inference.resolve_geometry(classifier, None))
    target = stain_region_colours(reference_windows)
    before = stain_distance(site_windows, target)["delta_e"]
    assert stain_distance(standardizer(site_windows), target)["delta_e"] < before / 2
