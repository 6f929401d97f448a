"""Label-free stain likeness (models/metrics.py): it sees stain colour, not framing or content."""

from __future__ import annotations

import numpy as np
import torch

from stainbridge.models.imaging import stain_augment, synthetic
from stainbridge.models.metrics import STAIN_REGIONS, stain_distance, stain_region_colours


def _cells(protocol: str, seed: int, size: int = 64) -> torch.Tensor:
    images = [synthetic.render_cell(label, size=size, protocol=protocol, rng=synthetic.image_rng(seed, protocol, label, i))
              for i, label in enumerate(synthetic.CLASSES * 4)]
    return torch.stack([torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1) for img in images])


def test_stain_distance_sees_stain_not_framing() -> None:
    """Another stain protocol is far from the reference; a recentred crop of the reference itself is near."""
    reference = _cells("reference", 0)
    colours = stain_region_colours(reference)
    assert all(len(colours[r]) for r in STAIN_REGIONS)
    other_stain = stain_distance(_cells("incoming", 1), colours)["delta_e"]
    same_stain = stain_distance(_cells("reference", 2), colours)["delta_e"]
    zoomed = torch.nn.functional.interpolate(_cells("reference", 3)[:, :, 8:56, 8:56], size=(64, 64), mode="bilinear")
    reframed = stain_distance(zoomed, colours)["delta_e"]
    assert same_stain < 3.0 and reframed < 5.0
    assert other_stain > 3 * max(same_stain, reframed)


def test_stain_distance_grows_with_a_hue_shift() -> None:
    """Rotating the hue of reference images moves them away from the reference, more for a larger turn."""
    reference = _cells("reference", 0)
    colours = stain_region_colours(reference)
    small = stain_distance(stain_augment.hue_rotate(reference, torch.full((len(reference),), 0.15)), colours)["delta_e"]
    large = stain_distance(stain_augment.hue_rotate(reference, torch.full((len(reference),), 0.6)), colours)["delta_e"]
    assert small < large


def test_stain_summary_gives_each_regions_median_colour_and_none_for_a_blank_frame() -> None:
    """A stained cell gives the median L*a*b* of background, other stained pixels and nucleus (background light,
    nucleus darker and bluer); another lab's stain moves the nucleus; a blank frame has nothing to measure."""
    from PIL import Image

    from stainbridge.models.metrics import stain_summary

    incoming = [stain_summary(synthetic.render_cell(label, protocol="incoming", size=96,
                                                    rng=synthetic.image_rng(0, "incoming", label, 0)))
                for label in synthetic.CLASSES]
    faded = [stain_summary(synthetic.render_cell(label, protocol="faded", size=96,
                                                 rng=synthetic.image_rng(0, "faded", label, 0)))
             for label in synthetic.CLASSES]
    assert all(set(s) == set(STAIN_REGIONS) for s in incoming)
    assert all(s["background"][0] > s["nucleus"][0] + 20 and s["nucleus"][2] < s["background"][2] for s in incoming)
    nucleus = [np.median([s["nucleus"] for s in summaries], axis=0) for summaries in (incoming, faded)]
    assert np.linalg.norm(nucleus[0] - nucleus[1]) > 15
    assert stain_summary(Image.new("RGB", (200, 200), (250, 248, 245))) == {}
