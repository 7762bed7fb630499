"""Train the MTST modification-text generator on the annotated training triplets (MTST paper §3.1).

Shapes: (1) the tiny language model learns the world's language from text alone (captions + the annotated modification
texts), then is frozen; (2) the Q-Former, query tokens, segment vectors and LM projection learn to write the
modification text of (reference, target) — the InstructBLIP objective, image encoder and LM frozen. Real data: the
pretrained InstructBLIP parts (`--pretrained Salesforce/instructblip-vicuna-7b`) and step (2) only.

Reads a CIRR-layout folder and the frozen dense image tower; writes `{output_dir}/checkpoint-best/` (the generator
folder, `core.modtext.load_modification_generator`), `metrics.json` (ROUGE on held-out annotated pairs: val for
selection, test for the report, plus a shuffled-reference chance level), `config.yaml` and `checkpoint-last/` (the
trained weights without the frozen parts, optimizer, step, RNG: written when the LM pretraining ends and at every
validation, so a killed run resumes where it stopped). A finished run is not redone (core.run_folder).

Under torchrun every rank draws the same global batch (one seeded stream, as one process draws it) and trains on its
contiguous share; the text losses are token sums over the share divided by the global batch's token count / world
size, so DDP's average over ranks is the global batch's token mean, as in one process. A batch size the world size
does not divide is refused before work; rank 0 evaluates and writes, the others wait.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from cir.data import CIRSplit, load_cirr
from cir.features import TokenBank, check_mode, token_source
from cir.metrics import generation_scores
from core.checkpoint import BEST, LAST, read_meta, resume, save_checkpoint
from core.config import parse_config, save_config
from core.data import LoaderOptions, verify_images
from core.device import autocast, seed_everything, set_threads
from core.distributed import (DistInfo, all_reduce_mean, barrier, broadcast_object, check_batch_divisible, cleanup,
                              init_distributed, rank_share, shard_range, wrap_model, world_size_from_env)
from core.errors import InputError
from core.io import read_json
from core.logging import Tracker, format_table, progress, write_metrics
from core.modtext import (ModificationTextGenerator, build_shapes_generator, load_pretrained_instructblip,
                          token_cross_entropy)
from core.run_folder import open_run_folder
from core.schedule import warmup_cosine_factor


@dataclass
class MTSTConfig(LoaderOptions):
    cirr_root: str = "data/shapes/cirr"  # folder with captions/ and image_splits/ (CIRR rc2 layout)
    image_root: str = ""  # default: {cirr_root}/img_raw
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"  # held-out annotated pairs for the reported generation quality ("" to skip)
    data_json: str = ""  # Karpathy captions: extra text for the Shapes LM's language pretraining ("" = none)
    dense_checkpoint: str = "runs/shapes/dense/checkpoint-best"  # frozen image encoder (Shapes)
    pretrained: str = ""  # an InstructBLIP checkpoint name for real data; "" = the tiny Shapes generator
    output_dir: str = "runs/shapes/cir/mtst"
    cache_dir: str = ""  # image-token cache; default {output_dir}/../features
    # "cache": the frozen tower's tokens cached once as float16 on disk, read by memory map (the default, right for the
    # Shapes world's small tower); "live": the tower runs on every batch in bf16 (InstructBLIP's ViT-g on CIRR)
    image_tokens: str = "cache"
    num_query_tokens: int = 16
    freeze_language_model: bool = True  # the paper trains only the Q-Former side
    difference_tokens: bool = True  # Shapes: the Q-Former also reads target − reference patch tokens
    lm_steps: int = 400  # Shapes: language pretraining steps of the tiny LM (text only)
    lm_batch_size: int = 64
    lm_lr: float = 3e-3
    steps: int = 800  # Q-Former steps
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    eval_every: int = 200
    eval_pairs: int = 200  # val pairs generated at each evaluation
    test_pairs: int = 500
    max_new_tokens: int = 32
    num_beams: int = 1
    seed: int = 0
    threads: int = 0  # torch CPU threads; 0 = one per core, 1 when the CPU is shared with other busy jobs
    overwrite: bool = False  # start afresh where output_dir holds another run (core.run_folder)


def main(argv: Sequence[str] | None = None) -> dict:
    cfg = parse_config(MTSTConfig, argv)
    try:
        return run(cfg)
    finally:
        cleanup(DistInfo(world_size=world_size_from_env()))


def run(cfg: MTSTConfig) -> dict:
    """Train the generator as `cfg` says (or return the metrics of the finished run); every rank calls this."""
    set_threads(cfg.threads)
    world = world_size_from_env()
    check_batch_divisible(cfg.batch_size, world)
    if not cfg.pretrained and cfg.lm_steps > 0:
        check_batch_divisible(cfg.lm_batch_size, world, key="lm_batch_size")
    check_mode(cfg.image_tokens)
    out = Path(cfg.output_dir)
    start = open_run_folder(out, cfg, overwrite=cfg.overwrite)
    if start.reuse_finished and (out / "metrics.json").is_file() and (out / BEST / "meta.json").is_file():
        print(f"[mtst] {out} is finished; reusing it (--overwrite true to retrain)")
        return read_json(out / "metrics.json")
    seed_everything(cfg.seed)
    image_root = cfg.image_root or None
    splits = {name: load_cirr(cfg.cirr_root, name, image_root) for name in
              dict.fromkeys(s for s in (cfg.train_split, cfg.val_split, cfg.test_split) if s)}
    train = splits[cfg.train_split]
    dist = init_distributed()
    if cfg.verify_images:  # each rank decodes its share of the files once
        paths = list(dict.fromkeys(p for s in splits.values() for p in s.images.values()))
        verify_images([paths[i] for i in shard_range(len(paths), dist)], cfg.cirr_root, cfg)
    gen = _build(cfg, train, dist.device).to(dist.device)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    tracker = Tracker(out, cfg, name="cir-mtst", enabled=dist.is_main)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else out.parent / "features"
    banks = {name: token_source(cfg.image_tokens, gen.image_encoder, s.images,
                                cache / f"{Path(cfg.cirr_root).name}_{name}", cfg, dist) for name, s in splits.items()}
    pretrain_lm = not cfg.pretrained and cfg.lm_steps > 0
    objective = _wrap(gen, cfg, dist, pretrain_lm)
    last = out / LAST if not start.fresh and (out / LAST / "training_state.pt").is_file() else None
    if pretrain_lm:
        pretrain_language_model(gen, objective, _lm_corpus(cfg, train), cfg, tracker, dist, resume_from=last)
    gen.language_model.requires_grad_(not cfg.freeze_language_model)
    best = train_qformer(gen, objective, train, banks[cfg.train_split], splits[cfg.val_split], banks[cfg.val_split],
                         cfg, tracker, dist, resume_from=last)
    metrics: dict = {}
    if dist.is_main:
        final = load_best(out, dist.device)
        metrics = {"val": best}
        if cfg.test_split:
            metrics["test"] = evaluate_generation(final, splits[cfg.test_split], banks[cfg.test_split], cfg,
                                                  cfg.test_pairs, n_examples=8)
        metrics["model_id"] = final.model_id
        write_metrics(out, metrics)
        tracker.log({f"test/{k}": v for k, v in metrics.get("test", {}).items() if isinstance(v, float)})
        print(format_table({k: {m: v for m, v in metrics[k].items() if isinstance(v, float)}
                            for k in ("val", "test") if k in metrics}, title="MTST generation quality (%)"))
    tracker.finish()
    return broadcast_object(metrics, dist)


class MTSTObjective(torch.nn.Module):
    """The generator's two training losses, each step one module forward (what DDP needs): kind "lm", the Shapes
    LM's next-token loss on text; kind "text", the modification-text loss of (reference, target) tokens."""

    def __init__(self, gen: ModificationTextGenerator):
        super().__init__()
        self.gen = gen

    def forward(self, kind: str, texts: Sequence[str], normalizer: float, ref: torch.Tensor | None = None,
                tgt: torch.Tensor | None = None) -> torch.Tensor:
        if kind == "lm":
            return lm_text_loss(self.gen, texts, normalizer)
        return self.gen.loss(ref, tgt, texts, normalizer)


