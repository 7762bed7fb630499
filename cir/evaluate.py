"""Evaluate composed retrievers with the CIRR protocol and add the stage's rows to the main job's summary.

`python -m cir.evaluate --rows '{"pretrain+ptha": "runs/shapes/cir/pretrain+ptha/checkpoint-best", ...}'` scores
every row's model on the split (queries and gallery from cached frozen image tokens, through the same
`encode_*_from_tokens` the training used), writes `{output_dir}/metrics.json`, the CIRR test-server files of
`submission_row`, and, with `--summary`, merges the rows (and the MTST generation quality) into results.json.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from cir.data import CIRSplit, load_cirr
from cir.features import TokenBank, token_bank
from cir.metrics import cirr_metrics, write_cirr_submission
from cir.retriever import ComposedRetriever
from core.config import parse_config, save_config
from core.device import set_threads
from core.errors import InputError
from core.io import read_json
from core.logging import format_table, write_metrics
from core.results import update_summary


@dataclass
class EvalConfig:
    cirr_root: str = "data/shapes/cirr"
    image_root: str = ""
    split: str = "test"
    rows: dict = field(default_factory=dict)  # row name → retriever folder
    output_dir: str = "runs/shapes/cir/eval"
    cache_dir: str = ""  # default {output_dir}/../features
    mtst_metrics: str = ""  # the generator's metrics.json, reported beside the rows ("" = none)
    submission_row: str = "pretrain+ptha"  # whose CIRR test-server files to write ("" = none)
    summary: str = ""  # results.json of the main job ("" = do not write)
    stage: str = "cir"
    threads: int = 0  # torch CPU threads; 0 = one per core, 1 when the CPU is shared with other busy jobs


@torch.no_grad()
def score_split(model: ComposedRetriever, split: CIRSplit, bank: TokenBank, batch_size: int = 256) -> np.ndarray:
    """scores[q, j]: cosine of query q (reference + text) with gallery image j, in `split.gallery` order."""
    model.eval()
    device = model.device
    gallery = split.gallery
    targets = torch.cat([model.encode_targets_from_tokens(bank.get(gallery[i:i + batch_size], device))
                         for i in range(0, len(gallery), batch_size)])
    queries = []
    for i in range(0, len(split.triplets), batch_size):
        chunk = split.triplets[i:i + batch_size]
        queries.append(model.encode_queries_from_tokens(bank.get([t.reference for t in chunk], device),
                                                        [t.caption for t in chunk]))
    return (torch.cat(queries) @ targets.T).cpu().numpy()


def evaluate_model(model: ComposedRetriever, split: CIRSplit, bank: TokenBank) -> dict[str, float]:
    return cirr_metrics(score_split(model, split, bank), split.gallery, split.triplets)


def main(argv: Sequence[str] | None = None) -> dict:
    cfg = parse_config(EvalConfig, argv)
    set_threads(cfg.threads)
    if not cfg.rows:
        raise InputError("command line", "rows", "name at least one row: --rows '{\"row\": \"folder\"}'")
    for row, folder in cfg.rows.items():
        if not (Path(folder) / "meta.json").is_file():
            raise InputError(folder, f"rows.{row}", "not a retriever folder (meta.json is missing)")
    split = load_cirr(cfg.cirr_root, cfg.split, cfg.image_root or None)
    out = Path(cfg.output_dir)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else out.parent / "features"
    results: dict[str, dict] = {}
    for row, folder in cfg.rows.items():
        model = ComposedRetriever.from_pretrained(folder)
        bank = token_bank(model.image_encoder, split.images, cache / f"{Path(cfg.cirr_root).name}_{cfg.split}.pt")
        scores = score_split(model, split, bank)
        results[row] = cirr_metrics(scores, split.gallery, split.triplets)
        if row == cfg.submission_row:
            write_cirr_submission(out, scores, split.gallery, split.triplets, name=cfg.split)
    summary_rows = dict(results)
    if cfg.mtst_metrics:
        gen = read_json(cfg.mtst_metrics)
        test = gen.get("test") or gen.get("val") or {}
        summary_rows["mtst-generator"] = {k: v for k, v in test.items()
                                          if k in ("ROUGE-1", "ROUGE-L", "chance/ROUGE-L", "exact")}
    save_config(cfg, out / "config.yaml")
    write_metrics(out, {"split": cfg.split, "n_queries": len(split.triplets), "n_gallery": len(split.gallery),
                        "rows": summary_rows})
    if cfg.summary:
        update_summary(cfg.summary, cfg.stage, summary_rows)
    print(format_table(summary_rows, title=f"CIR on {split.name} ({len(split.triplets)} queries, "
                                           f"{len(split.gallery)} images)"))
    return summary_rows


if __name__ == "__main__":
    main()
