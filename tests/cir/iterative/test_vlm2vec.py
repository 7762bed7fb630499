"""The qwen2_vl backbone as VLM2Vec releases it: a PEFT LoRA adapter over a Qwen2-VL base (no hub: a tiny Qwen2-VL
and an adapter made on it with peft). It loads base + adapter, trains only the adapter (base weights unchanged),
checkpoints and resumes the adapter alone, and saves a folder that reloads to the same embeddings."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from cir.iterative import trainer
from cir.iterative.backbones import Qwen2VLEmbedder, check_vlm2vec_options, load_backbone
from cir.iterative.config import VLM2VecOptions
from cir.iterative.data import Corpus, Triplet
from core.checkpoint import LAST
from core.data import LoaderOptions
from core.errors import InputError

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "grey": (128, 128, 128)}
TRIPLETS = [Triplet("0", "red", "make it blue", "blue"), Triplet("1", "red", "make it green", "green"),
            Triplet("2", "grey", "make it red", "red"), Triplet("3", "grey", "make it blue", "blue")]


@pytest.fixture(scope="module")
def adapter(tiny_qwen2vl, tmp_path_factory):
    """A LoRA adapter saved by peft over the tiny base, with non-zero B so that it changes the embeddings."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2VLForConditionalGeneration

    torch.manual_seed(0)
    base = Qwen2VLForConditionalGeneration.from_pretrained(tiny_qwen2vl)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False))
    folder = tmp_path_factory.mktemp("adapter") / "vlm2vec-tiny"
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = {}
    for name, colour in COLOURS.items():
        paths[name] = folder / f"{name}.png"
        Image.new("RGB", (56, 56), colour).save(paths[name])
    return Corpus(paths, options=LoaderOptions(num_workers=0))


def _split(model):
    """(adapter parameters, base parameters) by name, copied."""
    lora, base = {}, {}
    for name, p in model.named_parameters():
        (lora if "lora_" in name else base)[name] = p.detach().clone()
    return lora, base


def _embed(model, corpus):
    corpus.prepare(model)
    model.eval()
    with torch.no_grad():
        return (model.encode_queries(corpus.batch(["red", "grey"]), ["make it blue", "make it red"]),
                model.encode_targets(corpus.batch(list(COLOURS))))


def _image_tokens(model, side: int) -> int:
    """How many image tokens the model's processor makes of one side x side picture."""
    inputs = model.processor(text=[model.TARGET.format(image=model.image_placeholder)],
                             images=[Image.new("RGB", (side, side), (200, 0, 0))], return_tensors="pt")
    return int(inputs["input_ids"].eq(model.processor.image_token_id).sum())


def _train(model, corpus, state_dir):
    corpus.prepare(model)
    return trainer.train_round(
        model, corpus, TRIPLETS, epochs=1, batch_size=2, lr=5e-2, weight_decay=0.0, warmup_steps=0,
        temperature=model.temperature, negatives_per_query=0, seed=0, round_index=1,
        validate=lambda m: {"Avg": 0.0}, state_dir=state_dir, manifest={"round": 1})


def test_vlm2vec_adapter_loads_trains_alone_and_reloads(tiny_qwen2vl, adapter, corpus, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    options = VLM2VecOptions(model_adapter=str(adapter), max_pixels=0, gradient_checkpointing=True)
    model = load_backbone("qwen2_vl", str(tiny_qwen2vl), vlm_options=options)
    assert isinstance(model, Qwen2VLEmbedder) and isinstance(model.vlm, PeftModel)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.vlm.modules())
    lora0, base0 = _split(model)
    saved = load_file(adapter / "adapter_model.safetensors")
    # the saved adapter's weights, not a fresh adapter (peft names them without the adapter's name "default")
    assert len(lora0) == len(saved) > 0
    assert all(torch.equal(p, saved[n.removeprefix("vlm.").replace(".default", "")]) for n, p in lora0.items())
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    bare = load_backbone("qwen2_vl", str(tiny_qwen2vl), vlm_options=VLM2VecOptions(max_pixels=0))  # fresh: = base
    assert not torch.allclose(_embed(model, corpus)[1], _embed(bare, corpus)[1], atol=1e-4)

    result = _train(model, corpus, tmp_path / "state")
    assert result["steps"] == 2
    lora1, base1 = _split(model)
    assert all(torch.equal(base0[n], base1[n]) for n in base0)  # the base never moves
    assert sum(not torch.equal(lora0[n], lora1[n]) for n in lora0) >= len(lora0) // 2
    # The in-round checkpoint holds the adapter alone, and a resumed round restores it exactly.
    stored = torch.load(tmp_path / "state" / LAST / "model.pt", weights_only=True)
    assert set(stored) == set(lora1)
    trained = _embed(model, corpus)
    resumed = load_backbone("qwen2_vl", str(tiny_qwen2vl), vlm_options=options)
    assert _train(resumed, corpus, tmp_path / "state")["resumed_from_step"] == 2
    assert all(torch.equal(lora1[n], p) for n, p in _split(resumed)[0].items())

    model.save_pretrained(tmp_path / "ckpt")
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors", "iterative_backbone.json"]
    again = load_backbone("qwen2_vl", str(tmp_path / "ckpt"))  # base named by the spec + the saved adapter
    assert again.base_model == str(tiny_qwen2vl)
    for ours, theirs in zip(trained, _embed(again, corpus)):
        assert torch.allclose(ours, theirs, atol=1e-5)


