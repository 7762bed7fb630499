"""Encode images and captions with a trained dense encoder (the `prepare_emb` step of every pipeline).

Reads a dual-encoder checkpoint folder and Karpathy-split data; writes, per split, into `output_dir/`:
`image_{split}.npy` + `image_{split}_ids.json` (image ids) and `text_{split}.npy` + `text_{split}_ids.json`
(`{"sentid", "imgid", "raw"}` per caption), L2-normalised float16 rows in the same order as the ids, written as
they are made (core.io.EmbeddingWriter): images are decoded by DataLoader workers and never held for a split.
Under torchrun each rank encodes its contiguous share of each split into its own shard. A split whose stored
embeddings were made by the same model, preprocessing and image list is kept, not encoded again.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from core.checkpoint import read_meta
from core.config import parse_config, save_config
from core.data import (ImageRecord, LoaderOptions, caption_queries, fix_heap_threshold, image_batches,
                       load_karpathy_splits, verify_images)
from core.distributed import DistInfo, barrier, cleanup, init_distributed, shard_range
from core.encoders import DualEncoder, load_dual_encoder
from core.errors import InputError
from core.io import EmbeddingWriter, embeddings_made_by, file_digest, json_digest, open_embeddings
from retriever.dense.common import embed_image_batches, encode_texts


@dataclass
class EncodeConfig(LoaderOptions):
    checkpoint: str = "runs/shapes/dense/checkpoint-best"
    data_json: str = "data/shapes/dataset_shapes.json"
    image_root: str = "data/shapes/images"
    splits: list[str] = field(default_factory=lambda: ["train", "val", "test"])
    output_dir: str = "runs/shapes/dense/emb"
    batch_size: int = 256


def main(argv: Sequence[str] | None = None) -> Path:
    cfg = parse_config(EncodeConfig, argv)
    fix_heap_threshold()
    read_meta(cfg.checkpoint, stage="dense")
    records = load_karpathy_splits(cfg.data_json, cfg.image_root, cfg.splits)
    if cfg.verify_images:
        verify_images([r.path for recs in records.values() for r in recs], cfg.data_json, cfg)
    dist = init_distributed()
    model = load_dual_encoder(cfg.checkpoint).to(dist.device)
    out = Path(cfg.output_dir)
    model_id = _weights_digest(Path(cfg.checkpoint))
    for split, recs in records.items():
        made_by = {"model": model_id, "preprocess": repr(model.preprocess),
                   "images": json_digest([str(r.path) for r in recs])}
        keep = _current(out / f"image_{split}", made_by)
        barrier(dist)  # every rank decides before any rank writes this split
        if keep:
            if dist.is_main:
                print(f"{split}: embeddings in {out} were made by this model from these images; kept")
            continue
        _encode_split(cfg, model, recs, split, out, made_by, dist)
    barrier(dist)
    if dist.is_main:
        save_config(cfg, out / "config.yaml")
    cleanup(dist)
    return out


def _encode_split(cfg: EncodeConfig, model: DualEncoder, recs: list[ImageRecord], split: str, out: Path,
                  made_by: dict, dist: DistInfo) -> None:
    rows = shard_range(len(recs), dist)
    mine = recs[rows.start:rows.stop]
    images = EmbeddingWriter(out / f"image_{split}", len(mine), model.embed_dim, dist.rank, dist.world_size)
    try:
        batches = image_batches([r.path for r in mine], model.preprocess, cfg, cfg.batch_size, dist.device,
                                cfg.data_json, desc=f"encoding {split} images")
        for block in embed_image_batches(model, batches, dist.device):
            images.write(block)
    except BaseException:
        images.abort()
        raise
    queries = caption_queries(mine)
    texts = EmbeddingWriter(out / f"text_{split}", len(queries), model.embed_dim, dist.rank, dist.world_size)
    for i in range(0, len(queries), cfg.batch_size):
        chunk = queries[i:i + cfg.batch_size]
        texts.write(encode_texts(model, [q.text for q in chunk], dist.device, cfg.batch_size, desc=""))
    # captions first: the image manifest (with made_by) is what marks a split complete
    texts.close(({"sentid": q.sentid, "imgid": q.imgid, "raw": q.text} for q in queries), made_by)
    images.close([r.imgid for r in mine], made_by)
    if dist.is_main:
        print(f"{split}: {len(recs)} images, {sum(len(r.captions) for r in recs)} captions → {out}")


def _current(prefix: Path, made_by: dict) -> bool:
    """Stored embeddings of a split are kept when the same model made them from the same image list."""
    if embeddings_made_by(prefix) != made_by:
        return False
    try:
        open_embeddings(prefix)
        open_embeddings(prefix.with_name(prefix.name.replace("image_", "text_", 1)))
    except InputError:
        return False
    return True


def _weights_digest(folder: Path) -> str:
    """The checkpoint's weights file (or its spec, for a named pretrained model without one)."""
    weights = folder / "model.pt"
    return file_digest(weights if weights.is_file() else folder / "encoder.json")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
