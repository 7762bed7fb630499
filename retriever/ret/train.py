"""Train ReT (and its ablations) on M2KR-style data with the towers frozen: in-batch contrastive loss on MaxSim.

Reads the train/val splits (queries + passages JSONL) of one training set or of several (`datasets`: the M2KR
multi-task mixture, retriever/ret/mixture.py: sets drawn in proportion to their size or at a temperature, steps and
warmup sized from the mixture, validation on a held-out slice of each set's training queries), the towers (`encoder`: a dual-encoder folder) and, for
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
from core.data import LoaderOptions, verify_images
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
from retriever.ret.mixture import MixtureBatchSampler, mixture_weights, schedule_steps, split_heldout
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
    # The training sets of a mixture, each filling {dataset} in queries_file / passages_file; empty: one set, the
    # files as named. Set s is drawn with probability ∝ n_s^(1/mixture_temperature) (1 = in proportion to its size).
    datasets: list = field(default_factory=list)
    mixture_temperature: float = 1.0
    train_split: str = "train"
    val_split: str = "val"  # validation files of each set, read when heldout_queries = 0
    # > 0: validate on this many (≥ 1) or this fraction (< 1) of each training set's question ids, kept out of its
    # training queries (never the test files); 0: on the val_split files
    heldout_queries: float = 0.0
    batch_size: int = 128  # global batch, split evenly over the ranks under torchrun
    epochs: int = 4  # passes over the mixture (Σ of the sets' training queries) ...
    max_steps: int = 0  # ... or, when > 0, exactly this many steps
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 0  # > 0: this many warmup steps; else warmup_ratio of the run's steps
    warmup_ratio: float = 0.05
    eval_every: int = 0  # validate every N steps; 0 = at the end of each epoch
    max_val_queries: int = 0  # per set; 0 = all
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
    sets = load_training_sets(cfg)
    if mode == "cache" and len(sets) > 1:
        raise InputError("config", "features", "a cache holds one training set's tokens; a mixture of "
                         f"{len(sets)} sets trains with features: live")
    schedule_steps(sum(len(s.train.queries) for s in sets), cfg.batch_size, cfg.epochs, cfg.max_steps,
                   cfg.warmup_steps, cfg.warmup_ratio, sets[0].files[0])  # a bad budget fails before any work
    if mode == "live" and cfg.verify_images:
        for s in sets:
            for split, files in ((s.train, s.files), (s.val, s.val_files)):
                verify_images(sorted({i for _, i in query_items(split, False) + passage_items(split) if i}),
                              " / ".join(files), cfg)

    dist = init_distributed()
    encoder = load_dual_encoder(cfg.encoder)
    towers = FrozenTowers(encoder).to(dist.device)
    train_source = open_source(mode, cfg.cache_dir, cfg.train_split, towers, dist.device, " / ".join(sets[0].files))
    # validation data is opened once, by the rank that validates; a held-out slice is read where its set is
    val_source = None
    if dist.is_main:
        val_source = train_source if cfg.heldout_queries else \
            open_source(mode, cfg.cache_dir, cfg.val_split, towers, dist.device, " / ".join(sets[0].val_files))
    results = {}
    for variant, model_cfg in configs.items():
        results[variant] = train_variant(cfg, variant, model_cfg, encoder, sets, train_source, val_source, dist,
                                         starts[variant])
    if dist.is_main:
        print(format_table(results, title="ReT validation (best checkpoint)", row_header="variant"))
    cleanup(dist)
    return results


@dataclass
class TrainingSet:
    """One set of the mixture: its training queries over its corpus, and the queries it is validated on."""

    name: str  # '' for a run on one set named by the files alone
    train: M2KRSplit
    val: M2KRSplit
    files: tuple[str, str]  # the training queries and passages files
    val_files: tuple[str, str]


def set_files(cfg: TrainConfig, dataset: str, split: str) -> tuple[str, str]:
    return cfg.queries_file.format(split=split, dataset=dataset), cfg.passages_file.format(split=split, dataset=dataset)


def load_training_sets(cfg: TrainConfig) -> list[TrainingSet]:
    """Every set of the mixture, checked when opened: its training split (every query needs its positive), and
    either the held-out slice of its training queries or its val_split files."""
    for key in ("queries_file", "passages_file"):
        if bool(cfg.datasets) != ("{dataset}" in getattr(cfg, key)):
            raise InputError("config", key, "names each set of `datasets` with a {dataset} placeholder"
                             if cfg.datasets else "has a {dataset} placeholder but `datasets` is empty")
    if len(set(cfg.datasets)) != len(cfg.datasets):
        raise InputError("config", "datasets", f"a set is listed twice: {cfg.datasets}")
    sets = []
    for name in cfg.datasets or [""]:
        files, val_files = set_files(cfg, name, cfg.train_split), set_files(cfg, name, cfg.val_split)
        train = load_m2kr(*files, cfg.image_root, strict=True)
        if cfg.heldout_queries:
            keep, held = split_heldout([q.question_id for q in train.queries], cfg.heldout_queries, cfg.seed,
                                       files[0])
            held = held[:cfg.max_val_queries] if cfg.max_val_queries else held
            val = M2KRSplit([train.queries[i] for i in held], train.passages)
            train = M2KRSplit([train.queries[i] for i in keep], train.passages)
            val_files = files
        else:
            val = load_m2kr(*val_files, cfg.image_root, max_queries=cfg.max_val_queries)
        sets.append(TrainingSet(name, train, val, files, val_files))
    return sets


class ContrastiveStep(nn.Module):
    """A training step's loss as one forward of the cells, so that DDP's hooks see it: each rank encodes its share of
    the global batch, the tokens of both sides are gathered across ranks with gradients (in rank order: the global
    batch in its own order), and the loss is averaged over this rank's rows (model.contrastive_loss)."""

    def __init__(self, cells: nn.ModuleDict, dist: DistInfo):
        super().__init__()
        self.cells, self.dist = cells, dist

    def forward(self, query, passage, labels: Sequence[Any]) -> torch.Tensor:
        q, p = self.cells["query"].encode(query), self.cells["passage"].encode(passage)
        # Both sides in one collective: with one all_gather per side, the gathered queries' gradients came back
        # wrong under gloo once the passage→query loss read every rank's queries (measured: 2 ranks no longer
        # trained like 1), while one gather of both sides gives the single-process gradients.
        both = gather_with_grad(torch.cat([q.flatten(1), p.flatten(1)], 1), self.dist)
        width = q[0].numel()
        q, p = both[:, :width].reshape(-1, *q.shape[1:]), both[:, width:].reshape(-1, *p.shape[1:])
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


