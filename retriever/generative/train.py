"""Train the ComGTIR-D retriever, one stage per call (`--stage`):

- `seqid`   (stage 1): the T5 learns to generate the sequential identifier of the query's image;
- `setid`   (stage 2): from the stage-1 model, the encoder and the set head learn the order-invariant identifier
                       (decoder, token embeddings and LM head frozen: its checkpoint is the stage-1 decoder with the
                       stage-2 encoder and set head, what the original merges by hand between its stages 2 and 3);
- `unified` (stage 3): from the stage-2 model, both objectives jointly.

A new (stage-1) model takes its code-token embeddings and set head from the RQ-VAE codebook (`code_init`, read
from the `rqvae` run folder) as the original ComGTIR-D does, or keeps T5's random init.

Reads `data_dir/{train,val}.jsonl` (retriever.generative.prepare_dataset) and `codes.json`; writes
`output_dir/checkpoint-last/` (resumable) and `output_dir/checkpoint-best/` (best validation recall: constrained
beam search over the validation images for seqid/unified, set-score ranking for setid), and `metrics.json`
after every validation. A finished stage is skipped unless `--overwrite true`. Runs under `torchrun` unchanged:
each rank trains on its share of every global batch (DDP), rank 0 validates and writes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from core.checkpoint import BEST, LAST, BestTracker, read_meta, resume, save_checkpoint
from core.config import hf_config_keys, nested_keys, parse_config, save_config
from core.device import autocast, seed_everything
from core.distributed import (all_reduce_mean, barrier, check_batch_divisible, cleanup, init_distributed, rank_share,
                              world_size_from_env, wrap_model)
from core.errors import InputError
from core.io import atomic_write_json, read_jsonl
from core.logging import Tracker, progress, write_metrics
from core.metrics import mean_recall, recall_from_rankings
from core.run_folder import CONFIG, open_run_folder
from core.schedule import warmup_cosine
from retriever.generative.decoding import (CorpusTrie, check_prior_mode, generate_rankings, multi_hot, set_index_lists,
                                           set_scores)
from retriever.generative.model import (CODE_INITS, SET_HEADS, SET_LOSSES, SET_POOLINGS, SHAPES_T5, STAGE,
                                        GenerativeRetriever, RetrieverSpec, build_t5, init_from_codebook,
                                        load_retriever, save_retriever_files, set_loss)
from retriever.generative.vocab import CodeVocab, build_tokenizer
from rqvae.codes import Identifiers
from rqvae.train import load_rqvae

STAGES = ("seqid", "setid", "unified")


def t5_keys() -> dict[str, None]:
    """What `model` may set: T5's config attributes, or `pretrained` (a name or folder)."""
    from transformers import T5Config

    return hf_config_keys(T5Config, "pretrained")


@dataclass
class RetrieverTrainConfig:
    stage: str = "seqid"  # seqid (stage 1), setid (stage 2), unified (stage 3)
    data_dir: str = "runs/shapes/comgtir/data"
    codes: str = "runs/shapes/comgtir/codes.json"
    output_dir: str = "runs/shapes/comgtir/stage1_seqid"
    init: str = ""  # checkpoint folder to start from ("" = a new model; stage 2 and 3 need one)
    rqvae: str = "runs/shapes/comgtir/rqvae"  # the RQ-VAE run folder whose codebook code_init reads (its checkpoint-best)
    code_init: str = "random"  # a new model's code-token embeddings and set head: codebook (the original's) or random
    set_pooling: str = "mean"  # how the set head pools the encoder states: max (the original's) or mean; padding excluded
    set_head: str = "mlp"  # linear (the original's one layer) or mlp (one hidden GELU layer)
    tokenizer: str = "word"  # "word": a WordLevel tokenizer trained on the training queries; else a pretrained name/folder
    model: dict = field(default_factory=lambda: dict(SHAPES_T5), metadata=nested_keys(t5_keys))  # T5 config, or {"pretrained": "t5-base"}
    epochs: int = 20
    max_steps: int = 0  # stop after this many steps if > 0 (overrides epochs; validates at the last step)
    batch_size: int = 128  # global batch, split over ranks
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    set_loss: str = "margin"  # margin (the paper's, default) or infonce (the reference code's)
    margin: float = 0.5
    set_weight: float = 1.0  # weight of the set loss in the unified stage
    guidance: float = 1.0  # weight of the set prior when decoding at validation (unified stage)
    prior: str = "token"  # its form: token (per-code bonus), prefix (best reachable image) or both
    prefix_top: int = 500  # images kept per query by the prefix prior
    num_beams: int = 10
    eval_every: int = 2  # epochs between validations (and the last epoch)
    max_val_queries: int = 500
    max_query_len: int = 48
    overwrite: bool = False  # start afresh where output_dir holds another run (core.run_folder)
    wandb_project: str = "genretrieval"
    seed: int = 0


