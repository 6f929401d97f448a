"""Procedurally drawn blood-smear cell images, stained by named lab protocols.

Every image holds a plasma background, several red cells and one white cell near the
centre whose nucleus, size, cytoplasm and granules follow its class. The drawing is
done in stain-concentration maps (numpy, vectorised); a :class:`StainProtocol` turns
them into RGB through Beer-Lambert optics with its own stain colours (rotated in
optical-density space), background, blur, camera response curves and noise, and its
own framing (``cell_fraction``). A classifier trained on "reference" images loses most
of its accuracy on "incoming" ones, which is the shift stainbridge has to undo.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

CLASSES = ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil")
# Drawn too, but none of the five: what the service must flag instead of forcing into a class (models.abstention).
OTHER_CLASSES = ("platelet", "smudge")

# Stain channels drawn as concentration maps, and their optical density per unit
# concentration (R, G, B) in the reference lab (May-Grunwald-Giemsa as in PBC).
STAINS = ("nucleus", "cyto_blue", "cyto_pink", "red_cell", "eo_granule", "baso_granule")
REFERENCE_OD = np.array(
    [
        [1.05, 1.55, 0.55],  # nucleus: purple
        [0.55, 0.42, 0.14],  # basophilic cytoplasm: light blue
        [0.12, 0.30, 0.12],  # neutrophil cytoplasm: pale lilac-pink
        [0.20, 0.48, 0.40],  # red cell: pinkish grey
        [0.10, 0.85, 1.15],  # eosinophil granules: orange-red
        [1.35, 1.95, 0.80],  # basophil granules: dark purple
    ],
    dtype=np.float32,
)
_CHANNEL_OFFSET = np.array([0, 256, 512], dtype=np.intp)
_GREY = np.ones(3, dtype=np.float32) / math.sqrt(3.0)


class SyntheticError(Exception):
    """An unknown class, protocol or output format was requested."""


@dataclass(frozen=True)
class StainProtocol:
    """How one lab's stain, microscope and camera turn stain concentrations into RGB.

    hue_degrees rotates every stain's OD vector about the grey axis; saturation scales its
    colourfulness; strengths scale each stain (order of STAINS); background_od is the
    plasma's optical density; gamma is a per-channel camera curve applied after optics;
    cell_fraction is a medium white cell's diameter as a fraction of the frame side.
    red_cell_radius is the range of red-cell radii in units of a medium white cell's radius (the
    physical ruler ``models.imaging.red_cells`` measures); red_cell_gap, when set, places red cells
    apart by at least that gap (a thin, well-spread smear) instead of letting them overlap.
    """

    name: str
    hue_degrees: float = 0.0
    saturation: float = 1.0
    strengths: tuple[float, ...] = (1.0,) * len(STAINS)
    background_od: tuple[float, float, float] = (0.02, 0.11, 0.19)
    gamma: tuple[float, float, float] = (1.0, 1.0, 1.0)
    contrast: float = 1.0
    brightness: float = 0.0
    blur: float = 0.0  # Gaussian sigma in px at 128 px
    noise: float = 0.01  # std of additive noise, fraction of full scale
    cell_fraction: float = 0.45
    jitter: float = 0.1  # per-image relative variation of stain strengths, background and exposure
    red_cell_radius: tuple[float, float] = (0.55, 0.7)
    red_cell_gap: float | None = None
    od_matrix: np.ndarray = field(init=False, repr=False, compare=False)
    lut: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "od_matrix", _protocol_od(self))
        object.__setattr__(self, "lut", self.camera_lut())

    def camera_lut(self) -> np.ndarray:
        """768-entry uint8 lookup table (R, G, B blocks of 256) for the camera response."""
        x = np.arange(256, dtype=np.float64) / 255.0
        lut = [np.clip(self.contrast * (x**g - 0.5) + 0.5 + self.brightness, 0, 1) for g in self.gamma]
        return np.round(np.concatenate(lut) * 255).astype(np.uint8)


def _protocol_od(p: StainProtocol) -> np.ndarray:
    """Stain OD vectors after hue rotation about the grey axis (Rodrigues), saturation and strength."""
    t = math.radians(p.hue_degrees)
    v = REFERENCE_OD.astype(np.float64)
    k = _GREY.astype(np.float64)
    along = (v @ k)[:, None] * k
    rotated = v * math.cos(t) + np.cross(k, v) * math.sin(t) + along * (1 - math.cos(t))
    grey = (rotated @ k)[:, None] * k
    out = grey + p.saturation * (rotated - grey)
    return (np.clip(out, 0.01, None) * np.asarray(p.strengths)[:, None]).astype(np.float32)


PROTOCOLS: dict[str, StainProtocol] = {
    # PBC-like: pale pinkish-cream plasma, purple nuclei, sharp, cells fill ~ a quarter of the frame.
    "reference": StainProtocol("reference"),
    # Another lab: bluish-violet nuclei, greenish-grey darker plasma, redder cells, soft focus,
    # a camera with a different response, and tight crops.
    "incoming": StainProtocol(
        "incoming",
        hue_degrees=35.0,
        saturation=0.8,
        strengths=(0.85, 1.2, 1.4, 1.2, 0.8, 0.9),
        background_od=(0.22, 0.15, 0.24),
        gamma=(1.3, 0.9, 0.75),
        contrast=0.9,
        brightness=-0.02,
        blur=1.0,
        noise=0.015,
        cell_fraction=0.75,
    ),
    # An old or under-stained slide: washed-out colours, bright, low contrast.
    "faded": StainProtocol(
        "faded",
        hue_degrees=-12.0,
        saturation=0.5,
        strengths=(0.55, 0.6, 0.6, 0.5, 0.5, 0.6),
        background_od=(0.01, 0.04, 0.06),
        gamma=(0.8, 0.8, 0.85),
        contrast=0.8,
        brightness=0.05,
        blur=0.6,
        noise=0.015,
        cell_fraction=0.5,
    ),
}


def get_protocol(protocol: str | StainProtocol) -> StainProtocol:
    """The protocol object for a name (or the object itself)."""
    if isinstance(protocol, StainProtocol):
        return protocol
    try:
        return PROTOCOLS[protocol]
    except KeyError:
        raise SyntheticError(f"unknown stain protocol {protocol!r}; choose one of {sorted(PROTOCOLS)}") from None


# ---------------------------------------------------------------------------- drawing helpers


def _value_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth random field in [0,1] with about `cells` features across the frame."""
    grid = rng.random((cells + 1, cells + 1), dtype=np.float32)
    return np.asarray(Image.fromarray(grid).resize((size, size), Image.Resampling.BILINEAR))


