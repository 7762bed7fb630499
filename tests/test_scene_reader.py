"""The object-level check of generated images: hand-computed metrics, complete-caption selection, and a reader
trained on the tiny world that reads real held-out images far above chance and is reused from its cache."""
from __future__ import annotations

import pytest
import torch

from core.data import load_karpathy
from core.shapes.make import load_scenes
from core.shapes.world import Obj, Scene
from core.errors import InputError
from core.shapes.scene_reader import (COLOUR_CLASSES, READER_FILE, READER_RESOLUTION, SHAPE_CLASSES, load_or_train_reader,
                                      load_reader, object_metrics, read_cells)
from mir.generator import PixelImages
from mir.object_check import complete_caption, names_every_object
from mir.train_generator import load_pixels

SCENE = Scene(objects=(Obj("circle", "red", "small", 0, 0), Obj("square", "blue", "large", 2, 1)),
              background=(240, 240, 240))


def _cells(pairs: dict[int, tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    shape, colour = torch.zeros(1, 9, dtype=torch.long), torch.zeros(1, 9, dtype=torch.long)
    for cell, (s, c) in pairs.items():
        shape[0, cell], colour[0, cell] = SHAPE_CLASSES.index(s), COLOUR_CLASSES.index(c)
    return shape, colour


def test_object_metrics_by_hand():
    # top-left: right shape, wrong colour; bottom-middle (cell 7): both right; an invented star in cell 4
    m = object_metrics(*_cells({0: ("circle", "green"), 7: ("square", "blue"), 4: ("star", "red")}), [SCENE])
    assert m["shape acc"] == 100.0 and m["colour acc"] == 50.0 and m["object acc"] == 50.0
    assert m["extra objects / image"] == 1.0 and m["objects"] == 2 and m["images"] == 1
    # everything read as empty: nothing right, nothing extra
    m = object_metrics(*_cells({}), [SCENE])
    assert m["object acc"] == 0.0 and m["extra objects / image"] == 0.0


def test_complete_captions_name_every_object_and_nothing_else():
    full = "a small red circle in the top left and a large blue square at the bottom middle"
    assert names_every_object(full, SCENE)
    assert not names_every_object("a small red circle in the top left", SCENE)  # one object left out
    assert not names_every_object("a red circle in the top left and a large blue square at the bottom middle", SCENE)
    assert not names_every_object(full + " and a small green star in the centre", SCENE)
    assert complete_caption(["a red circle and a blue square", full], SCENE) == full
    assert complete_caption(["a red circle"], SCENE) is None


@pytest.fixture(scope="module")
def world_split(shapes_world):
    scenes = {r.imgid: r.scene for r in load_scenes(shapes_world)}
    data = (str(shapes_world / "dataset_shapes.json"), str(shapes_world / "images"))
    train, test = load_karpathy(*data, "train"), load_karpathy(*data, "test")
    return scenes, train, test


def test_reader_reads_real_heldout_images(world_split, scene_reader_file):
    scenes, _, test = world_split
    m = object_metrics(*read_cells(load_reader(scene_reader_file), load_pixels([r.path for r in test], READER_RESOLUTION)),
                       [scenes[r.imgid] for r in test])
    # chance of the right (shape, colour) pair in a cell is about 1/7 × 1/9; 400 training images read nearly all
    assert m["object acc"] > 85 and m["extra objects / image"] < 0.2, m


def test_reader_is_cached_by_its_settings(world_split, tmp_path):
    scenes, train, test = world_split
    loads = []

    def train_pixels() -> PixelImages:  # opened per item by the reader's DataLoader, never all in memory
        loads.append(1)
        return PixelImages([r.path for r in train], READER_RESOLUTION)

    train_scenes = [scenes[r.imgid] for r in train]
    reader = load_or_train_reader(tmp_path / READER_FILE, train_pixels, train_scenes, seed=0, epochs=1, batch_size=64)
    again = load_or_train_reader(tmp_path / READER_FILE, train_pixels, train_scenes, seed=0, epochs=1, batch_size=64)
    assert len(loads) == 1  # the second call loaded the cached reader
    x = load_pixels([test[0].path], READER_RESOLUTION)
    assert all(torch.equal(a, b) for a, b in zip(read_cells(reader, x), read_cells(again, x)))
    assert all(torch.equal(a, b) for a, b in zip(read_cells(reader, x), read_cells(load_reader(tmp_path / READER_FILE), x)))
    load_or_train_reader(tmp_path / READER_FILE, train_pixels, train_scenes, seed=1, epochs=1, batch_size=64)
    assert len(loads) == 2  # other settings: trained anew


def test_a_missing_or_foreign_reader_file_is_refused(tmp_path):
    with pytest.raises(InputError, match="no scene reader file"):
        load_reader(tmp_path / "missing.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(InputError, match="not a scene reader file"):
        load_reader(tmp_path / "other.pt")
