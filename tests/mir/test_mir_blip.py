"""ChatIR's BLIP retriever: ChatIR's VisDial dialogues replayed under ChatIR's protocol with a tiny random BLIP and
checked against a hand computation; a checkpoint in the original BLIP layout converted back to the same embeddings;
retrievers opened by name and cached by name; dialogue images outside the search space refused before work."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.data import LoaderOptions
from core.errors import InputError
from core.io import embeddings_made_by
from mir import convert_blip, evaluate_dialogues
from mir.blip import BlipRetriever
from mir.chatir import load_chatir
from mir.retrieval import DenseSearcher

# ChatIR's real files, read where they are (beside the project's root), never copied.
CHATIR_DATA = Path(__file__).parents[2].parent / "shared" / "data" / "chatir"
SERIAL = LoaderOptions(num_workers=0)
CHATIR_MAX_TOKENS = 200  # ChatIR's BLIP dialogue encoder: max_length=200, truncation on (written here, not imported)


def chatir_file(name: str) -> Path:
    path = CHATIR_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} is absent: ChatIR's files are read from ../shared/data/chatir/ beside the project")
    return path


def placeholder_images(root: Path, names: list[str], seed: int = 0) -> None:
    """A distinct random-noise image under each listed name (the real files are COCO photos we do not have)."""
    rng = np.random.default_rng(seed)
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(root / name, format="PNG")


def hand_hits_at_10(folder: Path, dialogs: list[list[str]], targets: list[str], space: list[str], root: Path,
                    rounds: int) -> tuple[list[float], int]:
    """Cumulative Hits@10 computed the long way: each query joined by hand, tokenised alone, cut by hand to 200
    tokens ([SEP] kept last) and padded by hand, scored by the transformers model's own ITC path
    (use_itm_head=False) in float32 against every image; a target is found at round r if fewer than 10 images score
    above it at some round <= r."""
    from transformers import BlipForImageTextRetrieval, BlipProcessor

    model = BlipForImageTextRetrieval.from_pretrained(folder).eval()
    processor = BlipProcessor.from_pretrained(folder)
    pixels = processor(images=[Image.open(root / n).convert("RGB") for n in space], return_tensors="pt")["pixel_values"]
    sep, pad = processor.tokenizer.sep_token_id, processor.tokenizer.pad_token_id
    column = torch.tensor([space.index(t) for t in targets])
    found = np.zeros(len(targets), dtype=bool)
    hits, truncated = [], 0
    with torch.no_grad():
        for r in range(rounds + 1):
            queries = []
            for dialog in dialogs:
                ids = processor.tokenizer(", ".join(dialog[: r + 1]))["input_ids"]
                if len(ids) > CHATIR_MAX_TOKENS:
                    ids, truncated = ids[: CHATIR_MAX_TOKENS - 1] + [sep], truncated + 1
                queries.append(ids)
            width = max(map(len, queries))
            ids = torch.tensor([q + [pad] * (width - len(q)) for q in queries])
            mask = torch.tensor([[1] * len(q) + [0] * (width - len(q)) for q in queries])
            sim = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_itm_head=False).itm_score.T
            above = (sim > sim.gather(1, column[:, None])).sum(1)
            found |= (above < 10).numpy()
            hits.append(100.0 * found.mean())
    return hits, truncated


def test_visdial_dialogues_replay_under_chatir_protocol_as_by_hand(tiny_blip_retrieval, tmp_path):
    visdial = chatir_file("VisDial_v1.0_queries_val.json")
    full_space = json.loads(chatir_file("Search_Space_val_50k.json").read_text())
    rows = json.loads(visdial.read_text())[:8]
    targets = [r["img"] for r in rows]
    # A 40-image search space from ChatIR's own list: the 8 targets and the first 32 other images.
    listed = set(targets)
    space = targets + [p for p in full_space if p not in listed][:32]
    (tmp_path / "space.json").write_text(json.dumps(space))
    placeholder_images(tmp_path / "coco", space)

    metrics = evaluate_dialogues.main([
        "--dialogues_json", str(visdial), "--search_space_json", str(tmp_path / "space.json"),
        "--image_root", str(tmp_path / "coco"), "--dense_checkpoint", str(tiny_blip_retrieval),
        "--output_dir", str(tmp_path / "out"), "--n_targets", "8", "--rounds", "10", "--num_workers", "0"])

    expected, truncated = hand_hits_at_10(tiny_blip_retrieval, [r["dialog"] for r in rows], targets, space,
                                          tmp_path / "coco", rounds=10)
    assert metrics["Hits@10"] == pytest.approx(expected)
    assert 0 < truncated < 8 * 11  # the 200-token cut is exercised, and not on every query
    assert metrics["truncated queries %"] == pytest.approx(100 * truncated / (8 * 11))
    assert len(set(expected)) > 1  # the hand computation moves over the rounds: not a constant both sides share


# The original BLIP names, written out from salesforce/BLIP's module tree (models/vit.py, models/med.py,
# models/blip_retrieval.py) independently of mir.blip's rename table.
def original_name(key: str) -> str:
    vit_layer = {"layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.qkv": "attn.qkv",
                 "self_attn.projection": "attn.proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    fixed = {"vision_model.embeddings.class_embedding": "visual_encoder.cls_token",
             "vision_model.embeddings.position_embedding": "visual_encoder.pos_embed",
             "vision_model.embeddings.patch_embedding.weight": "visual_encoder.patch_embed.proj.weight",
             "vision_model.embeddings.patch_embedding.bias": "visual_encoder.patch_embed.proj.bias",
             "vision_model.post_layernorm.weight": "visual_encoder.norm.weight",
             "vision_model.post_layernorm.bias": "visual_encoder.norm.bias"}
    if key in fixed:
        return fixed[key]
    if key.startswith("vision_model.encoder.layers."):
        layer, rest = key[len("vision_model.encoder.layers."):].split(".", 1)
        module, param = rest.rsplit(".", 1)
        return f"visual_encoder.blocks.{layer}.{vit_layer[module]}.{param}"
    assert key.startswith(("text_encoder.", "vision_proj.", "text_proj.", "itm_head.")), key
    return key  # BLIP's BERT and heads carry the same names in both


def original_layout_checkpoint(folder: Path, path: Path) -> dict[str, torch.Tensor]:
    """The transformers model's weights as BLIP's retrieval training saves them: the model, its momentum copies,
    the feature queues, the temperature and the position-id buffer, under a `model` key."""
    from transformers import BlipForImageTextRetrieval

    state = {original_name(k): v.clone() for k, v in BlipForImageTextRetrieval.from_pretrained(folder).state_dict().items()}
    for k in list(state):
        for part in ("visual_encoder", "text_encoder", "vision_proj", "text_proj"):
            if k.startswith(part + "."):
                state[k.replace(part, part + "_m", 1)] = state[k] + 1.0  # momentum copies differ: never to be loaded
    dim = state["text_proj.weight"].shape[0]
    state.update({"image_queue": torch.randn(dim, 8), "text_queue": torch.randn(dim, 8),
                  "idx_queue": torch.full((1, 8), -100), "ptr_queue": torch.zeros(1, dtype=torch.long),
                  "temp": torch.tensor(0.07), "text_encoder.embeddings.position_ids": torch.arange(256)[None]})
    torch.save({"model": state, "epoch": 5}, path)
    return state


def test_original_layout_checkpoint_converts_to_the_same_embeddings(tiny_blip_retrieval, tmp_path):
    ckpt = tmp_path / "chatir_weights.ckpt"
    original_layout_checkpoint(tiny_blip_retrieval, ckpt)
    out = convert_blip.main(["--checkpoint", str(ckpt), "--base", str(tiny_blip_retrieval),
                             "--output_dir", str(tmp_path / "converted"), "--image_size", "32"])

    source, converted = BlipRetriever.from_pretrained(tiny_blip_retrieval), BlipRetriever.from_pretrained(out)
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 30, 3), dtype=np.uint8)) for i in range(3)]
    texts = ["a man riding a bike, is it sunny? yes", "two cats on a couch", "x"]
    with torch.no_grad():
        pixels = torch.stack([source.preprocess(im) for im in images])
        assert torch.equal(torch.stack([converted.preprocess(im) for im in images]), pixels)
        img_a, img_b = source.encode_image(pixels), converted.encode_image(pixels)
        txt_a, txt_b = source.encode_text(source.tokenize(texts)), converted.encode_text(converted.tokenize(texts))
        # the per-side embeddings are transformers' own ITC scores (use_itm_head=False)
        tokens = source.tokenize(texts)
        itc = source.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels,
                           use_itm_head=False).itm_score
    torch.testing.assert_close(img_b, img_a, rtol=0, atol=1e-6)
    torch.testing.assert_close(txt_b, txt_a, rtol=0, atol=1e-6)
    torch.testing.assert_close(itc, img_a @ txt_a.T, rtol=0, atol=1e-5)


def test_conversion_resizes_positions_and_refuses_unknown_or_missing_keys(tiny_blip_retrieval, tmp_path):
    ckpt = tmp_path / "blip.ckpt"
    state = original_layout_checkpoint(tiny_blip_retrieval, ckpt)
    out = convert_blip.main(["--checkpoint", str(ckpt), "--base", str(tiny_blip_retrieval),
                             "--output_dir", str(tmp_path / "48px"), "--image_size", "48"])
    wide = BlipRetriever.from_pretrained(out)
    pos = wide.model.vision_model.embeddings.position_embedding
    assert pos.shape[1] == 1 + 6 * 6 and torch.equal(pos[:, 0], state["visual_encoder.pos_embed"][:, 0])  # [CLS] kept
    assert wide.preprocess(Image.new("RGB", (10, 10))).shape == (3, 48, 48)

    for broken, field in [({**state, "visual_encoder.blocks.0.adapter.weight": torch.zeros(1)},
                           "visual_encoder.blocks.0.adapter.weight"),
                          ({k: v for k, v in state.items() if k != "text_proj.bias"}, None)]:
        torch.save({"model": broken}, ckpt)
        with pytest.raises(InputError, match=field or "text_proj.bias") as err:
            convert_blip.main(["--checkpoint", str(ckpt), "--base", str(tiny_blip_retrieval),
                               "--output_dir", str(tmp_path / "bad")])
        assert str(ckpt) in str(err.value)
    assert not (tmp_path / "bad").exists()


def _save_tiny_open_clip(folder: Path) -> Path:
    """A tiny open_clip CLIP in open_clip's local-dir layout (open_clip_config.json + weights)."""
    import open_clip

    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    folder.mkdir(parents=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    torch.manual_seed(0)
    torch.save(open_clip.model.CLIP(**cfg).state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder


def test_retrievers_open_by_name_and_cache_by_name(tiny_blip_retrieval, tmp_path, monkeypatch):
    names = [f"img{i}.png" for i in range(6)]
    placeholder_images(tmp_path / "space", names)
    paths = [tmp_path / "space" / n for n in names]
    calls: list[int] = []
    encode = DenseSearcher.encode_pixels
    monkeypatch.setattr(DenseSearcher, "encode_pixels", lambda self, px: calls.append(len(px)) or encode(self, px))

    for spec in (f"blip:{tiny_blip_retrieval}", f"open_clip:local-dir:{_save_tiny_open_clip(tmp_path / 'clip')}"):
        calls.clear()
        first = DenseSearcher(spec, paths, names, tmp_path / "cache", batch_size=4, loader=SERIAL)
        assert first.model_id == spec and embeddings_made_by(first.cache_prefix)["model"] == spec
        assert sum(calls) == len(names)
        again = DenseSearcher(spec, paths, names, tmp_path / "cache", batch_size=4, loader=SERIAL)
        assert sum(calls) == len(names) and again.cache_prefix == first.cache_prefix  # reused: nothing hashed anew
        ranks, _ = again.rank_texts(["a man riding a bike"] * 2, names[:2])
        assert all(0 <= r < len(names) for r in ranks)

    # The same BLIP weights given as a folder are identified by their weights' hash, under another cache key.
    folder = DenseSearcher(tiny_blip_retrieval, paths, names, tmp_path / "cache", batch_size=4, loader=SERIAL)
    assert folder.model_id.startswith("blip-weights:") and folder.cache_prefix != first.cache_prefix
    with pytest.raises(InputError, match="not a retriever"):
        DenseSearcher(tmp_path / "space", paths, names, tmp_path / "cache", loader=SERIAL)
    with pytest.raises(InputError, match="names no pretrained weights"):  # never a randomly initialised ViT-B-32
        DenseSearcher("open_clip:ViT-B-32", paths, names, tmp_path / "cache", loader=SERIAL)


def test_dialogue_images_outside_the_search_space_are_refused_before_work(tmp_path, monkeypatch):
    visdial = chatir_file("VisDial_v1.0_queries_val.json")
    rows = json.loads(visdial.read_text())
    targets = {r["img"] for r in rows}
    others = [p for p in json.loads(chatir_file("Search_Space_val_50k.json").read_text()) if p not in targets][:5]
    (tmp_path / "space.json").write_text(json.dumps(others + [rows[1]["img"]]))  # the first target is missing
    monkeypatch.setattr(DenseSearcher, "__init__", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(InputError) as err:
        evaluate_dialogues.main(["--dialogues_json", str(visdial), "--search_space_json", str(tmp_path / "space.json"),
                                 "--image_root", str(tmp_path), "--dense_checkpoint", "blip:unused"])
    message = str(err.value)
    assert str(visdial) in message and "[0].img" in message and rows[0]["img"] in message
    assert f"{len(rows) - 1} of {len(rows)} dialogue images" in message
    with pytest.raises(InputError, match=r"\[0\]\.img"):
        load_chatir(visdial, tmp_path / "space.json", tmp_path, check_files=False, first=3)


def test_real_configs_name_chatir_retriever_and_parse():
    from core.config import parse_config
    from mir.loop import MIRConfig

    root = Path(__file__).parents[2] / "configs" / "mir"
    replay = parse_config(evaluate_dialogues.EvaluateDialoguesConfig, ["--config", str(root / "chatir_visdial.yaml")])
    genir = parse_config(MIRConfig, ["--config", str(root / "coco_genir.yaml")])
    converted = parse_config(convert_blip.ConvertBlipConfig, []).output_dir
    assert replay.dense_checkpoint == genir.dense_checkpoint == converted
