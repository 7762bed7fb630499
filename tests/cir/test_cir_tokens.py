"""The image-token cache and the frozen pretrained towers at scale: the cache is a float16 memory map written as made
and rebuilt when the encoder or the image list changes; a corrupt image is an InputError naming it; a retriever or a
generator on a (tiny random) pretrained InstructBLIP tower saves no tower weights and reloads it alone, equal."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cir.data import load_cirr
from cir.features import LiveTokens, token_bank
from core.data import LoaderOptions
from core.errors import InputError
from tests.tiny_models import tiny_instructblip
from core.modtext import build_word_tokenizer, dense_image_tokens

WORDS = ["make the circle red", "remove the star", "How to change from one image to the other image?"]
SPEC = {"qformer": {"num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
                    "cross_attention_frequency": 1, "max_position_embeddings": 64},
        "num_query_tokens": 4, "embed_dim": 16, "max_text_length": 16}
NO_WORKERS = LoaderOptions(num_workers=0)


def save_tiny_instructblip(folder: Path, seed: int = 0) -> Path:
    """The tiny InstructBLIP and its processor saved like a hub checkpoint (the folder is its name)."""
    from transformers import BlipImageProcessor, InstructBlipProcessor

    tok = build_word_tokenizer(WORDS)
    tiny_instructblip(len(tok), seed).save_pretrained(folder)
    InstructBlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tok, tok,
                          num_query_tokens=4).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def small_split(shapes_world):
    train = load_cirr(shapes_world / "cirr", "train")
    return dict(list(train.images.items())[:24])


def test_token_cache_is_a_float16_memmap_rebuilt_when_its_inputs_change(dense_checkpoint, small_split, tmp_path):
    encoder = dense_image_tokens(dense_checkpoint)
    prefix = tmp_path / "features" / "train"
    bank = token_bank(encoder, small_split, prefix, batch_size=10, options=NO_WORKERS)
    made = json.loads((tmp_path / "features" / "train.json").read_text())
    (shard,) = [tmp_path / "features" / name for name in made["shards"]]
    assert isinstance(bank.shards[0], np.memmap) and bank.shards[0].dtype == np.float16
    assert np.load(shard, mmap_mode="r").shape[0] == len(small_split) and not list(shard.parent.glob(".*.tmp"))
    names = list(small_split)[3:9]
    live = LiveTokens(encoder, small_split, NO_WORKERS, torch.device("cpu")).get(names, "cpu")
    got = bank.get(names, "cpu")
    assert got.dtype == torch.float32 and torch.allclose(got, live, atol=1e-2, rtol=1e-3)  # float16 rounding only
    assert not torch.equal(got, live)

    again = token_bank(encoder, small_split, prefix, options=NO_WORKERS)  # same encoder, same images: reused
    assert json.loads((tmp_path / "features" / "train.json").read_text()) == made
    assert np.array_equal(again.rows(np.arange(len(small_split))), bank.rows(np.arange(len(small_split))))

    fewer = dict(list(small_split.items())[:20])  # another image list: rebuilt, the old shard removed
    token_bank(encoder, fewer, prefix, options=NO_WORKERS)
    remade = json.loads((tmp_path / "features" / "train.json").read_text())
    assert remade["made_by"]["images"] != made["made_by"]["images"] and remade["shards"] != made["shards"]
    assert not shard.exists()

    with torch.no_grad():  # another encoder: rebuilt, and its tokens are the new encoder's
        encoder.model.clip.visual.conv1.weight.mul_(1.5)
    changed = token_bank(encoder, fewer, prefix, options=NO_WORKERS)
    assert json.loads((tmp_path / "features" / "train.json").read_text())["made_by"]["encoder"] != \
        remade["made_by"]["encoder"]
    fresh = LiveTokens(encoder, fewer, NO_WORKERS, torch.device("cpu")).get(names, "cpu")
    assert torch.allclose(changed.get(names, "cpu"), fresh, atol=1e-2, rtol=1e-3)


def test_a_corrupt_image_is_named(dense_checkpoint, small_split, tmp_path):
    encoder = dense_image_tokens(dense_checkpoint)
    images = dict(small_split)
    bad = tmp_path / "broken.png"
    bad.write_bytes(Path(next(iter(images.values()))).read_bytes()[:100])  # a truncated PNG
    images["broken"] = bad
    with pytest.raises(InputError, match="broken.png"):
        token_bank(encoder, images, tmp_path / "tokens", batch_size=10, options=LoaderOptions(num_workers=1))
    assert not list(tmp_path.glob("tokens*")) and not list(tmp_path.glob(".tokens*"))  # nothing half-written


def _no_full_instructblip(monkeypatch):
    """Reloading must read the tower (and the LM) alone, never build the whole InstructBLIP."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("the whole InstructBLIP was loaded")

    monkeypatch.setattr(transformers.InstructBlipForConditionalGeneration, "from_pretrained", refuse)


