"""Train the composed retriever: pretraining on synthetic triplets (L_q2t) or fine-tuning on annotated triplets, with
L_q2t alone or with PTHA (L_q2t + L_t2t + α·L_p2p, reverse texts from the MTST generator). `ptha_variant` picks the
released model's form ("official": text-only L_t2t, MSE L_p2p, hop two on the same Q-Former, max-over-tokens target
scores with a learnt temperature) or the project's earlier one ("project"); the retriever records it, so fine-tuning
and evaluation follow the folder they load.

Each batch: the queries' own targets, then (with `subset_negatives`) every other member of each query's
near-duplicate set as appended hard negatives (FashionIQ has no sets: nothing is appended); duplicate target images
are not negatives (cir.losses). The model is selected on the val split's Avg: CIRR's (R@5 + Rs@1)/2, or with
`--dataset fashioniq` FashionIQ's (R@10 + R@50)/2 over `categories`, whose train splits are concatenated.
`checkpoint-last/` (optimizer, step, RNG) lets a killed run resume, and a run whose metrics.json is written is
finished and not redone.

Under torchrun (`torchrun --nproc_per_node N -m cir.train ...`) every rank takes its contiguous share of each global
batch (the same epoch permutation on every rank), encodes it, and scores its queries against every rank's targets,
gathered with gradients (cir.losses.gather_target_rows); DDP averages the gradients, so a step equals one process's on
the global batch. A batch_size the world size does not divide is refused before any work. Rank 0 validates and writes;
the token caches are built by all ranks, each its share (cir.features).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from cir.data import (FASHIONIQ_CATEGORIES, CIRSplit, CIRTriplet, cache_key, caption_texts, cirr_files,
                      default_image_root, load_cir_split, merge_splits)
from cir.evaluate import evaluate_model
from cir.features import TokenBank, check_mode, token_source
from cir.losses import gather_target_rows, prototype_alignment, prototype_mse, ptha_loss, query_target_contrastive
from cir.retriever import (VARIANTS, ComposedRetriever, build_shapes_retriever, load_pretrained_retriever,
                           SHAPES_RETRIEVER)
from core.checkpoint import BEST, LAST, BestTracker, resume, save_checkpoint
from core.config import hf_config_keys, nested_keys, parse_config, save_config
from core.data import LoaderOptions, epoch_batches, verify_images
from core.device import autocast, seed_everything, set_threads
from core.distributed import (DistInfo, all_reduce_mean, barrier, broadcast_object, check_batch_divisible, cleanup,
                              gather_with_grad, init_distributed, rank_share, shard_range, wrap_model,
                              world_size_from_env)
from core.errors import InputError
from core.io import read_json
from core.logging import Tracker, progress, write_metrics
from core.run_folder import open_run_folder
from core.schedule import warmup_cosine

OBJECTIVES = ("q2t", "ptha")


def retriever_spec_keys() -> dict:
    """What `model` may override: the keys of the Shapes retriever's spec, its Q-Former's as BLIP-2's config has them."""
    from transformers import Blip2QFormerConfig

    return {**{k: None for k in SHAPES_RETRIEVER}, "qformer": hf_config_keys(Blip2QFormerConfig)}


