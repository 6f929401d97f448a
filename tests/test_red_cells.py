"""Site geometry from red cells: the label-free ruler that does not depend on how a lab crops."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from stainbridge.models.imaging import red_cells, site_geometry, synthetic


def _smear(cell_fraction: float, *, protocol: str = "reference", n: int = 25, size: int = 128) -> list[Image.Image]:
    """Well-spread synthetic smears whose red cells are 1.25 * cell_fraction * size / 2 px across on average."""
    p = dataclasses.replace(synthetic.get_protocol(protocol), cell_fraction=cell_fraction, red_cell_gap=0.1)
    return [synthetic.render_cell(label, protocol=p, size=size, rng=synthetic.image_rng(3, protocol, label, i))
            for i in range(n // len(synthetic.CLASSES) + 1) for label in synthetic.CLASSES][:n]


def test_red_cell_diameter_matches_the_drawn_size() -> None:
    """The site diameter of drawn red cells (mean radius 0.625 white-cell radii) is found within 5 %."""
    site = site_geometry.red_cell_diameter(_smear(0.3))
    assert site is not None and site.cells >= red_cells.MIN_CELLS
    assert site.diameter_px == pytest.approx(1.25 * 0.3 * 64, rel=0.05)
    assert site.whole > 0 and site.cut > 0  # both whole cells and cells cut by the frame are measured
    assert site.low_px <= site.diameter_px <= site.high_px


def test_diameters_are_in_native_pixels_whatever_the_working_size() -> None:
    """The same smear drawn at 256 px gives twice the diameter it gives at 128 px."""
    small = site_geometry.red_cell_diameter(_smear(0.3, n=15))
    large = site_geometry.red_cell_diameter(_smear(0.3, n=15, size=256))
    assert small is not None and large is not None
    assert large.diameter_px / small.diameter_px == pytest.approx(2.0, rel=0.06)


def test_site_profile_magnification_across_stains_and_framings() -> None:
    """A lab with another stain, larger cells and larger frames (red cells 50 px vs 24 px) gets k = 0.48."""
    reference = site_geometry.reference_geometry(_smear(0.3))
    profile = site_geometry.estimate_site_profile(_smear(0.5, protocol="incoming", size=160), reference)
    assert profile["method"] == "red_cell_diameter"
    assert profile["magnification"] == pytest.approx((0.3 * 128) / (0.5 * 160), rel=0.08)
    low, high = profile["magnification_interval"]
    assert low <= profile["magnification"] <= high
    assert profile["red_cells"] >= red_cells.MIN_CELLS


def _no_red_cells(nucleus_radius: int, n: int = 6) -> list[Image.Image]:
    images = []
    for i in range(n):
        img = Image.new("RGB", (120, 120), (236, 214, 206))
        r = nucleus_radius + i % 2
        ImageDraw.Draw(img).ellipse((60 - r, 60 - r, 60 + r, 60 + r), fill=(96, 60, 150))
        images.append(img)
    return images


def test_too_few_red_cells_falls_back_to_the_nucleus_area_and_says_so() -> None:
    """Without measurable red cells the profile uses nucleus areas, with method and reason recorded."""
    reference = site_geometry.reference_geometry(_smear(0.3))
    assert reference["reference_red_cell_diameter_px"] and reference["reference_nucleus_area_px"]
    profile = site_geometry.estimate_site_profile(_no_red_cells(20), reference)
    assert profile["method"] == "nucleus_area"
    assert "red cells" in profile["fallback_reason"]
    assert profile["magnification"] > 0


def test_neither_cue_raises_with_what_to_do() -> None:
    """Blank images and a reference without any scale: the error says to set the magnification by hand."""
    blank = [Image.new("RGB", (64, 64), (230, 220, 215))] * 3
    with pytest.raises(site_geometry.GeometryEstimateError, match="by hand"):
        site_geometry.estimate_site_profile(blank, {"reference_red_cell_diameter_px": None})


def test_the_sample_spans_the_whole_folder_from_first_to_last() -> None:
    """A folder sorted by class: 1,218 files sampled down to 1,000 must still reach the last class (it used to
    take the first 1,000 whenever the folder held fewer than twice the sample)."""
    files = [f"basophil_{i}" for i in range(283)] + [f"neutrophil_{i}" for i in range(935)]
    sample = site_geometry.evenly(files, 1000)
    assert len(sample) == len(set(sample)) == 1000
    assert sample[0] == files[0] and sample[-1] == files[-1]
    assert sum(name.startswith("basophil") for name in sample) == pytest.approx(1000 * 283 / 1218, abs=2)
    assert site_geometry.evenly(files[:10], 1000) == files[:10]
    assert site_geometry.evenly(files, 1) == files[:1] and site_geometry.evenly(files, 0) == []


@pytest.mark.slow
def test_site_profile_command_prints_one_line_per_site(tmp_path: Path, run_stainbridge) -> None:
    """`stainbridge site-profile` measures a reference folder and a target folder and prints JSON lines."""
    for name, images in (("ref", _smear(0.3)), ("tgt", _smear(0.45, protocol="incoming"))):
        (tmp_path / name).mkdir()
        for i, img in enumerate(images):
            img.save(tmp_path / name / f"{i}.png")
    done = run_stainbridge("site-profile", "--reference", str(tmp_path / "ref"), "--target", str(tmp_path / "tgt"))
    assert done.returncode == 0, done.stderr
    ref, site = (json.loads(line) for line in done.stdout.strip().splitlines())
    assert ref["reference_red_cell_diameter_px"] == pytest.approx(1.25 * 0.3 * 64, rel=0.05)
    assert site["method"] == "red_cell_diameter"
    assert site["magnification"] == pytest.approx(0.3 / 0.45, rel=0.08)
