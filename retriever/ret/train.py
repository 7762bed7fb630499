"""Train ReT (and its ablations) on M2KR-style data with the towers frozen: in-batch contrastive loss on MaxSim.

Reads the train/val splits (queries + passages JSONL), the towers (`encoder`: a dual-encoder folder) and, for
`features` = cache, their cached per-layer tokens (python -m retriever.ret.cache); for `features` = live the
towers run on every batch from a DataLoader. Writes, for each variant, `output_dir/{variant}/` with
`config.yaml`, `checkpoint-last/` (cells, optimizer, scheduler, step, RNG: a rerun with the same config
continues it, core.run_folder) and
`checkpoint-best/` (best validation mean recall; a folder that `RetrieverModel.from_pretrained` opens; the
frozen towers are named in it, not copied), and `metrics.json`.
Runs under torchrun unchanged: each rank encodes its share of the global batch, the query and passage tokens are
gathered across ranks with gradients, rank 0 validates and writes.
Variants: `ret` (the model), `text-only` / `image-only` (one modality masked out on both sides, R4-R6 with
m = 0), `single-layer` (one step of the cell on the towers' last layer: fusion without recurrence).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from core.checkpoint import BEST, LAST, BestTracker, read_meta, resume, save_checkpoint
from core.config import dataclass_keys, nested_keys, parse_config, save_config
from core.data import EpochBatchSampler, LoaderOptions, verify_images
from core.device import autocast, derive_seed, seed_everything
from core.distributed import (DistInfo, all_reduce_mean, barrier, check_batch_divisible, cleanup, gather_with_grad,
                              init_distributed, shard_range, world_size_from_env, wrap_model)
from core.encoders import DualEncoder, load_dual_encoder, spec_image_token_layers
from core.errors import InputError
from core.io import read_json
from core.logging import Tracker, format_table, progress, write_metrics
from core.metrics import mean_recall, recall_from_rankings
from core.run_folder import MAY_CHANGE_ON_RESUME, RunStart, open_run_folder
from core.schedule import warmup_cosine
from retriever.ret.data import M2KRSplit, load_m2kr
from retriever.ret.features import CachedSource, Item, LiveSource, item_loader, open_source, resolve_features
from retriever.ret.model import STAGE, FrozenTowers, RetConfig, RetrieverConfig, RetrieverModel, contrastive_loss, layer_strategy
from retriever.ret.retrieval import encode_items, exact_topk, passage_items, query_items

VARIANTS = ("ret", "text-only", "image-only", "single-layer")


@dataclass
class TrainConfig(LoaderOptions):
    encoder: str = "runs/shapes/dense/checkpoint-best"  # frozen towers: a dual-encoder folder
    queries_file: str = "data/shapes/m2kr/shapes_{split}.jsonl"  # {split} is replaced
    passages_file: str = "data/shapes/m2kr/shapes_passages_{split}.jsonl"
    image_root: str = "data/shapes"
    # Where the towers' tokens come from: 'cache' reads cache_dir (python -m retriever.ret.cache), 'live' runs the
    # frozen towers on every batch. 'auto' = cache for towers built from a spec (the Shapes world: megabytes), live
    # for pretrained towers (every layer of ViT-L/14 is 12.6 MB per image: a real corpus's cache does not fit).
    features: str = "auto"
    cache_dir: str = "runs/shapes/ret/cache"  # cached tower tokens, one folder per split (features = cache)
    output_dir: str = "runs/shapes/ret"
    variants: list = field(default_factory=lambda: list(VARIANTS))
    layer_strategy: str = "shapes"  # tower layers the cell reads (model.LAYER_STRATEGIES, or "all")
    single_layer_strategy: str = "shapes_last"  # the layer(s) of the single-layer ablation (or "last")
    # RetConfig overrides for both sides, e.g. {"hidden_size": 64}
    cell: dict = field(default_factory=dict, metadata=nested_keys(lambda: dataclass_keys(RetConfig)))
    use_instruction: bool = False
    train_split: str = "train"
    val_split: str = "val"
    batch_size: int = 128  # global batch, split evenly over the ranks under torchrun
    epochs: int = 4
    max_steps: int = 0  # > 0: stop after this many steps (overrides epochs)
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 20
    eval_every: int = 0  # validate every N steps; 0 = at the end of each epoch
    max_val_queries: int = 0  # 0 = all
    seed: int = 0
    overwrite: bool = False  # start each variant afresh even where its folder holds another run (core.run_folder)
    wandb_project: str = "genretrieval"


def variant_config(cfg: TrainConfig, variant: str, n_text: int | None = None,
                   n_vision: int | None = None) -> RetrieverConfig:
    """The retriever config of one variant: ReT, or one of its ablations (towers of n_text / n_vision layers)."""
    if variant not in VARIANTS:
        raise InputError("command line", "variants", f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    layers = layer_strategy(cfg.single_layer_strategy if variant == "single-layer" else cfg.layer_strategy,
                            n_text, n_vision)
    try:
        side = RetConfig(**{**cfg.cell, "text_layers": layers["text"], "vision_layers": layers["vision"],
                            "use_text": variant != "image-only", "use_image": variant != "text-only"})
    except TypeError as e:
        raise InputError("command line", "cell", str(e)) from None
    side.validate()
    return RetrieverConfig(query=side, passage=copy.deepcopy(side), use_instruction=cfg.use_instruction)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    cfg = parse_config(TrainConfig, argv)
    check_batch_divisible(cfg.batch_size, world_size_from_env())  # before any work: every rank gets an equal share
    encoder_spec = read_json(Path(cfg.encoder) / "encoder.json")  # the towers' depth, before loading them
    mode = resolve_features(cfg.features, encoder_spec)
    depth = (encoder_spec.get("text", {}).get("layers"), spec_image_token_layers(encoder_spec))
    configs = {v: variant_config(cfg, v, *depth) for v in cfg.variants}  # bad variants fail before any work
    # every variant folder is checked before any work; which variants a rerun trains may change
    starts = {v: open_run_folder(Path(cfg.output_dir) / v, cfg, overwrite=cfg.overwrite,
                                 may_change=MAY_CHANGE_ON_RESUME | {"variants"}) for v in configs}
    train_files = (cfg.queries_file.format(split=cfg.train_split), cfg.passages_file.format(split=cfg.train_split))
    val_files = (cfg.queries_file.format(split=cfg.val_split), cfg.passages_file.format(split=cfg.val_split))
    train = load_m2kr(*train_files, cfg.image_root, strict=True)  # every training query needs its positive
    val = load_m2kr(*val_files, cfg.image_root, max_queries=cfg.max_val_queries)
    if len(train.queries) < cfg.batch_size:
        raise InputError(train_files[0], "batch_size",
                         f"{cfg.batch_size} is larger than the training queries ({len(train.queries)})")
    if mode == "live" and cfg.verify_images:
        for split, files in ((train, train_files), (val, val_files)):
            verify_images(sorted({i for _, i in query_items(split, False) + passage_items(split) if i}),
                          " / ".join(files), cfg)

    dist = init_distributed()
    encoder = load_dual_encoder(cfg.encoder)
    towers = FrozenTowers(encoder).to(dist.device)
    train_source = open_source(mode, cfg.cache_dir, cfg.train_split, towers, dist.device, " / ".join(train_files))
    # validation data is opened once, by the rank that validates
    val_source = open_source(mode, cfg.cache_dir, cfg.val_split, towers, dist.device, " / ".join(val_files)) \
        if dist.is_main else None
    results = {}
    for variant, model_cfg in configs.items():
        results[variant] = train_variant(cfg, variant, model_cfg, encoder, train, val, train_source, val_source, dist,
                                         starts[variant])
    if dist.is_main:
        print(format_table(results, title="ReT validation (best checkpoint)", row_header="variant"))
    cleanup(dist)
    return results


class ContrastiveStep(nn.Module):
    """A training step's loss as one forward of the cells, so that DDP's hooks see it: each rank encodes its share of
    the global batch, the tokens of both sides are gathered across ranks with gradients (in rank order: the global
    batch in its own order), and the loss is averaged over this rank's rows (model.contrastive_loss)."""

    def __init__(self, cells: nn.ModuleDict, dist: DistInfo):
        super().__init__()
        self.cells, self.dist = cells, dist

    def forward(self, query, passage, labels: Sequence[Any]) -> torch.Tensor:
        q = gather_with_grad(self.cells["query"].encode(query), self.dist)
        p = gather_with_grad(self.cells["passage"].encode(passage), self.dist)
        share = shard_range(len(labels), self.dist)
        return contrastive_loss(q, p, labels, rows=slice(share.start, share.stop))


