"""The site colour map (models.imaging.colour_map): one colour function per site, onto the reference stain."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stainbridge.models.imaging import classical, colour_map, synthetic
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
    after = {rounds: stain_distance(fit_colour_map(site[:30], reference[:30], histogram_weight=1.0, iterations=rounds,
                                                   seed=0)(site[30:]),
                                    reference_colours)["delta_e"] for rounds in (1, 5)}
    assert before > 15 and after[1] < before / 2 and after[5] < 3, (before, after)


def test_one_colour_function_per_site_unlike_reinhard(site_and_reference) -> None:
    """A pixel's new colour depends on the colour only, not on the rest of its image: an image maps the same
    alone or in a batch, and a darker copy stays darker; Reinhard makes a darker copy look like the original."""
    site, reference = site_and_reference
    site_map = fit_colour_map(site, reference, histogram_weight=1.0, seed=0)
    assert torch.allclose(site_map(site[:8])[3:4], site_map(site[3:4]), atol=1e-6)
    image = site[:1]
    darker = image * 0.8
    assert site_map(darker).mean() < site_map(image).mean() - 0.02
    reinhard = classical.Reinhard.from_stats(classical.fit_reference_stats(
        [synthetic.render_cell("lymphocyte", protocol="reference", size=48, rng=synthetic.image_rng(1, "r", "l", 0))]))
    assert abs(float(reinhard(darker).mean() - reinhard(image).mean())) < 0.01


def test_state_round_trip_and_determinism(site_and_reference) -> None:
    """The checkpoint tensors rebuild the same map; the same seed fits the same map."""
    site, reference = site_and_reference
    fitted = fit_colour_map(site, reference, histogram_weight=0.5, iterations=3, seed=5)
    rebuilt = ColourMap.from_state(fitted.state())
    assert torch.allclose(rebuilt(site[:4]), fitted(site[:4]), atol=1e-3)
    again = fit_colour_map(site, reference, histogram_weight=0.5, iterations=3, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(fitted.state().values(), again.state().values()))
    assert len(fitted.rotations) == 3 and np.allclose(fitted.rotations[0], np.eye(3))


def test_weight_zero_moves_each_channel_by_one_affine_map_onto_the_reference_mean_and_spread(site_and_reference) -> None:
    """w = 0 keeps the shape of the site's histograms (its contrast between cells): each L*a*b* channel goes
    through one straight line, which puts the site's pooled mean and spread on the reference's."""
    site, reference = site_and_reference
    fitted = fit_colour_map(site, reference, histogram_weight=0.0, seed=0)
    site_lab = classical.rgb_to_lab(classical.batch_to_numpy(site)).reshape(-1, 3)
    reference_lab = classical.rgb_to_lab(classical.batch_to_numpy(reference)).reshape(-1, 3)
    mapped = fitted.map_lab(site_lab)
    for k in range(3):
        slope, intercept = np.polyfit(site_lab[:, k], mapped[:, k], 1)
        assert np.abs(mapped[:, k] - (slope * site_lab[:, k] + intercept)).max() < 1e-3 and slope > 0
    assert np.allclose(mapped.mean(0), reference_lab.mean(0), atol=0.5)
    assert np.allclose(mapped.std(0), reference_lab.std(0), rtol=0.02)
    # w = 1: the reference's histograms themselves (the same pixels' quantiles land on the reference's)
    matched = fit_colour_map(site, reference, histogram_weight=1.0, seed=0).map_lab(site_lab)
    assert np.allclose(np.median(matched, 0), np.median(reference_lab, 0), atol=1.0)


@pytest.mark.slow
def test_the_weight_is_chosen_against_the_baseline_on_the_sites_own_images(site_and_reference) -> None:
    """Default: the smallest weight whose output is more reference-like than the baseline's by the margin (Delta E
    on the site's images), recorded with the score of every candidate tried (smallest first, up to that one); a baseline that changes nothing is beaten at once
    (w = 0); one closer than every candidate (five rounds of transport) leaves the closest candidate."""
    site, reference = site_and_reference
    loose = fit_colour_map(site, reference, baseline=lambda batch: batch, seed=0).fit
    assert loose["histogram_weight"] == 0.0, loose
    assert list(loose["histogram_weight_choice"]["delta_e"]) == ["0.0"]  # the first passed: no other was fitted
    closer = fit_colour_map(site, reference, histogram_weight=1.0, iterations=5, seed=0)
    strict = fit_colour_map(site, reference, baseline=closer, seed=0)
    choice = strict.fit["histogram_weight_choice"]
    scores = {float(w): v for w, v in choice["delta_e"].items()}
    assert set(scores) == set(colour_map.HISTOGRAM_WEIGHTS)
    assert min(scores.values()) > colour_map.BASELINE_MARGIN * choice["baseline_delta_e"], choice
    assert scores[strict.fit["histogram_weight"]] == min(scores.values())
    assert choice["baseline_delta_e"] < loose["histogram_weight_choice"]["baseline_delta_e"]
    assert torch.equal(strict(site[:2]),
                       fit_colour_map(site, reference, histogram_weight=strict.fit["histogram_weight"], seed=0)(site[:2]))
    with pytest.raises(classical.BaselineError, match="baseline"):
        fit_colour_map(site, reference, seed=0)
    with pytest.raises(classical.BaselineError, match="between 0 and 1"):
        fit_colour_map(site, reference, histogram_weight=1.5, seed=0)


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


def _cast(images: torch.Tensor, gains: tuple[float, float, float]) -> torch.Tensor:
    """A camera's own white balance and exposure: each linear-RGB channel scaled."""
    x = images.double().numpy().transpose(0, 2, 3, 1)
    return torch.from_numpy(colour_map._srgb(colour_map._linear(x) * np.array(gains)).transpose(0, 3, 1, 2)).float()