def _wrap(gen: ModificationTextGenerator, cfg: MTSTConfig, dist: DistInfo, pretrain_lm: bool) -> torch.nn.Module:
    """DDP over the generator. DDP syncs only what requires a gradient when it is built, so the LM is made trainable
    first if any phase trains it; a phase that leaves some parameters out (the Q-Former during LM pretraining, a
    frozen LM after it) is why unused parameters are allowed."""
    lm_trains = pretrain_lm or not cfg.freeze_language_model
    gen.language_model.requires_grad_(lm_trains)
    objective = MTSTObjective(gen)
    if dist.enabled:
        # frozen pretrained parts are identical on every rank (loaded by name): DDP need not broadcast them
        frozen = [m for m, on in (("image_encoder", True), ("language_model", not lm_trains)) if on]
        names = [f"gen.{m}.{n}" for m in frozen for n, _ in
                 [*getattr(gen, m).named_parameters(), *getattr(gen, m).named_buffers()]]
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(objective, names)
    return wrap_model(objective, dist, find_unused_parameters=True)


def _build(cfg: MTSTConfig, train: CIRSplit, device: torch.device) -> ModificationTextGenerator:
    if cfg.pretrained:
        return load_pretrained_instructblip(cfg.pretrained, device)
    texts = [t.caption for t in train.triplets] + _captions(cfg)
    return build_shapes_generator(cfg.dense_checkpoint, texts, cfg.num_query_tokens,
                                  freeze_language_model=cfg.freeze_language_model,
                                  difference_tokens=cfg.difference_tokens)


