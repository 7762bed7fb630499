"""The real backbone (BLIP-2's retrieval checkpoint) on a tiny random Blip2ForImageTextRetrieval saved to disk."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import cir.retriever as retriever_module
import core.modtext as modtext
from core.io import atomic_write_json, read_json
from cir import train
from cir.data import CIRTriplet
from cir.features import token_bank, token_source
from cir.retriever import ComposedRetriever, load_pretrained_retriever
from core.config import parse_config
from core.data import LoaderOptions
from core.errors import InputError
from tests.tiny_models import save_tiny_blip2_retrieval

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "cir"
TEXTS = ["make the circle red", "remove the star", "add a blue square", "make it smaller"]
REVERSE = ["make the circle blue", "add the star", "remove the blue square", "make it larger"]
COLOURS = ((255, 0, 0), (0, 0, 255), (0, 200, 0), (250, 250, 0), (120, 0, 120))
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def blip2(tmp_path_factory) -> Path:
    return save_tiny_blip2_retrieval(tmp_path_factory.mktemp("blip2") / "itm", TEXTS + REVERSE)


def _retriever(name: Path) -> ComposedRetriever:
    spec = {**retriever_module.SHAPES_RETRIEVER, "ptha_variant": "official"}
    return load_pretrained_retriever(str(name), spec, CPU)


def _images(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, colour in enumerate(COLOURS):
        img = Image.new("RGB", (40, 40), colour)
        img.paste((255 - colour[0], 90, 30), (5 * i, 5, 5 * i + 12, 20))
        out[f"im{i}"] = folder / f"im{i}.png"
        img.save(out[f"im{i}"])
    return out


def _scores(model: ComposedRetriever, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        queries = model.encode_queries(pixels[:len(TEXTS)], TEXTS)
        targets = model.encode_target_tokens_from_tokens(model.image_tokens(pixels))
        return model.similarity(queries, targets)


def test_the_retriever_starts_from_the_checkpoints_parts(blip2):
    """Hop one computes what BLIP-2's own Q-Former computes (image side through vision_projection, text side
    through the text embeddings), and the heads and query tokens are the checkpoint's."""
    from transformers import Blip2ForImageTextRetrieval

    hf = Blip2ForImageTextRetrieval.from_pretrained(blip2).eval()
    r = _retriever(blip2).eval()
    assert r.spec["kind"] == "blip2" and r.spec["num_query_tokens"] == 4 and r.spec["embed_dim"] == 16
    assert torch.equal(r.query_tokens1, hf.query_tokens)
    assert torch.equal(r.query_proj.weight, hf.text_projection.weight)
    assert torch.equal(r.target_proj.bias, hf.vision_projection.bias)
    assert not any(p.requires_grad for p in r.image_encoder.parameters())
    px = torch.stack([r.preprocess(Image.new("RGB", (40, 40), c)) for c in COLOURS[:2]])
    with torch.no_grad():
        image = hf.vision_model(pixel_values=px).last_hidden_state
        ours = r.encode_target_tokens_from_tokens(r.image_tokens(px))
        theirs = hf.qformer(query_embeds=hf.query_tokens.expand(2, -1, -1), encoder_hidden_states=image)
        assert torch.allclose(ours, F.normalize(hf.vision_projection(theirs.last_hidden_state), dim=-1), atol=1e-5)
        ids, mask = r.tokenize(TEXTS[:2])
        assert ids[0, 0] == r.tokenizer.cls_token_id and ids[0, -1] == r.tokenizer.sep_token_id  # BERT inputs
        text = hf.qformer(query_embeds=hf.embeddings(input_ids=ids), query_length=0, attention_mask=mask)
        assert torch.allclose(r.hop1(input_ids=ids, attention_mask=mask).last_hidden_state,
                              text.last_hidden_state, atol=1e-5)


