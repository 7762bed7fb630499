"""Hard-negative captions for the dense retriever: each kind changes exactly what it says (read back with the MIR
stage's independent caption parser), the loss reduces to CLIP's without negatives, and a run trained with them
resumes its negatives exactly."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from open_clip.loss import ClipLoss

from core.errors import InputError
from core.shapes.captions import CONTRAST_KINDS, caption_scene, contrast_caption
from core.shapes.world import Obj, Scene
from mir.refiner import parse_caption
from retriever.dense import probe, train
from retriever.dense.loss import HardNegativeClipLoss

SCENE = Scene(objects=(Obj("square", "red", "large", 0, 0), Obj("star", "blue", "small", 2, 1)))
CAPTION = "a large red square in the top left and a small blue star at the bottom middle"


def _objects(caption: str) -> list[tuple]:
    state = parse_caption(caption)
    assert not state.unparsed, state.unparsed
    return [(o.shape, o.colour, o.size, o.cell) for o in state.objects]


@pytest.mark.parametrize("kind,field", [("shape", 0), ("colour", 1), ("size", 2), ("position", 3)])
def test_each_kind_changes_one_attribute_of_one_object(kind, field):
    before = _objects(CAPTION)
    for seed in range(10):
        after = _objects(contrast_caption(CAPTION, np.random.default_rng(seed), [kind]))
        changed = [(b, a) for b, a in zip(before, after) if b != a]
        assert len(after) == 2 and len(changed) == 1
        b, a = changed[0]
        assert [i for i in range(4) if a[i] != b[i]] == [field]


def test_swap_exchanges_the_shapes_of_two_objects():
    after = _objects(contrast_caption(CAPTION, np.random.default_rng(0), ["swap"]))
    assert after == [("star", "red", "large", (0, 0)), ("square", "blue", "small", (2, 1))]


def test_nothing_to_change_gives_none():
    rng = np.random.default_rng(0)
    assert contrast_caption("a picture of something", rng) is None
    # the two objects are described alike, so exchanging their shapes describes the same scene
    assert contrast_caption("a picture of a square and a star", rng, ["swap"]) is None
    with pytest.raises(ValueError, match="unknown contrast kinds"):
        contrast_caption(CAPTION, rng, ["texture"])


def test_world_captions_always_offer_a_change():
    rng = np.random.default_rng(1)
    for caption in caption_scene(SCENE, rng, n=50):
        changed = contrast_caption(caption, rng, CONTRAST_KINDS)
        assert changed is not None and changed != caption


def test_loss_without_valid_negatives_is_clip_loss():
    g = torch.Generator().manual_seed(0)
    image, text, negatives = (torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=1) for _ in range(3))
    scale = torch.tensor(10.0)
    plain = ClipLoss()(image, text, scale)
    hard = HardNegativeClipLoss()
    assert torch.allclose(hard(image, text, negatives, torch.zeros(8, dtype=torch.bool), scale), plain)
    # a negative identical to its image's caption is as close as the caption itself: the loss must rise
    assert hard(image, text, text.clone(), torch.ones(8, dtype=torch.bool), scale) > plain + 0.1


def test_hard_negatives_are_replayed_on_resume():
    captions = [CAPTION, "a picture of something"]
    first, valid = train._hard_negatives(captions, list(CONTRAST_KINDS), (0, 5, 0))
    again, _ = train._hard_negatives(captions, list(CONTRAST_KINDS), (0, 5, 0))
    assert first == again and valid.tolist() == [True, False] and first[1] == captions[1]


def test_resnet_tower_trains_with_twins_and_the_probe_reports_it(shapes_world, resnet_run, tmp_path):
    """A ResNet tower trained on the tiny world with edited twins and changed captions (tests/conftest.py's
    `resnet_run`) prefers the true caption to a recoloured one far more often than chance (50 %); the probe writes
    what it prints. (Position and shape need the full world: the figures are in docs/dense.md.)"""
    result = probe.main(["--checkpoint", str(resnet_run / "checkpoint-best"), "--world_dir", str(shapes_world),
                         "--output_dir", str(tmp_path / "probe"), "--probe_steps", "50"])
    assert result["caption contrasts"]["colour"] > 80
    assert set(result["caption contrasts"]) == set(CONTRAST_KINDS)
    assert json.loads((tmp_path / "probe" / "probe.json").read_text()) == json.loads(json.dumps(result))


def test_cell_probe_reads_what_the_features_hold():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 7, (600, 9), generator=g) * (torch.rand(600, 9, generator=g) < 0.3)
    holding = torch.nn.functional.one_hot(labels, 7).flatten(1).float() + 0.1 * torch.randn(600, 63, generator=g)
    noise = torch.randn(600, 63, generator=g)
    read = probe.cell_probes(holding[:500], labels[:500], holding[500:], labels[500:], steps=200, seed=0)
    blind = probe.cell_probes(noise[:500], labels[:500], noise[500:], labels[500:], steps=200, seed=0)
    assert read["cell occupancy"] > 99 and read["occupied cell's shape"] > 99
    assert blind["cell occupancy"] < blind["all-empty baseline"] + 3 and blind["occupied cell's shape"] < 30


def test_unknown_kind_is_refused_before_work(shapes_world, tmp_path):
    with pytest.raises(InputError, match="contrast_kinds"):
        train.main(["--data_json", str(shapes_world / "dataset_shapes.json"), "--image_root",
                    str(shapes_world / "images"), "--output_dir", str(tmp_path / "x"), "--contrast_kinds", "[texture]"])
    assert not (tmp_path / "x").exists()


def test_edited_twin_is_the_scene_with_one_edit_rendered_and_captioned():
    from core.shapes.edits import edited_twin, random_edit
    from core.shapes.render import render

    image, caption = edited_twin(SCENE, np.random.default_rng(3), ["move"], image_size=64)
    rng = np.random.default_rng(3)
    _, twin = random_edit(SCENE, rng, ["move"])
    assert np.array_equal(np.asarray(image), np.asarray(render(twin, 64)))
    assert not np.array_equal(np.asarray(image), np.asarray(render(SCENE, 64)))
    described = {o.cell for o in parse_caption(caption).objects if o.cell is not None}
    assert described <= {o.cell for o in twin.objects}


def test_twins_need_the_worlds_scenes_and_known_kinds(shapes_world, tmp_path):
    args = ["--data_json", str(shapes_world / "dataset_shapes.json"), "--image_root", str(shapes_world / "images"),
            "--output_dir", str(tmp_path / "x")]
    with pytest.raises(InputError, match="scenes.json.*twin_edits"):
        train.main(args + ["--twin_edits", "[move]", "--world_dir", str(tmp_path)])
    with pytest.raises(InputError, match="twin_edits.*unknown kinds"):
        train.main(args + ["--twin_edits", "[warp]"])
    assert not (tmp_path / "x").exists()
