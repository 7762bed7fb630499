"""Iterative CIR training. Round N (1..num_iterations), starting from the model of round N-1 (round 0 = --model_path):
  1. mine hard negatives over the training images with the current model  -> hard_negatives_iter_{N-1}.json
  2. the foundation model writes texts for (reference, hard negative)      -> augmented_samples_iter_N.json
  3. train on original + augmented triplets with hard negatives in the loss -> checkpoint_iter_N/
A hard-negative file is numbered by the model that mined it (the first round's mining, with the round-0 model, is
hard_negatives_iter_0.json), the other two by the round they make.
Each file stores the manifest it was computed from (checkpoint hash, config hash, generator settings) and is reused
on --auto_resume only when that manifest matches. Reads the CIRR layout under --data_dir; writes --experiment_dir
(and the frozen image encoder's token cache in its image_cache/).

Runs under torchrun unchanged: mining, generation and validation are computed in shards by every rank, training
splits each global batch over the ranks (cir.iterative.trainer), and only rank 0 writes.

    python -m cir.iterative.train_iterative --config configs/cir_iterative/shapes.yaml --data_dir ... --model_path ...
    torchrun --nproc_per_node 8 -m cir.iterative.train_iterative --config configs/cir_iterative/cirr.yaml
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import numpy as np

from cir.iterative import augment, manifest
from cir.iterative.backbones import MODEL_BACKBONES, EmbeddingBackbone, check_vlm2vec_options, load_backbone
from cir.iterative.config import GENERATION_FIELDS, TrainIterativeConfig, mining_fields, training_fields
from cir.iterative.data import Corpus, Triplet, load_split, split_listing
from cir.iterative.evaluate import evaluate_split
from cir.iterative.foundation import check_foundation_args, foundation_settings, load_foundation_model
from cir.iterative.retrieval import mine_hard_negatives
from cir.iterative.text_filter import TextFilter
from cir.iterative.trainer import discard_round_state, train_round
from core.config import config_to_dict, parse_config, save_config
from core.data import verify_images
from core.device import seed_everything
from core.distributed import (DistInfo, barrier, broadcast_object, check_batch_divisible, cleanup, init_distributed,
                              world_size_from_env)
from core.errors import InputError
from core.io import atomic_dir, atomic_write_json, file_digest, json_digest, read_json
from core.logging import Tracker, format_table, write_metrics

log = logging.getLogger("cir.iterative")
STAGE = "cir-iterative"
ROUND_FILE = "iteration.json"   # in checkpoint_iter_N/: the round's manifest, training history, stage name
CACHE_DIR = "image_cache"       # in the experiment folder: the frozen image encoder's token caches
T = TypeVar("T")


def experiment_dir(cfg: TrainIterativeConfig) -> Path:
    return Path(cfg.experiment_dir or f"experiments/{cfg.model_backbone}_{cfg.dataset_name}_iterative")


def checkpoint_dir(exp: Path, round_index: int) -> Path:
    return exp / f"checkpoint_iter_{round_index}"


def hard_negatives_file(exp: Path, round_index: int) -> Path:
    """What round N trains with: the hard negatives mined by round N-1's model, numbered by that model."""
    return exp / f"hard_negatives_iter_{round_index - 1}.json"


def training_state_dir(exp: Path, round_index: int) -> Path:
    """Round N's in-round checkpoint-last/ (scratch: removed once checkpoint_iter_N/ is written)."""
    return exp / f"training_iter_{round_index}"


def round_model_path(exp: Path, cfg: TrainIterativeConfig, round_index: int) -> str:
    return cfg.model_path if round_index == 0 else str(checkpoint_dir(exp, round_index))