def _soft(inside: np.ndarray, edge: float) -> np.ndarray:
    """Anti-aliased mask from a signed distance-like field (positive inside), edge in field units."""
    return np.clip(inside / edge + 0.5, 0.0, 1.0)


def _blob(x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: float, ay: float, edge: float) -> np.ndarray:
    """Soft ellipse with centre (cx, cy) and semi-axes (ax, ay)."""
    r = np.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2)
    return _soft((1 - r) * min(ax, ay), edge)


def _chain(x: np.ndarray, y: np.ndarray, pts: np.ndarray, lobe: float, strand: float, edge: float) -> np.ndarray:
    """Nuclear lobes of radius `lobe` at pts [K,2], joined in order by strands of half-width `strand`."""
    pts = pts.astype(np.float32)
    d_pts = np.sqrt((x[None] - pts[:, 0, None, None]) ** 2 + (y[None] - pts[:, 1, None, None]) ** 2)
    lobes = _soft(lobe - d_pts.min(axis=0), edge)
    a, b = pts[:-1], pts[1:]
    ab = b - a
    px, py = x[None] - a[:, 0, None, None], y[None] - a[:, 1, None, None]
    t = np.clip((px * ab[:, 0, None, None] + py * ab[:, 1, None, None]) / (ab**2).sum(1)[:, None, None], 0, 1)
    d_seg = np.sqrt((px - t * ab[:, 0, None, None]) ** 2 + (py - t * ab[:, 1, None, None]) ** 2).min(axis=0)
    return np.maximum(lobes, _soft(strand - d_seg, edge))


