"""MTST synthesis on the real layouts: CIRR's rc2 val annotations (read where the shared data folder keeps them; no
`image_sets` file, placeholder images under the listed names) grouped by their `img_set` subsets and NLVR2 names,
and a FashionIQ fixture in its real layout; what synthesis writes is read back through the trainer's own loaders.
A tiny untrained generator: the files and the pairing rules are checked, not the texts' quality."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cir import synthesize, train
from cir.data import cirr_groups, load_cirr, merge_splits
from core.config import parse_config
from core.encoders import build_dual_encoder
from core.errors import InputError
from core.modtext import build_shapes_generator

ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = Path(os.environ.get("SHARED_DATA_DIR", ROOT.parent / "shared" / "data"))
REAL_CIRR = SHARED_DATA / "cirr"
TINY_TOWER = {"embed_dim": 32, "image_size": 16,
              "vision": {"layers": 1, "width": 32, "patch_size": 8, "head_width": 16, "mlp_ratio": 2.0},
              "text": {"context_length": 16, "width": 32, "heads": 2, "layers": 1, "mlp_ratio": 2.0}}
TINY_QFORMER = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
TINY_LM = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
           "intermediate_size": 64}
# Two subsets of the real val file (its img_set ids) and what the rules make of them (read off the real files)
SUBSETS = (36, 48)
SET_36 = ("dev-430-3-img0", "dev-63-0-img1", "dev-1028-1-img1", "dev-1028-2-img1", "dev-244-0-img0", "dev-1028-2-img0")
NLVR2_1044 = {"dev-1044-3-img1", "dev-1044-2-img1", "dev-1044-0-img0", "dev-1044-0-img1", "dev-1044-2-img0"}
SYNTH_ARGS = ["--max_pairs", "40", "--max_new_tokens", "2", "--min_words", "0", "--batch_size", "16",
              "--threads", "1", "--num_workers", "0"]


def _real(rel: str) -> Path:
    path = REAL_CIRR / rel
    if not path.is_file():
        pytest.skip(f"the real CIRR annotations are not here ({path} is absent)")
    return path


def _placeholder(path: Path, rng: np.random.Generator) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def generator(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    tower = tmp_path_factory.mktemp("tower") / "dense"
    tower.mkdir()
    build_dual_encoder(TINY_TOWER).save(tower)
    texts = ["add a dog", "remove the bottles and show a beach", "make the dress red and longer"]
    gen = build_shapes_generator(tower, texts, num_query_tokens=2, qformer=TINY_QFORMER, language_model=TINY_LM)
    folder = tmp_path_factory.mktemp("mtst") / "checkpoint-best"
    gen.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def cirr_subset(tmp_path_factory) -> Path:
    """A CIRR root with the real val rows of two subsets, and the real val image split cut to every image of the
    NLVR2 groups those subsets touch (33 images, 21 of them in no subset); placeholder images, no image_sets/."""
    rows = [r for r in json.loads(_real("captions/cap.rc2.val.json").read_text()) if r["img_set"]["id"] in SUBSETS]
    mapping = json.loads(_real("image_splits/split.rc2.val.json").read_text())
    touched = {m.rsplit("-", 2)[0] for r in rows for m in r["img_set"]["members"]}
    mapping = {n: rel for n, rel in mapping.items() if n.rsplit("-", 2)[0] in touched}
    root = tmp_path_factory.mktemp("cirr-real") / "cirr"
    (root / "captions").mkdir(parents=True)
    (root / "image_splits").mkdir()
    (root / "captions" / "cap.rc2.val.json").write_text(json.dumps(rows))
    (root / "image_splits" / "split.rc2.val.json").write_text(json.dumps(mapping))
    rng = np.random.default_rng(0)
    for rel in mapping.values():
        _placeholder(root / "img_raw" / rel, rng)
    return root


def test_cirr_groups_of_the_real_val_file():
    """Every val image is in some img_set: the 503 subsets of the file are the groups, none from NLVR2 names."""
    _real("captions/cap.rc2.val.json")
    groups = dict(cirr_groups(REAL_CIRR, "val"))
    assert len(groups) == 503 and all(isinstance(k, int) for k in groups)
    assert groups[36] == SET_36


def test_cirr_groups_add_the_nlvr2_groups_of_images_outside_the_subsets(cirr_subset):
    groups = dict(cirr_groups(cirr_subset, "val"))
    assert groups[36] == SET_36 and set(groups) == {36, 48, "dev-1044", "dev-244", "dev-1028", "dev-1004",
                                                    "dev-63", "dev-1042"}
    assert set(groups["dev-1044"]) == NLVR2_1044
    assert set(groups["dev-1028"]) == {"dev-1028-3-img1", "dev-1028-3-img0"}  # its other images are in set 36
    # dev-430 and dev-940 keep a single image outside the subsets: no pair, no group


def test_cirr_synthesis_without_image_sets_feeds_the_trainer(cirr_subset, generator, tmp_path):
    out = tmp_path / "synthetic"
    manifest = synthesize.main(["--cirr_root", str(cirr_subset), "--split", "val", "--generator", str(generator),
                                "--output_dir", str(out), *SYNTH_ARGS])
    groups = dict(cirr_groups(cirr_subset, "val"))
    assert manifest["n_groups"] == 8 and manifest["n_mined"] == 40
    cfg = parse_config(train.TrainConfig, ["--cirr_root", str(cirr_subset), "--train_root", str(out),
                                           "--train_split", "val", "--reverse_root", str(out)])
    image_root = str(cirr_subset / "img_raw")
    synthetic = merge_splits(train._load(cfg, str(out), "val", image_root))
    annotated = load_cirr(cirr_subset, "val")
    assert len(synthetic.triplets) == manifest["n_synthetic"] > 0
    known = {(t.reference, t.target) for t in annotated.triplets}
    for t in synthetic.triplets:
        assert t.target in groups[t.set_id] and t.reference in groups[t.set_id] and t.reference != t.target
        assert (t.reference, t.target) not in known
    assert len({(t.reference, t.target) for t in synthetic.triplets}) == len(synthetic.triplets)
    reverse = train._reverse_texts(cfg, annotated, image_root)  # one generated text per annotated pairid
    assert set(reverse) == {t.pairid for t in annotated.triplets}
    rows = {r["pairid"]: r for r in json.loads((out / "captions" / "cap.rc2.val_reverse.json").read_text())}
    assert all(rows[t.pairid]["reference"] == t.target and rows[t.pairid]["target_hard"] == t.reference
               for t in annotated.triplets)


def test_synthesis_on_a_split_with_hidden_targets_is_refused(generator, tmp_path):
    """Reverse texts need the targets: CIRR test1 (real rows, their images as placeholders) stops before work."""
    rows = json.loads(_real("captions/cap.rc2.test1.json").read_text())[:3]
    mapping = json.loads(_real("image_splits/split.rc2.test1.json").read_text())
    root = tmp_path / "cirr"
    (root / "captions").mkdir(parents=True)
    (root / "image_splits").mkdir()
    names = {m for r in rows for m in r["img_set"]["members"]}
    (root / "captions" / "cap.rc2.test1.json").write_text(json.dumps(rows))
    (root / "image_splits" / "split.rc2.test1.json").write_text(json.dumps({n: mapping[n] for n in names}))
    rng = np.random.default_rng(0)
    for n in names:
        _placeholder(root / "img_raw" / mapping[n], rng)
    out = tmp_path / "synthetic"
    with pytest.raises(InputError, match=r"cap\.rc2\.test1\.json: \[0\]\.target_hard: .*no targets"):
        synthesize.main(["--cirr_root", str(root), "--split", "test1", "--generator", str(generator),
                         "--output_dir", str(out), *SYNTH_ARGS])
    assert not out.exists()


def test_synthesis_on_a_caption_file_with_a_repeated_pairid_is_refused(cirr_subset, tmp_path):
    """The reverse texts are keyed by pairid: a repeated one stops synthesis before the generator loads."""
    root = tmp_path / "cirr"
    root.mkdir()
    for folder in ("image_splits", "img_raw"):
        (root / folder).symlink_to(cirr_subset / folder, target_is_directory=True)
    rows = json.loads((cirr_subset / "captions" / "cap.rc2.val.json").read_text())
    rows[4]["pairid"] = rows[2]["pairid"]
    (root / "captions").mkdir()
    (root / "captions" / "cap.rc2.val.json").write_text(json.dumps(rows))
    out = tmp_path / "synthetic"
    with pytest.raises(InputError, match=r"cap\.rc2\.val\.json: \[4\]\.pairid: pairid .* repeats row \[2\]"):
        synthesize.main(["--cirr_root", str(root), "--split", "val", "--generator", str(tmp_path / "absent"),
                         "--output_dir", str(out), *SYNTH_ARGS])
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ FashionIQ
CATEGORIES = ("dress", "shirt")


@pytest.fixture(scope="module")
def fashioniq_root(tmp_path_factory) -> Path:
    """FashionIQ's layout, two categories of six .jpg images each, three annotated train pairs per category."""
    root = tmp_path_factory.mktemp("fiq") / "fashionIQ_dataset"
    for folder in ("captions", "image_splits", "images"):
        (root / folder).mkdir(parents=True)
    rng = np.random.default_rng(1)
    for c, category in enumerate(CATEGORIES):
        names = [f"B00{c}{i:06d}" for i in range(6)]
        for name in names:
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / "images" / f"{name}.jpg")
        rows = [{"candidate": names[i], "target": names[i + 1], "captions": ["is darker", "has long sleeves"]}
                for i in range(3)]
        (root / "captions" / f"cap.{category}.train.json").write_text(json.dumps(rows))
        (root / "image_splits" / f"split.{category}.train.json").write_text(json.dumps(names))
    return root


