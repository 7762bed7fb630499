"""CIRR and FashionIQ loaders on fixtures written in their exact formats, bad input, and the Shapes CIR files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from cir.data import load_cirr, load_cirr_sets, load_fashioniq
from core.errors import InputError


def _img(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)


def write_cirr(root: Path, split: str = "val", triplets: list | None = None, with_target: bool = True) -> Path:
    """A CIRR rc2 fixture: two 6-image subsets, NLVR2-style names and ./dev/ paths, as the CIRR repo ships them."""
    names = [f"dev-{g}-{k}-img{m}" for g in (7, 8) for k, m in ((0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1))]
    mapping = {n: f"./dev/{n}.png" for n in names}
    for n in names:
        _img(root / "img_raw" / "dev" / f"{n}.png")
    if triplets is None:
        triplets = [{
            "pairid": 12063, "reference": names[0], "target_hard": names[3],
            "target_soft": {names[3]: 1.0, names[4]: 0.5}, "caption": "Remove all but one dog and add a woman hugging it.",
            "img_set": {"id": 264, "members": names[:6], "reference_rank": 0, "target_rank": 3},
        }, {
            "pairid": 12064, "reference": names[7], "target_hard": names[6],
            "target_soft": {names[6]: 1.0}, "caption": "Make the bottle green",
            "img_set": {"id": 265, "members": names[6:], "reference_rank": 1, "target_rank": 0},
        }]
        if not with_target:
            for t in triplets:
                del t["target_hard"], t["target_soft"]
    (root / "captions").mkdir(parents=True, exist_ok=True)
    (root / "image_splits").mkdir(parents=True, exist_ok=True)
    (root / "captions" / f"cap.rc2.{split}.json").write_text(json.dumps(triplets))
    (root / "image_splits" / f"split.rc2.{split}.json").write_text(json.dumps(mapping))
    return root


def test_cirr_loader_reads_the_rc2_layout(tmp_path):
    split = load_cirr(write_cirr(tmp_path), "val")
    assert [t.pairid for t in split.triplets] == [12063, 12064]
    t = split.triplets[0]
    assert t.reference == "dev-7-0-img0" and t.target == "dev-7-1-img1" and len(t.members) == 6
    assert t.caption.startswith("Remove all but one dog") and t.set_id == 264
    assert len(split.gallery) == 12 and split.images[t.reference].is_file()


def test_cirr_hidden_test_split(tmp_path):
    write_cirr(tmp_path, "test1", with_target=False)
    with pytest.raises(InputError, match="target_hard"):
        load_cirr(tmp_path, "test1")
    split = load_cirr(tmp_path, "test1", require_targets=False)
    assert all(t.target is None for t in split.triplets)


def test_cirr_triplet_without_image_is_named(tmp_path):
    bad = [{"pairid": 1, "reference": "dev-7-0-img0", "target_hard": "nowhere-img9", "caption": "x",
            "img_set": {"id": 1, "members": ["dev-7-0-img0", "dev-7-0-img1"]}}]
    write_cirr(tmp_path, triplets=bad)
    with pytest.raises(InputError, match=r"\[0\]\.target_hard.*nowhere-img9"):
        load_cirr(tmp_path, "val")


def test_cirr_missing_image_file(tmp_path):
    write_cirr(tmp_path)
    (tmp_path / "img_raw" / "dev" / "dev-8-0-img0.png").unlink()
    with pytest.raises(InputError, match="image file not found"):
        load_cirr(tmp_path, "val")


def test_cirr_empty_subset(tmp_path):
    bad = [{"pairid": 1, "reference": "dev-7-0-img0", "target_hard": "dev-7-0-img1", "caption": "x",
            "img_set": {"id": 1, "members": []}}]
    write_cirr(tmp_path, triplets=bad)
    with pytest.raises(InputError, match=r"img_set\.members.*empty"):
        load_cirr(tmp_path, "val")


def test_cirr_wrong_layout(tmp_path):
    write_cirr(tmp_path)
    # a FashionIQ-style or mapping file where a list of CIRR triplets belongs
    (tmp_path / "captions" / "cap.rc2.val.json").write_text(json.dumps({"candidate": "a", "target": "b"}))
    with pytest.raises(InputError, match="list of triplets"):
        load_cirr(tmp_path, "val")
    (tmp_path / "captions" / "cap.rc2.val.json").write_text(json.dumps([{"candidate": "a", "target": "b",
                                                                          "captions": ["x", "y"]}]))
    with pytest.raises(InputError, match=r"\[0\]\.pairid"):
        load_cirr(tmp_path, "val")


def write_fashioniq(root: Path, category: str = "dress") -> Path:
    names = ["B008BHCT58", "B003FGW7MK", "B00BZ8GPVO", "B007P2IZ0K"]
    for n in names:
        _img(root / "images" / f"{n}.png")
    rows = [{"target": "B008BHCT58", "candidate": "B003FGW7MK", "captions": ["is solid black with no sleeves",
                                                                               "is black and has no sleeves."]},
            {"target": "B007P2IZ0K", "candidate": "B00BZ8GPVO", "captions": ["is longer", "has a floral print"]}]
    (root / "captions").mkdir(parents=True, exist_ok=True)
    (root / "image_splits").mkdir(parents=True, exist_ok=True)
    (root / "captions" / f"cap.{category}.val.json").write_text(json.dumps(rows))
    (root / "image_splits" / f"split.{category}.val.json").write_text(json.dumps(names))
    return root


def test_fashioniq_loader(tmp_path):
    split = load_fashioniq(write_fashioniq(tmp_path), "dress", "val")
    t = split.triplets[0]
    assert (t.reference, t.target) == ("B003FGW7MK", "B008BHCT58")
    assert t.caption == "Is solid black with no sleeves and is black and has no sleeves"
    assert len(split.gallery) == 4 and t.members == ()


def test_fashioniq_bad_input(tmp_path):
    write_fashioniq(tmp_path)
    with pytest.raises(InputError, match="category"):
        load_fashioniq(tmp_path, "shoes", "val")
    rows = [{"target": "B000000000", "candidate": "B003FGW7MK", "captions": ["a", "b"]}]
    (tmp_path / "captions" / "cap.dress.val.json").write_text(json.dumps(rows))
    with pytest.raises(InputError, match=r"\[0\]\.target"):
        load_fashioniq(tmp_path, "dress", "val")


def test_shapes_world_has_cirr_files(shapes_world):
    root = shapes_world / "cirr"
    train, test = load_cirr(root, "train"), load_cirr(root, "test")
    sets = load_cirr_sets(root, "train")
    assert all(len(t.members) == 6 for t in train.triplets + test.triplets)
    assert all(t.reference != t.target and t.target in t.members for t in test.triplets)
    # few annotated training triplets, many unannotated pairs in the sets
    n_pairs = sum(len(s) * (len(s) - 1) for s in sets)
    assert 0 < len(train.triplets) < 0.2 * n_pairs
    assert len(train.gallery) == 6 * len(sets)
    # every test image is a distinct scene: no false negatives in the gallery
    scenes = json.loads((root / "scenes.rc2.test.json").read_text())
    from core.shapes.world import Scene, scene_key

    assert len({scene_key(Scene.from_dict(s)) for s in scenes.values()}) == len(scenes)
