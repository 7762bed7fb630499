"""Published ReT checkpoints: a folder in aimagelab's Hugging Face layout, built here from tiny random transformers
CLIP towers and random cells under the published weight names, opens through RetrieverModel.from_pretrained and
gives the features of the model it was built from."""
from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from core.errors import InputError
from retriever.ret.model import LAYER_STRATEGIES, RetConfig, RetModel, RetrieverModel, SideInputs

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

STRATEGY = "clip_vit_l"  # 12 text layers, every other of 24 vision layers
PRIORS = {"input_gate_bias_prior": 0.5, "forget_gate_bias_prior": -0.25}


def _tokenizer_and_processor(folder):
    """CLIP's BPE vocabulary (shipped with open_clip) as a transformers CLIPTokenizer, and a 32 px processor."""
    import open_clip

    bpe = open_clip.tokenizer.SimpleTokenizer()
    specials = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {specials.get(k, k): v for k, v in bpe.encoder.items()}
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=merges, pad_token="<|endoftext|>", model_max_length=77)
    tokenizer.save_pretrained(folder)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return transformers.AutoTokenizer.from_pretrained(folder), transformers.AutoImageProcessor.from_pretrained(folder)


def _side_config(use_tanh: bool) -> dict:
    """One side's ReT config as the reference's RetConfig serialises it (towers added by the caller)."""
    return {"model_type": "ret", "layer_strategy": STRATEGY, "num_queries": 32, "hidden_size": 64,
            "intermediate_size": 256, "num_attention_heads": 1, "late_proj_output_size": 128, "dropout_p": 0.05,
            "attention_dropout": 0.05, "activation_fn": "gelu", "use_tanh": use_tanh, "use_pooler_features": False,
            "is_text_frozen": True, "is_vision_frozen": True, **PRIORS}


def _published_tower_keys(prefix: str, inner: str, module) -> dict[str, torch.Tensor]:
    """Tower weights under the names transformers 4.x wrote into the published files (`text_model.text_model.`)."""
    out = {}
    for key, value in module.state_dict().items():
        key = key if key.startswith(inner + ".") else f"{inner}.{key}"
        out[f"{prefix}.{key}"] = value.detach().clone().contiguous()
    return out


