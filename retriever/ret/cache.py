"""Cache every layer's tokens of the frozen towers for the texts and images of each split, once.

Reads the M2KR-style files of each split and the towers (a dual-encoder folder, e.g. the dense stage's
`checkpoint-best/`); writes `output_dir/{split}/` (see retriever/ret/features.py). A split whose cache
already matches (same encoder weights, same texts and images) is left as it is.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from core.config import parse_config
from core.device import get_device
from core.encoders import load_dual_encoder
from retriever.ret.data import load_m2kr
from retriever.ret.features import build_cache, cache_is_current, cache_meta
from retriever.ret.model import FrozenTowers
from retriever.ret.retrieval import passage_items, query_items


@dataclass
class CacheConfig:
    encoder: str = "runs/shapes/dense/checkpoint-best"  # dual-encoder folder (core.encoders.load_dual_encoder)
    queries_file: str = "data/shapes/m2kr/shapes_{split}.jsonl"  # {split} is replaced
    passages_file: str = "data/shapes/m2kr/shapes_passages_{split}.jsonl"
    image_root: str = "data/shapes"  # img_path is relative to this
    splits: list = field(default_factory=lambda: ["train", "val", "test"])
    use_instruction: bool = False  # prefix queries with their instruction (M2KR: yes; Shapes: no)
    output_dir: str = "runs/shapes/ret/cache"
    batch_size: int = 256


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_config(CacheConfig, argv)
    splits = {s: load_m2kr(cfg.queries_file.format(split=s), cfg.passages_file.format(split=s), cfg.image_root)
              for s in cfg.splits}  # every file is checked before any work starts
    device = get_device()
    towers = FrozenTowers(load_dual_encoder(cfg.encoder)).to(device)
    meta = cache_meta(cfg.encoder, towers)
    for name, split in splits.items():
        items = query_items(split, cfg.use_instruction) + passage_items(split)
        texts = sorted({t for t, _ in items if t})
        images = sorted({i for _, i in items if i})
        folder = Path(cfg.output_dir) / name
        if cache_is_current(folder, meta, texts, images):
            print(f"cache {folder} is up to date")
            continue
        build_cache(towers, texts, images, folder, meta, device, cfg.batch_size)
        print(f"cached {len(texts)} texts and {len(images)} images of {name} in {folder}")


if __name__ == "__main__":
    main()
