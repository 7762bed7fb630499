"""Evaluate ReT and its ablations on a split by the M2KR protocol (retriever/ret/protocol.py): Recall@K and, for
queries with answers, Pseudo Recall@K by exhaustive MaxSim; and how often the faiss index finds the same top-10.

Reads `run_dir/{variant}/checkpoint-best` for each variant (or one `checkpoint`: a ReT folder or a published
checkpoint such as aimagelab/ReT-CLIP-ViT-L-14, reported as row `row`), the split's queries/passages JSONL, the
tower-token cache, and (for the `index` row) the index folder and the search step's rankings. Writes
`output_dir/metrics.json` and, with `summary`, the rows ret/{variant} and ret/index of the main job's
results.json.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from core.config import parse_config
from core.data import LoaderOptions
from core.device import get_device
from core.errors import InputError
from core.io import read_jsonl
from core.logging import format_table, write_metrics
from core.results import update_summary
from retriever.ret.data import M2KRSplit, load_m2kr
from retriever.ret.features import open_source, resolve_features
from retriever.ret.model import RetrieverModel
from retriever.ret.protocol import M2KR_KS, m2kr_metrics
from retriever.ret.retrieval import encode_items, exact_topk, passage_items, query_items
from retriever.ret.token_index import TokenIndex
from retriever.ret.train import VARIANTS


@dataclass
class EvalConfig(LoaderOptions):
    run_dir: str = "runs/shapes/ret"  # holds {variant}/checkpoint-best
    variants: list = field(default_factory=lambda: list(VARIANTS))
    checkpoint: str = ""  # one ReT folder or published checkpoint (path or hub name) instead of run_dir's variants
    row: str = "ret"  # the row name of `checkpoint`
    queries_file: str = "data/shapes/m2kr/shapes_{split}.jsonl"
    passages_file: str = "data/shapes/m2kr/shapes_passages_{split}.jsonl"
    image_root: str = "data/shapes"
    split: str = "test"
    features: str = "auto"  # cache | live | auto (cache for towers trained here, live for pretrained ones)
    cache_dir: str = "runs/shapes/ret/cache"  # cached tower tokens (features = cache)
    use_instruction: bool | None = None  # None: as the checkpoint was trained (saved in its retriever.json)
    ks: list = field(default_factory=lambda: list(M2KR_KS))  # the K of Recall@K / Pseudo Recall@K
    strict: bool = False  # a positive id missing from the corpus: an error (False: a miss, counted and printed)
    index_dir: str = "runs/shapes/ret/index"  # '' = skip the index check
    rankings_file: str = "runs/shapes/ret/search/rankings_test.jsonl"
    index_variant: str = "ret"  # the variant the index was built with
    output_dir: str = "runs/shapes/ret/eval"
    summary: str = ""  # results.json of the main job to update ('' = don't)
    stage: str = "ret"


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    cfg = parse_config(EvalConfig, argv)
    files = (cfg.queries_file.format(split=cfg.split), cfg.passages_file.format(split=cfg.split))
    split = load_m2kr(*files, cfg.image_root, strict=cfg.strict)
    texts = {p.passage_id: p.text for p in split.passages}
    checkpoints = {cfg.row: cfg.checkpoint} if cfg.checkpoint else \
        {v: str(Path(cfg.run_dir) / v / "checkpoint-best") for v in cfg.variants}
    for variant, folder in checkpoints.items():
        if not cfg.checkpoint and not Path(folder).is_dir():
            raise InputError(folder, "run_dir", "no trained model here")
    device = get_device()
    rows: dict[str, dict[str, float]] = {}
    query_emb = {}
    for variant, folder in checkpoints.items():
        model = RetrieverModel.from_pretrained(folder, device=device)
        mode = resolve_features(cfg.features, model.towers.encoder.spec)
        source = open_source(mode, cfg.cache_dir, cfg.split, model.towers, device, " / ".join(files))
        use_instruction = model.config.use_instruction if cfg.use_instruction is None else cfg.use_instruction
        q = encode_items(model.get_query_model(), source, query_items(split, use_instruction),
                         desc=f"{variant} queries", options=cfg)
        p = encode_items(model.get_passage_model(), source, passage_items(split), desc=f"{variant} passages",
                         options=cfg)
        query_emb[variant] = q
        _, top = exact_topk(q, p, max(cfg.ks), desc=f"{variant} exact MaxSim", device=device)
        ranked = [[split.passages[r].passage_id for r in row] for row in top]
        rows[variant] = m2kr_metrics(ranked, split.queries, texts, cfg.ks)
    if cfg.index_dir:
        if cfg.index_variant not in query_emb:
            raise InputError("command line", "index_variant", f"{cfg.index_variant!r} is not among the variants evaluated")
        rows["index"] = index_agreement(cfg, split, query_emb[cfg.index_variant], texts)
    print(format_table(rows, title=f"ReT on {cfg.split} ({len(split.queries)} queries, {len(split.passages)} passages)",
                       row_header="variant"))
    write_metrics(cfg.output_dir, {"split": cfg.split, "n_queries": len(split.queries),
                                   "n_passages": len(split.passages), "missing_positives": split.missing_positives,
                                   **rows})
    if cfg.summary:  # the main job's table keeps its columns; metrics.json has every K
        update_summary(cfg.summary, cfg.stage, {row: {k: v for k, v in m.items() if k in SUMMARY_KEYS}
                                                for row, m in rows.items()})
    return rows


SUMMARY_KEYS = ("R@1", "R@5", "R@10", "R@1 95% CI", "R@10 95% CI", "top10_agreement", "top10_same_order")


def index_agreement(cfg: EvalConfig, split: M2KRSplit, queries: np.ndarray, texts: dict[str, str]) -> dict[str, float]:
    """% of queries whose index top-10 is exactly the exhaustive-MaxSim top-10 (as a set, and in order), over the
    very embeddings the index stores; plus the index's own Recall@K."""
    index = TokenIndex.load(cfg.index_dir)
    ranked = {r["question_id"]: r["passage_ids"] for r in read_jsonl(cfg.rankings_file, required=["question_id", "passage_ids"])}
    missing = [q.question_id for q in split.queries if q.question_id not in ranked]
    if missing:
        raise InputError(cfg.rankings_file, "question_id", f"no ranking for query {missing[0]!r} (rerun the search step)")
    _, top = exact_topk(queries, index.passages, 10, desc="exact MaxSim over the indexed corpus")
    same_set = same_order = 0
    for q, row in zip(split.queries, top):
        exact = [index.ids[r] for r in row]
        found = ranked[q.question_id][:10]
        same_set += set(found) == set(exact)
        same_order += found == exact
    n = len(split.queries)
    recall = m2kr_metrics([ranked[q.question_id] for q in split.queries], split.queries, texts, cfg.ks)
    return {"top10_agreement": 100.0 * same_set / n, "top10_same_order": 100.0 * same_order / n, **recall}


if __name__ == "__main__":
    main()