def test_vlm2vec_fresh_adapter_shape_and_pixel_cap(tiny_qwen2vl, corpus, tmp_path):
    options = VLM2VecOptions(lora_r=2, lora_alpha=4, lora_target_modules=["q_proj", "v_proj"], lora_dora=False,
                             max_pixels=112 * 112)
    model = load_backbone("qwen2_vl", str(tiny_qwen2vl), vlm_options=options)
    lora = model.vlm.peft_config["default"]
    assert (lora.r, lora.lora_alpha, set(lora.target_modules), lora.use_dora) == (2, 4, {"q_proj", "v_proj"}, False)
    # The cap reaches the processor: a 112 px image is 16 image tokens under it, 4 under the tiny model's own 56 px.
    native = load_backbone("qwen2_vl", str(tiny_qwen2vl), vlm_options=VLM2VecOptions(max_pixels=0))
    assert (_image_tokens(model, 112), _image_tokens(native, 112)) == (16, 4)
    model.save_pretrained(tmp_path / "ckpt")
    assert load_backbone("qwen2_vl", str(tmp_path / "ckpt")).max_pixels == 112 * 112  # the trained cap is kept


def test_vlm2vec_bad_options(tiny_qwen2vl, adapter, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    with pytest.raises(InputError, match="adapter_model.safetensors.*model_adapter"):
        check_vlm2vec_options(VLM2VecOptions(model_adapter=str(broken)))
    with pytest.raises(InputError, match="model_adapter.*not found"):
        check_vlm2vec_options(VLM2VecOptions(model_adapter=str(tmp_path / "missing")))
    with pytest.raises(InputError, match="lora_r"):
        check_vlm2vec_options(VLM2VecOptions(lora_r=0))


def test_the_cirr_config_names_base_adapter_and_recipe():
    from pathlib import Path

    from cir.iterative.config import VLM2VEC_TARGET_MODULES, TrainIterativeConfig
    from core.config import parse_config

    cfg = parse_config(TrainIterativeConfig, ["--config", str(Path(__file__).parents[3] / "configs/cir_iterative/cirr.yaml")])
    assert (cfg.model_backbone, cfg.model_path, cfg.model_adapter) == (
        "qwen2_vl", "Qwen/Qwen2-VL-2B-Instruct", "TIGER-Lab/VLM2Vec-Qwen2VL-2B")
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_dora) == (16, 64, 0.1, True)
    assert cfg.lora_target_modules == list(VLM2VEC_TARGET_MODULES)
    assert cfg.gradient_checkpointing and cfg.max_pixels == 28 * 28 * 1280
    check_vlm2vec_options(cfg)


def test_the_loop_runs_on_the_vlm2vec_backbone_and_keeps_adapters_only(tiny_qwen2vl, adapter, tmp_path):
    """train_iterative + eval_iterative with qwen2_vl over base + adapter on a small world: every round's folder is
    an adapter, round 0's hash covers the adapter, and a rerun with --auto_resume reuses every round."""
    import json

    from safetensors.torch import load_file

    from cir.iterative import eval_iterative, manifest, train_iterative
    from core.shapes.make import WorldConfig, make_world

    world = make_world(WorldConfig(seed=0, out_dir=str(tmp_path / "shapes"), n_train=40, n_val=12, n_test=12,
                                   image_size=56))
    exp = tmp_path / "exp"
    args = ["--data_dir", str(world / "cirr"), "--model_backbone", "qwen2_vl", "--model_path", str(tiny_qwen2vl),
            "--model_adapter", str(adapter), "--max_pixels", "0", "--foundation_model_backbone", "qwen2_vl",
            "--foundation_model_path", str(tiny_qwen2vl), "--experiment_dir", str(exp), "--num_iterations", "2",
            "--epochs_per_round", "1", "--batch_size", "8", "--hard_negative_k", "2", "--max_augment_per_round", "4",
            "--generation_batch_size", "4", "--max_new_tokens", "4", "--fast_mode", "true",
            "--fast_mode_triplets", "16", "--learning_rate", "1e-2", "--num_workers", "0", "--eval_batch_size", "16",
            "--wandb", "false"]
    train_iterative.main(args)
    for n in (1, 2):
        assert sorted(p.name for p in (exp / f"checkpoint_iter_{n}").iterdir()) == [
            "README.md", "adapter_config.json", "adapter_model.safetensors", "iteration.json", "iterative_backbone.json"]
    first = json.loads((exp / "checkpoint_iter_1" / train_iterative.ROUND_FILE).read_text())["manifest"]
    assert first["init"] == f"{manifest.hash_folder(tiny_qwen2vl)}+{manifest.hash_folder(adapter)}"
    start, trained = load_file(adapter / "adapter_model.safetensors"), load_file(
        exp / "checkpoint_iter_2" / "adapter_model.safetensors")
    assert set(start) == set(trained) and any(not torch.equal(start[k], trained[k]) for k in start)
    stamps = {p: p.stat().st_mtime_ns for p in exp.glob("*_iter_*") if p.is_file()}
    train_iterative.main(args + ["--auto_resume", "true"])  # every round's manifest matches: nothing recomputed
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    rows = eval_iterative.main(["--experiment_dir", str(exp), "--num_workers", "0"])
    assert list(rows) == ["round0", "round1", "round2"]
