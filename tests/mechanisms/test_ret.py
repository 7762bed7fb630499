"""ReT's recurrence over the towers' layers, asserted so that it fails when the recurrence is cut: the
late-interaction tokens depend on the earlier layers only through the state the cell carries from layer to layer,
so the full model differs from the single-layer variant with the same weights, and changing layer 0 alone changes
the output. Untrained tiny towers over the tiny world's M2KR items: the dependence is structural."""
from __future__ import annotations

import json

import pytest
import torch

from core.encoders import build_dual_encoder
from retriever.ret.model import FrozenTowers, RetConfig, RetModel, SideInputs, layer_strategy
from tests.conftest import TINY_ENCODER

CELL = dict(hidden_size=32, head_dim=16, dropout=0.0, attention_dropout=0.0)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    towers = FrozenTowers(build_dual_encoder(TINY_ENCODER))
    every = layer_strategy("all", towers.n_text_layers, towers.n_vision_layers)
    last = layer_strategy("last", towers.n_text_layers, towers.n_vision_layers)
    full = RetModel(RetConfig(text_layers=every["text"], vision_layers=every["vision"], **CELL), towers).eval()
    single = RetModel(RetConfig(text_layers=last["text"], vision_layers=last["vision"], **CELL), towers).eval()
    # the single-layer variant with the full model's weights for the last layer: the cell applied once, from h_0
    single.cell.load_state_dict(full.cell.state_dict())
    single.late_proj.load_state_dict(full.late_proj.state_dict())
    single.text_adapter[0].load_state_dict(full.text_adapter[-1].state_dict())
    single.vision_adapter[0].load_state_dict(full.vision_adapter[-1].state_dict())
    full.init_tokenizer_and_image_processor()
    return full, single


def _items(world):
    rows = [json.loads(line) for line in (world / "m2kr/shapes_test.jsonl").read_text().splitlines()[:4]]
    return [[r["question"], str(world / r["img_path"])] for r in rows]


def _last_layer_only(inputs: SideInputs) -> SideInputs:
    return SideInputs(inputs.text[:, -1:], inputs.text_attention, inputs.vision[:, -1:], inputs.text_mask,
                      inputs.image_mask)


@torch.no_grad()
def test_the_output_depends_on_earlier_layers_through_the_recurrence(models, shapes_world):
    full, single = models
    assert full.cfg.n_steps >= 2 and single.cfg.n_steps == 1
    inputs = full.prepare(_items(shapes_world))
    out = full(inputs)
    assert not torch.allclose(out, single(_last_layer_only(inputs)), atol=1e-4), \
        "the full model equals the single-layer variant: the earlier layers were not carried"
    changed = SideInputs(inputs.text.clone(), inputs.text_attention, inputs.vision.clone(), inputs.text_mask,
                         inputs.image_mask)
    changed.text[:, 0] = torch.randn_like(changed.text[:, 0])
    changed.vision[:, 0] = torch.randn_like(changed.vision[:, 0])
    assert torch.equal(changed.text[:, -1], inputs.text[:, -1])  # the last layer is untouched
    assert (full(changed) - out).abs().max() > 1e-3, "changing layer 0 alone did not change the output"
