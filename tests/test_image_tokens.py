"""Image tokens from either dense tower (core.encoders): a ViT's patch tokens exactly as they were read before, a
ResNet's stage feature maps as positioned grid tokens; ReT, the composed retriever and the modification-text
generator train on a tiny ResNet tower and beat chance, as they do on the ViT."""
from __future__ import annotations

import pytest
import torch

from core.encoders import (grid_tokens, build_dual_encoder, grid_position_embedding, image_token_layers,
                           image_token_width, image_tokens, layer_image_tokens, layer_token_width)
from core.errors import InputError
from core.modtext import dense_image_tokens, load_image_tokens
from tests.conftest import TINY_ENCODER

TINY_RESNET = {**TINY_ENCODER, "vision": {"layers": [1, 1, 1, 1], "width": 16, "head_width": 16}}


@pytest.fixture(scope="module")
def resnet_checkpoint(tmp_path_factory):
    """A tiny ResNet dual-encoder folder, untrained: the readers train on its frozen features, so the tower need not
    be (training one would cost minutes). open_clip starts each block's last BatchNorm at zero, which leaves only the
    shortcut path; it is set to one so that every block's residual branch shapes the features, as in a trained
    tower."""
    torch.manual_seed(0)
    encoder = build_dual_encoder(TINY_RESNET)
    with torch.no_grad():
        for name, param in encoder.clip.visual.named_parameters():
            if name.endswith("bn3.weight"):
                param.fill_(1.0)
    folder = tmp_path_factory.mktemp("dense_resnet") / "checkpoint-best"
    folder.mkdir()
    encoder.save(folder)
    return folder


# ----------------------------------------------------------------------------------------------------- the tokens
def test_vit_tokens_are_read_exactly_as_before():
    """The ViT path is the code the readers ran before a ResNet was accepted, bit for bit."""
    torch.manual_seed(0)
    encoder = build_dual_encoder(TINY_ENCODER).eval()
    visual = encoder.clip.visual
    pixels = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        before = visual.ln_post(visual.transformer(visual._embeds(pixels)))
        out = visual.forward_intermediates(pixels, indices=[0, 1], intermediates_only=True, output_fmt="NLC",
                                           output_extra_tokens=True)
        layers_before = torch.cat([torch.stack(out["image_intermediates_prefix"], 1),
                                   torch.stack(out["image_intermediates"], 1)], 2)
        assert torch.equal(image_tokens(encoder, pixels), before)
        assert torch.equal(layer_image_tokens(encoder, pixels, [0, 1]), layers_before)
    assert image_token_width(encoder) == layer_token_width(encoder) == 64 and image_token_layers(encoder) == 2
    with pytest.raises(InputError, match="stage"):
        image_tokens(encoder, pixels, stage=0)


def test_vit_image_token_encoder_keeps_its_source_and_fingerprint(tmp_path):
    """A ViT tower's `image_encoder.json` records nothing new, so caches and folders written before still match."""
    torch.manual_seed(0)
    build_dual_encoder(TINY_ENCODER).save(tmp_path)
    tokens = dense_image_tokens(tmp_path)
    assert tokens.source == {"dense_folder": str(tmp_path)} and tokens.hidden_size == 64
    tokens.save(tmp_path / "image_encoder")
    assert load_image_tokens(tmp_path / "image_encoder").fingerprint() == tokens.fingerprint()


def test_resnet_tokens_are_a_positioned_grid_per_stage(tmp_path):
    torch.manual_seed(0)
    encoder = build_dual_encoder(TINY_RESNET).eval()
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        # widths 64, 128, 256, 512 and grids 16, 8, 4, 2 (a 4× stem, then strides 1, 2, 2, 2), after one global token
        for stage, (width, grid) in enumerate([(64, 16), (128, 8), (256, 4), (512, 2)]):
            assert image_tokens(encoder, pixels, stage).shape == (2, 1 + grid * grid, width)
            assert image_token_width(encoder, stage) == width
        last = image_tokens(encoder, pixels)
        assert torch.equal(last, image_tokens(encoder, pixels, -1))
        per_layer = layer_image_tokens(encoder, pixels, [0, 1, 2, 3])
        reordered = layer_image_tokens(encoder, pixels, [3, 1])
    assert per_layer.shape == (2, 4, 5, 512) and image_token_layers(encoder) == 4 and layer_token_width(encoder) == 512
    assert torch.equal(per_layer[:, 3], last) and torch.equal(reordered[:, 0], last)
    assert torch.allclose(reordered[:, 1], per_layer[:, 1])
    assert per_layer[:, 0, :, 64:].abs().max() == 0  # narrower stages are zero-padded, not projected
    # every cell carries its own position: the same feature map everywhere gives distinct tokens
    flat = torch.ones(1, 8, 3, 3)
    cells = grid_tokens(flat)[0, 1:]
    assert torch.cdist(cells, cells).add(torch.eye(9) * 1e3).min() > 0.1
    pe = grid_position_embedding(3, 3, 8)
    assert torch.allclose(cells, torch.nn.functional.layer_norm(torch.ones(9, 8), (8,)) + pe)
    with pytest.raises(InputError, match="stage"):
        image_tokens(encoder, pixels, stage=4)
    with pytest.raises(InputError, match="divisible by 4"):
        grid_position_embedding(2, 2, 6)


