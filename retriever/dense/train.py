"""Train the dense dual encoder (CLIP-style, InfoNCE in both directions) on Karpathy-split image–caption data.

Reads `data_json` + `image_root`; writes `output_dir/` with `config.yaml`, `checkpoint-last/` (a rerun with the
same config resumes it: core.run_folder), `checkpoint-best/` (best validation mean recall; a dual-encoder folder other stages load) and
`metrics.json`. Runs under `torchrun` unchanged (DDP, gloo on CPU, nccl on GPU).
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from open_clip.loss import ClipLoss

from core.checkpoint import BEST, LAST, BestTracker, read_meta, resume, save_checkpoint, unwrap
from core.config import nested_keys, parse_config, save_config
from core.data import (EpochBatchSampler, ImageCaptionPairs, ImageRecord, LoaderOptions, caption_queries,
                       load_karpathy_splits, make_loader, verify_images)
from core.device import autocast, seed_everything
from core.distributed import barrier, check_batch_divisible, cleanup, init_distributed, world_size_from_env, wrap_model
from core.encoders import SHAPES_ENCODER, build_dual_encoder, dual_encoder_spec_keys
from core.errors import InputError
from core.logging import Tracker, format_table, progress, write_metrics
from core.metrics import mean_recall, t2i_recall
from core.run_folder import open_run_folder
from core.schedule import warmup_cosine
from core.shapes.captions import CONTRAST_KINDS, contrast_caption
from core.shapes.edits import EDIT_KINDS, edited_twin, possible_kinds
from core.shapes.make import SCENES_FILE, load_scenes, load_world_config
from retriever.dense.common import encode_image_files, encode_texts
from retriever.dense.loss import HardNegativeClipLoss

STAGE = "dense"


@dataclass
class TrainConfig(LoaderOptions):
    data_json: str = "data/shapes/dataset_shapes.json"  # Karpathy-split captions
    image_root: str = "data/shapes/images"
    output_dir: str = "runs/shapes/dense"
    model: dict = field(default_factory=lambda: dict(SHAPES_ENCODER),
                        metadata=nested_keys(dual_encoder_spec_keys))  # encoder spec (core/encoders.py)
    train_split: str = "train"
    val_split: str = "val"
    batch_size: int = 128  # global batch, split over ranks
    epochs: int = 10
    max_steps: int = 0  # stop after this many steps if > 0 (overrides epochs)
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    eval_every: int = 0  # validate every N steps; 0 = at the end of each epoch
    save_every: int = 50  # write checkpoint-last every N steps
    max_val_images: int = 0  # validate on the first N val images (0 = all)
    # Hard-negative captions (NegCLIP): each training caption with one attribute changed, in the Shapes world's
    # vocabulary (core/shapes/captions.contrast_caption). Empty = plain CLIP loss (real datasets).
    contrast_kinds: list = field(default_factory=list)
    # Edited twins: each training image joined in the batch by a copy of its scene with one edit of these kinds
    # (core/shapes/edits.py: colour, shape, size, move, add, remove), rendered and captioned by the world, so the
    # batch holds image and caption negatives that differ in one attribute only. Needs the world's scenes.json
    # (`world_dir`, default: data_json's folder). Empty = off (real datasets).
    twin_edits: list = field(default_factory=list)
    world_dir: str = ""
    seed: int = 0
    overwrite: bool = False  # start afresh in an output_dir that holds another run (core.run_folder)
    wandb_project: str = "genretrieval"


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    cfg = parse_config(TrainConfig, argv)
    out = Path(cfg.output_dir)
    start = open_run_folder(out, cfg, overwrite=cfg.overwrite)
    splits = load_karpathy_splits(cfg.data_json, cfg.image_root, [cfg.train_split, cfg.val_split])
    train_records, val_records = splits[cfg.train_split], splits[cfg.val_split]
    if cfg.max_val_images:
        val_records = val_records[:cfg.max_val_images]
    unknown = set(cfg.contrast_kinds) - set(CONTRAST_KINDS)
    if unknown:
        raise InputError("config", "contrast_kinds",
                         f"unknown kinds {sorted(unknown)}; expected some of {list(CONTRAST_KINDS)}")
    twins = _TwinMaker(cfg, train_records) if cfg.twin_edits else None
    if len(train_records) < cfg.batch_size:
        raise InputError(cfg.data_json, "batch_size",
                         f"{cfg.batch_size} is larger than the training split ({len(train_records)} images)")
    check_batch_divisible(cfg.batch_size, world_size_from_env())
    if cfg.verify_images:
        verify_images([r.path for r in train_records + val_records], cfg.data_json, cfg)

    dist = init_distributed()
    seed_everything(cfg.seed + dist.rank)
    model = build_dual_encoder(cfg.model).to(dist.device)
    ddp_model = wrap_model(model, dist)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr)
    steps_per_epoch = len(train_records) // cfg.batch_size
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    scheduler = warmup_cosine(optimizer, cfg.warmup_steps, total_steps)

    step, best = 0, BestTracker()
    if not start.fresh and (out / LAST).is_dir():
        step, meta = resume(out / LAST, stage=STAGE, model=model, optimizer=optimizer, scheduler=scheduler)
        best = BestTracker(meta.get("best"))
        if dist.is_main:
            print(f"resuming from step {step}/{total_steps}")
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    tracker = Tracker(out, cfg, project=cfg.wandb_project, name=f"{STAGE}-{out.name}", enabled=dist.is_main)

    pairs = ImageCaptionPairs(train_records, model.preprocess, seed=cfg.seed, listed_in=cfg.data_json)
    sampler = EpochBatchSampler(len(pairs), cfg.batch_size, cfg.seed, dist.rank, dist.world_size)
    loader = make_loader(pairs, cfg, batch_sampler=sampler, device=dist.device)
    loss_fn = ClipLoss(gather_with_grad=True, rank=dist.rank, world_size=dist.world_size)
    hard_loss_fn = HardNegativeClipLoss(rank=dist.rank, world_size=dist.world_size)
    eval_every = cfg.eval_every or steps_per_epoch

    bar = progress(total=total_steps, initial=step, desc="training dense", enabled=dist.is_main)
    started = time.time()
    while step < total_steps:
        epoch, offset = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch, skip=offset)
        for images, captions, local in loader:
            ddp_model.train()
            images, captions, local = images.to(dist.device, non_blocking=True), list(captions), local.tolist()
            if twins is not None:
                twin_pixels, twin_captions = twins.make(local, model.preprocess, (cfg.seed, step, dist.rank))
                images, captions = torch.cat([images, twin_pixels.to(dist.device)]), captions + twin_captions
            tokens = model.tokenize(captions).to(dist.device)
            with autocast(dist.device):
                if cfg.contrast_kinds:
                    negatives, valid = _hard_negatives(captions, cfg.contrast_kinds, (cfg.seed, step, dist.rank))
                    tokens = torch.cat([tokens, model.tokenize(negatives).to(dist.device)])
                image_emb, text_emb, logit_scale = ddp_model(images, tokens)
                if cfg.contrast_kinds:
                    text_emb, negative_emb = text_emb.split(len(captions))
                    loss = hard_loss_fn(image_emb, text_emb, negative_emb, valid.to(dist.device), logit_scale)
                else:
                    loss = loss_fn(image_emb, text_emb, logit_scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():  # CLIP clamps the temperature so logits stay bounded
                model.clip.logit_scale.clamp_(0, math.log(100))
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            tracker.log({"train/loss": loss.item(), "train/lr": scheduler.get_last_lr()[0]}, step=step)
            if step % eval_every == 0 or step == total_steps:
                _validate_and_save(cfg, model, optimizer, scheduler, step, best, val_records, dist, tracker, out)
            elif step % cfg.save_every == 0 and dist.is_main:
                _save_last(cfg, model, optimizer, scheduler, step, best, out)
            if step >= total_steps:
                break
    bar.close()
    barrier(dist)
    final: dict[str, float] = {}
    if dist.is_main:
        final = dict(read_meta(out / BEST).get("val", {}))
        print(f"trained {step} steps in {time.time() - started:.0f}s; best validation:")
        print(format_table({"dense (val, text→image)": final}))
    tracker.finish()
    cleanup(dist)
    return final


def _hard_negatives(captions: list[str], kinds: list[str], seed: tuple[int, ...]) -> tuple[list[str], torch.Tensor]:
    """One changed caption per caption (the caption itself, masked out, where nothing can be changed); drawn from
    (seed, step, rank) so a resumed run replays the same negatives."""
    rng = np.random.default_rng(seed)
    changed = [contrast_caption(c, rng, kinds) for c in captions]
    return [n if n is not None else c for n, c in zip(changed, captions)], torch.tensor([n is not None for n in changed])


class _TwinMaker:
    """Edited twins of training scenes (see TrainConfig.twin_edits), drawn from (seed, step, rank) so that a resumed
    run replays them."""

    def __init__(self, cfg: TrainConfig, records: Sequence[ImageRecord]):
        world = Path(cfg.world_dir) if cfg.world_dir else Path(cfg.data_json).parent
        if not (world / SCENES_FILE).is_file():
            raise InputError(world / SCENES_FILE, "twin_edits", "edited twins need the Shapes world's scenes.json "
                             "(set --world_dir, or --twin_edits [] for data without scenes)")
        unknown = set(cfg.twin_edits) - set(EDIT_KINDS)
        if unknown:
            raise InputError("config", "twin_edits", f"unknown kinds {sorted(unknown)}; expected some of {list(EDIT_KINDS)}")
        by_file = {r.filename: r.scene for r in load_scenes(world)}
        missing = [r.filename for r in records if r.filename not in by_file]
        if missing:
            raise InputError(world / SCENES_FILE, "images", f"no scene for {len(missing)} training images, e.g. {missing[0]}")
        self.scenes = [by_file[r.filename] for r in records]
        self.kinds, self.image_size = list(cfg.twin_edits), load_world_config(world).image_size

    def make(self, indices, preprocess, seed: tuple[int, ...]) -> tuple[torch.Tensor, list[str]]:
        rng = np.random.default_rng(seed)
        twins = [edited_twin(self.scenes[i], rng, self._applicable(self.scenes[i]), self.image_size) for i in indices]
        return torch.stack([preprocess(image) for image, _ in twins]), [caption for _, caption in twins]

    def _applicable(self, scene) -> list[str]:
        # a one-object scene cannot lose an object and a full one cannot gain one: fall back to any edit
        kinds = [k for k in self.kinds if k in possible_kinds(scene)]
        return kinds or possible_kinds(scene)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on gains, biases, embeddings and the temperature, as in CLIP."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "embedding" in name or "logit_scale" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def validate(model, records, device, options: LoaderOptions, listed_in: str | None = None) -> dict[str, float]:
    """Text→image Recall@1/5/10 on the validation split (every caption a query)."""
    queries = caption_queries(records)
    image_emb = encode_image_files(model, [r.path for r in records], device, options, listed_in=listed_in,
                                   desc="val images")
    text_emb = encode_texts(model, [q.text for q in queries], device, desc="val captions")
    column = {r.imgid: i for i, r in enumerate(records)}
    return t2i_recall(text_emb @ image_emb.T, [column[q.imgid] for q in queries])


def _validate_and_save(cfg, model, optimizer, scheduler, step, best, val_records, dist, tracker, out):
    if not dist.is_main:
        barrier(dist)
        return
    # one-off workers: persistent ones would idle between validations
    metrics = validate(unwrap(model), val_records, dist.device, dataclasses.replace(cfg, persistent_workers=False),
                       cfg.data_json)
    score = mean_recall(metrics)
    tracker.log({f"val/{k}": v for k, v in metrics.items()} | {"val/mean_recall": score}, step=step)
    write_metrics(out, {"step": step, "split": cfg.val_split, **metrics})
    if best.update(score):
        save_checkpoint(out / BEST, stage=STAGE, model=model, step=step, config=cfg,
                        extra={"val": metrics, "best": score}, model_files=unwrap(model).write_spec)
    _save_last(cfg, model, optimizer, scheduler, step, best, out)
    barrier(dist)


def _save_last(cfg, model, optimizer, scheduler, step, best, out) -> None:
    save_checkpoint(out / LAST, stage=STAGE, model=model, step=step, optimizer=optimizer, scheduler=scheduler,
                    config=cfg, extra={"best": best.best}, model_files=unwrap(model).write_spec)


if __name__ == "__main__":
    main()