def _fiq_args(root: Path, generator: Path, out: Path, ext: str) -> list[str]:
    return ["--dataset", "fashioniq", "--categories", ",".join(CATEGORIES), "--cirr_root", str(root),
            "--image_ext", ext, "--split", "train", "--generator", str(generator), "--output_dir", str(out),
            *SYNTH_ARGS]


def test_fashioniq_synthesis_pairs_within_a_category_and_feeds_the_trainer(fashioniq_root, generator, tmp_path):
    out = tmp_path / "synthetic"
    manifest = synthesize.main(_fiq_args(fashioniq_root, generator, out, ".jpg"))
    assert manifest["n_groups"] == 2 and manifest["n_mined"] == 40  # of 2 * (30 - 3) unannotated ordered pairs
    cfg = parse_config(train.TrainConfig, ["--dataset", "fashioniq", "--categories", ",".join(CATEGORIES),
                                           "--cirr_root", str(fashioniq_root), "--image_ext", ".jpg",
                                           "--train_root", str(out), "--reverse_root", str(out)])
    image_root = str(fashioniq_root / "images")
    annotated = merge_splits(train._load(cfg, str(fashioniq_root), "train", image_root))
    known = {(t.reference, t.target) for t in annotated.triplets}
    synthetic = train._load(cfg, str(out), "train", image_root)
    assert sum(len(u.triplets) for u in synthetic) == manifest["n_synthetic"] > 0
    for unit in synthetic:
        for t in unit.triplets:  # both images of the unit's own category
            assert t.reference[3] == t.target[3] == str(CATEGORIES.index(unit.meta["category"]))
            assert t.reference != t.target and (t.reference, t.target) not in known
    reverse = train._reverse_texts(cfg, annotated, image_root)
    assert set(reverse) == {t.pairid for t in annotated.triplets}
    for category in CATEGORIES:
        rows = json.loads((out / "captions" / f"cap.{category}.train_reverse.json").read_text())
        forward = json.loads((fashioniq_root / "captions" / f"cap.{category}.train.json").read_text())
        assert [(r["candidate"], r["target"]) for r in rows] == [(f["target"], f["candidate"]) for f in forward]


