"""The inference surface the daemon uses (models/inference.py): load checkpoints, run a batch."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stainbridge.models import inference
from stainbridge.models.checkpoint import CheckpointError, save_checkpoint
from stainbridge.models.classifier import build_classifier
from stainbridge.models.cyclegan import build_generator
from stainbridge.models.imaging import classical, synthetic

CLASSES = ["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"]
SIZE = 64
GEN_ARGS = {"ngf": 8, "n_blocks": 2, "upsample": "resize_conv", "norm": "instance"}


def cells(protocol: str, n: int, size: int = 80) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [synthetic.render_cell(CLASSES[i % len(CLASSES)], protocol=protocol, size=size, rng=rng) for i in range(n)]


@functools.cache
def reference_stats() -> dict:
    return classical.fit_reference_stats(cells("reference", 5))


def classifier_header() -> dict:
    return {
        "kind": "classifier",
        "architecture": "resnet18",
        "arch_args": {"num_classes": len(CLASSES)},
        "classes": CLASSES,
        "input_size": SIZE,
        "normalization": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        "geometry": {"reference_cell_fraction": 0.3},
        "reference_stain": reference_stats(),
    }


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    folder = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    clf_path, gen_path = folder / "clf.safetensors", folder / "gan.safetensors"
    clf_sha = save_checkpoint(clf_path, build_classifier(arch="resnet18", num_classes=len(CLASSES)).state_dict(), classifier_header())
    gen_header = {"kind": "standardizer", "architecture": "resnet_generator", "arch_args": GEN_ARGS, "input_size": SIZE}
    gen_sha = save_checkpoint(gen_path, build_generator(**GEN_ARGS).state_dict(), gen_header)
    return {"classifier": (clf_path, clf_sha), "standardizer": (gen_path, gen_sha)}


@pytest.fixture(scope="module")
def classifier(checkpoints) -> inference.Classifier:
    path, sha = checkpoints["classifier"]
    return inference.load_classifier(path, device="cpu", expected_sha256=sha)


def test_load_classifier_reads_its_contract(classifier: inference.Classifier, checkpoints) -> None:
    """The loaded classifier exposes classes, input size, sha256 and a name from its file."""
    assert classifier.classes == CLASSES and classifier.input_size == SIZE
    assert classifier.sha256 == checkpoints["classifier"][1] and classifier.name == "clf"


def test_run_batch_with_cyclegan(classifier: inference.Classifier, checkpoints) -> None:
    """A batch through the generator and classifier gives a label and probabilities summing to 1."""
    path, sha = checkpoints["standardizer"]
    standardizer = inference.load_standardizer(str(path), classifier=classifier, expected_sha256=sha)
    assert standardizer.name == "gan" and standardizer.sha256 == sha
    results = inference.run_batch(cells("incoming", 3), standardizer, classifier, scale="1.0")
    assert len(results) == 3
    for r in results:
        assert r.label in CLASSES and r.confidence == max(r.probabilities.values())
        assert sum(r.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        assert r.standardized.size == (SIZE, SIZE) and r.standardized.mode == "RGB"


@pytest.mark.parametrize("spec", ["none", "reinhard", "macenko"])
def test_builtin_standardizers_run(classifier: inference.Classifier, spec: str) -> None:
    """The built-in standardizers run with the classifier's reference stats and keep [0,1] and shape."""
    standardizer = inference.load_standardizer(spec, classifier=classifier)
    assert standardizer.name == spec and standardizer.sha256 is None
    batch = inference.prepare_batch(cells("incoming", 2), inference.Geometry(SIZE))
    out = standardizer(batch)
    assert out.shape == batch.shape and out.min() >= 0 and out.max() <= 1
    if spec == "none":
        assert torch.equal(out, batch)


def test_generator_standardizer_pads_odd_sizes(checkpoints) -> None:
    """A generator standardizer accepts sizes that are not multiples of 4 and returns the same size in [0,1]."""
    standardizer = inference.load_standardizer(str(checkpoints["standardizer"][0]))
    batch = torch.rand(2, 3, 66, 71)
    out = standardizer(batch)
    assert out.shape == batch.shape and out.min() >= 0 and out.max() <= 1