def _captions(cfg: MTSTConfig) -> list[str]:
    if not cfg.data_json:
        return []
    from core.data import load_karpathy

    records = load_karpathy(cfg.data_json, Path(cfg.data_json).parent / "images", cfg.train_split, check_files=False)
    return [c for r in records for c in r.captions]


def _lm_corpus(cfg: MTSTConfig, train: CIRSplit) -> tuple[list[str], list[str]]:
    return [t.caption for t in train.triplets], _captions(cfg)


def _lm_batch(tok, texts: Sequence[str]) -> list[str]:
    return [tok.bos_token + t + tok.eos_token for t in texts]


def lm_text_loss(gen: ModificationTextGenerator, texts: Sequence[str], normalizer: float) -> torch.Tensor:
    """Next-token loss of the LM on `texts` alone: the token sum divided by `normalizer` (see `train_qformer`)."""
    enc = gen.lm_tokenizer(_lm_batch(gen.lm_tokenizer, texts), add_special_tokens=False, padding=True,
                           return_tensors="pt")
    ids, mask = enc["input_ids"].to(gen.device), enc["attention_mask"].to(gen.device)
    with autocast(gen.device):
        logits = gen.language_model(input_ids=ids, attention_mask=mask).logits
    return token_cross_entropy(logits, ids.masked_fill(mask == 0, -100), normalizer)


