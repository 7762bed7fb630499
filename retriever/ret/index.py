"""Index a passage corpus with a trained ReT: passage tokens into a faiss IVF-PQ index (retriever/ret/token_index.py).

Reads a ReT folder (`checkpoint`, e.g. `runs/shapes/ret/ret/checkpoint-best`), the passages JSONL and the
tower-token cache (or runs the towers, `features`: see retriever/ret/train.py); writes `output_dir/` (index.faiss,
passages.npy, ids.json, meta.json). The passage tokens are written as they are encoded into a float16 memory map
(a corpus's tokens are never held in memory). An index already built from the same checkpoint and passages is kept.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from core.checkpoint import read_meta
from core.config import parse_config
from core.data import LoaderOptions
from core.device import get_device
from core.errors import InputError
from core.io import read_json
from retriever.ret.data import load_passages
from retriever.ret.features import open_source, resolve_features
from retriever.ret.model import STAGE, RetrieverModel
from retriever.ret.retrieval import encode_items
from retriever.ret.token_index import TokenIndex


@dataclass
class IndexConfig(LoaderOptions):
    checkpoint: str = "runs/shapes/ret/ret/checkpoint-best"  # a ReT folder (RetrieverModel.from_pretrained)
    passages_file: str = "data/shapes/m2kr/shapes_passages_{split}.jsonl"
    image_root: str = "data/shapes"
    split: str = "test"
    features: str = "auto"  # cache | live | auto (cache for towers trained here, live for pretrained ones)
    cache_dir: str = "runs/shapes/ret/cache"  # cached tower tokens (features = cache)
    output_dir: str = "runs/shapes/ret/index"
    index_kind: str = "ivfpq"  # ivfpq | ivf | flat
    nlist: int = 256  # 0: sized from the corpus's token count (TokenIndex.nlist_for_tokens)
    nprobe: int = 32
    pq_m: int = 16  # PQ sub-quantizers (must divide 128)
    pq_bits: int = 8
    chunk_size: int = 4096  # passages added per chunk
    batch_size: int = 256
    overwrite: bool = False  # rebuild even if the index matches the checkpoint and passages


def main(argv: Sequence[str] | None = None) -> Path:
    cfg = parse_config(IndexConfig, argv)
    passages_file = cfg.passages_file.format(split=cfg.split)
    passages = load_passages(passages_file, cfg.image_root)
    meta = read_meta(cfg.checkpoint, STAGE)
    built_from = {"checkpoint": str(Path(cfg.checkpoint).resolve()), "checkpoint_step": meta.get("step"),
                  "checkpoint_mtime": (Path(cfg.checkpoint) / "model.pt").stat().st_mtime,
                  "passages_file": str(Path(passages_file).resolve()), "index_kind": cfg.index_kind,
                  "nlist_asked": cfg.nlist, "pq_m": cfg.pq_m}
    out = Path(cfg.output_dir)
    if not cfg.overwrite and _built_from(out) == built_from:
        print(f"index {out} is up to date")
        return out
    device = get_device()
    model = RetrieverModel.from_pretrained(cfg.checkpoint, device=device)
    side = model.get_passage_model()
    mode = resolve_features(cfg.features, model.towers.encoder.spec)
    source = open_source(mode, cfg.cache_dir, cfg.split, model.towers, device, passages_file)
    started = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = out.parent / f".{out.name}.passages.{os.getpid()}.npy"
    try:
        emb = np.lib.format.open_memmap(scratch, mode="w+", dtype=np.float16,
                                        shape=(len(passages), side.cfg.num_queries, side.cfg.out_dim))
        encode_items(side, source, [(p.text, p.image) for p in passages], cfg.batch_size, desc="encoding passages",
                     options=cfg, out=emb)
        encoded = time.time()
        nlist = cfg.nlist or TokenIndex.nlist_for_tokens(emb.shape[0] * emb.shape[1])
        index = TokenIndex(emb.shape[2], cfg.index_kind, nlist, cfg.nprobe, cfg.pq_m, cfg.pq_bits)
        index.build(emb, [p.passage_id for p in passages], chunk_size=cfg.chunk_size)
        index.save(out, extra={"built_from": built_from, "encode_s": encoded - started,
                               "build_s": time.time() - encoded})
    finally:
        with contextlib.suppress(FileNotFoundError):
            scratch.unlink()
    print(f"indexed {len(passages)} passages ({len(passages) * emb.shape[1]} tokens) in {out}: "
          f"encode {encoded - started:.1f}s, build {time.time() - encoded:.1f}s")
    return out


def _built_from(folder: Path) -> dict | None:
    try:
        return read_json(folder / "meta.json").get("built_from")
    except InputError:
        return None


if __name__ == "__main__":
    main()