@dataclass
class TrainConfig(LoaderOptions):
    dataset: str = "cirr"  # layout and protocol: "cirr" (CIRR layout, Shapes included) or "fashioniq"
    categories: list[str] = field(default_factory=lambda: list(FASHIONIQ_CATEGORIES))  # FashionIQ only
    cirr_root: str = "data/shapes/cirr"  # the annotated data (CIRR or FashionIQ folder): val for selection, vocabulary
    image_root: str = ""  # default {cirr_root}/img_raw (FashionIQ: /images); also the image root of `train_root`
    image_ext: str = ".png"  # FashionIQ image files are {name}{image_ext} (copies come as .png or .jpg)
    train_root: str = ""  # where the training triplets are (default cirr_root; the synthetic folder to pretrain)
    train_split: str = "train"
    val_split: str = "val"
    reverse_root: str = ""  # PTHA: folder holding cap.rc2.{train_split}_reverse.json (the synthesis output);
    # FashionIQ: cap.{category}.{train_split}_reverse.json, row i reversing row i of the train file
    data_json: str = ""  # Karpathy captions, added to the Shapes tokenizer's vocabulary ("" = none)
    dense_checkpoint: str = "runs/shapes/dense/checkpoint-best"  # frozen image encoder (Shapes)
    pretrained: str = ""  # real data: an InstructBLIP name whose ViT and Q-Former start the retriever
    # overrides of cir.retriever.SHAPES_RETRIEVER
    model: dict = field(default_factory=dict, metadata=nested_keys(retriever_spec_keys))
    init_from: str = ""  # a retriever folder to start from (fine-tuning after pretraining)
    output_dir: str = "runs/shapes/cir/run"
    cache_dir: str = ""  # image-token cache; default {output_dir}/../features
    # "cache": the frozen tower's tokens cached once as float16 on disk, read by memory map (the default, right for the
    # Shapes world's small tower); "live": the tower runs on every batch in bf16 (real ViT-g towers, whose CIRR cache
    # would be 12 GB)
    image_tokens: str = "cache"
    objective: str = "q2t"  # "q2t" (L_q2t) or "ptha" (L_q2t + L_t2t + α·L_p2p)
    # "official" (the released model's PTHA, cir.retriever) or "project" (the earlier variant); a model read from
    # `init_from` must have been built with the same one
    ptha_variant: str = "official"
    w_q2t: float = 1.0
    w_t2t: float = 1.0
    alpha: float = 0.5  # weight of L_p2p (the paper's 0.5)
    temperature: float = 0.07  # fixed, "project" variant only (the official one learns its own from 0.07)
    subset_negatives: bool = True  # append each query's set members as hard negatives
    # the same for PTHA's reverse branch (L_t2t); off by default: a PTHA step then costs 1.7 q2t steps instead of 2.1
    reverse_subset_negatives: bool = False
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 20
    max_triplets: int = 0  # use only the first N training triplets (0 = all)
    seed: int = 0
    threads: int = 0  # torch CPU threads; 0 = one per core, 1 when the CPU is shared with other busy jobs
    overwrite: bool = False  # start afresh where output_dir holds another run (core.run_folder)


def main(argv: Sequence[str] | None = None) -> dict:
    cfg = parse_config(TrainConfig, argv)
    try:
        return run(cfg)
    finally:
        cleanup(DistInfo(world_size=world_size_from_env()))


def run(cfg: TrainConfig) -> dict:
    """Train one retriever as `cfg` says (or return the metrics of the finished run in cfg.output_dir). Under torchrun
    every rank calls this; the caller ends the process group (`main`), so several runs can share it."""
    set_threads(cfg.threads)
    check_batch_divisible(cfg.batch_size, world_size_from_env())
    if cfg.objective not in OBJECTIVES:
        raise InputError("config", "objective", f"must be one of {OBJECTIVES}, got {cfg.objective!r}")
    if cfg.ptha_variant not in VARIANTS:
        raise InputError("config", "ptha_variant", f"must be one of {VARIANTS}, got {cfg.ptha_variant!r}")
    check_mode(cfg.image_tokens)
    out = Path(cfg.output_dir)
    start = open_run_folder(out, cfg, overwrite=cfg.overwrite)
    if start.reuse_finished and (out / "metrics.json").is_file() and (out / BEST / "meta.json").is_file():
        print(f"[cir.train] {out} is finished; reusing it (--overwrite true to retrain)")
        return read_json(out / "metrics.json")
    seed_everything(cfg.seed)
    image_root = cfg.image_root or str(default_image_root(cfg.dataset, cfg.cirr_root))
    train = merge_splits(_load(cfg, cfg.train_root or cfg.cirr_root, cfg.train_split, image_root))
    if cfg.max_triplets:
        train.triplets = train.triplets[:cfg.max_triplets]
    val = _load(cfg, cfg.cirr_root, cfg.val_split, image_root)  # FashionIQ: one unit per category
    reverse = _reverse_texts(cfg, train, image_root) if cfg.objective == "ptha" else None
    dist = init_distributed()
    val_images = merge_splits(val).images
    if cfg.verify_images:  # each rank decodes its share of the files once
        paths = list(dict.fromkeys([*train.images.values(), *val_images.values()]))
        verify_images([paths[i] for i in shard_range(len(paths), dist)], cfg.train_root or cfg.cirr_root, cfg)
    model = _build(cfg, train, dist.device).to(dist.device)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else out.parent / "features"
    prefix = {s: cache / cache_key(cfg.dataset, cfg.cirr_root, s, cfg.categories)
              for s in (cfg.train_split, cfg.val_split)}
    bank = token_source(cfg.image_tokens, model.image_encoder, train.images, prefix[cfg.train_split], cfg, dist)
    val_bank = token_source(cfg.image_tokens, model.image_encoder, val_images, prefix[cfg.val_split], cfg, dist)
    return fit(model, train, bank, val, val_bank, reverse, cfg, dist)


