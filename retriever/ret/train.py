"""Train ReT (and its ablations) on M2KR-style data with the towers frozen: in-batch contrastive loss on MaxSim.

Reads the train/val splits (queries + passages JSONL), the towers (`encoder`: a dual-encoder folder) and,
when `cache_dir` is set, their cached per-layer tokens (python -m retriever.ret.cache). Writes, for each
variant, `output_dir/{variant}/` with `config.yaml`, `checkpoint-last/` (cells, optimizer, scheduler, step,
RNG: `--resume true` continues it) and `checkpoint-best/` (best validation mean recall; a folder that
`RetrieverModel.from_pretrained` opens), and `metrics.json`.
Variants: `ret` (the model), `text-only` / `image-only` (one modality masked out on both sides, R4-R6 with
m = 0), `single-layer` (one step of the cell on the towers' last layer: fusion without recurrence).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from core.checkpoint import BEST, LAST, BestTracker, read_meta, resume, save_checkpoint
from core.config import parse_config, save_config
from core.data import epoch_batches
from core.device import autocast, get_device, seed_everything
from core.encoders import load_dual_encoder
from core.errors import InputError
from core.io import read_json
from core.logging import Tracker, format_table, progress, write_metrics
from core.metrics import mean_recall, recall_from_rankings
from retriever.ret.data import M2KRSplit, load_m2kr
from retriever.ret.features import CachedSource, LiveSource
from retriever.ret.model import STAGE, RetConfig, RetrieverConfig, RetrieverModel, layer_strategy
from retriever.ret.retrieval import encode_items, exact_topk, passage_items, query_items

VARIANTS = ("ret", "text-only", "image-only", "single-layer")


@dataclass
class TrainConfig:
    encoder: str = "runs/shapes/dense/checkpoint-best"  # frozen towers: a dual-encoder folder
    queries_file: str = "data/shapes/m2kr/shapes_{split}.jsonl"  # {split} is replaced
    passages_file: str = "data/shapes/m2kr/shapes_passages_{split}.jsonl"
    image_root: str = "data/shapes"
    cache_dir: str = "runs/shapes/ret/cache"  # cached tower tokens; '' = run the towers on every batch
    output_dir: str = "runs/shapes/ret"
    variants: list = field(default_factory=lambda: list(VARIANTS))
    layer_strategy: str = "shapes"  # tower layers the cell reads (model.LAYER_STRATEGIES, or "all")
    single_layer_strategy: str = "shapes_last"  # the layer(s) of the single-layer ablation (or "last")
    cell: dict = field(default_factory=dict)  # RetConfig overrides for both sides, e.g. {"hidden_size": 64}
    use_instruction: bool = False
    train_split: str = "train"
    val_split: str = "val"
    batch_size: int = 128
    epochs: int = 4
    max_steps: int = 0  # > 0: stop after this many steps (overrides epochs)
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 20
    eval_every: int = 0  # validate every N steps; 0 = at the end of each epoch
    max_val_queries: int = 0  # 0 = all
    seed: int = 0
    resume: bool = False  # continue output_dir/{variant}/checkpoint-last; a finished variant is skipped
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
    return RetrieverConfig(query=side, passage=copy.deepcopy(side))


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    cfg = parse_config(TrainConfig, argv)
    encoder_spec = read_json(Path(cfg.encoder) / "encoder.json")  # the towers' depth, before loading them
    depth = (encoder_spec.get("text", {}).get("layers"), encoder_spec.get("vision", {}).get("layers"))
    configs = {v: variant_config(cfg, v, *depth) for v in cfg.variants}  # bad variants fail before any work
    train = load_m2kr(cfg.queries_file.format(split=cfg.train_split), cfg.passages_file.format(split=cfg.train_split),
                      cfg.image_root)
    val = load_m2kr(cfg.queries_file.format(split=cfg.val_split), cfg.passages_file.format(split=cfg.val_split),
                    cfg.image_root, max_queries=cfg.max_val_queries)
    if len(train.queries) < cfg.batch_size:
        raise InputError(cfg.queries_file.format(split=cfg.train_split), "batch_size",
                         f"{cfg.batch_size} is larger than the training queries ({len(train.queries)})")
    device = get_device()
    encoder = load_dual_encoder(cfg.encoder)
    results = {}
    for variant, model_cfg in configs.items():
        results[variant] = train_variant(cfg, variant, model_cfg, encoder, train, val, device)
    print(format_table(results, title="ReT validation (best checkpoint)", row_header="variant"))
    return results


def _source(cfg: TrainConfig, split: str, model: RetrieverModel, device: torch.device) -> CachedSource | LiveSource:
    return CachedSource(Path(cfg.cache_dir) / split) if cfg.cache_dir else LiveSource(model.towers, device)


def train_variant(cfg: TrainConfig, variant: str, model_cfg: RetrieverConfig, encoder, train: M2KRSplit,
                  val: M2KRSplit, device: torch.device) -> dict[str, float]:
    out = Path(cfg.output_dir) / variant
    if (out / LAST).is_dir() and not cfg.resume:
        raise InputError(out, "output_dir", "already holds a run; pass --resume true to continue it or choose another folder")
    seed_everything(cfg.seed)
    model = RetrieverModel(model_cfg, encoder).to(device)
    cells = model.cells()
    optimizer = torch.optim.AdamW(cells.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(train.queries) // cfg.batch_size
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(cfg.warmup_steps, total))
    step, best = 0, BestTracker()
    if cfg.resume and (out / LAST).is_dir():
        step, meta = resume(out / LAST, stage=STAGE, model=cells, optimizer=optimizer, scheduler=scheduler)
        best = BestTracker(meta.get("best"))
        if step >= total:
            print(f"[{variant}] already trained ({step}/{total} steps)")
            return dict(read_meta(out / BEST, STAGE).get("val", {}))
        print(f"[{variant}] resuming from step {step}/{total}")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    tracker = Tracker(out, cfg, project=cfg.wandb_project, name=f"{STAGE}-{variant}")
    train_source = _source(cfg, cfg.train_split, model, device)
    val_source = _source(cfg, cfg.val_split, model, device)
    passages = train.passage_index()
    q_items = query_items(train, cfg.use_instruction)
    p_items = passage_items(train)
    positive = [passages[q.positives[0]] for q in train.queries]
    eval_every = cfg.eval_every or steps_per_epoch

    bar = progress(total=total, initial=step, desc=f"training ReT ({variant})")
    started = time.time()
    while step < total:
        epoch, offset = divmod(step, steps_per_epoch)
        for batch in epoch_batches(len(q_items), cfg.batch_size, cfg.seed, epoch)[offset:]:
            model.train()
            rows = [positive[i] for i in batch]
            query = train_source.side([q_items[i] for i in batch], model_cfg.query).to(device)
            passage = train_source.side([p_items[r] for r in rows], model_cfg.passage).to(device)
            with autocast(device):
                loss = model(query, passage, labels=rows)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            tracker.log({"train/loss": loss.item(), "train/lr": scheduler.get_last_lr()[0]}, step=step)
            if step % eval_every == 0 or step == total:
                metrics = validate(model, val, val_source, cfg.use_instruction)
                score = mean_recall(metrics)
                tracker.log({f"val/{k}": v for k, v in metrics.items()}, step=step)
                write_metrics(out, {"step": step, "split": cfg.val_split, **metrics})
                if best.update(score):
                    save_checkpoint(out / BEST, stage=STAGE, model=cells, step=step, config=cfg,
                                    extra={"val": metrics, "best": score, "variant": variant},
                                    model_files=model.write_files)
                save_checkpoint(out / LAST, stage=STAGE, model=cells, step=step, optimizer=optimizer,
                                scheduler=scheduler, config=cfg, extra={"best": best.best, "variant": variant},
                                model_files=model.write_files)
            if step >= total:
                break
    bar.close()
    tracker.finish()
    final = dict(read_meta(out / BEST, STAGE).get("val", {}))
    print(f"[{variant}] trained {step} steps in {time.time() - started:.0f}s; best validation {final}")
    return final


def validate(model: RetrieverModel, split: M2KRSplit, source, use_instruction: bool) -> dict[str, float]:
    """Recall@1/5/10 of the split's queries over its passages, exact MaxSim."""
    q = encode_items(model.get_query_model(), source, query_items(split, use_instruction), desc="val queries")
    p = encode_items(model.get_passage_model(), source, passage_items(split), desc="val passages")
    _, rows = exact_topk(q, p, 10, desc="val MaxSim")
    ids = [[split.passages[r].passage_id for r in row] for row in rows]
    return recall_from_rankings(ids, [q.positives for q in split.queries])


def _warmup_cosine(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return factor


if __name__ == "__main__":
    main()