class QueryData:
    """The rows of a retriever JSONL as tensors the training loop indexes by batch."""

    def __init__(self, path: Path, ids: Identifiers, vocab_spec: RetrieverSpec | None = None):
        self.rows = read_jsonl(path, required=["query", "imgid", "code", "set"])
        if not self.rows:
            raise InputError(path, None, "no rows")
        ids.require([r["imgid"] for r in self.rows])
        for n, r in enumerate(self.rows):
            if tuple(r["code"]) != ids.seq[str(r["imgid"])]:
                raise InputError(path, f"line {n + 1}: code", f"differs from {ids.path} for image {r['imgid']}: "
                                                              "regenerate the retriever data after generate_codes")
        self.queries = [r["query"] for r in self.rows]
        self.imgids = [r["imgid"] for r in self.rows]
        self.codes = torch.tensor([r["code"] for r in self.rows], dtype=torch.long)
        self.set_size = ids.set_size
        self.set_index = set_index_lists([r["set"] for r in self.rows])  # multi-hot only per batch (multi_hot)
        keys = {i: k for k, i in enumerate(dict.fromkeys(map(str, self.imgids)))}
        self.image_index = torch.tensor([keys[str(i)] for i in self.imgids])

    def __len__(self) -> int:
        return len(self.rows)


def split_corpus(ids: Identifiers, split: str, width: int) -> CorpusTrie:
    keys = [k for k, s in ids.split.items() if s == split]
    if not keys:
        raise InputError(ids.path, "images[].split", f"no image of split {split!r}")
    imgids = [int(k) if k.lstrip("-").isdigit() else k for k in keys]
    return CorpusTrie(torch.tensor([ids.seq[k] for k in keys]), imgids, width, set_index_lists([ids.sets[k] for k in keys]))


def set_ranking_recall(model: GenerativeRetriever, tokenizer: Any, queries: list[str], positives: list, ids: Identifiers,
                       split: str, device: torch.device, max_len: int) -> dict[str, float]:
    """Recall of ranking the split's images by set score alone (mean of their codes' scores)."""
    keys = [k for k, s in ids.split.items() if s == split]
    sets = set_index_lists([ids.sets[k] for k in keys])
    ranked = []
    with torch.no_grad():
        for i in range(0, len(queries), 256):
            b = tokenizer(queries[i:i + 256], padding=True, truncation=True, max_length=max_len, return_tensors="pt").to(device)
            with autocast(device):
                hidden = model.encode(b["input_ids"], b["attention_mask"])
                logits = model.set_logits(hidden, b["attention_mask"]).float().cpu()
            top = set_scores(logits, sets).topk(min(10, len(keys)), dim=1).indices
            ranked += [[keys[j] for j in row] for row in top.tolist()]
    return recall_from_rankings(ranked, [[str(p)] for p in positives])


def validate(cfg: RetrieverTrainConfig, model: GenerativeRetriever, tokenizer: Any, vocab: CodeVocab, val: QueryData,
             ids: Identifiers, trie: CorpusTrie, device: torch.device) -> dict[str, float]:
    rng = np.random.default_rng(cfg.seed)
    pick = np.sort(rng.permutation(len(val))[:cfg.max_val_queries])
    queries, positives = [val.queries[i] for i in pick], [val.imgids[i] for i in pick]
    model.eval()
    if cfg.stage == "setid":
        return set_ranking_recall(model, tokenizer, queries, positives, ids, "val", device, cfg.max_query_len)
    ranked, _ = generate_rankings(model, tokenizer, vocab, trie, queries, num_beams=cfg.num_beams,
                                  guidance=cfg.guidance if cfg.stage == "unified" else 0.0,
                                  max_query_len=cfg.max_query_len, device=device, desc="validating",
                                  prior=cfg.prior, prefix_top=cfg.prefix_top)
    return recall_from_rankings(ranked, [[p] for p in positives])


