"""Image folders, splits, manifests, datasets, geometry normalization and transforms."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stainbridge.models.imaging import data, synthetic, transforms


def _touch_images(root: Path, names: dict[str, list[str]]) -> None:
    for label, files in names.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for name in files:
            Image.new("RGB", (8, 8), (200, 100, 50)).save(root / label / name, format="PNG")


def _cell(label: str, protocol: str = "reference", seed: int = 0, size: int = 128) -> Image.Image:
    return synthetic.render_cell(label, protocol=protocol, size=size, rng=np.random.default_rng(seed))


def test_list_labeled_sorted_and_case_insensitive(tmp_path: Path) -> None:
    """Images with upper-case suffixes count; hidden files, other files and loose files do not."""
    _touch_images(tmp_path, {"b": ["2.PNG", "1.png"], "a": ["x.JpEg"]})
    (tmp_path / "b" / "notes.txt").write_text("x")
    (tmp_path / "b" / ".hidden.png").write_bytes(b"")
    Image.new("RGB", (4, 4)).save(tmp_path / "loose.png")
    items = data.list_labeled(tmp_path)
    assert [(p.name, label) for p, label in items] == [("x.JpEg", "a"), ("1.png", "b"), ("2.PNG", "b")]


def test_list_labeled_errors_say_what_to_do(tmp_path: Path) -> None:
    """An empty folder or a missing one raises DataError that names the expected layout."""
    with pytest.raises(data.DataError, match="<class>"):
        data.list_labeled(tmp_path)
    with pytest.raises(data.DataError, match="not a folder"):
        data.list_labeled(tmp_path / "missing")


def test_list_unlabeled_is_recursive(tmp_path: Path) -> None:
    """Unlabeled listing finds images at any depth, sorted by relative path."""
    _touch_images(tmp_path, {"x/y": ["b.tif"], "x": ["a.bmp"]})
    Image.new("RGB", (4, 4)).save(tmp_path / "top.png")
    rel = [p.relative_to(tmp_path).as_posix() for p in data.list_unlabeled(tmp_path)]
    assert rel == ["top.png", "x/a.bmp", "x/y/b.tif"]


def test_make_split_stratified_disjoint_complete(tmp_path: Path) -> None:
    """Every image lands in exactly one split, and each class is split in the requested proportions."""
    _touch_images(tmp_path, {"a": [f"{i}.png" for i in range(20)], "b": [f"{i}.png" for i in range(10)]})
    m = data.make_split(tmp_path, val=0.1, test=0.2, seed=3)
    all_rel = m["train"] + m["val"] + m["test"]
    assert len(all_rel) == len(set(all_rel)) == 30
    assert m["counts"]["test"] == {"a": 4, "b": 2} and m["counts"]["val"] == {"a": 2, "b": 1}
    assert m["classes"] == ["a", "b"]


def test_make_split_ignores_file_system_order(tmp_path: Path) -> None:
    """Two folders with the same files created in different orders split identically; seeds matter."""
    names = [f"img_{i:03d}.png" for i in range(25)]
    shuffled = names[:]
    random.Random(1).shuffle(shuffled)
    _touch_images(tmp_path / "one", {"a": names})
    _touch_images(tmp_path / "two", {"a": shuffled})
    one, two = data.make_split(tmp_path / "one", seed=0), data.make_split(tmp_path / "two", seed=0)
    assert all(one[s] == two[s] for s in data.SPLITS)
    assert data.make_split(tmp_path / "one", seed=1)["test"] != one["test"]


def test_manifest_round_trip(tmp_path: Path) -> None:
    """write_manifest returns the file's sha256 and read_manifest gives the same dict back."""
    _touch_images(tmp_path / "d", {"a": ["1.png", "2.png", "3.png"]})
    m = data.make_split(tmp_path / "d")
    sha = data.write_manifest(m, tmp_path / "split.json")
    import hashlib

    assert sha == hashlib.sha256((tmp_path / "split.json").read_bytes()).hexdigest()
    assert data.read_manifest(tmp_path / "split.json") == m
    items = data.manifest_items(m, "train")
    assert all(p.is_file() and label == "a" for p, label in items)


def test_read_manifest_rejects_incomplete(tmp_path: Path) -> None:
    """A manifest missing its split lists raises DataError telling to regenerate it."""
    (tmp_path / "bad.json").write_text('{"root": "."}')
    with pytest.raises(data.DataError, match="make_split"):
        data.read_manifest(tmp_path / "bad.json")