def validate_config(cfg: TrainIterativeConfig) -> None:
    """Every option checked before any work starts."""
    if cfg.model_backbone not in MODEL_BACKBONES:
        raise InputError("command line", "model_backbone", f"choose one of {', '.join(MODEL_BACKBONES)}")
    if not cfg.model_path:
        raise InputError("command line", "model_path", "no round-0 model given")
    if cfg.model_backbone == "composed_retriever" and not Path(cfg.model_path).is_dir():
        raise InputError(cfg.model_path, "model_path", "round-0 model folder not found")
    if cfg.model_backbone == "qwen2_vl":
        check_vlm2vec_options(cfg)
    check_foundation_args(cfg.foundation_model_backbone, cfg.foundation_model_path)
    for name in ("num_iterations", "hard_negative_k", "batch_size", "epochs_per_round", "eval_batch_size",
                 "generation_batch_size", "augment_per_query", "max_text_words"):
        if getattr(cfg, name) < 1:
            raise InputError("command line", name, "must be at least 1")
    # A global batch is split over the ranks: refused here, before any work, when they cannot share it evenly.
    check_batch_divisible(cfg.batch_size, world_size_from_env(), "command line", "batch_size")
    if cfg.checkpoint_every < 0:
        raise InputError("command line", "checkpoint_every", "must be 0 (after each epoch only) or a number of steps")
    if not 0 <= cfg.resume_from_iteration <= cfg.num_iterations:
        raise InputError("command line", "resume_from_iteration", f"must be in 0..{cfg.num_iterations}")


def check_experiment_state(cfg: TrainIterativeConfig, exp: Path) -> None:
    """A run never silently overwrites another: an existing experiment needs --auto_resume or --resume_from_iteration."""
    if (exp / "config.yaml").is_file() and not cfg.auto_resume and not cfg.resume_from_iteration:
        raise InputError(exp, "experiment_dir", "holds an experiment already; pass --auto_resume true to continue it "
                                               "or --resume_from_iteration N to redo rounds from N")
    if cfg.resume_from_iteration > 1:
        previous = checkpoint_dir(exp, cfg.resume_from_iteration - 1) / ROUND_FILE
        if not previous.is_file():
            raise InputError(previous, "resume_from_iteration",
                             f"round {cfg.resume_from_iteration - 1} has no finished checkpoint to resume from")


def clean_stale_temporaries(exp: Path) -> int:
    """Leftovers of a killed run's atomic writes (core.io): `.{name}.*.tmp` files and folders are half-written and
    removed; a `.{name}.old` folder is the complete previous version, put back if `{name}` itself is missing (a kill
    between atomic_dir's two renames) and removed otherwise. Returns how many entries were removed."""
    removed = 0
    for folder in [exp, exp / CACHE_DIR, *sorted(exp.glob("training_iter_*"))]:
        for entry in sorted(folder.glob(".*")):
            if entry.name.endswith(".old") and entry.is_dir():
                target = entry.with_name(entry.name[1:-len(".old")])
                if not target.exists():
                    os.replace(entry, target)
                    log.info("restored %s from its previous version (killed mid-replace)", target)
                    continue
            elif not entry.name.endswith(".tmp"):
                continue
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            removed += 1
    if removed:
        log.info("removed %d half-written temporary file(s) of a killed run", removed)
    return removed