def test_retriever_on_a_pretrained_tower_saves_no_tower_weights(tmp_path, monkeypatch):
    from cir.retriever import ComposedRetriever, load_pretrained_retriever

    name = str(save_tiny_instructblip(tmp_path / "instructblip"))
    cpu = torch.device("cpu")
    retriever = load_pretrained_retriever(name, SPEC, cpu).eval()
    assert retriever.image_encoder.named
    retriever.save_pretrained(tmp_path / "r")
    state = torch.load(tmp_path / "r" / "model.pt", weights_only=True)
    assert state and not [k for k in state if k.startswith("image_encoder.")]
    assert {p.name for p in (tmp_path / "r" / "image_encoder").iterdir()} == {"image_encoder.json"}
    assert {n for n, _ in retriever.named_parameters() if not n.startswith("image_encoder.")} <= set(state)

    _no_full_instructblip(monkeypatch)
    again = ComposedRetriever.from_pretrained(tmp_path / "r", device=cpu)
    ims = [Image.new("RGB", (40, 40), c) for c in ((255, 0, 0), (0, 0, 255))]
    px = torch.stack([retriever.preprocess(i) for i in ims])
    texts = ["make the circle red", "remove the star"]
    with torch.no_grad():
        assert torch.equal(again.image_tokens(px), retriever.image_tokens(px))
        assert torch.allclose(again.encode_queries(px, texts), retriever.encode_queries(px, texts), atol=1e-6)
        assert torch.allclose(again.encode_targets(px), retriever.encode_targets(px), atol=1e-6)

    save_tiny_instructblip(tmp_path / "instructblip", seed=1)  # the named checkpoint changed under the folder
    with pytest.raises(InputError, match="fingerprint"):
        ComposedRetriever.from_pretrained(tmp_path / "r", device=cpu)


def test_generator_on_a_pretrained_instructblip_names_its_frozen_parts(tmp_path, monkeypatch):
    from core.modtext import load_modification_generator, load_pretrained_instructblip

    name = str(save_tiny_instructblip(tmp_path / "instructblip"))
    gen = load_pretrained_instructblip(name, torch.device("cpu")).eval()
    ims = [Image.new("RGB", (40, 40), c) for c in ((255, 0, 0), (0, 0, 255))]
    texts = gen.generate(ims, ims[::-1], max_new_tokens=5)
    gen.save_pretrained(tmp_path / "g")
    saved = {p.relative_to(tmp_path / "g").as_posix() for p in (tmp_path / "g").rglob("*") if p.is_file()}
    assert not [p for p in saved if p.startswith("language_model/")]
    assert [p for p in saved if p.startswith("image_encoder/")] == ["image_encoder/image_encoder.json"]

    _no_full_instructblip(monkeypatch)
    again = load_modification_generator(tmp_path / "g", device=torch.device("cpu"))
    assert again.generate(ims, ims[::-1], max_new_tokens=5) == texts
    for mine, theirs in ((gen.language_model, again.language_model), (gen.image_encoder, again.image_encoder)):
        for (k, a), (_, b) in zip(mine.state_dict().items(), theirs.state_dict().items()):
            assert torch.equal(a, b), k
