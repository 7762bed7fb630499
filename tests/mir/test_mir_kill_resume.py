"""The Shapes generator's trainer resumes exactly after a real SIGKILL: the UNet and its EMA (tests/resume.py)."""
from __future__ import annotations

import json

from tests.mir.conftest import TINY_UNET, with_cached_helpers
from tests.resume import assert_resume_replays_the_run


def test_generator_resumes_exactly(mir_generator, shapes_world, dense_checkpoint, tmp_path, monkeypatch):
    args = {"data_json": shapes_world / "dataset_shapes.json", "image_root": shapes_world / "images",
            "dense_checkpoint": dense_checkpoint, "unet": json.dumps(TINY_UNET), "steps": 4, "batch_size": 8,
            "lr": 2e-3, "warmup_steps": 1, "save_every": 2, "eval_images": 2, "sample_steps": 1, "num_workers": 0,
            "seed": 0}
    argv = lambda out: [x for k, v in {**args, "output_dir": out}.items() for x in (f"--{k}", str(v))]  # noqa: E731
    assert_resume_replays_the_run("mir.train_generator", argv, tmp_path, monkeypatch,
                                  prepare=lambda out: with_cached_helpers(out, mir_generator))