def load_codebooks(rqvae: str | Path, ids: Identifiers) -> torch.Tensor:
    """The RQ-VAE codebook [books, K, dim] of a run folder (its checkpoint-best) or a checkpoint folder, checked
    against the identifiers the retriever's vocabulary is built from: K codes per level, one book per level (or one
    shared book)."""
    folder = Path(rqvae)
    if not (folder / "rqvae.json").is_file() and (folder / BEST / "rqvae.json").is_file():
        folder = folder / BEST
    if not (folder / "rqvae.json").is_file():
        raise InputError(folder, "rqvae", "no RQ-VAE checkpoint here (rqvae.json is missing): set --rqvae to the "
                                          "tokenizer's run folder")
    books = load_rqvae(folder).quantizer.codebooks.detach()
    want = (1 if ids.shared else ids.levels, ids.codebook_size)
    if tuple(books.shape[:2]) != want:
        raise InputError(folder / "model.pt", "quantizer.codebooks",
                         f"shape {list(books.shape)} does not fit the identifiers of {ids.path} ({ids.levels} levels × "
                         f"{ids.codebook_size} codes, {'one shared book' if ids.shared else 'one book per level'}): "
                         "expected [" + ", ".join(map(str, want)) + ", dim]")
    return books


def check_set_head_options(cfg: RetrieverTrainConfig) -> None:
    for key, allowed in (("code_init", CODE_INITS), ("set_pooling", SET_POOLINGS), ("set_head", SET_HEADS)):
        if getattr(cfg, key) not in allowed:
            raise InputError("config", key, f"must be one of {allowed}, got {getattr(cfg, key)!r}")


def build_model(cfg: RetrieverTrainConfig, ids: Identifiers, train: QueryData,
                codebooks: torch.Tensor | None = None) -> tuple[GenerativeRetriever, Any, CodeVocab]:
    if cfg.init:
        model, tokenizer, vocab, _ = load_retriever(cfg.init)
        model.spec.check_fits(ids)
        for key in ("set_pooling", "set_head"):  # a trained model keeps its set head: say so rather than ignore the key
            if getattr(model.spec, key) != getattr(cfg, key):
                raise InputError(Path(cfg.init) / "retriever.json", key,
                                 f"the model was built with {getattr(model.spec, key)!r}, the config asks for "
                                 f"{getattr(cfg, key)!r}")
        return model, tokenizer, vocab
    if cfg.stage != "seqid":
        raise InputError("config", "init", f"stage {cfg.stage} starts from a trained model: set --init")
    tokenizer = build_tokenizer(cfg.tokenizer, train.queries, ids.levels, ids.codebook_size, ids.suffix_size)
    vocab = CodeVocab(tokenizer, ids.levels, ids.codebook_size, ids.suffix_size, source=cfg.tokenizer)
    t5 = build_t5(cfg.model, len(tokenizer), vocab.pad_id, vocab.eos_id)
    model = GenerativeRetriever(t5, RetrieverSpec.from_identifiers(ids, cfg.set_pooling, cfg.set_head))
    if cfg.code_init == "codebook":
        init_from_codebook(model, vocab, codebooks, seed=cfg.seed)
    return model, tokenizer, vocab


def trainable_parameters(model: GenerativeRetriever, stage: str) -> list[torch.nn.Parameter]:
    """Stage 2 trains the encoder blocks and the set head only, so merging with stage 1 is well defined."""
    if stage != "setid":
        return [p for p in model.parameters() if p.requires_grad]
    model.t5.shared.weight.requires_grad_(False)
    return list(model.t5.encoder.block.parameters()) + list(model.t5.encoder.final_layer_norm.parameters()) + \
        list(model.set_head.parameters())


