"""The site colour map (models.imaging.colour_map): one colour function per site, onto the reference stain."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stainbridge.models.imaging import classical, synthetic
from stainbridge.models.imaging.colour_map import ColourMap, fit_colour_map
from stainbridge.models.metrics import stain_distance, stain_region_colours


def _cells(protocol: str, n: int, seed: int) -> torch.Tensor:
    images = [synthetic.render_cell(synthetic.CLASSES[i % 5], protocol=protocol, size=48,
                                    rng=synthetic.image_rng(seed, protocol, synthetic.CLASSES[i % 5], i)) for i in range(n)]
    return torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1) for im in images])


@pytest.fixture(scope="module")
def site_and_reference() -> tuple[torch.Tensor, torch.Tensor]:
    return _cells("incoming", 40, seed=3), _cells("reference", 40, seed=4)


def test_the_site_lands_on_the_reference_stain(site_and_reference) -> None:
    """Fitted on some of a site's images, it brings unseen ones of that site to the reference's stain colours
    (background and nucleus Delta E), far closer than they were; more rounds match the joint colour
    distribution, not only each channel's (this synthetic site's stain differs in hue and saturation at once)."""
    site, reference = site_and_reference
    reference_colours = stain_region_colours(reference[30:])
    before = stain_distance(site[30:], reference_colours)["delta_e"]
    after = {rounds: stain_distance(fit_colour_map(site[:30], reference[:30], iterations=rounds, seed=0)(site[30:]),
                                    reference_colours)["delta_e"] for rounds in (1, 5)}
    assert before > 15 and after[1] < before / 2 and after[5] < 3, (before, after)


def test_one_colour_function_per_site_unlike_reinhard(site_and_reference) -> None:
    """A pixel's new colour depends on the colour only, not on the rest of its image: an image maps the same
    alone or in a batch, and a darker copy stays darker; Reinhard makes a darker copy look like the original."""
    site, reference = site_and_reference
    colour_map = fit_colour_map(site, reference, seed=0)
    assert torch.allclose(colour_map(site[:8])[3:4], colour_map(site[3:4]), atol=1e-6)
    image = site[:1]
    darker = image * 0.8
    assert colour_map(darker).mean() < colour_map(image).mean() - 0.02
    reinhard = classical.Reinhard.from_stats(classical.fit_reference_stats(
        [synthetic.render_cell("lymphocyte", protocol="reference", size=48, rng=synthetic.image_rng(1, "r", "l", 0))]))
    assert abs(float(reinhard(darker).mean() - reinhard(image).mean())) < 0.01


def test_state_round_trip_and_determinism(site_and_reference) -> None:
    """The checkpoint tensors rebuild the same map; the same seed fits the same map."""
    site, reference = site_and_reference
    fitted = fit_colour_map(site, reference, iterations=3, seed=5)
    rebuilt = ColourMap.from_state(fitted.state())
    assert torch.allclose(rebuilt(site[:4]), fitted(site[:4]), atol=1e-3)
    again = fit_colour_map(site, reference, iterations=3, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(fitted.state().values(), again.state().values()))
    assert len(fitted.rotations) == 3 and np.allclose(fitted.rotations[0], np.eye(3))


def test_a_damaged_state_is_refused_with_what_to_do() -> None:
    """Missing tensors, wrong shapes or quantiles that are not increasing: BaselineError naming the command."""
    good = {"rotations": torch.eye(3)[None], "site_quantiles": torch.linspace(0, 1, 5)[None, :, None].repeat(1, 1, 3),
            "reference_quantiles": torch.linspace(0, 1, 5)[None, :, None].repeat(1, 1, 3)}
    ColourMap.from_state(good)
    with pytest.raises(classical.BaselineError, match="train site-profile"):
        ColourMap.from_state({k: v for k, v in good.items() if k != "rotations"})
    with pytest.raises(classical.BaselineError, match="rotations"):
        ColourMap.from_state({**good, "rotations": torch.eye(2)[None]})
    with pytest.raises(classical.BaselineError, match="not increasing"):
        ColourMap.from_state({**good, "site_quantiles": good["site_quantiles"].flip(1)})


def test_the_name_alone_says_how_to_make_one() -> None:
    """`standardizer = "colour_map"` (a name, not a file) is refused with the command that writes one."""
    from stainbridge.models import inference

    with pytest.raises(FileNotFoundError, match="train site-profile --method colour_map"):
        inference.load_standardizer("colour_map")