def test_white_balance_takes_each_images_background_to_the_reference_background(site_and_reference) -> None:
    """Images with different casts come out with the same background colour, the reference's."""
    site, reference = site_and_reference
    target = np.median(colour_map.backgrounds(reference.double().numpy().transpose(0, 2, 3, 1)), axis=0)
    for gains in ((1.0, 1.0, 1.0), (0.6, 0.8, 1.1), (1.1, 0.7, 0.5)):
        balanced = colour_map.white_balance(_cast(site[:6], gains).double().numpy().transpose(0, 2, 3, 1), target)
        assert np.allclose(colour_map.backgrounds(balanced), target, atol=0.02), gains


def test_a_balanced_map_undoes_per_image_casts_that_one_map_per_site_keeps(site_and_reference) -> None:
    """A site whose images each carry their own cast: the balanced map takes its worst cast as close to the
    reference stain as the plain map takes the same site without casts, where the plain map on the cast site is
    far off; its checkpoint tensors rebuild it (the background travels with it)."""
    site, reference = site_and_reference
    gains = [(0.6, 0.8, 1.1), (1.1, 0.7, 0.5), (0.8, 1.0, 0.7), (1.0, 1.0, 1.0)]
    mixed = torch.cat([_cast(site[i::4], g) for i, g in enumerate(gains)])
    clean = torch.cat([site[i::4] for i in range(4)])
    reference_colours = stain_region_colours(reference)
    plain = fit_colour_map(mixed, reference, histogram_weight=1.0, seed=0)
    balanced = fit_colour_map(mixed, reference, histogram_weight=1.0, seed=0, balance=True)
    plain_on_clean = fit_colour_map(clean, reference, histogram_weight=1.0, seed=0)
    per_cast = [slice(i * 10, (i + 1) * 10) for i in range(4)]

    def worst(fitted: ColourMap, images: torch.Tensor) -> float:
        return max(stain_distance(fitted(images[s]), reference_colours)["delta_e"] for s in per_cast)

    assert worst(balanced, mixed) < worst(plain_on_clean, clean) + 2 < worst(plain, mixed) - 3
    assert "background" in balanced.state() and "background" not in plain.state()
    assert torch.allclose(ColourMap.from_state(balanced.state())(mixed[:4]), balanced(mixed[:4]), atol=1e-3)
    assert balanced.fit["white_balance"]["background_share"] == colour_map.BACKGROUND_SHARE