def train_variant(cfg: TrainConfig, variant: str, model_cfg: RetrieverConfig, encoder: DualEncoder,
                  sets: Sequence[TrainingSet], train_source: CachedSource | LiveSource,
                  val_source: CachedSource | LiveSource | None, dist: DistInfo, start: RunStart) -> dict[str, float]:
    out = Path(cfg.output_dir) / variant
    device = dist.device
    seed_everything(cfg.seed)  # the same cells on every rank (DDP would broadcast rank 0's anyway)
    model = RetrieverModel(model_cfg, encoder, encoder_dir=cfg.encoder).to(device)
    cells = model.cells()
    # an ablation that masks a modality out never uses that modality's adapters, attention and gates
    both = model_cfg.query.use_text and model_cfg.query.use_image
    step_loss = wrap_model(ContrastiveStep(cells, dist), dist, find_unused_parameters=not both)
    optimizer = torch.optim.AdamW(cells.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sizes = [len(s.train.queries) for s in sets]
    steps_per_epoch, total, warmup = schedule_steps(sum(sizes), cfg.batch_size, cfg.epochs, cfg.max_steps,
                                                    cfg.warmup_steps, cfg.warmup_ratio, sets[0].files[0])
    scheduler = warmup_cosine(optimizer, warmup, total)
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
    queries, passages, positive = mixture_pairs(sets, cfg.use_instruction)
    pairs = TrainPairs(queries, passages, positive, train_source.load)
    weights = mixture_weights(sizes, cfg.mixture_temperature)
    if dist.is_main and len(sets) > 1:
        print(f"[{variant}] mixture of {len(sets)} sets, {total} steps ({warmup} of warmup): " + ", ".join(
            f"{s.name} {n} queries, p = {w:.3f}" for s, n, w in zip(sets, sizes, weights)))
    sampler = MixtureBatchSampler(sizes, weights, cfg.batch_size, cfg.seed, dist.rank, dist.world_size)
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
                    _validate_and_save(cfg, variant, model, optimizer, scheduler, step, best, sets, val_source,
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


def mixture_pairs(sets: Sequence[TrainingSet], use_instruction: bool) -> tuple[list[Item], list[Item], list[int]]:
    """The sets' training queries and corpora laid end to end (the index space of MixtureBatchSampler), and each
    query's first positive as a row of the joined corpora. That row is also the in-batch label: two sets that
    reuse a passage id keep two passages, as their corpora are separate."""
    queries, passages, positive = [], [], []
    for s in sets:
        rows = s.train.passage_index()
        positive += [len(passages) + rows[q.positives[0]] for q in s.train.queries]
        queries += query_items(s.train, use_instruction)
        passages += passage_items(s.train)
    return queries, passages, positive


def validate_sets(model: RetrieverModel, sets: Sequence[TrainingSet], source, use_instruction: bool,
                  options: LoaderOptions | None = None) -> dict[str, float]:
    """Recall@K of each set's validation queries over its own corpus. One set: its figures; a mixture: each set's
    under `{name}/R@K` and their unweighted mean under `R@K` (the figure the best checkpoint is chosen by)."""
    per_set = {s.name: validate(model, s.val, source, use_instruction, options) for s in sets}
    if len(sets) == 1 and not sets[0].name:
        return per_set[""]
    metrics = {k: float(sum(m[k] for m in per_set.values()) / len(per_set)) for k in next(iter(per_set.values()))}
    for name, m in per_set.items():
        metrics.update({f"{name}/{k}": v for k, v in m.items()})
    return metrics


def _validate_and_save(cfg: TrainConfig, variant: str, model: RetrieverModel, optimizer, scheduler, step: int,
                       best: BestTracker, sets: Sequence[TrainingSet], val_source, tracker: Tracker,
                       out: Path) -> None:
    metrics = validate_sets(model, sets, val_source, cfg.use_instruction, cfg)
    score = mean_recall(metrics)
    tracker.log({f"val/{k}": v for k, v in metrics.items()}, step=step)
    write_metrics(out, {"step": step, "split": "heldout" if cfg.heldout_queries else cfg.val_split, **metrics})
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