def test_resnet_stage_choice_is_saved_with_the_tower(tmp_path):
    torch.manual_seed(0)
    build_dual_encoder(TINY_RESNET).save(tmp_path)
    chosen = dense_image_tokens(tmp_path, token_stage=2)
    assert chosen.hidden_size == 256
    chosen.save(tmp_path / "image_encoder")
    again = load_image_tokens(tmp_path / "image_encoder")
    pixels = torch.randn(2, 3, 64, 64)
    assert again.source["token_stage"] == 2 and torch.equal(again(pixels), chosen(pixels))
    # another stage of the same weights is another tower to a token cache
    assert dense_image_tokens(tmp_path).fingerprint() != chosen.fingerprint()


# ----------------------------------------------------------------------------------------------------- the readers
def test_ret_trains_on_a_resnet_tower_and_beats_chance(shapes_world, resnet_run, tmp_path):
    """ReT reads the four residual stages of a trained tiny ResNet tower (tests/conftest.py's `resnet_run`; an
    untrained one stays near chance). The image-only variant sees nothing but the image tokens, so beating chance
    there needs tokens that tell images apart."""
    resnet_checkpoint = resnet_run / "checkpoint-best"
    from retriever.ret import cache, train

    data = [f"--queries_file={shapes_world}/m2kr/shapes_{{split}}.jsonl",
            f"--passages_file={shapes_world}/m2kr/shapes_passages_{{split}}.jsonl", "--image_root", str(shapes_world)]
    cache.main(["--encoder", str(resnet_checkpoint), *data, "--output_dir", str(tmp_path / "cache"),
                "--splits", "[train, val]"])
    val = train.main(["--encoder", str(resnet_checkpoint), *data, "--cache_dir", str(tmp_path / "cache"),
                      "--output_dir", str(tmp_path), "--variants", "ret,image-only", "--layer_strategy", "all",
                      "--cell", '{"hidden_size": 32, "head_dim": 16, "dropout": 0.0, "attention_dropout": 0.0}',
                      "--batch_size", "64", "--epochs", "3", "--lr", "3e-3", "--warmup_steps", "5", "--seed", "0"])
    n_passages = sum(1 for _ in (shapes_world / "m2kr/shapes_passages_val.jsonl").open())
    chance_r10 = 100 * 10 / n_passages
    assert val["ret"]["R@10"] > 3 * chance_r10, (val, chance_r10)
    assert val["image-only"]["R@10"] > 3 * chance_r10, (val, chance_r10)


def test_composed_retriever_trains_on_a_resnet_tower_and_beats_chance(resnet_checkpoint, shapes_world, tmp_path):
    """As tests/cir/test_cir_models.py on the ViT: the subset ranking (5 near-duplicates, chance Rs@1 = 20%)."""
    from cir.data import load_cirr
    from cir.retriever import build_shapes_retriever
    from tests.cir.test_cir_models import SMALL, assert_fits_its_training_triplets

    train = load_cirr(shapes_world / "cirr", "train")
    torch.manual_seed(0)
    model = build_shapes_retriever(resnet_checkpoint, [t.caption for t in train.triplets], SMALL)
    assert model.image_encoder.hidden_size == 512
    assert_fits_its_training_triplets(model, train, tmp_path)


def test_modification_text_generator_trains_on_a_resnet_tower_and_reads_the_images(shapes_world, resnet_run, tmp_path):
    """As tests/cir/test_cir_mtst.py on the ViT, on the trained tiny ResNet tower: its text loss on the true pairs is
    clearly below the loss on mismatched pairs."""
    resnet_checkpoint = resnet_run / "checkpoint-best"
    from cir import train_mtst
    from core.modtext import load_modification_generator
    from tests.cir.test_cir_mtst import assert_reads_the_images

    out = tmp_path / "mtst"
    train_mtst.main([
        "--cirr_root", str(shapes_world / "cirr"), "--dense_checkpoint", str(resnet_checkpoint),
        "--data_json", str(shapes_world / "dataset_shapes.json"), "--output_dir", str(out),
        "--lm_steps", "40", "--steps", "150", "--batch_size", "16", "--lr", "3e-3", "--eval_every", "150",
        "--eval_pairs", "20", "--test_pairs", "20", "--max_new_tokens", "12", "--num_query_tokens", "8",
    ])
    gen = load_modification_generator(out / "checkpoint-best", device=torch.device("cpu"))
    assert gen.image_encoder.hidden_size == 512
    assert_reads_the_images(gen, shapes_world, tmp_path)

