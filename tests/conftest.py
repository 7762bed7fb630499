"""Session fixtures shared by every test: a tiny Shapes world (with every task's files) and a dense encoder
trained on it for a few steps, so stage tests start from real upstream artefacts on disk."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("TQDM_DISABLE", "1")

TINY_WORLD = dict(n_train=400, n_val=60, n_test=120, image_size=64)
# Small enough to train in seconds, big enough to beat chance clearly on the tiny world.
TINY_ENCODER = {
    "embed_dim": 64,
    "image_size": 64,
    "vision": {"layers": 2, "width": 64, "patch_size": 8, "head_width": 32, "mlp_ratio": 2.0},
    "text": {"context_length": 32, "width": 64, "heads": 2, "layers": 2, "mlp_ratio": 2.0},
}


@pytest.fixture(scope="session")
def shapes_world(tmp_path_factory) -> Path:
    """A tiny Shapes world: `dataset_shapes.json`, `scenes.json`, `images/` and every task's files."""
    from core.shapes.make import WorldConfig, make_world

    out = tmp_path_factory.mktemp("world") / "shapes"
    return make_world(WorldConfig(seed=0, out_dir=str(out), **TINY_WORLD))


@pytest.fixture(scope="session")
def scene_reader_file(shapes_world, tmp_path_factory) -> Path:
    """A scene reader trained on the tiny world's training images (25 epochs: it reads held-out images nearly
    perfectly), through the module's own entry point."""
    from core.shapes import scene_reader

    out = tmp_path_factory.mktemp("reader") / "scene_reader.pt"
    return scene_reader.main(["--data_json", str(shapes_world / "dataset_shapes.json"), "--out", str(out),
                              "--epochs", "25", "--batch_size", "32", "--num_workers", "0"])


@pytest.fixture(scope="session")
def dense_run(shapes_world, tmp_path_factory) -> Path:
    """A dense run folder (checkpoint-best/, checkpoint-last/, emb/) trained briefly on the tiny world."""
    import json

    from retriever.dense import encode, train

    run = tmp_path_factory.mktemp("dense") / "dense"
    train.main([
        "--data_json", str(shapes_world / "dataset_shapes.json"), "--image_root", str(shapes_world / "images"),
        "--output_dir", str(run), "--model", json.dumps(TINY_ENCODER), "--batch_size", "64", "--epochs", "30",
        "--lr", "3e-3", "--warmup_steps", "10", "--seed", "0",
    ])
    encode.main([
        "--checkpoint", str(run / "checkpoint-best"), "--data_json", str(shapes_world / "dataset_shapes.json"),
        "--image_root", str(shapes_world / "images"), "--output_dir", str(run / "emb"),
    ])
    return run


TINY_RESNET = {**TINY_ENCODER, "vision": {"layers": [1, 1, 1, 1], "width": 16, "head_width": 16}}


@pytest.fixture(scope="session")
def resnet_run(shapes_world, tmp_path_factory) -> Path:
    """A dense run folder with a tiny ResNet image tower, trained on the tiny world with edited twins and changed
    captions as the main job trains its own: the readers that take a ResNet's feature maps are tested on it."""
    import json

    from retriever.dense import train

    run = tmp_path_factory.mktemp("dense_resnet") / "dense"
    train.main(["--data_json", str(shapes_world / "dataset_shapes.json"), "--image_root", str(shapes_world / "images"),
                "--output_dir", str(run), "--model", json.dumps(TINY_RESNET), "--batch_size", "64", "--epochs", "8",
                "--lr", "3e-3", "--warmup_steps", "10", "--seed", "0", "--twin_edits", "[shape, move]",
                "--contrast_kinds", "[shape, position, swap]"])
    return run


@pytest.fixture(scope="session")
def dense_checkpoint(dense_run) -> Path:
    """The best dense encoder folder: `core.encoders.load_dual_encoder(dense_checkpoint)`."""
    return dense_run / "checkpoint-best"
