"""Evaluate every round's model (or the rounds in --iterations) of a train_iterative experiment on one split with
the CIRR metrics; writes `evaluation_results.json` in the experiment folder, beside it each round's CIRR
evaluation-server files (`recall_submission_{split}_round{N}.json`, `recall_subset_submission_{split}_round{N}.json`,
cir.metrics' writer), and, with --summary, rows round0..roundN (metrics + the statistics of the mining that round's
training used) into the main job's results.json. On a split whose targets are hidden (CIRR test1) the metrics are
skipped, saying so, and the server files are the result. The frozen image encoder's tokens of the split are cached in
the experiment's image_cache/. Runs under torchrun too (embeddings computed in shards, rank 0 writes).

    python -m cir.iterative.eval_iterative --experiment_dir experiments/composed_retriever_shapes_iterative --iterations "1,3,5"
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from cir.iterative.backbones import load_backbone
from cir.iterative.config import EvalIterativeConfig, TrainIterativeConfig
from cir.iterative.data import Corpus, load_split, split_listing
from cir.iterative.evaluate import cirr_metrics_from_scores
from cir.iterative.retrieval import score_queries
from cir.iterative.train_iterative import CACHE_DIR, ROUND_FILE, checkpoint_dir, round_model_path, round_stats
from cir.metrics import cirr_avg_interval, write_cirr_submission
from core.config import load_saved_config, parse_config
from core.data import verify_images
from core.device import seed_everything
from core.distributed import barrier, cleanup, init_distributed
from core.errors import InputError
from core.io import atomic_write_json
from core.logging import format_table
from core.results import update_summary

log = logging.getLogger("cir.iterative")


def available_rounds(exp: Path, train_cfg: TrainIterativeConfig) -> list[int]:
    """Round 0 and every round whose checkpoint finished (its iteration.json is written last, inside the folder)."""
    return [0] + [n for n in range(1, train_cfg.num_iterations + 1) if (checkpoint_dir(exp, n) / ROUND_FILE).is_file()]


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = parse_config(EvalIterativeConfig, argv)
    exp = Path(cfg.experiment_dir)
    if not cfg.experiment_dir or not (exp / "config.yaml").is_file():
        raise InputError(exp / "config.yaml", "experiment_dir", "not a train_iterative experiment folder")
    train_cfg = load_saved_config(TrainIterativeConfig, exp / "config.yaml")
    found = available_rounds(exp, train_cfg)
    rounds = list(cfg.iterations) or found
    for n in rounds:
        if n not in found:
            raise InputError(checkpoint_dir(exp, n), "iterations", f"round {n} has no finished checkpoint in {exp}")
    seed_everything(cfg.seed)
    data_dir = cfg.data_dir or train_cfg.data_dir
    triplets, paths = load_split(data_dir, cfg.image_root or train_cfg.image_root, cfg.eval_dataset,
                                 require_targets=False)
    hidden = all(t.target is None for t in triplets)  # the loader admits all targets or none
    listing = split_listing(data_dir, cfg.eval_dataset)
    if cfg.verify_images:
        verify_images(list(paths.values()), listing, cfg)
    info = init_distributed()
    if not info.is_main:
        log.setLevel(logging.WARNING)
    corpus = Corpus(paths, {n: listing for n in paths}, cache_dir=exp / CACHE_DIR, name=f"eval-{cfg.eval_dataset}",
                    options=cfg)
    gallery = sorted(paths)
    out = Path(cfg.output_file) if Path(cfg.output_file).is_absolute() else exp / cfg.output_file
    if hidden and info.is_main:
        print(f"[eval_iterative] {cfg.eval_dataset} has no target_hard (targets hidden, scored by the evaluation "
              f"server only): metrics skipped; writing each round's server files to {out.parent}")
    results: dict[str, dict[str, Any]] = {}
    submissions: dict[str, dict[str, str]] = {}
    for n in rounds:
        model = load_backbone(train_cfg.model_backbone, round_model_path(exp, train_cfg, n), device=info.device,
                              cache_tokens=train_cfg.cache_image_tokens, vlm_options=train_cfg)
        corpus.prepare(model.to(info.device), info)
        scores = score_queries(model, corpus, triplets, gallery, cfg.eval_batch_size, info)
        if info.is_main:
            written = write_cirr_submission(out.parent, scores, gallery, triplets, name=f"{cfg.eval_dataset}_round{n}")
            submissions[f"round{n}"] = {"recall": written[0].name, "recall_subset": written[1].name}
        metrics = {} if hidden else {**cirr_metrics_from_scores(scores, triplets, gallery),
                                     "Avg 95% CI": cirr_avg_interval(scores, gallery, triplets)}
        results[f"round{n}"] = {**metrics, **round_stats(exp, n)}
        if not hidden:
            log.info("round %d on %s: R@1 %.2f  Avg %.2f", n, cfg.eval_dataset, metrics["R@1"], metrics["Avg"])
    if info.is_main:
        atomic_write_json(out, {"split": cfg.eval_dataset, "queries": len(triplets), "gallery": len(gallery),
                                **({"metrics_skipped": "targets hidden (evaluation server only)"} if hidden else {}),
                                "rounds": results, "submission": submissions})
        if cfg.summary and not hidden:
            update_summary(cfg.summary, cfg.summary_stage, results)
        print(format_table(results,
                           title=f"iterative CIR on {cfg.eval_dataset} (rounds; stats of the mining each round "
                                 "trained with)"))
    barrier(info)
    cleanup(info)
    return results


if __name__ == "__main__":
    main()