def _load(cfg: TrainConfig, root: str, split: str, image_root: str) -> list[CIRSplit]:
    return load_cir_split(cfg.dataset, root, split, cfg.categories, image_root, image_ext=cfg.image_ext)


def _build(cfg: TrainConfig, train: CIRSplit, device: torch.device) -> ComposedRetriever:
    if cfg.init_from:
        model = ComposedRetriever.from_pretrained(cfg.init_from, device)
        if model.variant != cfg.ptha_variant:
            raise InputError(Path(cfg.init_from) / "retriever.json", "ptha_variant",
                             f"the retriever was built as {model.variant!r}, the config asks for "
                             f"{cfg.ptha_variant!r}: pretrain with the same ptha_variant")
        return model
    spec = {**SHAPES_RETRIEVER, **cfg.model, "ptha_variant": cfg.ptha_variant}
    if cfg.pretrained:
        return load_pretrained_retriever(cfg.pretrained, spec, device)
    texts = [t.caption for t in train.triplets]
    # pretraining on synthetic triplets: the annotated texts' words must be in the vocabulary too
    texts += caption_texts(cfg.dataset, cfg.cirr_root, cfg.train_split, cfg.categories)
    if cfg.data_json:
        from core.data import load_karpathy

        records = load_karpathy(cfg.data_json, Path(cfg.data_json).parent, "train", check_files=False)
        texts += [c for r in records for c in r.captions]
    return build_shapes_retriever(cfg.dense_checkpoint, texts, spec)


def _reverse_texts(cfg: TrainConfig, train: CIRSplit, image_root: str) -> dict:
    if not cfg.reverse_root:
        raise InputError("config", "reverse_root", "PTHA needs the reverse texts (the synthesis output folder)")
    rev = merge_splits(_load(cfg, cfg.reverse_root, f"{cfg.train_split}_reverse", image_root))
    by_id = {t.pairid: t.caption for t in rev.triplets}
    missing = [t.pairid for t in train.triplets if t.pairid not in by_id]
    if missing:
        where = (cirr_files(cfg.reverse_root, f"{cfg.train_split}_reverse")[0] if cfg.dataset == "cirr"
                 else Path(cfg.reverse_root) / "captions" / f"cap.*.{cfg.train_split}_reverse.json")
        raise InputError(where, "pairid", f"no reverse text for {len(missing)} training triplets "
                                          f"(e.g. pairid {missing[0]})")
    return by_id


def batch_targets(batch: Sequence[CIRTriplet], forward: bool, subset_negatives: bool) -> tuple[list[str], list[str]]:
    """(positives, all targets): the queries' own targets first, then their set members as appended negatives.
    Reverse direction (target + reverse text → reference): the positive is the reference. FashionIQ triplets have
    no members, so nothing is appended for them."""
    own = [t.target if forward else t.reference for t in batch]
    extra = []
    if subset_negatives:
        for t in batch:
            start = t.reference if forward else t.target  # never the query's own image
            extra += [m for m in t.members if m != start]
    return own, own + extra


def step_images(share: Sequence[CIRTriplet], reverse: bool, cfg: TrainConfig, variant: str = "official") -> list[str]:
    """Every image whose tokens `step_loss` reads for this rank's share of a batch (what a live source encodes), for
    a model of `variant`."""
    names = [t.reference for t in share] + batch_targets(share, True, cfg.subset_negatives)[1]
    if reverse:
        names += [t.target for t in share]
        if variant == "project":  # its reverse branch is scored against the references
            names += batch_targets(share, False, cfg.subset_negatives and cfg.reverse_subset_negatives)[1]
    return names