def test_trains_saves_and_reloads_reading_only_the_vision_tensors(blip2, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    r = _retriever(blip2)
    images = _images(tmp_path / "images")
    bank = token_bank(r.image_encoder, images, None, device=CPU)
    batch = [CIRTriplet(i, f"im{i}", TEXTS[i], f"im{i + 1}") for i in range(len(TEXTS))]
    reverse = {i: REVERSE[i] for i in range(len(TEXTS))}
    cfg = train.TrainConfig(objective="ptha")
    tower = {k: v.clone() for k, v in r.image_encoder.state_dict().items()}
    qformer = {k: v.clone() for k, v in r.hop1.state_dict().items()}
    opt = torch.optim.AdamW([p for p in r.parameters() if p.requires_grad], lr=1e-3)
    r.train()
    for _ in range(2):
        loss, parts = train.step_loss(r, batch, bank, reverse, cfg)
        assert torch.isfinite(loss) and set(parts) >= {"q2t", "t2t", "p2p"}
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.equal(v, tower[k]) for k, v in r.image_encoder.state_dict().items())
    assert any(not torch.equal(v, qformer[k]) for k, v in r.hop1.state_dict().items())
    r.eval()
    pixels = r.image_encoder.pixels([Image.open(p) for p in images.values()])
    before = _scores(r, pixels)

    folder = r.save_pretrained(tmp_path / "retriever")
    saved = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    saved = saved.get("model", saved)
    assert not any(k.startswith("image_encoder.") for k in saved)  # the frozen ViT is named, not copied
    assert {"hop1.encoder.layer.0.crossattention.attention.query.weight", "query_proj.weight",
            "prompt_tokens"} <= set(saved)
    assert not list((folder / "image_encoder").glob("*.safetensors"))

    # the pretrained checkpoint keeps its ViT only: a reload that asked for anything else would fail or differ
    weights = blip2.parent / "vision_only"
    weights.mkdir()
    for f in blip2.iterdir():
        if f.name != "model.safetensors":
            (weights / f.name).write_bytes(f.read_bytes())
    full = load_file(blip2 / "model.safetensors")
    save_file({k: v for k, v in full.items() if k.startswith("vision_model.")}, weights / "model.safetensors",
              metadata={"format": "pt"})
    info = read_json(folder / "image_encoder" / "image_encoder.json")
    assert info["name"] == str(blip2) and info["vision_class"] == "Blip2VisionModel"
    atomic_write_json(folder / "image_encoder" / "image_encoder.json", {**info, "name": str(weights)})
    asked = []
    real_part = modtext.pretrained_part

    def spy(name, cls, prefix, *args, **kwargs):
        asked.append((cls.__name__, prefix, kwargs.get("key_mapping")))
        return real_part(name, cls, prefix, *args, **kwargs)

    monkeypatch.setattr(modtext, "pretrained_part", spy)
    monkeypatch.setattr(retriever_module, "checkpoint_tensor", lambda *a: pytest.fail(f"reload read {a}"))
    again = ComposedRetriever.from_pretrained(folder, CPU)
    assert asked == [("Blip2VisionModel", "vision_model.", None)]
    assert torch.allclose(_scores(again, pixels), before, atol=1e-6)


def test_the_frozen_vit_tokens_stream_or_cache(blip2, tmp_path):
    """`image_tokens: live` and `cache` give the BLIP-2 tower's tokens (the cache in float16, reused when reopened)."""
    r = _retriever(blip2)
    images = _images(tmp_path / "images")
    names = list(images)[:3]
    options = LoaderOptions(num_workers=0)
    live = token_source("live", r.image_encoder, images, None, options).get(names, CPU)
    cached = token_source("cache", r.image_encoder, images, tmp_path / "cache" / "train", options).get(names, CPU)
    assert live.shape == (3, 17, 32) and torch.allclose(cached, live, atol=2e-2, rtol=1e-2)
    shard = next((tmp_path / "cache").glob("train.*.npy"))
    made = shard.stat().st_mtime_ns
    again = token_source("cache", r.image_encoder, images, tmp_path / "cache" / "train", options).get(names, CPU)
    assert torch.equal(again, cached) and shard.stat().st_mtime_ns == made


def test_a_blip2_checkpoint_without_the_retrieval_heads_is_refused(tmp_path):
    from transformers import Blip2Config

    config = Blip2Config(qformer_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2})
    config.architectures = ["Blip2ForConditionalGeneration"]
    config.save_pretrained(tmp_path / "opt")
    with pytest.raises(InputError, match="Blip2ForImageTextRetrieval"):
        _retriever(tmp_path / "opt")


@pytest.mark.parametrize("name", ["cirr_train.yaml", "fashioniq_train.yaml"])
def test_the_real_configs_start_from_blip2(name):
    cfg = parse_config(train.TrainConfig, ["--config", str(CONFIGS / name)])
    assert cfg.pretrained == "Salesforce/blip2-itm-vit-g" and cfg.ptha_variant == "official"
    assert cfg.model["num_query_tokens"] == 32 and cfg.model["embed_dim"] == 256  # blip2-itm-vit-g's