class RoundLoop:
    """The state of one run: data, corpus, and the model of the latest round (loaded only when a step needs it).
    Under torchrun every rank holds one; what a step reuses is decided by rank 0 and told to all, so the ranks
    always take the same branches (and meet at the same collectives)."""

    def __init__(self, cfg: TrainIterativeConfig, exp: Path, info: DistInfo | None = None):
        self.info = info or DistInfo()
        self.cfg, self.exp, self.device = cfg, exp, self.info.device
        self.train_triplets, train_paths = load_split(cfg.data_dir, cfg.image_root, cfg.train_split)
        self.val_triplets, val_paths = load_split(cfg.data_dir, cfg.image_root, cfg.val_split)
        listed_in = {**{n: split_listing(cfg.data_dir, cfg.train_split) for n in train_paths},
                     **{n: split_listing(cfg.data_dir, cfg.val_split) for n in val_paths}}
        if cfg.verify_images and self.info.is_main:
            verify_images([*train_paths.values(), *val_paths.values()], Path(cfg.data_dir) / "image_splits", cfg)
        barrier(self.info)
        if cfg.fast_mode:
            keep = np.random.default_rng((cfg.seed, 31337)).permutation(len(self.train_triplets))[:cfg.fast_mode_triplets]
            self.train_triplets = [self.train_triplets[i] for i in sorted(keep)]
        self.train_gallery = sorted(train_paths)
        self.val_gallery = sorted(val_paths)
        self.corpus = Corpus({**train_paths, **val_paths}, listed_in, cache_dir=exp / CACHE_DIR,
                             name=f"{cfg.train_split}-{cfg.val_split}", options=cfg)
        self.data_hash = json_digest({"train": [(t.pairid, t.reference, t.caption, t.target) for t in self.train_triplets],
                                             "gallery": self.train_gallery})
        self.model: EmbeddingBackbone | None = None
        self.model_round: int | None = None
        self.tracker = Tracker(exp, cfg, name=exp.name, enabled=cfg.wandb and self.info.is_main)

    def on_main(self, compute: Callable[[], T]) -> T:
        """Rank 0's value of `compute()` on every rank (a cache decision, a manifest)."""
        return broadcast_object(compute() if self.info.is_main else None, self.info)

    # ---- the model of a round
    def model_of(self, round_index: int) -> EmbeddingBackbone:
        if self.model_round != round_index:
            path = round_model_path(self.exp, self.cfg, round_index)
            self.model = load_backbone(self.cfg.model_backbone, path, device=self.device,
                                       cache_tokens=self.cfg.cache_image_tokens, vlm_options=self.cfg).to(self.device)
            self.model_round = round_index
            self.corpus.prepare(self.model, self.info)
        return self.model

    def model_hash(self, round_index: int) -> str:
        source = manifest.hash_model_source(round_model_path(self.exp, self.cfg, round_index))
        if round_index == 0 and self.cfg.model_backbone == "qwen2_vl" and self.cfg.model_adapter:
            source += "+" + manifest.hash_model_source(self.cfg.model_adapter)  # the round-0 model is base + adapter
        return source

    def temperature(self, model: EmbeddingBackbone) -> float:
        return model.temperature

    # ---- step 1: mining
    def mine(self, n: int, reuse: bool) -> tuple[Path, dict[str, Any]]:
        path = hard_negatives_file(self.exp, n)
        expected = self.on_main(lambda: {"round": n, "model": self.model_hash(n - 1), "data": self.data_hash,
                                         "config": manifest.config_hash(self.cfg, mining_fields(self.cfg))})
        cached = self.on_main(lambda: manifest.read_cached(path, expected) if reuse else None)
        if cached is not None:
            log.info("round %d: hard negatives reused from %s (manifest matches)", n, path.name)
            return path, cached
        model = self.model_of(n - 1)
        records, stats = mine_hard_negatives(model, self.corpus, self.train_triplets, self.train_gallery,
                                             self.cfg.hard_negative_k, self.cfg.eval_batch_size, self.info)
        data = self.on_main(lambda: {"stats": stats, "queries": records})
        if self.info.is_main:
            atomic_write_json(path, {"manifest": expected, "data": data})
        barrier(self.info)
        log.info("round %d: %d of %d training queries miss the top-1 (%.1f%%)", n, stats["missed_top1"],
                 stats["queries"], stats["missed_top1_%"])
        return path, data

    # ---- step 2: generation
    def generate(self, n: int, hn_path: Path, hard_negatives: dict[str, Any], reuse: bool) -> tuple[Path, dict[str, Any]]:
        cfg = self.cfg
        path = self.exp / f"augmented_samples_iter_{n}.json"
        expected = self.on_main(lambda: {
            "round": n, "hard_negatives": file_digest(hn_path),
            "generator": foundation_settings(cfg.foundation_model_backbone, cfg.foundation_model_path,
                                             cfg.max_new_tokens, cfg.num_beams, cfg.do_sample),
            "config": manifest.config_hash(cfg, GENERATION_FIELDS)})
        cached = self.on_main(lambda: manifest.read_cached(path, expected) if reuse else None)
        if cached is not None:
            log.info("round %d: augmented samples reused from %s (manifest matches)", n, path.name)
            return path, cached
        pairs = augment.select_pairs(hard_negatives["queries"], cfg.augment_per_query, cfg.max_augment_per_round,
                                     cfg.seed, n)
        foundation = load_foundation_model(cfg.foundation_model_backbone, cfg.foundation_model_path, self.device,
                                           cfg.max_new_tokens, cfg.num_beams, cfg.do_sample)
        samples, stats = augment.generate_augmented(foundation, self.corpus, pairs, TextFilter(cfg.max_text_words),
                                                    cfg.generation_batch_size, cfg.seed, n, info=self.info)
        del foundation
        data = self.on_main(lambda: {"stats": stats, "samples": samples})
        if self.info.is_main:
            atomic_write_json(path, {"manifest": expected, "data": data})
        barrier(self.info)
        log.info("round %d: %d generated texts kept, %d rejected %s, %.1f pairs/s", n, stats["kept"], stats["rejected"],
                 {k: v for k, v in stats.items() if k.startswith("rejected_")}, stats["pairs_per_s"] or 0)
        return path, data

    # ---- step 3: training
    def training_set(self, n: int, hard_negatives: dict[str, Any]) -> list[Triplet]:
        negatives = {r["pairid"]: tuple(h["image"] for h in r["hard_negatives"]) for r in hard_negatives["queries"]}
        originals = [Triplet(t.pairid, t.reference, t.caption, t.target, t.members, negatives.get(t.pairid, ()))
                     for t in self.train_triplets]
        rounds = range(1, n + 1) if self.cfg.accumulate_augmented else [n]
        augmented = []
        for r in rounds:
            data = read_json(self.exp / f"augmented_samples_iter_{r}.json", required=["data"])["data"]
            # The original target is the natural hard negative of a text written for the hard negative.
            augmented += [Triplet(s["pairid"], s["reference"], s["caption"], s["hard_negative"], (),
                                  (s["original_target"],), f"round {r}") for s in data["samples"] if s["kept"]]
        return originals + augmented

    def train(self, n: int, hn_path: Path, hard_negatives: dict[str, Any], reuse: bool) -> dict[str, Any]:
        cfg, folder = self.cfg, checkpoint_dir(self.exp, n)
        rounds = range(1, n + 1) if cfg.accumulate_augmented else [n]
        expected = self.on_main(lambda: {
            "round": n, "init": self.model_hash(n - 1), "hard_negatives": file_digest(hn_path),
            "augmented": [file_digest(self.exp / f"augmented_samples_iter_{r}.json") for r in rounds],
            "config": manifest.config_hash(cfg, training_fields(cfg))})
        stored = self.on_main(lambda: read_json(folder / ROUND_FILE)
                              if reuse and (folder / ROUND_FILE).is_file() else None)
        if stored is not None and stored.get("manifest") == expected:
            log.info("round %d: checkpoint reused from %s (manifest matches)", n, folder.name)
            return stored["training"]
        state_dir = training_state_dir(self.exp, n)
        if not reuse and self.info.is_main:
            discard_round_state(state_dir)  # --resume_from_iteration: this round is redone from its start
        barrier(self.info)
        triplets = self.training_set(n, hard_negatives)
        model = self.model_of(n - 1)  # restart from the previous round's best weights, fresh optimizer and schedule
        self.model_round = None  # the weights in memory change from here on: no longer round n-1's
        seed_everything(cfg.seed + n)
        result = train_round(
            model, self.corpus, triplets, epochs=1 if cfg.fast_mode else cfg.epochs_per_round,
            batch_size=cfg.batch_size, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
            warmup_steps=cfg.warmup_steps, temperature=self.temperature(model),
            negatives_per_query=cfg.negatives_per_query, seed=cfg.seed, round_index=n,
            validate=lambda m: evaluate_split(m, self.corpus, self.val_triplets, self.val_gallery, cfg.eval_batch_size,
                                              self.info),
            log=lambda metrics, step: self.tracker.log({f"round{n}/{k}": v for k, v in metrics.items()}),
            state_dir=state_dir, save_every=cfg.checkpoint_every, manifest=expected, info=self.info)
        result["augmented_in_training"] = sum(t.source != "original" for t in triplets)
        if self.info.is_main:
            with atomic_dir(folder) as tmp:
                model.save_pretrained(tmp)
                atomic_write_json(tmp / ROUND_FILE, {"stage": STAGE, "round": n, "manifest": expected,
                                                     "training": result})
            discard_round_state(state_dir)
        barrier(self.info)  # the next round's manifests hash this folder on rank 0; its model loads from it
        # The weights in memory are now round n's best: later steps of round n+1 use them without reloading.
        self.model_round = n
        log.info("round %d: best validation Avg %.2f", n, result["best_val_Avg"])
        return result

    def run(self) -> dict[str, Any]:
        cfg, summary = self.cfg, {}
        for n in range(1, cfg.num_iterations + 1):
            # --resume_from_iteration N keeps rounds < N as they are and recomputes N onwards; otherwise reuse is
            # decided by the manifests alone.
            redo = bool(cfg.resume_from_iteration) and n >= cfg.resume_from_iteration
            if cfg.resume_from_iteration and n < cfg.resume_from_iteration:
                summary[f"round{n}"] = read_json(checkpoint_dir(self.exp, n) / ROUND_FILE)["training"]
                continue
            hn_path, hard_negatives = self.mine(n, reuse=not redo)
            _, augmented = self.generate(n, hn_path, hard_negatives, reuse=not redo)
            training = self.train(n, hn_path, hard_negatives, reuse=not redo)
            summary[f"round{n}"] = {"mining": hard_negatives["stats"], "generation": augmented["stats"],
                                    "best_val_Avg": training["best_val_Avg"], "triplets": training["triplets"]}
        return summary