def _published_cell_keys(side: str, cells: RetModel) -> dict[str, torch.Tensor]:
    """This project's cell weights under the reference's names (written out here, independent of the loader)."""
    out = {}
    for key, value in cells.state_dict().items():
        if key == "cell.initial_state":
            key = "ret_cell.query_hidden_states"
        elif key.startswith("cell."):
            key = "ret_cell." + key[len("cell."):]
        out[f"{side}_model.{key}"] = value.detach().clone().contiguous()
    h = cells.cfg.hidden_size
    out[f"{side}_model.ret_cell.query_state_ids"] = cells.cell.slot_ids.clone()
    out[f"{side}_model.ret_cell.sa_ln.weight"] = torch.randn(h)  # built by the reference, never used
    out[f"{side}_model.ret_cell.sa_ln.bias"] = torch.randn(h)
    for name, value in PRIORS.items():
        out[f"{side}_model.ret_cell.{name}"] = torch.tensor(value)
    return out


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """(checkpoint folder, the source model's parts) for a tiny random ReT in the published layout."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("published")
    clip_files = root / "clip-tiny"
    tokenizer, processor = _tokenizer_and_processor(clip_files)
    text_cfg = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=12,
                                           num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu")
    vision_cfg = transformers.CLIPVisionConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=24,
                                               num_attention_heads=2, image_size=32, patch_size=8,
                                               hidden_act="quick_gelu")
    text_model, vision_model = transformers.CLIPTextModel(text_cfg).eval(), transformers.CLIPVisionModel(vision_cfg).eval()
    layers = LAYER_STRATEGIES[STRATEGY]
    widths = SimpleNamespace(text_width=32, vision_width=48, n_text_layers=12, n_vision_layers=24)
    cells = {}
    for side, tanh in (("query", False), ("passage", True)):
        cfg = RetConfig(text_layers=layers["text"], vision_layers=layers["vision"], hidden_size=64, head_dim=64,
                        use_tanh=tanh, **PRIORS)
        cells[side] = RetModel(cfg, widths).eval()
        with torch.no_grad():  # biases and norms away from their init, so a mis-mapped weight shows
            for p in cells[side].parameters():
                p.add_(0.05 * torch.randn_like(p))

    folder = root / "ReT-tiny"
    folder.mkdir()
    tensors = {**_published_tower_keys("query_model.text_model", "text_model", text_model),
               **_published_tower_keys("query_model.vision_model", "vision_model", vision_model),
               **_published_cell_keys("query", cells["query"]), **_published_cell_keys("passage", cells["passage"])}
    safetensors_torch.save_file(tensors, str(folder / "model.safetensors"))
    tower_configs = {"text_config": {**text_cfg.to_dict(), "_name_or_path": str(clip_files)},
                     "vision_config": {**vision_cfg.to_dict(), "_name_or_path": str(clip_files)}}
    config = {"model_type": "retriever", "architectures": ["RetrieverModel"],
              "query_config": {**_side_config(False), **tower_configs},
              "passage_config": {**_side_config(True), **tower_configs},
              "fg_loss": True, "simmetric_loss": True, "share_query_passage_models": False,
              "share_text_models": True, "share_vision_models": True}
    (folder / "config.json").write_text(json.dumps(config))

    rng = np.random.default_rng(0)
    images = []
    for i, size in enumerate([(40, 48), (64, 32)]):
        images.append(root / f"img{i}.png")
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(images[-1])
    source = SimpleNamespace(text_model=text_model, vision_model=vision_model, tokenizer=tokenizer,
                             processor=processor, cells=cells, layers=layers, images=[str(p) for p in images])
    return folder, source


@torch.no_grad()
def _source_features(source, side: str, docs) -> torch.Tensor:
    """The source model's features, computed directly: the reference's tokenisation (padding, truncation), black
    image for a missing one, `hidden_states[1:]` of the chosen layers, then the cell."""
    enc = source.tokenizer([t for t, _ in docs], padding=True, truncation=True, return_tensors="pt")
    images = [Image.open(p).convert("RGB") if p else Image.new("RGB", (336, 336)) for _, p in docs]
    pixels = source.processor(images=images, return_tensors="pt")["pixel_values"]
    text = source.text_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                             output_hidden_states=True).hidden_states[1:]
    vision = source.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[1:]
    inputs = SideInputs(torch.stack([text[i] for i in source.layers["text"]], 1), enc["attention_mask"].bool(),
                        torch.stack([vision[i] for i in source.layers["vision"]], 1),
                        torch.tensor([1.0 if t else 0.0 for t, _ in docs]),
                        torch.tensor([1.0 if p else 0.0 for _, p in docs]))
    return F.normalize(source.cells[side](inputs), dim=-1)


def test_published_checkpoint_gives_the_source_models_features(published):
    folder, source = published
    retriever = RetrieverModel.from_pretrained(folder, device_map="cpu")  # the reference README's call
    query_docs = [["Retrieve documents that answer the question: what is the content of the image?", source.images[0]],
                  ["a much shorter question", source.images[1]]]
    passage_docs = [["A passage with no image, long enough to need padding on the other rows " * 3, ""],
                    ["", source.images[1]]]
    for side, docs, model in (("query", query_docs, retriever.get_query_model()),
                              ("passage", passage_docs, retriever.get_passage_model())):
        model.init_tokenizer_and_image_processor()
        feats = model.get_ret_features(docs)
        assert feats.shape == (2, 32, 128)
        torch.testing.assert_close(feats, _source_features(source, side, docs), atol=2e-5, rtol=1e-4)
    assert retriever.config.query.input_gate_bias_prior == PRIORS["input_gate_bias_prior"]
    assert retriever.config.passage.use_tanh and not retriever.config.query.use_tanh
    assert retriever.towers.encoder.text_model.config.hidden_act == "quick_gelu"
    assert retriever.config.use_instruction  # ReT reads queries as "{instruction} {question}"


def test_published_towers_are_shared_and_reload_from_a_saved_retriever(published, tmp_path):
    folder, source = published
    retriever = RetrieverModel.from_pretrained(folder)
    assert retriever.get_query_model().towers is retriever.get_passage_model().towers
    saved = retriever.save_pretrained(tmp_path / "saved")
    assert not (saved / "encoder" / "model.pt").exists()  # the towers are named, not copied
    again = RetrieverModel.from_pretrained(saved)
    docs = [["a question", source.images[0]]]
    for a, b in ((retriever.get_query_model(), again.get_query_model()),
                 (retriever.get_passage_model(), again.get_passage_model())):
        a.init_tokenizer_and_image_processor()
        b.init_tokenizer_and_image_processor()
        torch.testing.assert_close(a.get_ret_features(docs), b.get_ret_features(docs))


def test_unknown_keys_in_a_published_checkpoint_are_one_clear_error(published, tmp_path):
    folder, _ = published
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    tensors = safetensors_torch.load_file(str(broken / "model.safetensors"))
    tensors["query_model.ret_cell.extra_gate.weight"] = torch.zeros(2)
    tensors["passage_model.pooler.weight"] = torch.zeros(2)
    safetensors_torch.save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(InputError, match=r"model\.safetensors.*2 keys.*passage_model\.pooler\.weight.*"
                                         r"query_model\.ret_cell\.extra_gate\.weight"):
        RetrieverModel.from_pretrained(broken)


def test_published_config_with_an_unknown_layer_strategy_is_one_clear_error(published, tmp_path):
    folder, _ = published
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    config = json.loads((broken / "config.json").read_text())
    config["passage_config"]["layer_strategy"] = "clip_vit_xl"
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=r"config\.json passage_config: layer_strategy: unknown 'clip_vit_xl'"):
        RetrieverModel.from_pretrained(broken)
