"""Search queries through a ReT token index: faiss gathers candidate passages, exact MaxSim ranks them.

Reads a ReT folder (`checkpoint`), the index (`index_dir`, python -m retriever.ret.index), the queries JSONL
(checked against the indexed corpus: a positive id the corpus lacks is counted and printed, or an InputError
with `strict`) and the tower-token cache; writes `output_file` (JSONL: question_id, passage_ids, scores, best first) and `{output_file}.json`
with the timing.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from core.config import parse_config
from core.data import LoaderOptions
from core.device import get_device
from core.io import atomic_write_json, atomic_write_jsonl
from retriever.ret.data import load_queries, report_missing_positives
from retriever.ret.features import open_source, resolve_features
from retriever.ret.model import RetrieverModel
from retriever.ret.retrieval import encode_items
from retriever.ret.token_index import TokenIndex


@dataclass
class SearchConfig(LoaderOptions):
    checkpoint: str = "runs/shapes/ret/ret/checkpoint-best"
    index_dir: str = "runs/shapes/ret/index"
    queries_file: str = "data/shapes/m2kr/shapes_{split}.jsonl"
    image_root: str = "data/shapes"
    split: str = "test"
    features: str = "auto"  # cache | live | auto (cache for towers trained here, live for pretrained ones)
    cache_dir: str = "runs/shapes/ret/cache"  # cached tower tokens (features = cache)
    use_instruction: bool | None = None  # None: as the checkpoint was trained (saved in its retriever.json)
    strict: bool = False  # a positive id missing from the indexed corpus: an error (False: counted and printed)
    k: int = 100  # passages returned per query
    per_token: int = 64  # nearest passage tokens each query token gathers (candidate generation)
    batch_size: int = 256
    output_file: str = "runs/shapes/ret/search/rankings_test.jsonl"


def main(argv: Sequence[str] | None = None) -> Path:
    cfg = parse_config(SearchConfig, argv)
    index = TokenIndex.load(cfg.index_dir)
    queries_file = cfg.queries_file.format(split=cfg.split)
    queries = load_queries(queries_file, cfg.image_root, set(index.ids), strict=cfg.strict)
    report_missing_positives(queries, set(index.ids), queries_file)
    device = get_device()
    model = RetrieverModel.from_pretrained(cfg.checkpoint, device=device)
    mode = resolve_features(cfg.features, model.towers.encoder.spec)
    source = open_source(mode, cfg.cache_dir, cfg.split, model.towers, device, queries_file)
    started = time.time()
    use_instruction = model.config.use_instruction if cfg.use_instruction is None else cfg.use_instruction
    emb = encode_items(model.get_query_model(), source, [(q.text(use_instruction), q.image) for q in queries],
                       cfg.batch_size, desc="encoding queries", options=cfg)
    encoded = time.time()
    scores, ids = index.search(emb, cfg.k, per_token=cfg.per_token)
    searched = time.time()
    out = Path(cfg.output_file)
    atomic_write_jsonl(out, [{"question_id": q.question_id, "passage_ids": row, "scores": [float(s) for s in sc[:len(row)]]}
                             for q, row, sc in zip(queries, ids, scores)])
    timing = {"n_queries": len(queries), "encode_s": encoded - started, "search_s": searched - encoded,
              "search_ms_per_query": 1000 * (searched - encoded) / len(queries), "per_token": cfg.per_token, "k": cfg.k}
    atomic_write_json(out.with_name(out.name + ".json"), timing)
    print(f"searched {len(queries)} queries: {timing['search_ms_per_query']:.1f} ms/query; rankings in {out}")
    return out


if __name__ == "__main__":
    main()