def round_stats(exp: Path, n: int) -> dict[str, Any]:
    """Statistics of the mining (with round n-1's model) and generation round n trained with, for the results table."""
    if n == 0:
        return {}
    out: dict[str, Any] = {}
    hn, aug = hard_negatives_file(exp, n), exp / f"augmented_samples_iter_{n}.json"
    if hn.is_file():
        s = read_json(hn)["data"]["stats"]
        out.update({"mined_queries": s["queries"], "missed_top1": s["missed_top1"], "missed_top1_%": s["missed_top1_%"]})
    if aug.is_file():
        s = read_json(aug)["data"]["stats"]
        out.update({"aug_kept": s["kept"], "aug_rejected": s["rejected"]})
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = parse_config(TrainIterativeConfig, argv)
    validate_config(cfg)  # before joining the process group: a bad option stops every rank before any work
    exp = experiment_dir(cfg)
    check_experiment_state(cfg, exp)
    info = init_distributed()
    if not info.is_main:
        log.setLevel(logging.WARNING)  # one copy of the run's messages
    barrier(info)  # every rank has checked the folder before rank 0 changes it
    if info.is_main and exp.is_dir():
        clean_stale_temporaries(exp)
    seed_everything(cfg.seed)
    loop = RoundLoop(cfg, exp, info)  # reads and checks the data before anything is written
    if info.is_main:
        save_config(cfg, exp / "config.yaml")
    summary = loop.run()
    loop.tracker.finish()
    if info.is_main:
        write_metrics(exp, {"rounds": summary, "config": config_to_dict(cfg)})
        print(format_table({r: {**s["mining"], "aug_kept": s["generation"]["kept"],
                                "aug_rejected": s["generation"]["rejected"], "val_Avg": s["best_val_Avg"]}
                            for r, s in summary.items() if "mining" in s},
                           title="iterative rounds (hard negatives mined with the previous round's model)"))
    barrier(info)
    cleanup(info)
    return summary


if __name__ == "__main__":
    main()
