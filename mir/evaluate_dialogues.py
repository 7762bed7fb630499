"""Evaluate stored dialogues with ChatIR's protocol: at round L the query is `", ".join(dialog[:L+1])`,
ranked against the search space by the retriever (a dense folder, ChatIR's BLIP, a pretrained name: mir.retrieval);
cumulative Hits@10 per round.

Works on ChatIR's own files (`VisDial_v1.0_queries_val.json` + `Search_Space_val_50k.json`) and on the
`dialogues.json` a MIR run writes. The search space is encoded once into a float16 cache under
`output_dir/cache/` (mir.retrieval). Writes `output_dir/metrics.json` (and a results.json row with --summary).

    python -m mir.evaluate_dialogues --config configs/mir/chatir_visdial.yaml
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from core.config import parse_config
from core.data import LoaderOptions, verify_images
from core.device import get_device
from core.logging import write_metrics
from core.results import update_summary
from mir.chatir import chatir_query, dialogue_rounds, load_chatir
from mir.metrics import summarise
from mir.retrieval import DenseSearcher


@dataclass
class EvaluateDialoguesConfig(LoaderOptions):
    dialogues_json: str = "runs/shapes/mir/text-only/dialogues.json"
    search_space_json: str = "data/shapes/chatir/search_space_test.json"
    image_root: str = "data/shapes"
    # retriever (mir.retrieval): a dense folder, a BLIP folder (mir.convert_blip), open_clip:<model>[:<tag>] or blip:<name>
    dense_checkpoint: str = "runs/shapes/dense/checkpoint-best"
    output_dir: str = "runs/shapes/mir/replay"
    rounds: int = -1  # -1: as many as the shortest dialogue has
    n_targets: int = -1  # the first n dialogues; -1: all
    batch_size: int = 512
    summary: str = ""
    summary_row: str = "chatir-protocol"


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    cfg = parse_config(EvaluateDialoguesConfig, argv)
    data = load_chatir(cfg.dialogues_json, cfg.search_space_json, cfg.image_root,
                       first=None if cfg.n_targets < 0 else cfg.n_targets)
    rounds = dialogue_rounds(data.dialogues, None if cfg.rounds < 0 else cfg.rounds)
    paths = [data.path(p) for p in data.search_space]
    if cfg.verify_images:
        verify_images(paths, cfg.search_space_json, cfg)
    searcher = DenseSearcher(cfg.dense_checkpoint, paths, data.search_space, Path(cfg.output_dir) / "cache",
                             get_device(), loader=cfg, listed_in=cfg.search_space_json)
    targets = [d.img for d in data.dialogues]
    ranks = np.zeros((len(targets), rounds + 1))
    truncated = 0
    with torch.no_grad():
        for r in range(rounds + 1):
            queries = [chatir_query(d.dialog, r) for d in data.dialogues]
            truncated += sum(searcher.truncated(q) for q in queries)
            for i in range(0, len(queries), cfg.batch_size):
                ranks[i:i + cfg.batch_size, r] = searcher.rank_texts(queries[i:i + cfg.batch_size], targets[i:i + cfg.batch_size])[0]
    metrics = summarise(ranks)
    metrics["truncated queries %"] = float(100 * truncated / ranks.size)
    write_metrics(cfg.output_dir, metrics)
    print("ChatIR protocol, cumulative Hits@10 per round:", " ".join(f"{h:.1f}" for h in metrics["Hits@10"]),
          f"(N = {len(targets)})")
    if cfg.summary:
        update_summary(cfg.summary, "mir", {cfg.summary_row: metrics})
    return metrics


if __name__ == "__main__":
    main()