def pretrain_language_model(gen: ModificationTextGenerator, objective: torch.nn.Module,
                            corpus: tuple[list[str], list[str]], cfg: MTSTConfig, tracker: Tracker,
                            dist: DistInfo | None = None, resume_from: Path | None = None) -> None:
    """Shapes only: teach the tiny LM the world's language from text (half modification texts, half captions), the
    stand-in for a pretrained LLM; it is frozen afterwards. Each rank trains on its share of the global batch.
    Ends with checkpoint-last/ of phase "lm"; `resume_from` (a checkpoint-last/ of either phase) skips the phase."""
    dist = dist or DistInfo(device=gen.device)
    mod_texts, captions = corpus
    lm, tok = gen.language_model, gen.lm_tokenizer
    lm.requires_grad_(True)
    lm.train()
    opt = torch.optim.AdamW(lm.parameters(), lr=cfg.lm_lr, weight_decay=0.01)
    if resume_from is not None:
        if read_meta(resume_from, MTST_STAGE)["phase"] == "lm":  # a Q-Former checkpoint restores the LM itself
            resume(resume_from, stage=MTST_STAGE, model=TrainedWeights(gen, cfg), optimizer=opt)
        lm.eval()
        return
    rng = np.random.default_rng(cfg.seed)
    bar = progress(range(cfg.lm_steps), desc="mtst: LM on text", enabled=dist.is_main)
    for step in bar:
        half = cfg.lm_batch_size // 2 if captions else cfg.lm_batch_size
        batch = [mod_texts[i] for i in rng.integers(len(mod_texts), size=half)]
        if captions:
            batch += [captions[i] for i in rng.integers(len(captions), size=cfg.lm_batch_size - half)]
        # every text scores len - 1 tokens (BOS is given, not predicted)
        scored = sum(len(ids) - 1 for ids in tok(_lm_batch(tok, batch), add_special_tokens=False)["input_ids"])
        loss = objective("lm", rank_share(batch, dist), scored / dist.world_size)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _set_lr(opt, cfg.lm_lr * warmup_cosine_factor(step, 20, cfg.lm_steps, floor=0.1))
        if step % 50 == 0:
            shown = all_reduce_mean(loss.item(), dist)
            bar.set_postfix(loss=f"{shown:.3f}")
            tracker.log({"lm/loss": shown}, step=step)
    lm.eval()
    if dist.is_main:
        save_checkpoint(Path(cfg.output_dir) / LAST, stage=MTST_STAGE, model=TrainedWeights(gen, cfg), step=0,
                        optimizer=opt, config=cfg, extra={"phase": "lm"})
    barrier(dist)


MTST_STAGE = "mtst"


