"""What a dense encoder sees in a Shapes scene: two probes of a trained checkpoint.

- **Caption contrasts** (text and image towers together): for every caption of the split's images, the share of
  images scored higher with their true caption than with the caption changed in one attribute (shape, position,
  colour, size, or two objects' shapes swapped; `core.shapes.captions.contrast_caption`). Chance is 50 %.
- **Linear probes of the image embedding**: a linear layer trained on frozen, standardised image embeddings of the
  training split reads each grid cell's content (empty or which shape), scored on the split. The majority baseline
  (every cell empty) is printed beside it.

Writes `output_dir/probe.json` and prints both tables. Needs the world's `scenes.json` for the image probes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from core.config import parse_config
from core.data import LoaderOptions, load_karpathy
from core.device import get_device
from core.encoders import DualEncoder, load_dual_encoder
from core.io import atomic_write_json
from core.logging import format_table
from core.shapes.captions import CONTRAST_KINDS, contrast_caption
from core.shapes.make import load_scenes
from core.shapes.world import SHAPE_CLASSES, SHAPES, cell_classes
from retriever.dense.common import encode_image_files, encode_texts


@dataclass
class ProbeConfig(LoaderOptions):
    checkpoint: str = "runs/shapes/dense/checkpoint-best"
    world_dir: str = "runs/shapes/data"  # dataset_shapes.json, images/ and scenes.json
    split: str = "val"
    max_images: int = 500  # of the split, for both probes
    probe_train_images: int = 5000  # training images the linear probes learn from
    probe_steps: int = 500
    output_dir: str = "runs/shapes/dense/probe"
    seed: int = 0


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    cfg = parse_config(ProbeConfig, argv)
    world = Path(cfg.world_dir)
    scenes = {r.filename: r.scene for r in load_scenes(world)}  # checked before any work
    device = get_device()
    model = load_dual_encoder(cfg.checkpoint).to(device).eval()
    records = load_karpathy(world / "dataset_shapes.json", world / "images", cfg.split)[:cfg.max_images]
    train_records = load_karpathy(world / "dataset_shapes.json", world / "images", "train")[:cfg.probe_train_images]
    image_emb = torch.from_numpy(encode_image_files(model, [r.path for r in records], device, cfg,
                                                    desc=f"{cfg.split} images"))

    contrasts, pairs = caption_contrasts(model, records, image_emb, device, cfg.seed)
    train_emb = torch.from_numpy(encode_image_files(model, [r.path for r in train_records], device, cfg,
                                                    desc="train images"))
    cells = cell_probes(train_emb, _cell_labels(train_records, scenes), image_emb, _cell_labels(records, scenes),
                        cfg.probe_steps, cfg.seed)
    result = {"caption contrasts": contrasts, "image probes": cells,
              "N": {"images": len(records), "probe train images": len(train_records), "caption pairs": pairs}}
    atomic_write_json(Path(cfg.output_dir) / "probe.json", result)
    print(format_table({"true caption preferred, % (chance 50)": contrasts}))
    print(format_table({"image embedding, linear probe, %": cells}))
    return result


def caption_contrasts(model: DualEncoder, records, image_emb: torch.Tensor, device: torch.device,
                      seed: int) -> tuple[dict[str, float], dict[str, int]]:
    """Per kind of change: % of (image, caption) pairs where the true caption scores higher; and the pair counts."""
    out: dict[str, float] = {}
    pairs: dict[str, int] = {}
    for kind in CONTRAST_KINDS:
        rng = np.random.default_rng((seed, CONTRAST_KINDS.index(kind)))
        triples = [(i, c, contrast_caption(c, rng, [kind])) for i, r in enumerate(records) for c in r.captions]
        triples = [t for t in triples if t[2] is not None]
        if not triples:
            continue
        true = torch.from_numpy(encode_texts(model, [t[1] for t in triples], device, desc=f"{kind}: true"))
        false = torch.from_numpy(encode_texts(model, [t[2] for t in triples], device, desc=f"{kind}: changed"))
        images = image_emb[torch.tensor([t[0] for t in triples])]
        out[kind] = 100 * ((images * true).sum(1) > (images * false).sum(1)).float().mean().item()
        pairs[kind] = len(triples)
    return out, pairs


def _cell_labels(records, scenes) -> torch.Tensor:
    """[n, 9]: 0 for an empty cell, 1 + the shape's index otherwise."""
    return torch.tensor([cell_classes(scenes[r.filename])[0] for r in records])


def cell_probes(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                steps: int, seed: int) -> dict[str, float]:
    """Linear read-out of every cell's content from standardised embeddings: occupancy over all cells and shape
    over occupied cells, with the all-empty baseline."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    classes = len(SHAPE_CLASSES)
    torch.manual_seed(seed)
    head = torch.nn.Linear(train_x.shape[1], train_y.shape[1] * classes)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(steps):
        logits = head(train_x).view(len(train_x), -1, classes)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, classes), train_y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = head(test_x).view(len(test_x), -1, classes).argmax(-1)
    occupied = test_y > 0
    return {"cell occupancy": 100 * ((pred > 0) == occupied).float().mean().item(),
            "all-empty baseline": 100 * (~occupied).float().mean().item(),
            "occupied cell's shape": 100 * (pred[occupied] == test_y[occupied]).float().mean().item(),
            "shape chance": 100 / len(SHAPES)}


if __name__ == "__main__":
    main()
