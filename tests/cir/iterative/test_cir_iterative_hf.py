"""The real-data code paths with tiny randomly initialised transformers models (no hub): Qwen2-VL multi-image chat
and LLaVA side-by-side generation, and the VLM2Vec-style Qwen2-VL embedder (last-token pooling, LoRA, save/reload)."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from cir.iterative.backbones import Qwen2VLEmbedder, last_token_pool, load_backbone
from cir.iterative.foundation import LlavaFoundation, Qwen2VLFoundation, load_foundation_model
from core.data import LoaderOptions
from core.vlm import side_by_side
from core.errors import InputError

RED, BLUE = Image.new("RGB", (64, 64), (220, 30, 30)), Image.new("RGB", (48, 64), (30, 30, 220))


def test_qwen2vl_foundation_sees_both_images_in_one_turn(tiny_qwen2vl):
    model = load_foundation_model("qwen2_vl", str(tiny_qwen2vl), max_new_tokens=5)
    assert isinstance(model, Qwen2VLFoundation)
    chat = model.processor.apply_chat_template(model._messages("make it blue"), tokenize=False, add_generation_prompt=True)
    assert chat.count("<|image_pad|>") == 2 and "make it blue" in chat
    texts = model.generate([RED, BLUE], [BLUE, RED], ["make it blue", "make it red"], seed=0)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert texts == model.generate([RED, BLUE], [BLUE, RED], ["make it blue", "make it red"], seed=0)  # greedy
    assert model.settings()["backbone"] == "qwen2_vl"


def test_llava_foundation_pastes_the_pair_side_by_side(tiny_llava):
    canvas = side_by_side(RED, BLUE)
    assert canvas.size == (64 + 48, 64)
    assert canvas.getpixel((10, 10)) == (220, 30, 30) and canvas.getpixel((100, 10)) == (30, 30, 220)
    model = load_foundation_model("llava", str(tiny_llava), max_new_tokens=4)
    assert isinstance(model, LlavaFoundation)
    chat = model.processor.apply_chat_template(model._messages("x"), tokenize=False, add_generation_prompt=True)
    assert chat.count("<image>") == 1
    assert len(model.generate([RED], [BLUE], ["make it blue"], seed=0)) == 1


def test_foundation_arguments_are_checked(tmp_path):
    with pytest.raises(InputError, match="foundation_model_backbone"):
        load_foundation_model("gpt", str(tmp_path))
    with pytest.raises(InputError, match="foundation_model_path"):
        load_foundation_model("mtst", str(tmp_path / "missing"))
    with pytest.raises(InputError, match="foundation_model_path"):
        load_foundation_model("qwen2_vl", "")


def test_last_token_pool_either_padding_side():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float).view(2, 4, 1)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert last_token_pool(hidden, right).flatten().tolist() == [1.0, 7.0]
    assert last_token_pool(hidden, left).flatten().tolist() == [3.0, 7.0]


def test_qwen2vl_embedder_last_token_and_reload(tiny_qwen2vl, tmp_path):
    from cir.iterative.data import Corpus, ImageFiles

    paths = {}
    for name, image in (("red", RED), ("blue", BLUE)):
        paths[name] = tmp_path / f"{name}.png"
        image.save(paths[name])
    model = load_backbone("qwen2_vl", str(tiny_qwen2vl))
    assert isinstance(model, Qwen2VLEmbedder)
    corpus = Corpus(paths, options=LoaderOptions(num_workers=0))
    corpus.prepare(model)
    assert isinstance(corpus.prepared, ImageFiles)  # adapters may reach the vision tower: images read per batch
    q = model.encode_queries(corpus.batch(["blue", "red"]), ["make it blue", "make it a big red star"])
    t = model.encode_targets(corpus.batch(["red", "blue"]))
    assert q.shape == t.shape == (2, 32)
    assert torch.allclose(q.norm(dim=-1), torch.ones(2), atol=1e-5)
    # a batch of one (no padding) gives the same embedding as inside a padded batch: pooling picks the real last token
    single = model.encode_queries(corpus.batch(["blue"]), ["make it blue"])
    assert torch.allclose(single[0], q[0], atol=1e-4)
    q.sum().backward()  # the LoRA adapters train (VLM2Vec's recipe), the base Qwen2-VL does not
    grads = {n: p.grad is not None for n, p in model.named_parameters()}
    assert any(g for n, g in grads.items() if "lora_" in n) and not any(g for n, g in grads.items() if "lora_" not in n)
    model.save_pretrained(tmp_path / "ckpt")
    again = load_backbone("qwen2_vl", str(tmp_path / "ckpt"))
    images = corpus.batch(["blue", "red"])
    with torch.no_grad():
        assert torch.allclose(again.encode_targets(images), model.encode_targets(images), atol=1e-5)
    with pytest.raises(InputError, match="backbone"):
        load_backbone("composed_retriever", str(tmp_path / "ckpt"))
