"""How an incoming image becomes the classifier's input square: the site geometry of the one inference path.

A classifier whose header records the reference window (``geometry.reference_window_px``: the
bench's classifiers and those of `train classifier`) sees every image cut to the window of the same
physical width, ``reference_window_px / magnification`` native pixels, where the magnification
(target pixels -> reference pixels) comes from the standardizer's site profile
(``site_profile.magnification``, estimated without labels from red-cell diameters when it was
trained, ``models.imaging.site_geometry``) or from a number given by hand (``[site] scale``, a
manual override). Classifiers from before the window was recorded see the whole frame zoomed by
``scale`` ("auto": by the stained-cell fraction).

``models.inference`` re-exports everything here; the daemon imports it from there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image

from stainbridge.models.checkpoint import ModelMismatch
from stainbridge.models.imaging import data, site_geometry

if TYPE_CHECKING:  # the loaded models, for type hints only (models.inference imports this module)
    from stainbridge.models.networks import Classifier, Standardizer

__all__ = ["SCALE_FROM_PROFILE", "Geometry", "resolve_geometry"]


@dataclass(frozen=True)
class Geometry:
    """How an image becomes the classifier's input square.

    ``window_px`` set: cut the centred window of ``window_px`` native pixels (the reference window
    divided by the site magnification), padding with the border colour where the crop is smaller.
    Otherwise: the whole frame zoomed by ``scale`` ("auto" or a number as text)."""

    size: int
    window_px: float | None = None
    magnification: float | None = None
    scale: str = "1.0"
    reference_cell_fraction: float | None = None
    source: str = "frame"

    def apply(self, img: Image.Image) -> Image.Image:
        if self.window_px is not None:
            return site_geometry.crop_window(img.convert("RGB"), window_px=self.window_px, out_size=self.size)
        return data.normalize_geometry(img, scale=self.scale, out_size=self.size,
                                       reference_cell_fraction=self.reference_cell_fraction)


SCALE_FROM_PROFILE = "profile"


def resolve_geometry(classifier: Classifier, standardizer: Standardizer | None = None, *,
                     scale: str = SCALE_FROM_PROFILE) -> Geometry:
    """The geometry for this pair of models. ``scale``: "profile" (the magnification in the
    standardizer's site profile, 1.0 when it has none), a number (the magnification by hand), or
    "auto" (the legacy frame zoom by stained-cell fraction)."""
    geo = classifier.header.get("geometry") or {}
    window, fraction = geo.get("reference_window_px"), geo.get("reference_cell_fraction")
    text = str(scale).strip().lower()
    if text == "auto" or not window:
        # Classifiers from before the reference window was recorded only know frame zooms.
        frame_scale = "1.0" if text == SCALE_FROM_PROFILE else text
        return Geometry(classifier.input_size, scale=frame_scale, reference_cell_fraction=fraction,
                        source=f"frame zoom {frame_scale}")
    if text == SCALE_FROM_PROFILE:
        profile = (standardizer.header.get("site_profile") if standardizer is not None else None) or {}
        magnification = float(profile.get("magnification") or 1.0)
        source = f"site profile ({profile.get('method', 'estimated')})" if profile else "no site profile"
    else:
        try:
            magnification, source = float(text), "[site] scale"
        except ValueError:
            raise ModelMismatch(f"scale must be 'profile', 'auto' or a number, got {scale!r}") from None
    if not magnification > 0:
        raise ModelMismatch(f"the site magnification must be a positive number, got {magnification!r}")
    return Geometry(classifier.input_size, window_px=float(window) / magnification, magnification=magnification,
                    source=source)
