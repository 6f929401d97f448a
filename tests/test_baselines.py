"""Classical stain normalization: Reinhard, Macenko, reference stats."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as F

from stainbridge.models.imaging import classical, synthetic


@pytest.fixture(scope="module")
def reference_images() -> list:
    return [
        synthetic.render_cell(label, protocol="reference", size=64, rng=synthetic.image_rng(0, "reference", label, i))
        for label in synthetic.CLASSES
        for i in range(4)
    ]


@pytest.fixture(scope="module")
def stats(reference_images: list) -> dict:
    return classical.fit_reference_stats(reference_images)


def _incoming_batch(n: int = 5, size: int = 64) -> torch.Tensor:
    return torch.stack(
        [
            F.to_tensor(synthetic.render_cell(label, protocol="incoming", size=size, rng=np.random.default_rng(i)))
            for i, label in zip(range(n), synthetic.CLASSES * 2)
        ]
    )


def test_stats_are_json_and_load_back(stats: dict) -> None:
    """Reference stats survive a JSON round trip and every standardizer builds from them."""
    loaded = json.loads(json.dumps(stats))
    assert loaded == stats and loaded["n_images"] == 20
    for name, cls in classical.STANDARDIZERS.items():
        std = cls.from_stats(loaded)
        out = std(_incoming_batch(2))
        assert out.shape == (2, 3, 64, 64) and out.dtype == torch.float32, name
        assert float(out.min()) >= 0 and float(out.max()) <= 1, name


def test_reinhard_matches_reference_lab_stats(stats: dict) -> None:
    """After Reinhard, an incoming image's L*a*b* means and stds match the reference's."""
    out = classical.Reinhard.from_stats(stats)(_incoming_batch(1))
    lab = classical.rgb_to_lab(out[0].permute(1, 2, 0).double().numpy()).reshape(-1, 3)
    np.testing.assert_allclose(lab.mean(axis=0), stats["reinhard"]["lab_mean"], atol=1.5)
    np.testing.assert_allclose(lab.std(axis=0), stats["reinhard"]["lab_std"], rtol=0.1, atol=1.0)


def test_lab_round_trip() -> None:
    """rgb_to_lab and lab_to_rgb invert each other on in-gamut colours."""
    rgb = np.random.default_rng(0).random((100, 3))
    np.testing.assert_allclose(classical.lab_to_rgb(classical.rgb_to_lab(rgb)), rgb, atol=1e-6)


def test_macenko_recovers_known_stain_vectors() -> None:
    """From pixels mixed out of two known stains, the Macenko stain matrix finds both vectors."""
    rng = np.random.default_rng(0)
    truth = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])
    truth /= np.linalg.norm(truth, axis=1, keepdims=True)
    conc = rng.gamma(2.0, 0.4, (20_000, 2)) * (rng.random((20_000, 2)) < 0.7)
    od = conc @ truth + rng.normal(0, 0.005, (20_000, 3))
    found = classical.macenko_stain_matrix(od)
    assert found is not None
    cosines = (found * truth).sum(axis=1)
    assert (cosines > 0.99).all(), cosines


def test_macenko_keeps_image_under_its_own_stats() -> None:
    """An image normalized with stats fitted on itself stays close to the original."""
    img = synthetic.render_cell("neutrophil", protocol="reference", size=96, rng=np.random.default_rng(3))
    x = F.to_tensor(img)[None]
    own = classical.Macenko.from_stats(classical.fit_reference_stats([img]))
    assert float((own(x) - x).abs().mean()) < 0.05


def test_macenko_blank_image_is_left_unchanged(stats: dict) -> None:
    """All-background and all-black images pass through Macenko without errors or NaNs."""
    blank = torch.ones(2, 3, 32, 32) * torch.tensor([0.98, 0.9, 0.85])[None, :, None, None]
    out = classical.Macenko.from_stats(stats)(blank)
    assert torch.allclose(out, blank)
    black = torch.zeros(1, 3, 16, 16)
    assert torch.isfinite(classical.Macenko.from_stats(stats)(black)).all()


def test_bad_stats_and_names_raise(stats: dict) -> None:
    """Missing stat sections, unknown names and empty reference sets raise BaselineError."""
    with pytest.raises(classical.BaselineError, match="fit_reference_stats"):
        classical.Macenko.from_stats({"reinhard": stats["reinhard"]})
    with pytest.raises(classical.BaselineError, match="choose one of"):
        classical.build_standardizer("vahadane", stats)
    with pytest.raises(classical.BaselineError, match="no reference images"):
        classical.fit_reference_stats([])
    with pytest.raises(classical.BaselineError, match=r"\[N,3,H,W\]"):
        classical.Reinhard.from_stats(stats)(torch.zeros(3, 8, 8))