class StepLoss(nn.Module):
    """One training step's loss as one forward pass, so DDP's hooks see every parameter it uses: the sequential
    identifier's cross-entropy (teacher forcing) on this rank's queries, plus the set identifier's loss of those
    queries against every image of the global batch (see set_loss)."""

    def __init__(self, model: GenerativeRetriever, seq_w: float, set_w: float, kind: str, margin: float):
        super().__init__()
        self.model, self.seq_w, self.set_w, self.kind, self.margin = model, seq_w, set_w, kind, margin

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None,
                sets: torch.Tensor, image_index: torch.Tensor, first: int,
                shares: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        hidden = self.model.encode(input_ids, attention_mask)
        loss, parts = hidden.new_zeros(()).float(), {}
        if self.seq_w:
            parts["seq"] = self.model.seq_loss(hidden, attention_mask, labels)
            loss = loss + self.seq_w * parts["seq"]
        if self.set_w:
            logits = self.model.set_logits(hidden, attention_mask).float()
            parts["set"] = set_loss(logits, sets, image_index, self.kind, self.margin, first, shares)
            loss = loss + self.set_w * parts["set"]
        return loss, parts


def main(argv: Sequence[str] | None = None) -> Path:
    cfg = parse_config(RetrieverTrainConfig, argv)
    check_batch_divisible(cfg.batch_size, world_size_from_env())
    if cfg.stage not in STAGES:
        raise InputError("config", "stage", f"must be one of {STAGES}, got {cfg.stage!r}")
    if cfg.set_loss not in SET_LOSSES:
        raise InputError("config", "set_loss", f"must be one of {SET_LOSSES}, got {cfg.set_loss!r}")
    check_prior_mode(cfg.prior)
    check_set_head_options(cfg)
    out = Path(cfg.output_dir)
    ids = Identifiers(cfg.codes)
    # read before any work: only a new model is initialised, a stage started from a checkpoint keeps its weights
    codebooks = load_codebooks(cfg.rqvae, ids) if cfg.code_init == "codebook" and not cfg.init else None
    train = QueryData(Path(cfg.data_dir) / "train.jsonl", ids)
    val = QueryData(Path(cfg.data_dir) / "val.jsonl", ids)
    start = open_run_folder(out, cfg, overwrite=cfg.overwrite)
    if start.reuse_finished and (out / BEST).is_dir() and read_meta(out / BEST, STAGE).get("done"):
        print(f"stage {cfg.stage} already trained in {out} (--overwrite true to retrain)")
        return out / BEST

    dist = init_distributed()
    # one batch of the whole data when it is smaller, cut to a multiple of the ranks (no-op for one process)
    batch_size = min(cfg.batch_size, len(train)) // dist.world_size * dist.world_size
    if batch_size < 1:
        raise InputError(Path(cfg.data_dir) / "train.jsonl", None,
                         f"{len(train)} training rows cannot be split over {dist.world_size} processes")
    seed_everything(cfg.seed)  # the same seed on every rank: the same new model (DDP also broadcasts it)
    device = dist.device
    model, tokenizer, vocab = build_model(cfg, ids, train, codebooks)
    model.to(device)
    trie = split_corpus(ids, "val", vocab.token_ids.shape[1])
    params = trainable_parameters(model, cfg.stage)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, len(train) // cfg.batch_size)
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    warmup = min(cfg.warmup_steps, total // 10 + 1)
    scheduler = warmup_cosine(optimizer, warmup, total)
    step, best = 0, BestTracker()
    if not start.fresh and (out / LAST).is_dir():
        step, meta = resume(out / LAST, stage=STAGE, model=model, optimizer=optimizer, scheduler=scheduler)
        best = BestTracker(meta.get("best"))
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / CONFIG)
    tracker = Tracker(out, cfg, project=cfg.wandb_project, name=f"comgtir-{cfg.stage}-{out.parent.parent.name}",
                      enabled=dist.is_main)
    files = save_retriever_files(model, tokenizer)
    seq_w = 0.0 if cfg.stage == "setid" else 1.0
    set_w = {"seqid": 0.0, "setid": 1.0, "unified": cfg.set_weight}[cfg.stage]
    # seqid leaves the set head unused, setid the decoder
    step_loss = wrap_model(StepLoss(model, seq_w, set_w, cfg.set_loss, cfg.margin), dist,
                           find_unused_parameters=not (seq_w and set_w))
    history: list[dict[str, Any]] = []

    bar = progress(total=total, initial=step, desc=f"training {cfg.stage}", enabled=dist.is_main)
    order_epoch, order = -1, None
    while step < total:
        epoch = step // steps_per_epoch
        if epoch != order_epoch:  # one shuffle per epoch, seeded by it, so a resumed run draws the same batches
            order_epoch, order = epoch, np.random.default_rng((cfg.seed, epoch)).permutation(len(train))
        # the global batch is drawn alike on every rank; each rank trains on its contiguous share
        batch = torch.from_numpy(order[(step % steps_per_epoch) * cfg.batch_size:][:batch_size])
        mine = rank_share(batch, dist)
        enc = tokenizer([train.queries[i] for i in mine], padding=True, truncation=True,
                        max_length=cfg.max_query_len, return_tensors="pt").to(device)
        labels = torch.cat([vocab.encode(train.codes[mine]), torch.full((len(mine), 1), vocab.eos_id)], dim=1)
        model.train()
        with autocast(device):
            loss, parts = step_loss(enc["input_ids"], enc["attention_mask"], labels.to(device),
                                    multi_hot(train.set_index[batch], train.set_size).to(device),
                                    train.image_index[batch].to(device),
                                    dist.rank * len(mine), dist.world_size)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        end_of_epoch = step % steps_per_epoch == 0
        if (end_of_epoch and (epoch + 1) % cfg.eval_every == 0) or step == total:
            # the losses logged are the global batch's (the mean of the ranks' losses)
            logged = {k: all_reduce_mean(v.item(), dist) for k, v in parts.items()}
            mean_loss = all_reduce_mean(loss.item(), dist)
            if dist.is_main:
                _validate_and_save(cfg, model, tokenizer, vocab, val, ids, trie, device, step, epoch, logged, best,
                                   history, tracker, optimizer, scheduler, files, mean_loss)
            barrier(dist)  # the other ranks wait for validation and the checkpoints
    bar.close()
    if dist.is_main:
        meta = read_meta(out / BEST, STAGE)
        atomic_write_json(out / BEST / "meta.json", {**meta, "done": True})
        print(f"[{cfg.stage}] best validation {meta.get('val')} → {out / BEST}")
    tracker.finish()
    barrier(dist)
    cleanup(dist)
    return out / BEST