def test_labeled_images_dataset(tmp_path: Path) -> None:
    """LabeledImages yields [3,S,S] tensors in [0,1] with class indices; unknown classes are refused."""
    synthetic.write_dataset(tmp_path, protocol="reference", per_class=1, size=48)
    items = data.list_labeled(tmp_path)
    ds = data.LabeledImages(items, list(synthetic.CLASSES), transforms.eval_transform(32))
    x, y = ds[2]
    assert x.shape == (3, 32, 32) and 0 <= float(x.min()) and float(x.max()) <= 1
    assert synthetic.CLASSES[y] == items[2][1] and ds.targets() == [0, 1, 2, 3, 4]
    with pytest.raises(data.DataError, match="not in the class list"):
        data.LabeledImages(items, ["lymphocyte"], transforms.eval_transform(32))
    assert data.UnlabeledImages([p for p, _ in items], transforms.eval_transform(16))[0].shape == (3, 16, 16)


def test_cell_fraction_tracks_framing() -> None:
    """Tighter framing gives a larger estimated cell fraction; a blank frame gives 0."""
    for label in synthetic.CLASSES:
        ref = np.median([data.estimate_cell_fraction(_cell(label, "reference", s)) for s in range(3)])
        tight = np.median([data.estimate_cell_fraction(_cell(label, "incoming", s)) for s in range(3)])
        assert 0.02 < ref < 0.4 and tight > 1.8 * ref, label
    assert data.estimate_cell_fraction(Image.new("RGB", (64, 64), (240, 220, 210))) == 0.0


def test_normalize_geometry_zoom_in_and_out() -> None:
    """scale 2 magnifies the centre (cell fraction ~x4); scale 0.5 pads with the border colour."""
    img = _cell("lymphocyte", seed=1)
    base = data.estimate_cell_fraction(img)
    zoomed = data.normalize_geometry(img, scale=2.0, out_size=96)
    assert zoomed.size == (96, 96)
    assert 2.8 < data.estimate_cell_fraction(zoomed) / base < 5.5
    small = data.normalize_geometry(img, scale=0.5, out_size=96)
    corner = np.asarray(small)[:10, :10].reshape(-1, 3)
    assert (corner == corner[0]).all()
    assert 0.15 < data.estimate_cell_fraction(small) / base < 0.4


def test_normalize_geometry_non_square_input() -> None:
    """A non-square image becomes a square of out_size at scale 1."""
    img = Image.new("RGB", (360, 363), (250, 230, 210))
    assert data.normalize_geometry(img, scale="1.0", out_size=64).size == (64, 64)


def test_normalize_geometry_auto_matches_reference() -> None:
    """scale='auto' brings a tightly framed cell to the reference cell fraction."""
    reference = float(np.median([data.estimate_cell_fraction(_cell("neutrophil", "reference", s)) for s in range(5)]))
    tight = _cell("neutrophil", "incoming", 7)
    out = data.normalize_geometry(tight, scale="auto", out_size=128, reference_cell_fraction=reference)
    assert data.estimate_cell_fraction(tight) > 2 * reference
    assert 0.6 < data.estimate_cell_fraction(out) / reference < 1.6


def test_normalize_geometry_rejects_bad_requests() -> None:
    """auto without a reference fraction, and non-positive or non-numeric scales, raise GeometryError."""
    img = _cell("monocyte")
    with pytest.raises(data.GeometryError, match="reference_cell_fraction"):
        data.normalize_geometry(img, scale="auto", out_size=64)
    for bad in (0, -1.0, "big", float("nan")):
        with pytest.raises(data.GeometryError):
            data.normalize_geometry(img, scale=bad, out_size=64)


def test_transforms_shapes_ranges_and_determinism() -> None:
    """Both transforms give [3,S,S] tensors in [0,1]; eval is deterministic, train is random."""
    img = _cell("eosinophil", size=96)
    ev = transforms.eval_transform(64)
    assert torch.equal(ev(img), ev(img)) and ev(img).shape == (3, 64, 64)
    tr = transforms.train_transform(64, color_augment=True)
    torch.manual_seed(0)
    random.seed(0)
    outs = [tr(img) for _ in range(4)]
    assert all(o.shape == (3, 64, 64) and float(o.min()) >= 0 and float(o.max()) <= 1 for o in outs)
    assert not torch.equal(outs[0], outs[1])


def test_slide_of_groups_crops_of_one_slide_and_leaves_other_files_alone() -> None:
    """Chula-style crops of one slide share a group; any other file name is its own group."""
    from stainbridge.models.imaging.data import slide_of

    assert slide_of("lymphocyte/slide-a1B2_0003_1.jpg") == slide_of(Path("monocyte/slide-a1B2_0117_4.jpg"))
    assert slide_of("slide-a1B2_0003_1.jpg") != slide_of("slide-zz9_0003_1.jpg")
    assert slide_of("BloodImage_00001_3.jpg") == "BloodImage_00001_3"
