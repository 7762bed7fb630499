"""Evaluate dense retrieval from stored embeddings through the faiss index: text→image Recall@K (each caption a
query) and image→text Recall@K. Reads `emb_dir/{image,text}_{split}` (written by `retriever.dense.encode`);
writes `output_dir/metrics.json`, prints a table, and adds the row to the main job's results.json if asked.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from core.config import parse_config
from core.index import VectorIndex
from core.io import open_embeddings
from core.logging import Tracker, format_table, write_metrics
from core.metrics import HEADLINE_INTERVALS, recall_from_rankings
from core.results import update_summary


@dataclass
class EvalConfig:
    emb_dir: str = "runs/shapes/dense/emb"
    split: str = "test"
    output_dir: str = "runs/shapes/dense/eval"
    index_kind: str = "flat"  # flat (exact), ivf, ivfpq, hnsw, or auto (chosen from the corpus size)
    nlist: int = 0  # IVF lists; 0 = about 4·sqrt(N) for N vectors
    nprobe: int = 0  # IVF lists searched; 0 = the index's default for its nlist
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    summary: str = ""  # path of the main job's results.json to add a row to ("" = none)
    summary_row: str = "dense/dense"  # stage/row in results.json
    wandb_project: str = "genretrieval"


def evaluate_embeddings(emb_dir: str | Path, split: str, ks: Sequence[int] = (1, 5, 10), index_kind: str = "flat",
                        nlist: int = 0, nprobe: int = 0) -> dict[str, dict[str, float]]:
    """Both directions over the stored (memory-mapped) embeddings: the index takes them block by block and the
    queries are searched block by block, so no side is held whole in float32."""
    emb_dir = Path(emb_dir)
    image_emb, image_ids = open_embeddings(emb_dir / f"image_{split}")
    text_emb, text_ids = open_embeddings(emb_dir / f"text_{split}")
    depth = max(ks)

    def index(matrix, ids) -> VectorIndex:
        return VectorIndex(matrix.shape[1], index_kind, nlist or None, nprobe or None).add(matrix, ids)

    ranked_images = _search_blocks(index(image_emb, image_ids), text_emb, depth)
    t2i = recall_from_rankings(ranked_images, [[t["imgid"]] for t in text_ids], ks, intervals=HEADLINE_INTERVALS)
    ranked_owners = _search_blocks(index(text_emb, [t["imgid"] for t in text_ids]), image_emb, depth)
    i2t = recall_from_rankings(ranked_owners, [[i] for i in image_ids], ks)
    return {"text→image": t2i, "image→text": i2t}


def _search_blocks(index: VectorIndex, queries, depth: int, block: int = 16384) -> list[list]:
    ranked: list[list] = []
    for start in range(0, len(queries), block):
        ranked += index.search(queries[start:start + block], depth)[1]
    return ranked


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    cfg = parse_config(EvalConfig, argv)
    results = evaluate_embeddings(cfg.emb_dir, cfg.split, cfg.ks, cfg.index_kind, cfg.nlist, cfg.nprobe)
    out = Path(cfg.output_dir)
    write_metrics(out, {"split": cfg.split, "index": cfg.index_kind, **results})
    tracker = Tracker(out, cfg, project=cfg.wandb_project, name=f"dense-eval-{out.parent.name}")
    tracker.log({f"test/{d}/{k}": v for d, m in results.items() for k, v in m.items()})
    tracker.finish()
    print(format_table(results, title=f"dense retrieval, {cfg.split} split ({cfg.index_kind} index)", row_header="direction"))
    if cfg.summary:
        stage, _, row = cfg.summary_row.partition("/")
        update_summary(cfg.summary, stage, {row: results["text→image"]})
    return results


if __name__ == "__main__":
    main()