def _granules(rng: np.random.Generator, size: int, per_frame: int, coverage: float) -> np.ndarray:
    """Granule mask: thresholded fine noise, about `coverage` of pixels set."""
    field_ = _value_noise(rng, size, per_frame)
    threshold = np.quantile(field_[:: max(1, size // 32), :: max(1, size // 32)], 1 - coverage)
    return np.clip((field_ - threshold) * 12, 0, 1)


# ---------------------------------------------------------------------------- white cells
# Coordinates are in units of a medium (neutrophil) white cell's radius, centred on the cell
# and rotated. The drawer returns one concentration map per stain and the cell's own mask.

_CELL_RADIUS = {"lymphocyte": 0.72, "monocyte": 1.3, "neutrophil": 1.0, "eosinophil": 1.05, "basophil": 0.9,
                "platelet": 0.35, "smudge": 1.5}


def _draw_white_cell(
    label: str, x: np.ndarray, y: np.ndarray, rng: np.random.Generator, edge: float, size: int
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    radius = _CELL_RADIUS[label] * rng.uniform(0.9, 1.1)
    theta = np.arctan2(y, x)
    wobble = (
        1
        + 0.04 * np.sin(3 * theta + rng.uniform(0, 6.3))
        + (0.06 if label == "monocyte" else 0.02) * np.sin(5 * theta + rng.uniform(0, 6.3))
    )
    cell = _soft(radius * wobble - np.sqrt(x**2 + y**2), edge)
    texture = _value_noise(rng, size, max(4, size // 10))
    zeros = np.zeros_like(x)
    out = {name: zeros for name in STAINS}
    if label == "lymphocyte":
        nuc = _blob(x, y, 0.07 * radius, 0.0, 0.84 * radius, 0.8 * radius, edge)
        out["nucleus"] = nuc * (0.85 + 0.3 * texture)
        out["cyto_blue"] = cell * (1 - nuc) * 0.75
    elif label == "monocyte":
        body = _blob(x, y, -0.12 * radius, 0.0, 0.62 * radius, 0.5 * radius, edge)
        notch = _blob(x, y, 0.42 * radius, rng.uniform(-0.1, 0.1) * radius, 0.34 * radius, 0.3 * radius, edge)
        nuc = body * (1 - notch)
        out["nucleus"] = nuc * (0.55 + 0.3 * texture)
        vacuoles = _granules(rng, size, max(6, size // 9), 0.12)
        cyto = cell * (1 - nuc)
        out["cyto_blue"] = cyto * 0.45 * (1 - 0.8 * vacuoles)
        out["cyto_pink"] = cyto * 0.35 * (1 - 0.8 * vacuoles)
    elif label == "neutrophil":
        k = int(rng.integers(3, 6))
        start = rng.uniform(0, 2 * np.pi)
        arc = np.linspace(start, start + rng.uniform(2.4, 3.6), k)
        ring = rng.uniform(0.38, 0.5) * radius
        pts = np.stack([ring * np.cos(arc), ring * np.sin(arc)], axis=1) + rng.normal(0, 0.05, (k, 2))
        nuc = _chain(x, y, pts, rng.uniform(0.2, 0.25) * radius, 0.05 * radius, edge)
        out["nucleus"] = nuc * (0.9 + 0.2 * texture)
        fine = _granules(rng, size, max(8, size // 4), 0.3)
        out["cyto_pink"] = cell * (1 - nuc) * (0.8 + 0.5 * fine)
    elif label == "eosinophil":
        dy = rng.uniform(-0.2, 0.0) * radius
        pts = np.array([[-0.4 * radius, dy], [0.4 * radius, dy]])
        nuc = _chain(x, y, pts, 0.3 * radius, 0.06 * radius, edge)
        out["nucleus"] = nuc * (0.9 + 0.2 * texture)
        granules = _granules(rng, size, max(8, size // 4), 0.55)
        out["eo_granule"] = cell * (1 - 0.7 * nuc) * (0.35 + 0.75 * granules)
        out["cyto_pink"] = cell * (1 - nuc) * 0.3
    elif label == "basophil":
        pts = np.array([[-0.25 * radius, 0.05], [0.25 * radius, -0.05]])
        nuc = _chain(x, y, pts, 0.32 * radius, 0.15 * radius, edge)
        out["nucleus"] = nuc * 0.6
        granules = _granules(rng, size, max(8, size // 5), 0.5)
        out["baso_granule"] = cell * granules * 0.85
        out["cyto_pink"] = cell * (1 - nuc) * 0.4
    elif label == "platelet":  # no white cell: a clump of small anucleate granular fragments
        fragments = np.zeros_like(x)
        for cx, cy in rng.normal(0, radius, (int(rng.integers(3, 7)), 2)).tolist():
            r = rng.uniform(0.12, 0.2)
            np.maximum(fragments, _blob(x, y, cx, cy, r, r * rng.uniform(0.7, 1.0), edge), out=fragments)
        granules = _granules(rng, size, max(8, size // 6), 0.5)
        out["baso_granule"] = fragments * (0.25 + 0.5 * granules)
        out["cyto_blue"] = fragments * 0.3
        cell = fragments
    elif label == "smudge":  # a ruptured cell: a large pale smear of nuclear material, streaked, no cytoplasm
        streaks = _value_noise(rng, size, max(3, size // 24))
        cell = _blob(x, y, 0.0, 0.0, radius, radius * rng.uniform(0.6, 0.8), 4 * edge)
        out["nucleus"] = cell * (0.4 + 0.6 * streaks) * 0.45
    else:  # guarded by render_cell
        raise SyntheticError(f"unknown cell class {label!r}")
    return out, cell


def _spread(centres: np.ndarray, radii: np.ndarray, gap: float) -> tuple[np.ndarray, np.ndarray]:
    """The cells, in order, that do not come within ``gap`` of an earlier kept one."""
    keep: list[int] = []
    for i in range(len(radii)):
        if all(math.dist(centres[i], centres[j]) >= radii[i] + radii[j] + gap for j in keep):
            keep.append(i)
    return centres[keep], radii[keep]


def _draw_red_cells(coords: np.ndarray, rng: np.random.Generator, edge: float, span: float,
                    radius: tuple[float, float] = (0.55, 0.7), gap: float | None = None) -> np.ndarray:
    """Red cells (pale discs with central pallor) scattered around, not covering the centre.

    Each disc is drawn only inside its own bounding box (a loop over cells, not pixels).
    """
    size = coords.size
    out = np.zeros((size, size), dtype=np.float32)
    n = int(rng.integers(8, 18))
    centres = rng.uniform(-span, span, (n, 2))
    radii = rng.uniform(*radius, n)
    if gap is not None:
        centres, radii = _spread(centres, radii, gap)
    step = float(coords[1] - coords[0])
    for (cx, cy), r in zip(centres.tolist(), radii.tolist()):
        if math.hypot(cx, cy) < 1.35:
            continue
        x0, x1 = np.searchsorted(coords, [cx - r - step, cx + r + step])
        y0, y1 = np.searchsorted(coords, [cy - r - step, cy + r + step])
        if x1 <= x0 or y1 <= y0:
            continue
        d = np.sqrt((coords[None, x0:x1] - cx) ** 2 + (coords[y0:y1, None] - cy) ** 2) / r
        disc = _soft((1 - d) * r, edge) * (1 - 0.6 * np.exp(-((d / 0.45) ** 2)))  # central pallor
        np.maximum(out[y0:y1, x0:x1], disc, out=out[y0:y1, x0:x1])
    return out


# ---------------------------------------------------------------------------- rendering


def render_cell(
    label: str, *, protocol: str | StainProtocol = "reference", size: int = 128, rng: np.random.Generator
) -> Image.Image:
    """One RGB image of a `label` white cell at the centre, stained by `protocol`."""
    if label not in _CELL_RADIUS:
        raise SyntheticError(f"unknown cell class {label!r}; choose one of {list(CLASSES + OTHER_CLASSES)}")
    p = get_protocol(protocol)
    unit = p.cell_fraction * size / 2  # px per medium-cell radius
    span = size / 2 / unit
    edge = 1.2 / unit
    coords = (np.arange(size, dtype=np.float32) - (size - 1) / 2) / unit
    gx, gy = np.meshgrid(coords, coords)
    shift = [float(v) for v in rng.normal(0, 0.06 * span, 2)]
    angle = rng.uniform(0, 2 * np.pi)
    c, s = math.cos(angle), math.sin(angle)
    x = (gx - shift[0]) * c + (gy - shift[1]) * s
    y = -(gx - shift[0]) * s + (gy - shift[1]) * c
    wbc, cell = _draw_white_cell(label, x, y, rng, edge, size)
    red = _draw_red_cells(coords, rng, edge, span, p.red_cell_radius, p.red_cell_gap) * (1 - cell)
    conc = np.stack([red if name == "red_cell" else wbc[name] for name in STAINS], axis=-1)
    # Slide-to-slide variation within one lab: stain uptake, plasma thickness, exposure.
    od_matrix = p.od_matrix * (1 + rng.uniform(-p.jitter, p.jitter, (len(STAINS), 1))).astype(np.float32)
    background = np.asarray(p.background_od, dtype=np.float32) * np.float32(1 + rng.uniform(-2, 2) * p.jitter)
    exposure = np.float32(1 + rng.uniform(-p.jitter, p.jitter))
    od = (conc @ od_matrix + background) * exposure
    u8 = np.clip(np.exp(-od) * 255 + 0.5, 0, 255).astype(np.uint8)
    img = Image.fromarray(u8, "RGB")
    if p.blur > 0:
        img = img.filter(ImageFilter.GaussianBlur(p.blur * size / 128))
    u8 = np.take(p.lut, np.asarray(img).astype(np.intp) + _CHANNEL_OFFSET)
    if p.noise > 0:
        noisy = u8.astype(np.float32) + rng.standard_normal((size, size, 3), dtype=np.float32) * (p.noise * 255)
        u8 = np.clip(noisy + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(u8, "RGB")


def image_rng(seed: int, protocol: str, label: str, index: int) -> np.random.Generator:
    """An independent generator per image, so any subset renders identically."""
    digest = hashlib.sha256(f"{seed}:{protocol}:{label}:{index}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "big"))


def write_dataset(
    out: Path | str,
    *,
    protocol: str,
    per_class: int,
    size: int = 128,
    seed: int = 0,
    fmt: str = "png",
    classes: tuple[str, ...] = CLASSES,
) -> dict[str, int]:
    """Write out/<class>/<protocol>_<i>.<fmt> for every class; return images written per class."""
    fmt = fmt.lower()
    if fmt not in ("png", "jpg"):
        raise SyntheticError(f"format must be 'png' or 'jpg', got {fmt!r}")
    get_protocol(protocol)
    out = Path(out)
    counts: dict[str, int] = {}
    for label in classes:
        folder = out / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = render_cell(label, protocol=protocol, size=size, rng=image_rng(seed, protocol, label, i))
            path = folder / f"{protocol}_{i:05d}.{fmt}"
            if fmt == "png":
                img.save(path, format="PNG")
            else:
                img.save(path, format="JPEG", quality=92)
        counts[label] = per_class
    return counts


def benchmark(n: int = 500, size: int = 128, protocol: str = "incoming") -> float:
    """Render n images in memory on the calling thread; print and return images per second."""
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for i in range(n):
        render_cell(CLASSES[i % len(CLASSES)], protocol=protocol, size=size, rng=rng)
    rate = n / (time.perf_counter() - start)
    print(f"{rate:.0f} images/s ({n} images, {size} px, protocol {protocol})")
    return rate


# ---------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `stainbridge synth`."""
    parser.add_argument("--out", required=True, type=Path, help="folder to write <class>/<protocol>_<i>.<format> into")
    parser.add_argument("--protocol", default="reference", choices=sorted(PROTOCOLS), help="staining protocol")
    parser.add_argument("--per-class", type=int, default=50, help="images per class (default 50)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes identical files")
    parser.add_argument("--format", default="png", choices=("png", "jpg"), help="file format (default png)")


def run(args: argparse.Namespace) -> int:
    """Write a synthetic labeled dataset and print what was written."""
    if args.per_class < 1 or args.size < 16:
        print("--per-class must be at least 1 and --size at least 16")
        return 2
    counts = write_dataset(
        args.out, protocol=args.protocol, per_class=args.per_class, size=args.size, seed=args.seed, fmt=args.format
    )
    print(f"wrote {sum(counts.values())} {args.protocol} images ({args.size} px, {args.format}) to {args.out}:")
    for label, n in counts.items():
        print(f"  {label}: {n}")
    return 0