def test_prepare_batch_geometry(classifier: inference.Classifier) -> None:
    """prepare_batch returns [N,3,size,size] in [0,1], for a numeric and an automatic scale."""
    images = cells("incoming", 2, size=100)
    for scale in ("1.0", "auto"):
        batch = inference.prepare_batch(images, inference.Geometry(48, scale=scale, reference_cell_fraction=0.3))
        assert batch.shape == (2, 3, 48, 48) and batch.dtype == torch.float32
        assert 0 <= batch.min() and batch.max() <= 1


def test_standardizer_checkpoint_as_classifier_is_a_mismatch(checkpoints) -> None:
    """Loading a standardizer checkpoint as the classifier raises ModelMismatch."""
    with pytest.raises(inference.ModelMismatch, match="'standardizer' checkpoint, not a 'classifier'"):
        inference.load_classifier(checkpoints["standardizer"][0])


def test_classifier_checkpoint_as_standardizer_is_a_mismatch(checkpoints) -> None:
    """Loading a classifier checkpoint as the standardizer raises ModelMismatch."""
    with pytest.raises(inference.ModelMismatch, match="not a 'standardizer'"):
        inference.load_standardizer(str(checkpoints["classifier"][0]))


def test_sha_mismatch_is_refused(checkpoints) -> None:
    """A checkpoint whose sha256 differs from the registry's value is refused."""
    path, _ = checkpoints["classifier"]
    with pytest.raises(CheckpointError, match="registry expects"):
        inference.load_classifier(path, expected_sha256="0" * 64)


def test_inconsistent_classes_are_a_mismatch(tmp_path: Path) -> None:
    """A header listing more classes than the network's head has raises ModelMismatch."""
    path = tmp_path / "bad.safetensors"
    header = {**classifier_header(), "classes": CLASSES + ["blast"], "arch_args": {}}
    save_checkpoint(path, build_classifier(arch="resnet18", num_classes=len(CLASSES)).state_dict(), header)
    with pytest.raises(inference.ModelMismatch, match="do not fit"):
        inference.load_classifier(path)


def test_wrong_generator_arch_args_are_a_mismatch(tmp_path: Path) -> None:
    """Generator tensors that do not fit the header's arch_args raise ModelMismatch."""
    path = tmp_path / "gan.safetensors"
    header = {"kind": "standardizer", "architecture": "resnet_generator", "arch_args": {**GEN_ARGS, "n_blocks": 3}}
    save_checkpoint(path, build_generator(**GEN_ARGS).state_dict(), header)
    with pytest.raises(inference.ModelMismatch, match="do not fit"):
        inference.load_standardizer(str(path))


def test_unknown_architecture_is_a_mismatch(tmp_path: Path) -> None:
    """An architecture name outside the explicit dict raises ModelMismatch."""
    path = tmp_path / "x.safetensors"
    save_checkpoint(path, {"w": torch.zeros(1)}, {**classifier_header(), "architecture": "vit_b_16"})
    with pytest.raises(inference.ModelMismatch, match="unknown classifier architecture"):
        inference.load_classifier(path)


def test_classical_standardizer_needs_reference_stats(classifier: inference.Classifier) -> None:
    """reinhard without a classifier (and so without reference stats) raises ModelMismatch."""
    with pytest.raises(inference.ModelMismatch, match="reference stain"):
        inference.load_standardizer("reinhard")


def test_unknown_standardizer_spec_raises(tmp_path: Path) -> None:
    """A spec that is neither a built-in name nor an existing file says what is allowed."""
    with pytest.raises(FileNotFoundError, match="none, reinhard"):
        inference.load_standardizer(str(tmp_path / "missing.safetensors"))


def test_resolve_device() -> None:
    """"auto" picks cuda only when available; "cpu" is always cpu; unknown names raise."""
    assert inference.resolve_device("cpu").type == "cpu"
    assert inference.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError):
        inference.resolve_device("tpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bf16 autocast + channels_last path)")
def test_cuda_matches_cpu(checkpoints) -> None:
    """On CUDA (bf16, channels_last) the probabilities agree with the float32 CPU run."""
    images = cells("incoming", 4)
    runs = {}
    for device in ("cpu", "cuda"):
        clf = inference.load_classifier(checkpoints["classifier"][0], device=device)
        std = inference.load_standardizer(str(checkpoints["standardizer"][0]), device=device)
        runs[device] = torch.tensor([[r.probabilities[c] for c in CLASSES] for r in inference.run_batch(images, std, clf)])
    assert torch.allclose(runs["cpu"], runs["cuda"], atol=0.05)
