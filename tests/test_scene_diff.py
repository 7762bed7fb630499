"""The pixel-reading comparer: its edits by hand, its words read back by the world's own parser, and, with a reader
trained on the tiny world, its statements about held-out pairs scored against the scenes it never reads."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from core.errors import InputError
from core.shapes.captions import caption_scene
from core.shapes.render import render
from core.shapes.scene_diff import (CellEdit, PixelComparer, Thing, edit_agreement, grid_edits, say_edits,
                                    scene_grid)
from core.shapes.scene_reader import load_reader
from core.shapes.world import Obj, Scene, sample_scene
from mir.refiner import ShapesRefiner
from mir.object_check import names_every_object

BG = (240, 240, 240)
BEFORE = Scene((Obj("circle", "red", "small", 0, 0), Obj("square", "blue", "large", 1, 1),
                Obj("star", "green", "medium", 2, 2)), BG)
AFTER = Scene((Obj("square", "yellow", "small", 0, 0), Obj("star", "green", "large", 0, 2),
               Obj("square", "blue", "large", 2, 1)), BG)


def test_edits_by_hand():
    edits = grid_edits(scene_grid(BEFORE), scene_grid(AFTER))
    # the red circle becomes a yellow square in place; the blue square goes from the middle (4) to the bottom
    # middle (7); the green star leaves the bottom right (8) and a larger green star appears top right (2): a
    # different size is a different object, so it is a removal and an addition, not a move
    # (said removals and moves first, additions last: a scene never passes through a fourth object)
    assert [(e.kind, e.cell, e.value) for e in edits] == [
        ("remove", 8, None), ("move", 4, 7), ("shape", 0, "square"), ("colour", 0, "yellow"), ("add", 2, None)]
    assert say_edits(edits) == ("remove the green star in the bottom right and move the blue square in the middle to "
                                "the bottom middle and turn the red circle in the top left into a square and make the "
                                "red square in the top left yellow and add a large green star in the top right")
    assert grid_edits(scene_grid(BEFORE), scene_grid(BEFORE)) == [] and say_edits([]) == ""


def test_a_reader_without_sizes_calls_the_star_a_move():
    sizeless = lambda s: tuple(None if t is None else Thing(t.shape, t.colour) for t in scene_grid(s))  # noqa: E731
    kinds = [(e.kind, e.cell, e.value) for e in grid_edits(sizeless(BEFORE), sizeless(AFTER))]
    assert ("move", 8, 2) in kinds and ("add", 2, None) not in kinds


def test_said_edits_read_back_by_the_world_parser_give_the_second_scene():
    """What the comparer says must be what the stages' readers of the world's grammar understand: the refiner
    applies the words to the first scene's full caption and must end at the second scene, object for object."""
    rng = np.random.default_rng(0)
    refiner = ShapesRefiner()
    checked = 0
    for _ in range(200):
        a, b = sample_scene(rng), sample_scene(rng)
        full = next((c for c in caption_scene(a, rng, n=20) if names_every_object(c, a)), None)
        if full is None:
            continue
        start = refiner.start(full)
        start.n_objects = None  # a count the caption states ("two shapes: ...") is the first scene's, not the second's
        state, missed = refiner.refine(start, say_edits(grid_edits(scene_grid(a), scene_grid(b))))
        assert missed == 0
        assert sorted((o.shape, o.colour, o.size, o.cell) for o in state.objects) == \
            sorted((o.shape, o.colour, o.size, (o.row, o.col)) for o in b.objects), (full, b)
        checked += 1
    assert checked > 50


def test_edit_agreement_by_hand():
    red = Thing("circle", "red")
    true = [[CellEdit("colour", 0, red, "blue"), CellEdit("size", 0, red, "large")], [CellEdit("remove", 3, red)]]
    stated = [[CellEdit("colour", 0, red, "blue"), CellEdit("add", 5, red)], [CellEdit("remove", 3, red)]]
    m = edit_agreement(stated, true)
    assert m["precision"] == pytest.approx(200 / 3) and m["recall"] == pytest.approx(200 / 3)
    assert m["recall (no size edits)"] == 100.0 and m["exact pairs"] == 50.0


def _cir_pairs(world):
    root = world / "cirr"
    triplets = json.loads((root / "captions" / "cap.rc2.test.json").read_text())
    images = json.loads((root / "image_splits" / "split.rc2.test.json").read_text())
    scenes = {k: Scene.from_dict(v) for k, v in json.loads((root / "scenes.rc2.test.json").read_text()).items()}
    names = [(t["reference"], t["target_hard"]) for t in triplets]
    open_ = lambda n: Image.open(root / "img_raw" / images[n]).convert("RGB")  # noqa: E731
    return [open_(a) for a, _ in names], [open_(b) for _, b in names], [(scenes[a], scenes[b]) for a, b in names]


def test_the_comparer_reads_heldout_pairs_from_pixels(shapes_world, scene_reader_file):
    refs, tgts, scenes = _cir_pairs(shapes_world)
    comparer = PixelComparer(load_reader(scene_reader_file))
    m = edit_agreement(comparer.edits(refs, tgts), [grid_edits(scene_grid(a), scene_grid(b)) for a, b in scenes])
    # a blind guess of one (kind, cell, object, value) edit is right far below 1 %; size edits are invisible to it
    assert m["pairs"] >= 20 and m["precision"] > 75 and m["recall (no size edits)"] > 75, m
    assert comparer.describe(refs[:1], refs[:1]) == [""]  # the same image twice: nothing to say


def test_measure_tool_writes_both_pair_kinds(shapes_world, scene_reader_file, tmp_path):
    from tools import measure_comparer

    out = tmp_path / "comparer.json"
    results = measure_comparer.main(["--world_dir", str(shapes_world), "--reader", str(scene_reader_file),
                                     "--out", str(out), "--random_pairs", "40"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    assert results["random test pairs"]["pairs"] == 40 and results["cir test pairs"]["ROUGE-L"] > 0


def test_the_iterative_stage_foundation_stand_in_says_what_the_comparer_says(shapes_world, scene_reader_file):
    from cir.iterative.foundation import load_foundation_model

    refs, tgts, _ = _cir_pairs(shapes_world)
    model = load_foundation_model("scene_reader", str(scene_reader_file))
    texts = model.generate(refs[:4], tgts[:4], ["x"] * 4, seed=0)
    assert texts == PixelComparer(load_reader(scene_reader_file)).describe(refs[:4], tgts[:4])
    assert model.settings()["backbone"] == "scene_reader"
    with pytest.raises(InputError, match="not found"):
        load_foundation_model("scene_reader", str(shapes_world / "missing.pt"))


def test_render_then_read_recovers_a_scene(scene_reader_file):
    """The reader reads a freshly rendered scene it has never seen (a check that the comparer's grids come from
    the pixels of whatever image it is given)."""
    scene = Scene((Obj("triangle", "orange", "large", 0, 1), Obj("cross", "cyan", "large", 2, 0)), BG)
    grid = PixelComparer(load_reader(scene_reader_file)).grids([render(scene, 64)])[0]
    assert [(i, t.shape, t.colour) for i, t in enumerate(grid) if t is not None] == [(1, "triangle", "orange"),
                                                                                     (6, "cross", "cyan")]