def test_fashioniq_synthesis_with_the_wrong_image_extension_is_refused(fashioniq_root, generator, tmp_path):
    out = tmp_path / "synthetic"
    with pytest.raises(InputError, match=r"B000000000\.png: B000000000: image file not found .*set image_ext to "
                                         r"'\.jpg'"):
        synthesize.main(_fiq_args(fashioniq_root, generator, out, ".png"))
    assert not out.exists()


def test_mine_pairs_draws_from_large_groups_without_listing_them():
    """A group of 1,500 images (2.2 M ordered pairs, over the listing limit): a seeded sample of distinct pairs
    within the groups, none excluded, the same for the same seed."""
    big = tuple(f"a{i}" for i in range(1500))
    groups = [("big", big), ("small", ("b0", "b1", "b2"))]
    exclude = {("a0", "a1")}
    pairs = synthesize.mine_pairs(groups, exclude, 300, seed=0)
    assert len(pairs) == 300 == len({p[:2] for p in pairs})
    assert all(p[0] != p[1] and set(p[:2]) <= set(dict(groups)[p[3]]) and p[:2] not in exclude for p in pairs)
    assert pairs == synthesize.mine_pairs(groups, exclude, 300, seed=0)
    assert pairs != synthesize.mine_pairs(groups, exclude, 300, seed=1)


def test_drawn_pairs_are_distinct_and_never_excluded(monkeypatch):
    """The drawing path on groups small enough that repeats and the excluded pair are drawn: asked for every
    available pair, it returns each exactly once."""
    monkeypatch.setattr(synthesize, "LIST_PAIRS_UP_TO", 0)
    groups = [("g", ("a", "b", "c", "d")), ("h", ("x", "y", "z"))]
    pairs = synthesize.mine_pairs(groups, {("a", "b")}, 17, seed=0)
    expected = {(p, q) for _, g in groups for p in g for q in g if p != q} - {("a", "b")}
    assert len(pairs) == 17 and {p[:2] for p in pairs} == expected


@pytest.mark.parametrize("name", ["cirr_synthesize", "fashioniq_synthesize", "shapes_synthesize"])
def test_synthesis_configs_parse(name):
    cfg = parse_config(synthesize.SynthConfig, ["--config", str(ROOT / "configs" / "cir" / f"{name}.yaml")])
    assert cfg.dataset == name.split("_")[0].replace("shapes", "cirr")
    assert cfg.image_tokens == ("cache" if name.startswith("shapes") else "live")
