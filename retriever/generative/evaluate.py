"""Generative retrieval on a test split (`test_tir`, stage 4): constrained beam search, optionally guided by the
set identifier, scored by image id.

The queries and the gallery are exactly the dense stage's: `emb_dir/text_{split}_ids.json` (each caption a query)
and `emb_dir/image_{split}_ids.json` (the images, each with its identifier in codes.json). Writes
`output_dir/candidates.jsonl` (per query: sentid, imgid, ranked image ids, beam scores — the re-rankers' input),
`output_dir/metrics.json`, logs to wandb, and adds a row to the main job's results.json if asked.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from core.config import parse_config
from core.device import get_device
from core.io import atomic_write_jsonl, read_json
from core.logging import Tracker, format_table, write_metrics
from core.metrics import HEADLINE_INTERVALS, recall_from_rankings
from core.results import update_summary
from retriever.generative.decoding import CorpusTrie, check_prior_mode, generate_rankings, set_index_lists
from retriever.generative.model import load_retriever
from rqvae.codes import Identifiers


@dataclass
class EvaluateConfig:
    checkpoint: str = "runs/shapes/comgtir/stage3_unified/checkpoint-best"
    codes: str = "runs/shapes/comgtir/codes.json"
    emb_dir: str = "runs/shapes/dense/emb"  # the dense stage's ids: the same queries and gallery as dense/dense
    split: str = "test"
    num_beams: int = 20
    guidance: float = 1.0  # weight of the set identifier's prior (0 = sequential identifier alone)
    prior: str = "token"  # token: per-code bonus; prefix: best set score among the images a prefix reaches; both
    prefix_top: int = 500  # images kept per query (by set score) for the prefix prior
    batch_size: int = 64
    max_query_len: int = 48
    max_queries: int = 0  # 0 = all
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    output_dir: str = "runs/shapes/comgtir/eval/dual-id"
    summary: str = ""
    summary_row: str = "comgtir/dual-id"
    wandb_project: str = "genretrieval"


def load_queries(emb_dir: Path, split: str) -> tuple[list[dict], list]:
    texts = read_json(emb_dir / f"text_{split}_ids.json")
    images = read_json(emb_dir / f"image_{split}_ids.json")
    return texts, images


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    cfg = parse_config(EvaluateConfig, argv)
    check_prior_mode(cfg.prior)
    ids = Identifiers(cfg.codes)
    texts, gallery = load_queries(Path(cfg.emb_dir), cfg.split)
    ids.require(gallery, what=f"{cfg.split} image")
    if cfg.max_queries:
        texts = texts[:cfg.max_queries]
    model, tokenizer, vocab, _ = load_retriever(cfg.checkpoint)
    model.spec.check_fits(ids)
    device = get_device()
    model.to(device)
    trie = CorpusTrie(torch.from_numpy(ids.matrix(gallery)), gallery, vocab.token_ids.shape[1],
                      set_index_lists([ids.sets[str(i)] for i in gallery]))
    ranked, scores = generate_rankings(model, tokenizer, vocab, trie, [t["raw"] for t in texts], cfg.num_beams,
                                       cfg.guidance, cfg.batch_size, cfg.max_query_len, device,
                                       desc=f"generating ({cfg.split})", prior=cfg.prior, prefix_top=cfg.prefix_top)
    recall = recall_from_rankings(ranked, [[t["imgid"]] for t in texts], cfg.ks, intervals=HEADLINE_INTERVALS)
    out = Path(cfg.output_dir)
    atomic_write_jsonl(out / "candidates.jsonl", [
        {"sentid": t["sentid"], "imgid": t["imgid"], "ranked": r, "scores": s} for t, r, s in zip(texts, ranked, scores)])
    report = {**recall, "mean_candidates": sum(map(len, ranked)) / len(ranked)}
    write_metrics(out, {"split": cfg.split, "checkpoint": cfg.checkpoint, "num_beams": cfg.num_beams,
                        "guidance": cfg.guidance,
                        "prior": cfg.prior, "prefix_top": cfg.prefix_top, **report})
    tracker = Tracker(out, cfg, project=cfg.wandb_project, name=f"comgtir-eval-{out.name}")
    tracker.log({f"test/{k}": v for k, v in report.items()})
    tracker.finish()
    row = cfg.summary_row.partition("/")
    print(format_table({row[2]: report}, title=f"generative retrieval, {cfg.split} split"))
    if cfg.summary:
        update_summary(cfg.summary, row[0], {row[2]: recall})
    return report


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
