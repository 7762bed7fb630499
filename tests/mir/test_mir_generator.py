"""The Shapes generator: trained for a few steps it denoises far better than an untrained one, sampling is
deterministic per (prompt, seed) whatever the batch, the image cache hits, and training resumes exactly."""
from __future__ import annotations

import json

import numpy as np
import torch

import pytest

from core.data import load_karpathy
from core.errors import InputError
from mir.generator import ImageCache, build_unet, load_generator
from mir.layout import LAYOUT_FILE
from core.shapes.scene_reader import READER_FILE
from mir.train_generator import diffusion_loss, load_pixels
from tests.mir.conftest import with_cached_helpers


def _heldout_loss(unet, conditioner, x0, captions) -> float:
    from diffusers import DDPMScheduler

    from mir.generator import SHAPES_SCHEDULER

    scheduler = DDPMScheduler(**SHAPES_SCHEDULER)
    gen = torch.Generator().manual_seed(123)
    losses = []
    with torch.no_grad():
        cond = conditioner(captions)
        for _ in range(4):
            noise = torch.randn(x0.shape, generator=gen)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=gen)
            losses.append(diffusion_loss(unet.eval(), scheduler, cond, x0, noise, t).item())
    return float(np.mean(losses))


def test_trained_generator_denoises_better_than_untrained(mir_generator, shapes_world, dense_checkpoint):
    from tests.mir.conftest import TINY_UNET

    train = load_karpathy(shapes_world / "dataset_shapes.json", shapes_world / "images", "train")[:48]
    x0, texts = load_pixels([r.path for r in train], 32), [r.captions[0] for r in train]
    trained = load_generator(mir_generator / "checkpoint-best", steps=4, guidance=2.0, size=64)
    conditioner = trained.conditioner  # the dense tower and the caption → layout encoder, as saved with the UNet
    assert conditioner.layout is not None and (mir_generator / "checkpoint-best" / LAYOUT_FILE).is_file()
    torch.manual_seed(0)
    untrained = build_unet(TINY_UNET, conditioner.dim, conditioner.layout_channels)
    trained_loss = _heldout_loss(trained.unet, conditioner, x0, texts)
    untrained_loss = _heldout_loss(untrained, conditioner, x0, texts)
    assert trained_loss < 0.6 * untrained_loss, (trained_loss, untrained_loss)
    metrics = json.loads((mir_generator / "metrics.json").read_text())
    assert {"R@10", "chance R@10", "N", "x0 MSE t=50", "x0 MSE t=900", "object acc", "real object acc",
            "extra objects / image", "object eval captions", "layout object acc"} <= set(metrics)
    assert metrics["object eval captions"] > 0 and (mir_generator / "scene_reader.pt").is_file()
    assert metrics["x0 MSE t=50"] < metrics["x0 MSE t=900"]  # nearly clean inputs are easier to denoise
    assert (mir_generator / "samples.png").is_file() and (mir_generator / "denoising.png").is_file()


def test_sampling_is_deterministic_per_seed_and_cached(mir_generator, tmp_path):
    gen = load_generator(mir_generator / "checkpoint-best", steps=3, guidance=2.0, size=64)
    a = gen.generate(["a red circle", "a blue square in the top left"], [1, 2])
    b = gen.generate(["a blue square in the top left"], [2])
    assert np.array_equal(np.asarray(a[1]), np.asarray(b[0]))  # batch-independent
    assert a[0].size == (64, 64)
    cache = ImageCache(tmp_path / "cache", gen)
    imgs, keys, made = cache.get(["a red circle", "a red circle"], [1, 5])
    assert made == 2 and keys[0] != keys[1]
    again, keys2, made2 = cache.get(["a red circle"], [1])
    assert made2 == 0 and keys2[0] == keys[0] and np.array_equal(np.asarray(again[0]), np.asarray(a[0]))


def test_generator_training_resumes_exactly(mir_generator, shapes_world, dense_checkpoint, tmp_path):
    """Train 20 steps, stop, resume to 40: the same weights as the uninterrupted 40-step fixture run."""
    from mir import train_generator
    from tests.mir.conftest import TINY_UNET

    args = ["--data_json", str(shapes_world / "dataset_shapes.json"), "--image_root", str(shapes_world / "images"),
            "--dense_checkpoint", str(dense_checkpoint), "--output_dir", str(tmp_path / "g"), "--unet", json.dumps(TINY_UNET),
            "--batch_size", "16", "--lr", "2e-3", "--warmup_steps", "5", "--save_every", "20", "--eval_images", "4",
            "--sample_steps", "2", "--seed", "0"]
    with_cached_helpers(tmp_path / "g", mir_generator)
    train_generator.main(args + ["--steps", "20"])
    # a 40-step run continues from checkpoint-last (step 20) instead of starting over
    train_generator.main(args + ["--steps", "40"])
    ours = torch.load(tmp_path / "g" / "checkpoint-last" / "model.pt", weights_only=True)
    ref = torch.load(mir_generator / "checkpoint-last" / "model.pt", weights_only=True)
    assert all(torch.equal(ours[k], ref[k]) for k in ref)


def test_generator_without_scenes_is_refused_before_work(shapes_world, dense_checkpoint, tmp_path):
    """The layout encoder learns from the world's scenes.json: a caption file without one is an error naming it."""
    from mir import train_generator

    lone = tmp_path / "captions_only"
    lone.mkdir()
    (lone / "dataset_shapes.json").write_text((shapes_world / "dataset_shapes.json").read_text())
    args = ["--data_json", str(lone / "dataset_shapes.json"), "--image_root", str(shapes_world / "images"),
            "--dense_checkpoint", str(dense_checkpoint), "--output_dir", str(tmp_path / "g"), "--steps", "2"]
    with pytest.raises(InputError, match="scenes.json"):
        train_generator.main(args)
    assert not (tmp_path / "g").exists()


def test_generator_without_layout_reads_the_dense_tower_alone(mir_generator, shapes_world, dense_checkpoint, tmp_path):
    """`--layout false`: no layout channels, no layout file, and no scenes.json needed to train."""
    from mir import train_generator
    from tests.mir.conftest import TINY_UNET

    args = ["--data_json", str(shapes_world / "dataset_shapes.json"), "--image_root", str(shapes_world / "images"),
            "--dense_checkpoint", str(dense_checkpoint), "--output_dir", str(tmp_path / "g"), "--unet", json.dumps(TINY_UNET),
            "--steps", "4", "--batch_size", "8", "--eval_images", "4", "--sample_steps", "2", "--layout", "false"]
    with_cached_helpers(tmp_path / "g", mir_generator, names=(READER_FILE,))
    train_generator.main(args)
    gen = load_generator(tmp_path / "g" / "checkpoint-best", steps=2, guidance=2.0, size=64)
    assert gen.conditioner.layout is None and gen.unet.layout_channels == 0
    assert not (tmp_path / "g" / "checkpoint-best" / LAYOUT_FILE).exists()
    assert gen.generate(["a red circle"], [0])[0].size == (64, 64)
