"""The Shapes world: scenes, rendering, captions, edits and the world writer, on tiny worlds."""
from __future__ import annotations

import dataclasses
import json
import types
from pathlib import Path

import numpy as np
import pytest

import core.shapes.make as make
from core.errors import InputError
from core.shapes.captions import caption_scene, describe_object, tokenize
from core.shapes.edits import Edit, apply_edit, describe_edit, near_duplicates, random_edit
from core.shapes.render import render
from core.shapes.world import COLOURS, GRID, Obj, Scene, sample_scene, scene_key
from tools.make_shapes import main as make_shapes_main

TINY = dict(n_train=30, n_val=10, n_test=20)


def tiny_cfg(out_dir: Path, **kw) -> make.WorldConfig:
    return make.WorldConfig(out_dir=str(out_dir), **{**TINY, **kw})


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return make.make_world(tiny_cfg(tmp_path_factory.mktemp("shapes") / "world"))


def test_same_seed_same_bytes_other_seed_other_world(world, tmp_path):
    again = make.make_world(tiny_cfg(tmp_path / "again"))
    assert all_files(again) == all_files(world)
    other = all_files(make.make_world(tiny_cfg(tmp_path / "other", seed=1)))
    ours = all_files(world)
    # The world's own files have the same names under any seed (task files, such as query images, may not).
    own = lambda files: {k for k in files if k.startswith("images/") or "/" not in k}
    assert own(other) == own(ours)
    assert other["scenes.json"] != ours["scenes.json"]
    assert other["dataset_shapes.json"] != ours["dataset_shapes.json"]
    assert sum(other[k] != ours[k] for k in own(ours) if k.endswith(".png")) > 50


def test_world_layout_and_karpathy_json(world):
    scenes = json.loads((world / "scenes.json").read_text())
    assert scenes["seed"] == 0 and scenes["image_size"] == 64
    assert [r["imgid"] for r in scenes["images"]] == list(range(60))
    d = json.loads((world / "dataset_shapes.json").read_text())
    assert set(d) == {"dataset", "images"} and d["dataset"] == "shapes"
    splits = [im["split"] for im in d["images"]]
    assert splits == ["train"] * 30 + ["val"] * 10 + ["test"] * 20
    sentids = []
    for im, rec in zip(d["images"], scenes["images"]):
        assert set(im) == {"filename", "imgid", "split", "sentids", "sentences"}
        assert (im["filename"], im["imgid"], im["split"]) == (rec["filename"], rec["imgid"], rec["split"])
        assert im["filename"] == f"{im['split']}_{splits[:im['imgid']].count(im['split']):05d}.png"
        assert (world / "images" / im["filename"]).is_file()
        assert len(im["sentences"]) == 5
        assert im["sentids"] == [s["sentid"] for s in im["sentences"]]
        for s in im["sentences"]:
            assert set(s) == {"raw", "tokens", "imgid", "sentid"}
            assert s["imgid"] == im["imgid"] and s["tokens"] == tokenize(s["raw"]) and s["tokens"]
        sentids += im["sentids"]
    assert sentids == list(range(300))
    # scenes are pairwise distinct in words
    assert len({scene_key(r.scene) for r in make.load_scenes(world)}) == 60


def test_render_is_deterministic_and_draws_every_object():
    rng = np.random.default_rng(3)
    for _ in range(20):
        scene = sample_scene(rng)
        img = render(scene)
        assert img.mode == "RGB" and img.size == (64, 64)
        assert img.tobytes() == render(scene).tobytes()
        px = np.asarray(img).astype(int)
        cell = 64 / GRID
        for o in scene.objects:
            r0, c0 = int(o.row * cell), int(o.col * cell)
            patch = px[r0:int(r0 + cell), c0:int(c0 + cell)].reshape(-1, 3)
            assert (np.abs(patch - COLOURS[o.colour]).sum(1) < 30).sum() >= 10, (o, scene)
    small, large = (render(Scene((Obj("square", "red", s, 1, 1),))) for s in ("small", "large"))
    red = lambda im: (np.abs(np.asarray(im).astype(int) - COLOURS["red"]).sum(2) < 30).sum()  # noqa: E731
    assert red(large) > 2.5 * red(small)