def _targets(model: ComposedRetriever, batch: Sequence[CIRTriplet], bank: TokenBank, forward: bool,
             subset_negatives: bool, dist: DistInfo) -> tuple[torch.Tensor, list[str]]:
    """The global batch's target embeddings (own targets, then appended negatives) and their image names: this rank
    encodes its share's, the others' come by all-gather with gradients."""
    _, names = batch_targets(batch, forward, subset_negatives)
    share = rank_share(batch, dist)
    own, mine = batch_targets(share, forward, subset_negatives)
    emb = model.encode_target_tokens_from_tokens(bank.get(mine, model.device))
    if not dist.enabled:
        return emb, names
    shares = [batch[r * len(batch) // dist.world_size:(r + 1) * len(batch) // dist.world_size]
              for r in range(dist.world_size)]
    extra = [len(batch_targets(s, forward, subset_negatives)[1]) - len(s) for s in shares]
    sizes = [[len(s) for s in shares], extra]
    return gather_target_rows([emb[:len(own)], emb[len(own):]], sizes, dist), names


def step_loss(model: ComposedRetriever, batch: Sequence[CIRTriplet], bank: TokenBank, reverse: dict | None,
              cfg: TrainConfig, dist: DistInfo | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """PTHA paper, total fine-tuning loss: L = w_q2t·L_q2t + w_t2t·L_t2t + α·L_p2p (or L_q2t alone for the "q2t"
    objective), in the model's variant (`ptha_variant`).

    `batch` is the global batch. This rank's queries are its share (rows `offset`..), scored against every rank's
    targets; the loss is the mean over its rows (DDP's average over ranks makes it the global mean)."""
    dist = dist or DistInfo(device=model.device)
    dev = model.device
    share = rank_share(batch, dist)
    offset = dist.rank * len(batch) // dist.world_size if dist.enabled else 0
    captions = [t.caption for t in share]
    query, proto = model.encode_queries_with_prototype(bank.get([t.reference for t in share], dev), captions)
    targets, fwd_ids = _targets(model, batch, bank, True, cfg.subset_negatives, dist)
    temperature = model.contrastive_temperature(cfg.temperature)
    l_q2t = query_target_contrastive(query, targets, temperature, target_ids=fwd_ids, row_offset=offset,
                                     label_smoothing=model.label_smoothing)
    if reverse is None:
        return l_q2t, {"q2t": l_q2t.item()}
    tgt_tok = bank.get([t.target for t in share], dev)
    reverse_texts = [reverse[t.pairid] for t in share]
    if model.variant == "official":
        # L_t2t: the text-only branch (prompt tokens + modification text, no image) against the same targets,
        # without label smoothing, as released
        l_t2t = query_target_contrastive(model.encode_text_only(captions), targets, temperature, target_ids=fwd_ids,
                                         row_offset=offset)
        # L_p2p: MSE of the mean first-hop tokens, the reverse branch (target + reverse text) detached
        l_p2p = prototype_mse(proto, model.encode_reverse_prototype(tgt_tok, reverse_texts))
    else:
        rev_query, rev_proto = model.encode_queries_with_prototype(tgt_tok, reverse_texts)
        refs, rev_ids = _targets(model, batch, bank, False, cfg.subset_negatives and cfg.reverse_subset_negatives,
                                 dist)
        l_t2t = query_target_contrastive(rev_query, refs, cfg.temperature, target_ids=rev_ids, row_offset=offset)
        # the reverse prototypes are a fixed anchor (detached): gathered without gradients
        l_p2p = prototype_alignment(proto, gather_with_grad(rev_proto.detach(), dist), cfg.temperature,
                                    row_offset=offset)
    loss = ptha_loss(l_q2t, l_t2t, l_p2p, cfg.w_q2t, cfg.w_t2t, cfg.alpha)
    return loss, {"q2t": l_q2t.item(), "t2t": l_t2t.item(), "p2p": l_p2p.item()}


class StepLoss(torch.nn.Module):
    """`step_loss` as one module forward, so DDP sees one forward (and one backward) per step."""

    def __init__(self, model: ComposedRetriever, reverse: dict | None, cfg: TrainConfig, dist: DistInfo):
        super().__init__()
        self.model, self.reverse, self.cfg, self.dist = model, reverse, cfg, dist

    def forward(self, batch: Sequence[CIRTriplet], bank: TokenBank) -> tuple[torch.Tensor, dict[str, float]]:
        return step_loss(self.model, batch, bank, self.reverse, self.cfg, self.dist)


def _wrap(model: ComposedRetriever, reverse: dict | None, cfg: TrainConfig, dist: DistInfo) -> torch.nn.Module:
    module = StepLoss(model, reverse, cfg, dist)
    if dist.enabled:
        # The frozen tower is identical on every rank (loaded by name): DDP need not broadcast or sync it.
        frozen = [f"model.image_encoder.{n}" for n, _ in model.image_encoder.named_parameters()]
        frozen += [f"model.image_encoder.{n}" for n, _ in model.image_encoder.named_buffers()]
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, frozen)
    # L_q2t alone never reaches the prototype projection (project) or the prompt tokens (official)
    return wrap_model(module, dist, find_unused_parameters=cfg.objective != "ptha")


def fit(model: ComposedRetriever, train: CIRSplit, bank: TokenBank, val: CIRSplit | Sequence[CIRSplit],
        val_bank: TokenBank, reverse: dict | None, cfg: TrainConfig, dist: DistInfo | None = None) -> dict:
    """Train on `train`, select on `val`'s Avg (a CIRSplit, or the per-category units of FashionIQ). `bank` and
    `val_bank` are token sources (cir.features: a cache, or the tower run live)."""
    dist = dist or DistInfo(device=model.device)
    out = Path(cfg.output_dir)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    triplets = [t for t in train.triplets if t.target is not None]
    if not triplets:
        raise InputError(cfg.train_root or cfg.cirr_root, f"{cfg.train_split} captions", "no triplet with a target")
    bs = min(cfg.batch_size, len(triplets))
    check_batch_divisible(bs, dist.world_size)  # bs < batch_size when there are fewer triplets
    per_epoch = len(triplets) // bs
    total = per_epoch * cfg.epochs
    params = [p for p in model.parameters() if p.requires_grad]
    loss_module = _wrap(model, reverse, cfg, dist)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = warmup_cosine(opt, cfg.warmup_steps, total, floor=0.1)
    step, tracker_best = 0, BestTracker()
    # the folder was checked by core.run_folder (run): a checkpoint-last here is this config's run
    if (out / LAST / "training_state.pt").is_file():
        step, meta = resume(out / LAST, stage="cir", model=model, optimizer=opt, scheduler=sched)
        tracker_best = BestTracker(meta.get("best_val_avg"))
        if dist.is_main:
            print(f"[cir.train] resuming {out} at step {step}")
    tracker = Tracker(out, cfg, name=f"cir-{out.name}", enabled=dist.is_main)
    best_metrics: dict = {}
    bar = progress(total=total, initial=step, desc=f"cir {out.name}", enabled=dist.is_main)
    while step < total:
        epoch, offset = divmod(step, per_epoch)
        loss_module.train()
        batches = [[triplets[i] for i in idx] for idx in epoch_batches(len(triplets), bs, cfg.seed, epoch)[offset:]]
        images = [step_images(rank_share(b, dist), reverse is not None, cfg, model.variant) for b in batches]
        for batch, tokens in zip(batches, bank.batches(images)):
            with autocast(dist.device):
                loss, parts = loss_module(batch, tokens)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            step += 1
            logged = {f"train/{k}": all_reduce_mean(v, dist) for k, v in parts.items()}
            logged["train/loss"] = all_reduce_mean(loss.item(), dist)
            bar.update(1)
            bar.set_postfix(loss=f"{logged['train/loss']:.3f}")
            tracker.log(logged, step=step)
        if dist.is_main:  # rank 0 validates and writes; the others wait
            new_best = _validate_and_save(model, val, val_bank, opt, sched, step, tracker, tracker_best, cfg)
            best_metrics = new_best or best_metrics
        barrier(dist)
    bar.close()
    result: dict = {}
    if dist.is_main:
        if not best_metrics:  # resumed after the last epoch finished: read what the best checkpoint recorded
            best_metrics = read_json(out / BEST / "meta.json").get("val", {})
        result = {"val": best_metrics, "objective": cfg.objective, "ptha_variant": model.variant, "alpha": cfg.alpha,
                  "n_train": len(triplets),
                  "steps": total}
        write_metrics(out, result)
        shown = ", ".join(f"{k} {best_metrics[k]:.2f}" for k in ("R@1", "Rs@1", "mean/R@10", "mean/R@50")
                          if k in best_metrics)
        print(f"[cir.train] {out.name}: best val Avg {best_metrics.get('Avg', float('nan')):.2f} ({shown})")
    tracker.finish()
    return broadcast_object(result, dist)


def _validate_and_save(model: ComposedRetriever, val: CIRSplit | Sequence[CIRSplit], val_bank: TokenBank,
                       opt: torch.optim.Optimizer, sched, step: int, tracker: Tracker, best: BestTracker,
                       cfg: TrainConfig) -> dict:
    """Validate, keep the best checkpoint and the last one; returns the metrics when they are a new best."""
    out = Path(cfg.output_dir)
    metrics = evaluate_model(model, val, val_bank)
    tracker.log({f"val/{k}": v for k, v in metrics.items()}, step=step)
    new_best = {}
    if best.update(metrics["Avg"]):
        new_best = {**metrics, "step": step}
        save_checkpoint(out / BEST, stage="cir", model=model, step=step, config=cfg,
                        extra={"val": metrics}, model_files=model.write_files)
    save_checkpoint(out / LAST, stage="cir", model=model, step=step, optimizer=opt, scheduler=sched, config=cfg,
                    extra={"best_val_avg": best.best}, model_files=model.write_files)
    return new_best


if __name__ == "__main__":
    main()
