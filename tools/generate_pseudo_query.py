"""Pseudo queries for gallery images, to teach the generative retriever every image's identifier (indexing).

Shapes (`source: scene`): terse descriptions written from each image's scene (`scenes.json`), in a style unlike
the human-style captions (canonical words, a fixed "shape, shape" list, attributes dropped at random) — the output
of an ideal but terse captioner. Real data (`source: captioner`): a captioning model named in the config
(BLIP through transformers, e.g. `Salesforce/blip-image-captioning-base`), sampled `n_per_image` times per image,
reading the images through a DataLoader a batch at a time.
Writes JSONL, one `{"imgid", "split", "query"}` a line. Never reads a caption of any split.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from core.config import parse_config
from core.data import ImageDataset, LoaderOptions, canonical_split, load_karpathy, make_loader, verify_images
from core.device import autocast, derive_seed, get_device, pretrained_dtype_kwargs
from core.errors import InputError
from core.io import atomic_write_jsonl
from core.logging import progress
from core.shapes.captions import position_name
from core.shapes.make import SCENES_FILE, load_scenes
from core.shapes.world import Scene


@dataclass
class PseudoQueryConfig(LoaderOptions):
    source: str = "scene"  # scene (the Shapes world) or captioner (real data)
    data_json: str = "runs/shapes/data/dataset_shapes.json"
    image_root: str = "runs/shapes/data/images"
    scenes: str = "runs/shapes/data/scenes.json"  # source: scene
    captioner: str = "Salesforce/blip-image-captioning-base"  # source: captioner
    splits: list[str] = field(default_factory=lambda: ["train", "val", "test"])
    n_per_image: int = 2
    drop_p: float = 0.3  # source: scene — chance of leaving out each object's size / position
    batch_size: int = 32
    output: str = "runs/shapes/comgtir/pseudo_queries.jsonl"
    seed: int = 0


def scene_query(scene: Scene, rng: np.random.Generator, drop_p: float) -> str:
    """E.g. "red circle top left, large blue square": one phrase per object, size/position sometimes dropped."""
    parts = []
    for i in rng.permutation(len(scene.objects)):
        obj = scene.objects[int(i)]
        words = ([obj.size] if rng.random() > drop_p else []) + [obj.colour, obj.shape]
        if rng.random() > drop_p:
            words.append(position_name(obj.row, obj.col))
        parts.append(" ".join(words))
    return ", ".join(parts)


def scene_queries(cfg: PseudoQueryConfig, wanted: dict) -> list[dict]:
    """`n_per_image` scene-written queries for each image in `wanted` (imgid → split)."""
    scenes_path = Path(cfg.scenes)
    if scenes_path.name != SCENES_FILE:
        raise InputError(scenes_path, None, f"expected the world's {SCENES_FILE}")
    rows = []
    for rec in load_scenes(scenes_path.parent):
        if rec.imgid not in wanted:
            continue
        rng = np.random.default_rng(derive_seed(cfg.seed, rec.imgid, "pseudo"))
        for _ in range(cfg.n_per_image):
            rows.append({"imgid": rec.imgid, "split": wanted[rec.imgid], "query": scene_query(rec.scene, rng, cfg.drop_p)})
    missing = set(wanted) - {r["imgid"] for r in rows}
    if missing:
        raise InputError(scenes_path, "images[].imgid", f"no scene for image {sorted(missing)[0]} ({len(missing)} missing)")
    return rows


def _decoded(image):
    """The loader's workers decode; BLIP's processor prepares the batch in the main process."""
    return image


@torch.no_grad()
def captioner_queries(cfg: PseudoQueryConfig, records: list) -> list[dict]:
    """Sampled captions from a BLIP captioning model (loaded by name or path, in bf16 on CUDA; fails clearly if it
    cannot load). The images are decoded by DataLoader workers, a batch at a time."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    device = get_device()
    processor = BlipProcessor.from_pretrained(cfg.captioner)
    model = BlipForConditionalGeneration.from_pretrained(cfg.captioner, **pretrained_dtype_kwargs(device))
    model = model.to(device).eval()
    dtype = next(model.parameters()).dtype
    loader = make_loader(ImageDataset([r.path for r in records], _decoded, cfg.data_json), cfg,
                         batch_size=cfg.batch_size, device=device, collate_fn=list)
    batches = iter(loader)  # a loader draws its workers' base seed from torch's generator: before the seed is set
    torch.manual_seed(cfg.seed)  # the sampled captions depend on the seed alone
    rows, start = [], 0
    for images in progress(batches, total=len(loader), desc="captioning", unit="batch"):
        batch = records[start:start + len(images)]
        start += len(images)
        inputs = processor(images=images, return_tensors="pt").to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)  # the processor makes float32 pixels
        with autocast(device):
            out = model.generate(**inputs, do_sample=True, top_p=0.9, num_return_sequences=cfg.n_per_image,
                                 max_new_tokens=30)
        texts = processor.batch_decode(out, skip_special_tokens=True)
        for j, text in enumerate(texts):
            rec = batch[j // cfg.n_per_image]
            rows.append({"imgid": rec.imgid, "split": canonical_split(rec.split), "query": text.strip()})
    return rows


def main(argv: Sequence[str] | None = None) -> Path:
    cfg = parse_config(PseudoQueryConfig, argv)
    if cfg.source not in ("scene", "captioner"):
        raise InputError("config", "source", f"must be 'scene' or 'captioner', got {cfg.source!r}")
    records = [r for split in cfg.splits for r in load_karpathy(cfg.data_json, cfg.image_root, split,
                                                               check_files=cfg.source == "captioner")]
    if cfg.source == "scene":
        rows = scene_queries(cfg, {r.imgid: canonical_split(r.split) for r in records})
    else:
        if cfg.verify_images:
            verify_images([r.path for r in records], cfg.data_json, cfg)
        rows = captioner_queries(cfg, records)
    atomic_write_jsonl(cfg.output, rows)
    print(f"{len(rows)} pseudo queries for {len(records)} images → {cfg.output}")
    return Path(cfg.output)


if __name__ == "__main__":
    main()
