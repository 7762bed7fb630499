"""Cache every layer's tokens of the frozen towers for the texts and images of each split, once (small worlds).

Reads the M2KR-style files of each split and the towers (a dual-encoder folder, e.g. the dense stage's
`checkpoint-best/`); writes `output_dir/{split}/` (float16 memory maps filled as made, see
retriever/ret/features.py). A split whose cache already matches (same towers' weights, preprocessing and
tokenizer, same texts and images) is left as it is; one that does not is rebuilt. Pretrained towers are not
cached by default (`features: auto`): the later steps run them live.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from core.config import parse_config
from core.data import LoaderOptions, fix_heap_threshold, verify_images
from core.device import get_device
from core.encoders import load_dual_encoder
from core.io import read_json
from retriever.ret.data import load_m2kr
from retriever.ret.features import build_cache, cache_is_current, cache_made_by, cache_shape, check_cache_size, resolve_features
from retriever.ret.model import FrozenTowers
from retriever.ret.retrieval import passage_items, query_items


@dataclass
class CacheConfig(LoaderOptions):
    encoder: str = "runs/shapes/dense/checkpoint-best"  # dual-encoder folder (core.encoders.load_dual_encoder)
    queries_file: str = "data/shapes/m2kr/shapes_{split}.jsonl"  # {split} is replaced
    passages_file: str = "data/shapes/m2kr/shapes_passages_{split}.jsonl"
    image_root: str = "data/shapes"  # img_path is relative to this
    splits: list = field(default_factory=lambda: ["train", "val", "test"])
    use_instruction: bool = False  # prefix queries with their instruction (M2KR: yes; Shapes: no)
    output_dir: str = "runs/shapes/ret/cache"
    # 'auto' caches towers built from a spec (the Shapes world's) and leaves pretrained towers to run live in the
    # later steps (every layer of ViT-L/14 is 12.6 MB per image); 'cache' caches any towers; 'live' caches nothing.
    features: str = "auto"
    max_cache_gb: float = 20.0  # refuse, before any work, caches larger than this on disk (all splits together)
    batch_size: int = 256


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    cfg = parse_config(CacheConfig, argv)
    fix_heap_threshold()
    files = {s: (cfg.queries_file.format(split=s), cfg.passages_file.format(split=s)) for s in cfg.splits}
    splits = {s: load_m2kr(*files[s], cfg.image_root) for s in cfg.splits}  # every file is checked before any work
    if resolve_features(cfg.features, read_json(Path(cfg.encoder) / "encoder.json")) == "live":
        print(f"towers in {cfg.encoder} run live (features={cfg.features}): nothing to cache")
        return {}
    device = get_device()
    towers = FrozenTowers(load_dual_encoder(cfg.encoder)).to(device)
    made_by = cache_made_by(towers)
    todo = {}
    for name, split in splits.items():
        items = query_items(split, cfg.use_instruction) + passage_items(split)
        texts = sorted({t for t, _ in items if t})
        images = sorted({i for _, i in items if i})
        folder = Path(cfg.output_dir) / name
        if cache_is_current(folder, made_by, texts, images):
            print(f"cache {folder} is up to date")
            continue
        todo[name] = (texts, images, folder)
    shapes = {name: cache_shape(towers, texts, images) for name, (texts, images, _) in todo.items()}
    check_cache_size(shapes, cfg.max_cache_gb)
    if cfg.verify_images:
        verify_images([i for _, images, _ in todo.values() for i in images], cfg.image_root, cfg)
    for name, (texts, images, folder) in todo.items():
        build_cache(towers, texts, images, folder, made_by, device, cfg.batch_size, cfg, " / ".join(files[name]),
                    shapes[name], encoder_dir=cfg.encoder)
        print(f"cached {len(texts)} texts and {len(images)} images of {name} in {folder} "
              f"({shapes[name].nbytes / 1e6:.0f} MB)")
    return {name: folder for name, (_, _, folder) in todo.items()}


if __name__ == "__main__":
    main()
