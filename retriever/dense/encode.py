"""Encode images and captions with a trained dense encoder (the `prepare_emb` step of every pipeline).

Reads a dual-encoder checkpoint folder and Karpathy-split data; writes, per split, into `output_dir/`:
`image_{split}.npy` + `image_{split}_ids.json` (image ids) and `text_{split}.npy` + `text_{split}_ids.json`
(`{"sentid", "imgid", "raw"}` per caption), L2-normalised, rows in the same order as the ids.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from core.checkpoint import read_meta
from core.config import parse_config, save_config
from core.data import caption_queries, load_images, load_karpathy
from core.device import get_device
from core.encoders import load_dual_encoder
from core.io import save_embeddings
from retriever.dense.common import encode_pixels, encode_texts


@dataclass
class EncodeConfig:
    checkpoint: str = "runs/shapes/dense/checkpoint-best"
    data_json: str = "data/shapes/dataset_shapes.json"
    image_root: str = "data/shapes/images"
    splits: list[str] = field(default_factory=lambda: ["train", "val", "test"])
    output_dir: str = "runs/shapes/dense/emb"
    batch_size: int = 256
    seed: int = 0


def main(argv: Sequence[str] | None = None) -> Path:
    cfg = parse_config(EncodeConfig, argv)
    read_meta(cfg.checkpoint, stage="dense")
    records = {split: load_karpathy(cfg.data_json, cfg.image_root, split) for split in cfg.splits}
    device = get_device()
    model = load_dual_encoder(cfg.checkpoint).to(device)
    out = Path(cfg.output_dir)
    for split, recs in records.items():
        pixels = load_images([r.path for r in recs], model.preprocess, desc=f"loading {split} images")
        image_emb = encode_pixels(model, pixels, device, cfg.batch_size, desc=f"encoding {split} images")
        save_embeddings(out / f"image_{split}", image_emb, [r.imgid for r in recs])
        queries = caption_queries(recs)
        text_emb = encode_texts(model, [q.text for q in queries], device, cfg.batch_size, desc=f"encoding {split} captions")
        save_embeddings(out / f"text_{split}", text_emb,
                        [{"sentid": q.sentid, "imgid": q.imgid, "raw": q.text} for q in queries])
        print(f"{split}: {len(recs)} images, {len(queries)} captions → {out}")
    save_config(cfg, out / "config.yaml")
    return out


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
