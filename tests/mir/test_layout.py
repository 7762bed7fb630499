"""The caption → layout encoder of the Shapes generator: trained on the tiny world it reads held-out captions that
name every object far above chance, it is reused from its cache, its tokens are not cut at the dense tower's
context; and the layout reaches the UNet over the patches each grid cell covers."""
from __future__ import annotations

import pytest
import torch

from core.data import load_karpathy
from core.encoders import load_dual_encoder
from core.shapes.make import load_scenes
from core.shapes.world import Obj, Scene
from mir.generator import cell_cover
from mir.layout import LAYOUT_CHANNELS, layout_accuracy, layout_targets, layout_tokens, load_or_train_layout
from mir.object_check import complete_caption


@pytest.fixture(scope="module")
def world(shapes_world, dense_checkpoint):
    scenes = {r.imgid: r.scene for r in load_scenes(shapes_world)}
    data = (str(shapes_world / "dataset_shapes.json"), str(shapes_world / "images"))
    return scenes, load_karpathy(*data, "train"), load_karpathy(*data, "test"), load_dual_encoder(dense_checkpoint)


def test_layout_targets_by_hand():
    scene = Scene(objects=(Obj("circle", "red", "small", 0, 0), Obj("square", "blue", "large", 2, 1)))
    t = layout_targets(scene)
    assert t.shape == (9, 3)
    assert t[0].tolist() == [1, 1, 1]  # circle, red, small: first of each list after "empty"/"none"
    assert t[7].tolist() == [2, 3, 3]  # square, blue, large
    assert t[4].tolist() == [0, 0, 0]


def test_layout_tokens_keep_long_captions(world):
    *_, encoder = world
    long = "a medium-sized orange star at the left edge, a medium red plus sign in the bottom left and a huge " \
           "violet square in the middle of the image"
    assert (encoder.tokenize([long])[0] != 0).sum() == 32  # the dense tower cuts it
    assert 32 < (layout_tokens(encoder.tokenizer, [long])[0] != 0).sum() < 64


def test_layout_encoder_reads_heldout_captions_and_is_cached(world, tmp_path):
    scenes, train, test, encoder = world
    calls = []

    def tokenize(texts):
        calls.append(len(texts))
        return layout_tokens(encoder.tokenizer, texts)

    vocab = encoder.clip.token_embedding.num_embeddings
    args = (tokenize, vocab, [r.captions for r in train], [scenes[r.imgid] for r in train], 0)
    layout = load_or_train_layout(tmp_path / "layout.pt", *args, epochs=12)
    chosen = [(c, scenes[r.imgid]) for r in test if (c := complete_caption(r.captions, scenes[r.imgid]))]
    assert len(chosen) >= 30
    acc = layout_accuracy(layout, layout_tokens(encoder.tokenizer, [c for c, _ in chosen]), [s for _, s in chosen])
    # Chance of the right shape, colour and size in a named cell is 1/6 * 1/8 * 1/3 (0.7 %).
    assert acc["layout object acc"] > 40.0, acc
    assert acc["layout empty-cell acc"] > 90.0, acc
    probs = layout.probabilities(layout_tokens(encoder.tokenizer, [c for c, _ in chosen[:4]]))
    assert probs.shape == (4, LAYOUT_CHANNELS, 3, 3)
    assert torch.allclose(probs.sum(1), torch.full((4, 3, 3), 3.0), atol=1e-4)  # three distributions per cell
    n_calls = len(calls)
    again = load_or_train_layout(tmp_path / "layout.pt", *args, epochs=12)
    assert len(calls) == n_calls  # the cache is reused, nothing retrained
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), layout.state_dict().values()))
    load_or_train_layout(tmp_path / "layout.pt", *args, epochs=1)
    assert len(calls) > n_calls  # other settings: trained anew


def test_cell_cover_spreads_each_patch_over_the_cells_it_overlaps():
    cover = cell_cover(8, 3)  # 8 patches, 3 cells: cell edges at 2.67 and 5.33 patches
    assert torch.allclose(cover.sum(1), torch.ones(8))
    assert cover[0].tolist() == [1.0, 0.0, 0.0] and cover[7].tolist() == [0.0, 0.0, 1.0]
    assert torch.allclose(cover[2], torch.tensor([2 / 3, 1 / 3, 0.0]))