def test_scene_and_edit_json_round_trip():
    rng = np.random.default_rng(0)
    for _ in range(50):
        scene = sample_scene(rng)
        assert Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene
        edit, _ = random_edit(scene, rng)
        assert Edit.from_dict(json.loads(json.dumps(edit.to_dict()))) == edit
    with pytest.raises(InputError, match=r"objects\[0\]\.colour"):
        Scene.from_dict({"objects": [{"shape": "circle", "colour": "mauve", "size": "small", "row": 0, "col": 0}]}, "x.json")


def test_scene_validation():
    a = Obj("circle", "red", "small", 0, 0)
    with pytest.raises(InputError):
        Scene((a, dataclasses.replace(a, shape="star")))  # same cell
    with pytest.raises(InputError):
        Scene(())
    with pytest.raises(InputError):
        Obj("circle", "red", "small", 3, 0)


def _diff(before: Scene, after: Scene) -> dict:
    return {
        "n": (len(before.objects), len(after.objects)),
        "changed": [
            (i, f.name)
            for i, (a, b) in enumerate(zip(before.objects, after.objects))
            for f in dataclasses.fields(Obj)
            if getattr(a, f.name) != getattr(b, f.name)
        ],
    }


@pytest.mark.parametrize("kind", ["colour", "shape", "size", "move", "add", "remove"])
def test_edits_change_exactly_what_they_say(kind):
    rng = np.random.default_rng(1)
    for _ in range(40):
        scene = sample_scene(rng)
        if kind == "add" and len(scene.objects) == 3 or kind == "remove" and len(scene.objects) == 1:
            with pytest.raises(InputError):
                random_edit(scene, rng, kinds=[kind])
            continue
        edit, after = random_edit(scene, rng, kinds=[kind])
        assert edit.kind == kind and after == apply_edit(scene, edit)
        assert scene_key(after) != scene_key(scene) and after.background == scene.background
        d = _diff(scene, after)
        n = len(scene.objects)
        if kind in ("colour", "shape", "size"):
            assert d == {"n": (n, n), "changed": [(edit.index, kind)]}
            assert getattr(after.objects[edit.index], kind) == edit.new
        elif kind == "move":
            assert d["n"] == (n, n) and {f for _, f in d["changed"]} <= {"row", "col"}
            assert after.objects[edit.index].cell == edit.new and edit.old == scene.objects[edit.index].cell
        elif kind == "add":
            assert after.objects[:n] == scene.objects and after.objects[n] == edit.new and edit.index == n
        else:
            assert after.objects == scene.objects[: edit.index] + scene.objects[edit.index + 1:]
        text = describe_edit(edit, scene, rng)
        assert text and text == text.strip()
        if kind == "colour":
            assert any(w in text for w in ("red", "green", "blue", "yellow", "purple", "violet", "orange", "black", "cyan", "turquoise"))


def test_invalid_edits_are_refused():
    scene = Scene((Obj("circle", "red", "small", 0, 0), Obj("star", "blue", "large", 1, 1)))
    with pytest.raises(InputError):
        apply_edit(scene, Edit("move", 0, (0, 0), (1, 1)))  # taken cell
    with pytest.raises(InputError):
        apply_edit(scene, Edit("colour", 0, "green", "blue"))  # wrong old value
    with pytest.raises(InputError):
        apply_edit(scene, Edit("shape", 5, "circle", "star"))  # no such object
    assert describe_edit(Edit("colour", 0, "red", "blue"), scene, np.random.default_rng(0))


def test_near_duplicates_are_distinct():
    rng = np.random.default_rng(2)
    scene = sample_scene(rng)
    variants = near_duplicates(scene, rng, 8)
    keys = [scene_key(s) for _, s in variants]
    assert len(variants) == 8 and len(set(keys)) == 8 and scene_key(scene) not in keys
    for edit, s in variants:
        assert apply_edit(scene, edit) == s