class TrainPairs(torch.utils.data.Dataset):
    """Item `(epoch, i)` (core.data.EpochBatchSampler): query i and its first positive passage, as the source loads
    them (a DataLoader worker opens their images for live towers; a cache needs only the keys)."""

    def __init__(self, queries: Sequence[Item], passages: Sequence[Item], positive: Sequence[int], load):
        self.queries, self.passages, self.positive, self.load = list(queries), list(passages), list(positive), load

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, item: tuple[int, int]) -> tuple[Any, Any]:
        _, i = item
        return self.load(self.queries[i]), self.load(self.passages[self.positive[i]])


def train_variant(cfg: TrainConfig, variant: str, model_cfg: RetrieverConfig, encoder: DualEncoder, train: M2KRSplit,
                  val: M2KRSplit, train_source: CachedSource | LiveSource, val_source: CachedSource | LiveSource | None,
                  dist: DistInfo, start: RunStart) -> dict[str, float]:
    out = Path(cfg.output_dir) / variant
    device = dist.device
    seed_everything(cfg.seed)  # the same cells on every rank (DDP would broadcast rank 0's anyway)
    model = RetrieverModel(model_cfg, encoder, encoder_dir=cfg.encoder).to(device)
    cells = model.cells()
    # an ablation that masks a modality out never uses that modality's adapters, attention and gates
    both = model_cfg.query.use_text and model_cfg.query.use_image
    step_loss = wrap_model(ContrastiveStep(cells, dist), dist, find_unused_parameters=not both)
    optimizer = torch.optim.AdamW(cells.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(train.queries) // cfg.batch_size
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    scheduler = warmup_cosine(optimizer, cfg.warmup_steps, total)
    step, best = 0, BestTracker()
    if not start.fresh and (out / LAST).is_dir():
        step, meta = resume(out / LAST, stage=STAGE, model=cells, optimizer=optimizer, scheduler=scheduler)
        best = BestTracker(meta.get("best"))
        if step >= total:
            if dist.is_main:
                print(f"[{variant}] already trained ({step}/{total} steps)")
            return dict(read_meta(out / BEST, STAGE).get("val", {}))
        if dist.is_main:
            print(f"[{variant}] resuming from step {step}/{total}")
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    tracker = Tracker(out, cfg, project=cfg.wandb_project, name=f"{STAGE}-{variant}", enabled=dist.is_main)
    passages = train.passage_index()
    positive = [passages[q.positives[0]] for q in train.queries]
    pairs = TrainPairs(query_items(train, cfg.use_instruction), passage_items(train), positive, train_source.load)
    sampler = EpochBatchSampler(len(pairs), cfg.batch_size, cfg.seed, dist.rank, dist.world_size)
    loader = item_loader(train_source, pairs, cfg, device, batch_sampler=sampler)
    eval_every = cfg.eval_every or steps_per_epoch

    bar = progress(total=total, initial=step, desc=f"training ReT ({variant})", enabled=dist.is_main)
    started = time.time()
    while step < total:
        epoch, offset = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch, skip=offset)
        for batch, loaded in zip(sampler.global_batches(), loader):
            step_loss.train()
            labels = [positive[i] for i in batch]  # of the whole global batch: the targets span every rank's rows
            query = train_source.side([q for q, _ in loaded], model_cfg.query).to(device)
            passage = train_source.side([p for _, p in loaded], model_cfg.passage).to(device)
            torch.manual_seed(derive_seed(cfg.seed, variant, step, dist.rank))  # dropout: replayed when resumed
            with autocast(device):
                loss = step_loss(query, passage, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            logged = all_reduce_mean(loss.detach(), dist)  # the global batch's loss
            bar.update(1)
            bar.set_postfix(loss=f"{logged:.3f}")
            tracker.log({"train/loss": logged, "train/lr": scheduler.get_last_lr()[0]}, step=step)
            if step % eval_every == 0 or step == total:
                if dist.is_main:
                    _validate_and_save(cfg, variant, model, optimizer, scheduler, step, best, val, val_source,
                                       tracker, out)
                barrier(dist)  # the other ranks wait for rank 0's validation and checkpoint
            if step >= total:
                break
    bar.close()
    tracker.finish()
    final = dict(read_meta(out / BEST, STAGE).get("val", {}))
    if dist.is_main:
        print(f"[{variant}] trained {step} steps in {time.time() - started:.0f}s; best validation {final}")
    return final


def _validate_and_save(cfg: TrainConfig, variant: str, model: RetrieverModel, optimizer, scheduler, step: int,
                       best: BestTracker, val: M2KRSplit, val_source, tracker: Tracker, out: Path) -> None:
    metrics = validate(model, val, val_source, cfg.use_instruction, cfg)
    score = mean_recall(metrics)
    tracker.log({f"val/{k}": v for k, v in metrics.items()}, step=step)
    write_metrics(out, {"step": step, "split": cfg.val_split, **metrics})
    cells = model.cells()
    if best.update(score):
        save_checkpoint(out / BEST, stage=STAGE, model=cells, step=step, config=cfg,
                        extra={"val": metrics, "best": score, "variant": variant}, model_files=model.write_files)
    save_checkpoint(out / LAST, stage=STAGE, model=cells, step=step, optimizer=optimizer, scheduler=scheduler,
                    config=cfg, extra={"best": best.best, "variant": variant}, model_files=model.write_files)


def validate(model: RetrieverModel, split: M2KRSplit, source, use_instruction: bool,
             options: LoaderOptions | None = None) -> dict[str, float]:
    """Recall@1/5/10 of the split's queries over its passages, exact MaxSim."""
    q = encode_items(model.get_query_model(), source, query_items(split, use_instruction), desc="val queries",
                     options=options)
    p = encode_items(model.get_passage_model(), source, passage_items(split), desc="val passages", options=options)
    _, rows = exact_topk(q, p, 10, desc="val MaxSim")
    ids = [[split.passages[r].passage_id for r in row] for row in rows]
    return recall_from_rankings(ids, [q.positives for q in split.queries])


if __name__ == "__main__":
    main()
