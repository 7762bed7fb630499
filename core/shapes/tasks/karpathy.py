"""Captions in the Karpathy split layout of Flickr30K: writes `dataset_shapes.json`.

`{"dataset": "shapes", "images": [{"filename", "imgid", "split", "sentids", "sentences":
[{"raw", "tokens", "imgid", "sentid"}]}]}`; filenames are relative to the world's `images/`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from core.io import atomic_write_json
from core.shapes.captions import caption_scene, tokenize
from core.shapes.make import load_world_config
from core.shapes.world import SceneRecord

NAME = "karpathy"
VERSION = 1  # bump when the captions change
FILENAME = "dataset_shapes.json"


def write(scenes: list[SceneRecord], out_dir: Path, rng: np.random.Generator) -> None:
    n = load_world_config(out_dir).captions_per_image
    images, sentid = [], 0
    for rec in scenes:
        sentences = []
        for raw in caption_scene(rec.scene, rng, n=n):
            sentences.append({"raw": raw, "tokens": tokenize(raw), "imgid": rec.imgid, "sentid": sentid})
            sentid += 1
        images.append({
            "filename": rec.filename,
            "imgid": rec.imgid,
            "split": rec.split,
            "sentids": [s["sentid"] for s in sentences],
            "sentences": sentences,
        })
    atomic_write_json(Path(out_dir) / FILENAME, {"dataset": "shapes", "images": images}, indent=None)