class TrainedWeights(torch.nn.Module):
    """What checkpoint-last/ saves of the generator: everything but its frozen parts (the image tower always, the
    language model when it is a pretrained one left frozen), so a real run's last checkpoint is the trained part."""

    def __init__(self, gen: ModificationTextGenerator, cfg: MTSTConfig):
        super().__init__()
        object.__setattr__(self, "gen", gen)  # not a submodule: only state_dict below is seen
        frozen_lm = bool(cfg.pretrained) and cfg.freeze_language_model
        self.skipped = ("image_encoder.",) + (("language_model.",) if frozen_lm else ())

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.gen.state_dict().items() if not k.startswith(self.skipped)}

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True, assign: bool = False):
        missing, unexpected = self.gen.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith(self.skipped)]
        if missing or unexpected:
            raise InputError("checkpoint-last/model.pt", "weights",
                             f"does not match this generator: missing {missing[:3]}, unexpected {unexpected[:3]}")


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def train_qformer(gen: ModificationTextGenerator, objective: torch.nn.Module, train: CIRSplit, bank: TokenBank,
                  val: CIRSplit, val_bank: TokenBank, cfg: MTSTConfig, tracker: Tracker,
                  dist: DistInfo | None = None, resume_from: Path | None = None) -> dict:
    """The InstructBLIP objective on (reference, target) → annotated text; best val ROUGE-L is kept (rank 0), and
    checkpoint-last/ of phase "qformer" after every validation, which `resume_from` continues."""
    dist = dist or DistInfo(device=gen.device)
    triplets = [t for t in train.triplets if t.target is not None]
    if not triplets:
        raise InputError(cfg.cirr_root, f"cap.rc2.{cfg.train_split}.json", "no annotated triplet with a target")
    params = gen.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed + 1)
    # the global batches of every step, drawn up front in the order one process draws them
    batches = [[triplets[i] for i in rng.integers(len(triplets), size=cfg.batch_size)] for _ in range(cfg.steps)]
    shares = [rank_share(b, dist) for b in batches]
    best: dict = {}
    done = 0
    if resume_from is not None and read_meta(resume_from, MTST_STAGE)["phase"] == "qformer":
        done, meta = resume(resume_from, stage=MTST_STAGE, model=TrainedWeights(gen, cfg), optimizer=opt)
        best = meta.get("best", {})
    batches, shares = batches[done:], shares[done:]
    bar = progress(total=cfg.steps, initial=done, desc="mtst: Q-Former", enabled=dist.is_main)
    objective.train()
    tokens = bank.batches([[t.reference for t in s] + [t.target for t in s] for s in shares])
    for step, (batch, share, step_tokens) in enumerate(zip(batches, shares, tokens), start=done + 1):
        ref = step_tokens.get([t.reference for t in share], gen.device)
        tgt = step_tokens.get([t.target for t in share], gen.device)
        texts = [t.caption for t in batch]
        loss = objective("text", [t.caption for t in share], gen.label_count(texts) / dist.world_size, ref, tgt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        _set_lr(opt, cfg.lr * warmup_cosine_factor(step, cfg.warmup_steps, cfg.steps, floor=0.1))
        bar.update(1)
        if step % 25 == 0:
            shown = all_reduce_mean(loss.item(), dist)
            bar.set_postfix(loss=f"{shown:.3f}")
            tracker.log({"mtst/loss": shown}, step=cfg.lm_steps + step)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            if dist.is_main:  # rank 0 evaluates and writes; the others wait
                scores = evaluate_generation(gen, val, val_bank, cfg, cfg.eval_pairs)
                tracker.log({f"val/{k}": v for k, v in scores.items() if isinstance(v, float)},
                            step=cfg.lm_steps + step)
                if not best or scores["ROUGE-L"] > best["ROUGE-L"]:
                    best = {**scores, "step": step}
                    gen.save_pretrained(Path(cfg.output_dir) / BEST,
                                        meta={"step": step, "val_ROUGE-L": scores["ROUGE-L"]})
                save_checkpoint(Path(cfg.output_dir) / LAST, stage=MTST_STAGE, model=TrainedWeights(gen, cfg),
                                step=step, optimizer=opt, config=cfg,
                                extra={"phase": "qformer", "best": best})
            barrier(dist)
            objective.train()
    bar.close()
    return best


@torch.no_grad()
def evaluate_generation(gen: ModificationTextGenerator, split: CIRSplit, bank: TokenBank, cfg: MTSTConfig,
                        n_pairs: int, n_examples: int = 0) -> dict:
    """ROUGE-1/ROUGE-L of generated vs annotated texts on the first `n_pairs` triplets, and the chance level
    (each generated text scored against another pair's annotation)."""
    gen.eval()
    triplets = [t for t in split.triplets if t.target is not None][:n_pairs]
    chunks = [triplets[i:i + 128] for i in range(0, len(triplets), 128)]
    preds: list[str] = []
    for chunk, tokens in zip(chunks, bank.batches([[t.reference for t in c] + [t.target for t in c] for c in chunks])):
        preds += gen.generate_from_tokens(tokens.get([t.reference for t in chunk], gen.device),
                                          tokens.get([t.target for t in chunk], gen.device),
                                          cfg.max_new_tokens, cfg.num_beams)
    refs = [t.caption for t in triplets]
    scores = generation_scores(preds, refs)
    shifted = refs[1:] + refs[:1]  # another pair's text: what ROUGE gives a generator that ignores the images
    scores.update({f"chance/{k}": v for k, v in generation_scores(preds, shifted).items() if k != "exact"})
    if n_examples:
        scores["examples"] = [{"reference": t.reference, "target": t.target, "annotated": t.caption, "generated": p}
                              for t, p in zip(triplets[:n_examples], preds)]
    return scores


def load_best(out: Path, device: torch.device | None = None) -> ModificationTextGenerator:
    from core.modtext import load_modification_generator

    return load_modification_generator(out / BEST, device)


if __name__ == "__main__":
    main()
