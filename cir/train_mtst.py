"""Train the MTST modification-text generator on the annotated training triplets (MTST paper §3.1).

Shapes: (1) the tiny language model learns the world's language from text alone (captions + the annotated modification
texts), then is frozen; (2) the Q-Former, query tokens, segment vectors and LM projection learn to write the
modification text of (reference, target) — the InstructBLIP objective, image encoder and LM frozen. Real data: the
pretrained InstructBLIP parts (`--pretrained Salesforce/instructblip-vicuna-7b`) and step (2) only.

Reads a CIRR-layout folder and the frozen dense image tower; writes `{output_dir}/checkpoint-best/` (the generator
folder, `core.modtext.load_modification_generator`), `metrics.json` (ROUGE on held-out annotated pairs: val for
selection, test for the report, plus a shuffled-reference chance level) and `config.yaml`. A finished run is not redone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from cir.data import CIRSplit, load_cirr
from cir.features import TokenBank, token_bank
from cir.metrics import generation_scores
from core.checkpoint import BEST
from core.config import parse_config, save_config
from core.device import get_device, seed_everything, set_threads
from core.errors import InputError
from core.io import read_json
from core.logging import Tracker, format_table, progress, write_metrics
from core.modtext import ModificationTextGenerator, build_shapes_generator, load_pretrained_instructblip


@dataclass
class MTSTConfig:
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
    overwrite: bool = False  # retrain even if output_dir holds a finished run


def main(argv: Sequence[str] | None = None) -> dict:
    cfg = parse_config(MTSTConfig, argv)
    set_threads(cfg.threads)
    out = Path(cfg.output_dir)
    if (out / "metrics.json").is_file() and (out / BEST / "meta.json").is_file() and not cfg.overwrite:
        print(f"[mtst] {out} is finished; reusing it (--overwrite true to retrain)")
        return read_json(out / "metrics.json")
    seed_everything(cfg.seed)
    device = get_device()
    image_root = cfg.image_root or None
    splits = {name: load_cirr(cfg.cirr_root, name, image_root) for name in
              dict.fromkeys(s for s in (cfg.train_split, cfg.val_split, cfg.test_split) if s)}
    train = splits[cfg.train_split]
    gen = _build(cfg, train).to(device)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    tracker = Tracker(out, cfg, name="cir-mtst")
    cache = Path(cfg.cache_dir) if cfg.cache_dir else out.parent / "features"
    banks = {name: token_bank(gen.image_encoder, s.images, cache / f"{Path(cfg.cirr_root).name}_{name}.pt")
             for name, s in splits.items()}
    if not cfg.pretrained and cfg.lm_steps > 0:
        pretrain_language_model(gen, _lm_corpus(cfg, train), cfg, tracker)
    gen.language_model.requires_grad_(not cfg.freeze_language_model)
    best = train_qformer(gen, train, banks[cfg.train_split], splits[cfg.val_split], banks[cfg.val_split], cfg, tracker)
    final = load_best(out)
    metrics = {"val": best}
    if cfg.test_split:
        metrics["test"] = evaluate_generation(final, splits[cfg.test_split], banks[cfg.test_split], cfg,
                                              cfg.test_pairs, n_examples=8)
    metrics["model_id"] = final.model_id
    write_metrics(out, metrics)
    tracker.log({f"test/{k}": v for k, v in metrics.get("test", {}).items() if isinstance(v, float)})
    tracker.finish()
    print(format_table({k: {m: v for m, v in metrics[k].items() if isinstance(v, float)}
                        for k in ("val", "test") if k in metrics}, title="MTST generation quality (%)"))
    return metrics


def _build(cfg: MTSTConfig, train: CIRSplit) -> ModificationTextGenerator:
    if cfg.pretrained:
        return load_pretrained_instructblip(cfg.pretrained)
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


def pretrain_language_model(gen: ModificationTextGenerator, corpus: tuple[list[str], list[str]], cfg: MTSTConfig,
                            tracker: Tracker) -> None:
    """Shapes only: teach the tiny LM the world's language from text (half modification texts, half captions), the
    stand-in for a pretrained LLM; it is frozen afterwards."""
    mod_texts, captions = corpus
    lm, tok = gen.language_model, gen.lm_tokenizer
    lm.requires_grad_(True)
    lm.train()
    opt = torch.optim.AdamW(lm.parameters(), lr=cfg.lm_lr, weight_decay=0.01)
    rng = np.random.default_rng(cfg.seed)
    bar = progress(range(cfg.lm_steps), desc="mtst: LM on text")
    for step in bar:
        half = cfg.lm_batch_size // 2 if captions else cfg.lm_batch_size
        batch = [mod_texts[i] for i in rng.integers(len(mod_texts), size=half)]
        if captions:
            batch += [captions[i] for i in rng.integers(len(captions), size=cfg.lm_batch_size - half)]
        enc = tok([tok.bos_token + t + tok.eos_token for t in batch], add_special_tokens=False, padding=True,
                  return_tensors="pt")
        ids, mask = enc["input_ids"].to(gen.device), enc["attention_mask"].to(gen.device)
        loss = lm(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _lr(opt, cfg.lm_lr, step, cfg.lm_steps, 20)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            tracker.log({"lm/loss": loss.item()}, step=step)
    lm.eval()


def _lr(opt: torch.optim.Optimizer, base: float, step: int, total: int, warmup: int) -> None:
    """Linear warmup, cosine decay to 10%."""
    if step < warmup:
        f = (step + 1) / warmup
    else:
        f = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    for g in opt.param_groups:
        g["lr"] = base * f


def train_qformer(gen: ModificationTextGenerator, train: CIRSplit, bank: TokenBank, val: CIRSplit, val_bank: TokenBank,
                  cfg: MTSTConfig, tracker: Tracker) -> dict:
    """The InstructBLIP objective on (reference, target) → annotated text; best val ROUGE-L is kept."""
    triplets = [t for t in train.triplets if t.target is not None]
    if not triplets:
        raise InputError(cfg.cirr_root, f"cap.rc2.{cfg.train_split}.json", "no annotated triplet with a target")
    params = gen.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed + 1)
    best: dict = {}
    bar = progress(range(1, cfg.steps + 1), desc="mtst: Q-Former")
    gen.train()
    for step in bar:
        batch = [triplets[i] for i in rng.integers(len(triplets), size=cfg.batch_size)]
        ref = bank.get([t.reference for t in batch], gen.device)
        tgt = bank.get([t.target for t in batch], gen.device)
        loss = gen.loss(ref, tgt, [t.caption for t in batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        _lr(opt, cfg.lr, step, cfg.steps, cfg.warmup_steps)
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            tracker.log({"mtst/loss": loss.item()}, step=cfg.lm_steps + step)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            scores = evaluate_generation(gen, val, val_bank, cfg, cfg.eval_pairs)
            gen.train()
            tracker.log({f"val/{k}": v for k, v in scores.items() if isinstance(v, float)}, step=cfg.lm_steps + step)
            if not best or scores["ROUGE-L"] > best["ROUGE-L"]:
                best = {**scores, "step": step}
                gen.save_pretrained(Path(cfg.output_dir) / BEST, meta={"step": step, "val_ROUGE-L": scores["ROUGE-L"]})
    return best


@torch.no_grad()
def evaluate_generation(gen: ModificationTextGenerator, split: CIRSplit, bank: TokenBank, cfg: MTSTConfig,
                        n_pairs: int, n_examples: int = 0) -> dict:
    """ROUGE-1/ROUGE-L of generated vs annotated texts on the first `n_pairs` triplets, and the chance level
    (each generated text scored against another pair's annotation)."""
    gen.eval()
    triplets = [t for t in split.triplets if t.target is not None][:n_pairs]
    preds: list[str] = []
    for i in range(0, len(triplets), 128):
        chunk = triplets[i:i + 128]
        preds += gen.generate_from_tokens(bank.get([t.reference for t in chunk], gen.device),
                                          bank.get([t.target for t in chunk], gen.device),
                                          cfg.max_new_tokens, cfg.num_beams)
    refs = [t.caption for t in triplets]
    scores = generation_scores(preds, refs)
    shifted = refs[1:] + refs[:1]  # another pair's text: what ROUGE gives a generator that ignores the images
    scores.update({f"chance/{k}": v for k, v in generation_scores(preds, shifted).items() if k != "exact"})
    if n_examples:
        scores["examples"] = [{"reference": t.reference, "target": t.target, "annotated": t.caption, "generated": p}
                              for t, p in zip(triplets[:n_examples], preds)]
    return scores


def load_best(out: Path) -> ModificationTextGenerator:
    from core.modtext import load_modification_generator

    return load_modification_generator(out / BEST)


if __name__ == "__main__":
    main()
