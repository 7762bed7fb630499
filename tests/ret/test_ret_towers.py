"""OpenAI CLIP towers are built with QuickGELU, the activation their weights were trained with; a config that would
load them into GELU towers is refused when it is built (open_clip itself only warns)."""
from __future__ import annotations

import pytest
from open_clip import factory
from open_clip.model import QuickGELU

from core.encoders import build_dual_encoder, require_matching_activation
from core.errors import InputError


@pytest.fixture
def no_download(monkeypatch):
    """Build pretrained architectures without fetching their weights (the activation is a property of the build)."""
    monkeypatch.setattr(factory, "download_pretrained", lambda *a, **k: "weights-not-downloaded.pt")
    monkeypatch.setattr(factory, "load_checkpoint", lambda *a, **k: None)


def test_openai_spec_builds_quickgelu_towers(no_download):
    clip = build_dual_encoder({"pretrained_name": "ViT-B-32-quickgelu", "pretrained": "openai"}).clip
    assert isinstance(clip.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert isinstance(clip.visual.transformer.resblocks[-1].mlp.gelu, QuickGELU)


def test_openai_weights_in_gelu_towers_are_refused_before_building(no_download, monkeypatch):
    monkeypatch.setattr(factory, "create_model_and_transforms", lambda *a, **k: pytest.fail("built before the check"))
    for name in ("ViT-B-32", "ViT-L-14"):
        with pytest.raises(InputError, match=f"pretrained_name.*QuickGELU.*use '{name}-quickgelu'"):
            build_dual_encoder({"pretrained_name": name, "pretrained": "openai"})


def test_documented_vit_l_spec_passes_the_check():
    require_matching_activation({"pretrained_name": "ViT-L-14-quickgelu", "pretrained": "openai"})
    require_matching_activation({"pretrained_name": "ViT-H-14", "pretrained": "laion2b_s32b_b79k"})  # GELU weights
    require_matching_activation({"pretrained_name": "ViT-L-14", "pretrained": None})  # random weights: any activation
