"""The ColorizationGAN standardizer: pix2pix L -> ab trained on reference images only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stainbridge.models import checkpoint, colorization, inference
from stainbridge.models.bench import training as bench_train
from stainbridge.models.bench.data import to_uint8
from stainbridge.models.imaging import classical, synthetic

torch.set_num_threads(1)


def _cells(protocol: str, n: int, size: int = 32) -> torch.Tensor:
    return torch.stack([to_uint8(synthetic.render_cell(synthetic.CLASSES[i % 5], protocol=protocol, size=size,
                                                       rng=synthetic.image_rng(0, protocol, "c", i))) for i in range(n)])


def test_lab_conversions_agree_with_the_classical_ones_and_round_trip() -> None:
    """The torch CIE Lab conversion equals models.imaging.classical's numpy one and inverts to the input."""
    x = torch.rand(2, 3, 9, 11)
    lab = colorization.rgb_to_lab(x)
    expected = classical.rgb_to_lab(x.permute(0, 2, 3, 1).double().numpy())
    assert lab.permute(0, 2, 3, 1).numpy() == pytest.approx(expected, abs=1e-3)
    assert torch.allclose(colorization.lab_to_rgb(lab), x, atol=1e-4)


def test_output_keeps_the_incoming_structure_by_construction() -> None:
    """Whatever the U-Net predicts, the output's lightness is the input's L matched to the reference statistics."""
    model = colorization.build_colorization(**colorization.UNET_PRESETS["tiny"], l_mean=70.0, l_std=12.0).eval()
    x = _cells("incoming", 3).float() / 255
    with torch.no_grad():
        out = (model(x * 2 - 1) + 1) / 2
        expected = model.normalized_lightness(x)
    got = colorization.rgb_to_lab(out)[:, :1]
    assert (got - expected).abs().mean() < 1.0  # L units (0-100); gamut clipping moves a few pixels
    assert expected.mean() == pytest.approx(70.0, abs=1.0)


@pytest.mark.slow
def test_training_on_the_reference_moves_incoming_colours_towards_it() -> None:
    """A few pix2pix steps on reference cells only make incoming cells' mean colour (a, b) closer to the reference's."""
    reference, incoming = _cells("reference", 40), _cells("incoming", 10).float() / 255
    model, header = bench_train.train_colorization(reference, unet="tiny", epochs=2, steps=30, batch_size=8,
                                                   discriminator="tiny", seed=0, device=torch.device("cpu"),
                                                   training_data={"source": None}, log=lambda _: None)
    assert header["metrics"]["history"][-1]["g_l1"] < header["metrics"]["history"][0]["g_l1"]
    standardized = inference.wrap_generator(model, name="c", header=header)(incoming)

    def ab(images: torch.Tensor) -> torch.Tensor:
        return colorization.rgb_to_lab(images)[:, 1:].mean(dim=(0, 2, 3))

    target = ab(reference.float() / 255)
    assert (ab(standardized) - target).norm() < 0.6 * (ab(incoming) - target).norm()


@pytest.mark.slow
def test_train_colorization_command_writes_a_standardizer_the_service_loads(tmp_path: Path, run_stainbridge) -> None:
    """`stainbridge train colorization` trains on a reference folder, records the --source site profile,
    and the checkpoint loads through inference.load_standardizer like any standardizer."""
    synthetic.write_dataset(tmp_path / "ref", protocol="reference", per_class=4, size=64, seed=0)
    synthetic.write_dataset(tmp_path / "inc", protocol="incoming", per_class=2, size=64, seed=1)
    out = tmp_path / "colorization.safetensors"
    done = run_stainbridge("train", "colorization", "--reference", str(tmp_path / "ref"), "--out", str(out),
                           "--preset", "tiny", "--source", str(tmp_path / "inc"), "--device", "cpu")
    assert done.returncode == 0, done.stderr
    _, header = checkpoint.load_checkpoint(out)
    assert header["architecture"] == "colorization" and header["training_data"]["labels_used"] is False
    assert header["training_data"]["source"]["used_for"] == "site profile only"
    assert header["site_profile"]["magnification"] > 0 and header["site_profile"]["method"]
    assert {"l_mean", "l_std", "ngf", "num_downs"} <= set(header["arch_args"])
    standardizer = inference.load_standardizer(str(out))
    batch = torch.rand(2, 3, 48, 48)
    result = standardizer(batch)
    assert result.shape == batch.shape and 0 <= float(result.min()) and float(result.max()) <= 1
    assert json.loads(done.stderr.strip().splitlines()[-1])["sha256"] == standardizer.sha256


@pytest.mark.slow
def test_size_must_suit_the_unet(tmp_path: Path, run_stainbridge) -> None:
    """A training size the U-Net cannot halve down to 1 px is refused with the multiple it needs."""
    synthetic.write_dataset(tmp_path / "ref", protocol="reference", per_class=1, size=32, seed=0)
    done = run_stainbridge("train", "colorization", "--reference", str(tmp_path / "ref"), "--out",
                           str(tmp_path / "c.safetensors"), "--preset", "tiny", "--size", "40")
    assert done.returncode == 2 and "multiple of 32" in done.stderr
