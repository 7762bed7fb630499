"""Evaluate composed retrievers with the benchmark's protocol and add the stage's rows to the main job's summary.

`python -m cir.evaluate --rows '{"pretrain+ptha": "runs/shapes/cir/pretrain+ptha/checkpoint-best", ...}'` scores
every row's model on the split (queries and gallery from cached frozen image tokens, through the same
`encode_*_from_tokens` the training used), writes `{output_dir}/metrics.json`, the CIRR test-server files of
`submission_row` (`recall_submission_{split}.json`, `recall_subset_submission_{split}.json`), and, with `--summary`,
merges the rows (and the MTST generation quality) into results.json. On a split whose targets are hidden (CIRR
test1) the metrics are skipped, saying so, and the server files are the result.
`--dataset fashioniq` scores each of `categories` against its own gallery (reference kept) and reports per-category
R@10/R@50, their means and Avg = (R@10 + R@50)/2 (rows under stage "cir-fashioniq" unless `--stage` says otherwise).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from cir.data import FASHIONIQ_CATEGORIES, CIRSplit, cache_key, load_cir_split, merge_splits
from cir.features import TokenBank, check_mode, token_source
from cir.metrics import cirr_avg_interval, cirr_metrics, fashioniq_recall, fashioniq_summary, write_cirr_submission
from cir.retriever import ComposedRetriever
from core.config import parse_config, save_config
from core.data import LoaderOptions, verify_images
from core.device import autocast, set_threads
from core.errors import InputError
from core.io import read_json
from core.logging import format_table, write_metrics
from core.results import update_summary


@dataclass
class EvalConfig(LoaderOptions):
    dataset: str = "cirr"  # "cirr" (CIRR layout, Shapes included) or "fashioniq"
    categories: list[str] = field(default_factory=lambda: list(FASHIONIQ_CATEGORIES))  # FashionIQ only
    cirr_root: str = "data/shapes/cirr"  # the dataset's folder (captions/, image_splits/), CIRR or FashionIQ
    image_root: str = ""  # default {cirr_root}/img_raw (CIRR) or {cirr_root}/images (FashionIQ)
    split: str = "test"  # FashionIQ is evaluated on val; CIRR test1 (targets hidden) gives the server files only
    image_ext: str = ".png"  # FashionIQ image files are {name}{image_ext} (copies come as .png or .jpg)
    rows: dict = field(default_factory=dict)  # row name → retriever folder
    output_dir: str = "runs/shapes/cir/eval"
    cache_dir: str = ""  # default {output_dir}/../features
    image_tokens: str = "cache"  # "cache" (float16 memory-mapped, the Shapes default) or "live" (real ViT-g towers)
    mtst_metrics: str = ""  # the generator's metrics.json, reported beside the rows ("" = none)
    submission_row: str = "pretrain+ptha"  # whose CIRR test-server files to write ("" = none; CIRR only, and
    # required where the split hides its targets)
    summary: str = ""  # results.json of the main job ("" = do not write)
    stage: str = ""  # results.json stage; default "cir" (CIRR) or "cir-fashioniq"
    threads: int = 0  # torch CPU threads; 0 = one per core, 1 when the CPU is shared with other busy jobs


@torch.no_grad()
def score_split(model: ComposedRetriever, split: CIRSplit, bank: TokenBank, batch_size: int = 256) -> np.ndarray:
    """scores[q, j]: the model's similarity of query q (reference + text) with gallery image j, in `split.gallery`
    order, by the rule it was trained with (`ComposedRetriever.similarity`: the max over the target's token
    embeddings for the official variant, the cosine for the project one). `bank` is a token source
    (cir.features): a cache, or the tower run live on the loader's batches."""
    model.eval()
    device = model.device
    gallery = split.gallery
    chunks = [gallery[i:i + batch_size] for i in range(0, len(gallery), batch_size)]
    with autocast(device):
        # [N, T, D]: one embedding per query token (official variant, scored by the max over them) or one (project)
        targets = torch.cat([model.encode_target_tokens_from_tokens(tokens.get(names, device)).float()
                             for names, tokens in zip(chunks, bank.batches(chunks))])
        triplets = [split.triplets[i:i + batch_size] for i in range(0, len(split.triplets), batch_size)]
        refs = [[t.reference for t in chunk] for chunk in triplets]
        scores = [model.similarity(model.encode_queries_from_tokens(tokens.get(names, device),
                                                                    [t.caption for t in chunk]).float(), targets)
                  for chunk, names, tokens in zip(triplets, refs, bank.batches(refs))]
    return torch.cat(scores).cpu().numpy()


def split_metrics(parts: Sequence[CIRSplit], scores: Sequence[np.ndarray]) -> dict[str, float]:
    """The benchmark's metrics from each unit's scores: CIRR R@K/Rs@K/Avg, or FashionIQ per-category R@10/R@50
    (reference kept in the gallery), their means and Avg. Both carry "Avg", the model-selection figure."""
    if parts[0].meta.get("dataset") == "fashioniq":
        return fashioniq_summary({p.meta["category"]: fashioniq_recall(s, p.gallery, p.triplets)
                                  for p, s in zip(parts, scores)})
    if len(parts) != 1:
        raise ValueError(f"CIRR has one gallery per split, got {len(parts)} units")
    return cirr_metrics(scores[0], parts[0].gallery, parts[0].triplets)


