"""Fixtures of the MIR tests: a tiny Shapes generator trained for a few steps and an untrained tiny
modification-text generator (the simulated user's interface; its words are noise, the machinery is real)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

import pytest

# The main job's blocks (mir.generator.SHAPES_UNET: no cross-attention, the layout in the input), narrower.
TINY_UNET = {"resolution": 32, "patch": 4, "layers_per_block": 1, "block_out_channels": [32, 32],
             "down_block_types": ["DownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "UpBlock2D"],
             "mid_block_type": "UNetMidBlock2D", "attention_head_dim": 8, "norm_num_groups": 8,
             "class_embed_type": "projection"}


def with_cached_helpers(out: Path, fixture_run: Path,
                        names: Sequence[str] = ("layout_encoder.pt", "scene_reader.pt")) -> Path:
    """A new run folder holding the fixture run's layout encoder and scene reader: each is cached by what it was
    trained on (the same captions, scenes and seed), so a generator run there trains only its UNet."""
    out.mkdir(parents=True)
    for name in names:
        shutil.copy(fixture_run / name, out / name)
    return out


@pytest.fixture(scope="session")
def mir_generator(shapes_world, dense_checkpoint, tmp_path_factory) -> Path:
    """`mir.train_generator` run for 40 steps on the tiny world; returns the run folder."""
    from mir import train_generator

    out = tmp_path_factory.mktemp("mir") / "generator"
    train_generator.main([
        "--data_json", str(shapes_world / "dataset_shapes.json"), "--image_root", str(shapes_world / "images"),
        "--dense_checkpoint", str(dense_checkpoint), "--output_dir", str(out), "--unet", json.dumps(TINY_UNET),
        "--steps", "40", "--batch_size", "16", "--lr", "2e-3", "--warmup_steps", "5", "--save_every", "20",
        "--eval_images", "20", "--sample_steps", "4", "--seed", "0",
    ])
    return out


@pytest.fixture(scope="session")
def tiny_user(shapes_world, dense_checkpoint, tmp_path_factory) -> Path:
    from core.modtext import build_shapes_generator
    from core.shapes.edits import describe_edit  # noqa: F401  (the words the generator's vocabulary covers)

    texts = [c["caption"] for c in json.loads((shapes_world / "cirr" / "captions" / "cap.rc2.train.json").read_text())]
    gen = build_shapes_generator(dense_checkpoint, texts, num_query_tokens=4)
    out = tmp_path_factory.mktemp("mir") / "user"
    gen.save_pretrained(out)
    return out


def save_tiny_blip_retrieval(folder: Path, seed: int = 0) -> Path:
    """A 1-layer random BlipForImageTextRetrieval with its real processor (32 px images, BLIP's CLIP mean/std) and a
    character-level BERT WordPiece tokenizer (every word is spelled out, so long dialogues pass BLIP's 200 tokens),
    saved as a from_pretrained folder. Every weight is perturbed from its initial value (LayerNorms included), so
    a weight loaded into the wrong place changes the embeddings."""
    import string

    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForImageTextRetrieval, BlipImageProcessor, BlipProcessor

    chars = list(string.ascii_lowercase + string.digits)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]", *chars, *(f"##{c}" for c in chars),
             *string.punctuation]
    tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, model_max_length=512)
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    config = BlipConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "intermediate_size": 64, "encoder_hidden_size": 32, "max_position_embeddings": 256,
                     "pad_token_id": 0, "sep_token_id": 3, "eos_token_id": 3, "bos_token_id": 5},
        vision_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
                       "image_size": 32, "patch_size": 8, "layer_norm_eps": 1e-6},
        image_text_hidden_size=16)
    torch.manual_seed(seed)
    model = BlipForImageTextRetrieval(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))  # at the initial 0.02 scale every text embeds alike
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_blip_retrieval(tmp_path_factory) -> Path:
    return save_tiny_blip_retrieval(tmp_path_factory.mktemp("mir") / "blip")


@pytest.fixture(scope="session")
def tiny_sd_pipeline(tmp_path_factory) -> Path:
    """A tiny random Stable Diffusion pipeline saved to disk (diffusers' real classes), shared by the MIR tests."""
    from tests.tiny_models import save_tiny_sd_pipeline

    return save_tiny_sd_pipeline(tmp_path_factory.mktemp("mir_sd") / "tiny-sd")