def test_captions_paraphrase_and_some_are_partial():
    rng = np.random.default_rng(0)
    scene = Scene((Obj("circle", "red", "small", 0, 0), Obj("square", "blue", "large", 2, 2)))
    assert describe_object(scene.objects[0], rng, with_size=False, with_position=False) in ("a red circle", "a red disc")
    caps = [c for _ in range(100) for c in caption_scene(scene, rng, n=5)]
    assert len(set(caps)) > 100
    full = [c for c in caps if ("red" in c and "blue" in c and ("small" in c or "little" in c or "tiny" in c)
                                and ("large" in c or "big" in c or "huge" in c) and "left" in c and "right" in c)]
    assert 0.5 < len(full) / len(caps) < 0.8  # about a third are partial


def test_task_rngs_are_independent_and_new_task_rebuilds(world, tmp_path, monkeypatch):
    out = tmp_path / "w"
    make.make_world(tiny_cfg(out))
    seen = {}

    def write(scenes, out_dir, rng):
        seen["n"] = len(scenes)
        (out_dir / "extra.json").write_text(json.dumps(rng.integers(1000, size=3).tolist()))

    extra = types.ModuleType("extra")
    extra.NAME, extra.write = "extra", write
    real = make.discover_tasks
    monkeypatch.setattr(make, "discover_tasks", lambda: real() + [extra])
    make.make_world(tiny_cfg(out))  # same world, one more task: rebuilt without overwrite
    assert seen["n"] == 60 and (out / "extra.json").is_file()
    files = all_files(out)
    assert {k: v for k, v in files.items() if k not in ("extra.json", "world_config.json")} == {
        k: v for k, v in all_files(world).items() if k != "world_config.json"
    }


def test_idempotent_rerun_and_refusal_to_overwrite(tmp_path):
    out = tmp_path / "w"
    make.make_world(tiny_cfg(out))
    stamp = (out / "scenes.json").stat().st_mtime_ns
    assert make.make_world(tiny_cfg(out)) == out
    assert (out / "scenes.json").stat().st_mtime_ns == stamp  # not rewritten
    with pytest.raises(InputError, match="overwrite"):
        make.make_world(tiny_cfg(out, seed=5))
    make.make_world(tiny_cfg(out, seed=5), overwrite=True)
    assert make.load_world_config(out).seed == 5
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="out_dir"):
        make.make_world(tiny_cfg(other))
    assert (other / "notes.txt").read_text() == "mine"


def test_failure_leaves_nothing_behind(tmp_path, monkeypatch):
    def boom(scenes, out_dir, rng):
        raise RuntimeError("task failed")

    bad = types.ModuleType("bad")
    bad.NAME, bad.write = "bad", boom
    real = make.discover_tasks
    monkeypatch.setattr(make, "discover_tasks", lambda: real() + [bad])
    with pytest.raises(RuntimeError):
        make.make_world(tiny_cfg(tmp_path / "w"))
    assert list(tmp_path.iterdir()) == []


def test_bad_config_is_refused(tmp_path):
    with pytest.raises(InputError, match="n_train"):
        make.make_world(tiny_cfg(tmp_path / "w", n_train=0))
    assert not (tmp_path / "w").exists()


def test_cli(tmp_path, capsys):
    make_shapes_main(["--out_dir", str(tmp_path / "w"), "--n_train", "5", "--n_val", "2", "--n_test", "3", "--seed", "4"])
    assert "5/2/3" in capsys.readouterr().out
    assert len(list((tmp_path / "w" / "images").glob("*.png"))) == 10
    make_shapes_main(["--out_dir", str(tmp_path / "w"), "--n_train", "5", "--n_val", "2", "--n_test", "3", "--seed", "4"])
    assert "unchanged" in capsys.readouterr().out