def evaluate_model(model: ComposedRetriever, split: CIRSplit | Sequence[CIRSplit], bank: TokenBank) -> dict[str, float]:
    """Metrics of `model` on a split (a CIRSplit, or the units `load_cir_split` returns); `bank` holds every image."""
    parts = [split] if isinstance(split, CIRSplit) else list(split)
    return split_metrics(parts, [score_split(model, p, bank) for p in parts])


def check_submission_row(cfg: EvalConfig, split: CIRSplit) -> None:
    """A split that hides its targets has no metric: its only result is the server files, so their row must be
    one of the rows evaluated."""
    if split.hides_targets and cfg.submission_row not in cfg.rows:
        raise InputError("command line", "submission_row",
                         f"{split.name} hides its targets, so the server files are its only result; name the row "
                         f"to write them for (one of {sorted(cfg.rows)}), got {cfg.submission_row!r}")


def main(argv: Sequence[str] | None = None) -> dict:
    cfg = parse_config(EvalConfig, argv)
    set_threads(cfg.threads)
    check_mode(cfg.image_tokens)
    if not cfg.rows:
        raise InputError("command line", "rows", "name at least one row: --rows '{\"row\": \"folder\"}'")
    for row, folder in cfg.rows.items():
        if not (Path(folder) / "meta.json").is_file():
            raise InputError(folder, f"rows.{row}", "not a retriever folder (meta.json is missing)")
    parts = load_cir_split(cfg.dataset, cfg.cirr_root, cfg.split, cfg.categories, cfg.image_root or None,
                           require_targets=False, image_ext=cfg.image_ext)
    split = merge_splits(parts)  # every image of the split, for one token cache
    check_submission_row(cfg, split)
    if cfg.verify_images:
        verify_images(list(split.images.values()), cfg.cirr_root, cfg)
    out = Path(cfg.output_dir)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else out.parent / "features"
    cache_prefix = cache / cache_key(cfg.dataset, cfg.cirr_root, cfg.split, cfg.categories)
    results: dict[str, dict] = {}
    submission: dict[str, str] = {}
    rows = cfg.rows
    if split.hides_targets:
        print(f"[cir.evaluate] {split.name} has no target_hard (targets hidden, scored by the evaluation server "
              f"only): metrics skipped; writing the server files of row {cfg.submission_row!r} to {out}")
        rows = {cfg.submission_row: cfg.rows[cfg.submission_row]}
    for row, folder in rows.items():
        model = ComposedRetriever.from_pretrained(folder)
        # rows on the same tower share one cache; another tower's rebuilds it
        bank = token_source(cfg.image_tokens, model.image_encoder, split.images, cache_prefix, cfg)
        scores = [score_split(model, p, bank) for p in parts]
        if row == cfg.submission_row and cfg.dataset == "cirr":
            paths = write_cirr_submission(out, scores[0], split.gallery, split.triplets, name=cfg.split)
            submission = {"row": row, "recall": paths[0].name, "recall_subset": paths[1].name}
        if not split.hides_targets:
            results[row] = split_metrics(parts, scores)
            if cfg.dataset == "cirr":
                results[row]["Avg 95% CI"] = cirr_avg_interval(scores[0], split.gallery, split.triplets)
    if split.hides_targets:
        save_config(cfg, out / "config.yaml")
        write_metrics(out, {"dataset": cfg.dataset, "split": cfg.split, "n_queries": len(split.triplets),
                            "n_gallery": len(split.gallery), "rows": {}, "submission": submission,
                            "metrics_skipped": "targets hidden (evaluation server only)"})
        return {}
    summary_rows = dict(results)
    if cfg.mtst_metrics:
        gen = read_json(cfg.mtst_metrics)
        test = gen.get("test") or gen.get("val") or {}
        summary_rows["mtst-generator"] = {k: v for k, v in test.items()
                                          if k in ("ROUGE-1", "ROUGE-L", "chance/ROUGE-L", "exact")}
    save_config(cfg, out / "config.yaml")
    sizes = {"n_queries": len(split.triplets), "n_gallery": len(split.gallery)}
    if cfg.dataset == "fashioniq":
        sizes["per_category"] = {p.meta["category"]: {"n_queries": len(p.triplets), "n_gallery": len(p.gallery)}
                                 for p in parts}
    write_metrics(out, {"dataset": cfg.dataset, "split": cfg.split, **sizes, "rows": summary_rows,
                        **({"submission": submission} if submission else {})})
    if cfg.summary:
        update_summary(cfg.summary, cfg.stage or ("cir" if cfg.dataset == "cirr" else "cir-fashioniq"), summary_rows)
    print(format_table(summary_rows, title=f"CIR on {split.name} ({len(split.triplets)} queries, "
                                           f"{len(split.gallery)} images)"))
    return summary_rows


if __name__ == "__main__":
    main()