def _validate_and_save(cfg: RetrieverTrainConfig, model: GenerativeRetriever, tokenizer: Any, vocab: CodeVocab,
                       val: QueryData, ids: Identifiers, trie: CorpusTrie, device: torch.device, step: int, epoch: int,
                       parts: dict[str, float], best: BestTracker, history: list, tracker: Tracker,
                       optimizer: torch.optim.Optimizer, scheduler: Any, files: Any, loss: float) -> None:
    """Rank 0: validation recall, metrics.json, checkpoint-best (if better) and checkpoint-last."""
    out = Path(cfg.output_dir)
    recall = validate(cfg, model, tokenizer, vocab, val, ids, trie, device)
    score = mean_recall(recall)
    history.append({"step": step, "epoch": epoch + 1, **parts, **{f"val/{k}": v for k, v in recall.items()}})
    tracker.log({f"train/{k}": v for k, v in parts.items()} | {f"val/{k}": v for k, v in recall.items()}, step=step)
    write_metrics(out, {"stage": cfg.stage, "best_val_mean_recall": max(best.best or 0, score), "history": history})
    if best.update(score):
        save_checkpoint(out / BEST, stage=STAGE, model=model, step=step, config=cfg,
                        extra={"val": recall, "val_mean_recall": score, "train_stage": cfg.stage}, model_files=files)
    save_checkpoint(out / LAST, stage=STAGE, model=model, step=step, optimizer=optimizer, scheduler=scheduler,
                    config=cfg, extra={"best": best.best, "train_stage": cfg.stage}, model_files=files)
    print(f"[{cfg.stage}] epoch {epoch + 1}: loss {loss:.3f} val {recall}")


if __name__ == "__main__":
    main()
