"""Train the Shapes ITM cross-encoder (the re-ranker that stands in for BLIP's ITM head on the Shapes world).

Reads the dense checkpoint (frozen features), the Karpathy JSON + images of the train/val splits and the dense
embeddings (`emb_dir`, to mine hard negatives: the dense model's top images that are not the caption's own).
Each training query is its caption with its image and `negatives` hard negatives (softmax over the group).
Validation: re-rank the dense top-`val_depth` of validation captions; the best R@1 is kept in `checkpoint-best/`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from core.checkpoint import BEST, LAST, BestTracker, read_meta, resume, save_checkpoint
from core.config import parse_config
from core.data import load_images, load_karpathy
from core.device import get_device, seed_everything
from core.encoders import load_dual_encoder
from core.io import atomic_write_json, load_embeddings
from core.logging import Tracker, progress, write_metrics
from core.metrics import recall_from_rankings
from retriever.generative.itm import ITM_STAGE, DenseTokenFeatures, ITMSpec, ShapesITM, itm_loss, save_itm_files


@dataclass
class ITMTrainConfig:
    dense_checkpoint: str = "runs/shapes/dense/checkpoint-best"
    emb_dir: str = "runs/shapes/dense/emb"
    data_json: str = "runs/shapes/data/dataset_shapes.json"
    image_root: str = "runs/shapes/data/images"
    output_dir: str = "runs/shapes/comgtir/itm"
    width: int = 128
    layers: int = 2
    heads: int = 4
    pool: int = 2  # average-pool the patch grid by this factor (fewer image tokens, cheaper pairs)
    negatives: int = 3  # hard negatives per query
    hard_k: int = 16  # negatives are drawn from the dense top-k
    queries_per_epoch: int = 4000  # captions drawn per epoch (one per image first)
    epochs: int = 3
    batch_size: int = 64
    lr: float = 5e-4
    val_queries: int = 300
    val_depth: int = 10
    overwrite: bool = False
    resume: bool = True
    wandb_project: str = "genretrieval"
    seed: int = 0


def hard_negatives(emb_dir: Path, split: str, k: int) -> tuple[list[dict], list, np.ndarray]:
    """For each caption of the split, the dense top-k image rows that are not its own image."""
    image_emb, image_ids = load_embeddings(emb_dir / f"image_{split}")
    text_emb, text_ids = load_embeddings(emb_dir / f"text_{split}")
    row_of = {i: r for r, i in enumerate(image_ids)}
    sims = text_emb @ image_emb.T
    own = np.array([row_of[t["imgid"]] for t in text_ids])
    sims[np.arange(len(sims)), own] = -np.inf
    return text_ids, image_ids, np.argsort(-sims, axis=1)[:, :k]


def score_pairs(model: ShapesITM, feats: DenseTokenFeatures, texts: Sequence[str], image_tokens: torch.Tensor,
                device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """ITM logits for aligned (text, image-token) rows. Each distinct text goes through the text tower once: a
    query re-ranked at depth k appears k times in `texts`."""
    unique = list(dict.fromkeys(texts))
    row = {t: i for i, t in enumerate(unique)}
    tokens, masks, embs = text_features(feats, unique, device, batch_size)
    out = []
    for i in range(0, len(texts), batch_size):
        idx = torch.tensor([row[t] for t in texts[i:i + batch_size]])
        length = int(masks[idx].sum(1).max())  # drop the all-padding tail of this batch
        out.append(model(tokens[idx, :length].to(device), masks[idx, :length].to(device), embs[idx].to(device),
                         image_tokens[i:i + batch_size].to(device)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def text_features(feats: DenseTokenFeatures, texts: Sequence[str], device: torch.device,
                  batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token features [N, L, W], mask [N, L], pooled embeddings [N, E]) of `texts`, padded to one length L."""
    chunks = [feats.text(texts[i:i + batch_size], device) for i in range(0, len(texts), batch_size)]
    length = max(t.shape[1] for t, _, _ in chunks)
    pad = lambda x: torch.nn.functional.pad(x, (0, 0, 0, length - x.shape[1]) if x.dim() == 3 else (0, length - x.shape[1]))  # noqa: E731
    return (torch.cat([pad(t).cpu() for t, _, _ in chunks]), torch.cat([pad(m).cpu() for _, m, _ in chunks]),
            torch.cat([e.cpu() for _, _, e in chunks]))


@torch.no_grad()
def validate(cfg: ITMTrainConfig, model: ShapesITM, feats: DenseTokenFeatures, tokens: torch.Tensor, device) -> dict:
    model.eval()
    image_emb, image_ids = load_embeddings(Path(cfg.emb_dir) / "image_val")
    text_emb, text_ids = load_embeddings(Path(cfg.emb_dir) / "text_val")
    pick = np.sort(np.random.default_rng(cfg.seed).permutation(len(text_ids))[:cfg.val_queries])
    top = np.argsort(-(text_emb[pick] @ image_emb.T), axis=1)[:, :cfg.val_depth]
    texts = [text_ids[i]["raw"] for i in pick for _ in range(cfg.val_depth)]
    scores = score_pairs(model, feats, texts, tokens[top.reshape(-1)], device).view(len(pick), -1)
    reranked = np.take_along_axis(top, np.argsort(-scores.numpy(), axis=1, kind="stable"), 1)
    positives = [[text_ids[i]["imgid"]] for i in pick]
    as_ids = lambda rows: [[image_ids[r] for r in row] for row in rows]  # noqa: E731
    return {"itm": recall_from_rankings(as_ids(reranked), positives), "dense": recall_from_rankings(as_ids(top), positives)}


def main(argv: Sequence[str] | None = None) -> Path:
    cfg = parse_config(ITMTrainConfig, argv)
    out = Path(cfg.output_dir)
    read_meta(cfg.dense_checkpoint, stage="dense")
    train_recs = load_karpathy(cfg.data_json, cfg.image_root, "train")
    val_recs = load_karpathy(cfg.data_json, cfg.image_root, "val")
    text_ids, image_ids, negs = hard_negatives(Path(cfg.emb_dir), "train", cfg.hard_k)
    if (out / BEST).is_dir() and not cfg.overwrite and read_meta(out / BEST, ITM_STAGE).get("done"):
        print(f"ITM already trained in {out} (--overwrite true to retrain)")
        return out / BEST
    seed_everything(cfg.seed)
    device = get_device()
    encoder = load_dual_encoder(cfg.dense_checkpoint).to(device)
    for p in encoder.parameters():
        p.requires_grad_(False)
    feats = DenseTokenFeatures(encoder, cfg.pool)
    path_of = {r.imgid: r.path for r in train_recs}
    train_tokens = torch.cat([feats.image(b, device).cpu() for b in torch.split(
        load_images([path_of[i] for i in image_ids], encoder.preprocess, desc="loading train images"), 256)])
    val_ids = load_embeddings(Path(cfg.emb_dir) / "image_val")[1]
    vpath = {r.imgid: r.path for r in val_recs}
    val_tokens = torch.cat([feats.image(b, device).cpu() for b in torch.split(
        load_images([vpath[i] for i in val_ids], encoder.preprocess, desc="loading val images"), 256)])
    t_dim = int(feats.text(["a"], device)[0].shape[-1])
    spec = ITMSpec(t_dim, train_tokens.shape[-1], cfg.width, cfg.layers, cfg.heads, train_tokens.shape[1] - 1,
                   float(encoder.clip.logit_scale.exp()))
    model = ShapesITM(spec).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    row_of = {i: r for r, i in enumerate(image_ids)}
    n_q = min(cfg.queries_per_epoch, len(text_ids))
    steps_per_epoch = max(1, n_q // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    step, best = 0, BestTracker()
    if cfg.resume and (out / LAST).is_dir() and not cfg.overwrite:
        step, meta = resume(out / LAST, stage=ITM_STAGE, model=model, optimizer=optimizer)
        best = BestTracker(meta.get("best"))
    tracker = Tracker(out, cfg, project=cfg.wandb_project, name=f"comgtir-itm-{out.parent.parent.name}")
    history = []
    if step == 0:
        # the head starts as the dense score: validating the start keeps a correction that does not help out of best
        val = validate(cfg, model, feats, val_tokens, device)
        history.append({"step": 0, **val})
        print(f"[itm] start: val itm {val['itm']} dense {val['dense']}")
        best.update(val["itm"]["R@1"])
        save_checkpoint(out / BEST, stage=ITM_STAGE, model=model, step=0, config=cfg, extra={"val": val},
                        model_files=save_itm_files(model))
    bar = progress(total=total, initial=step, desc="training itm")
    while step < total:
        epoch = step // steps_per_epoch
        rng = np.random.default_rng((cfg.seed, epoch))
        queries = rng.permutation(len(text_ids))[:n_q]
        batch = queries[(step % steps_per_epoch) * cfg.batch_size:][:cfg.batch_size]
        pos = np.array([row_of[text_ids[q]["imgid"]] for q in batch])
        neg = np.stack([rng.choice(negs[q], cfg.negatives, replace=False) for q in batch])
        rows = np.concatenate([pos[:, None], neg], axis=1)  # [B, 1 + n]
        group = 1 + cfg.negatives
        model.train()
        t, m, e = feats.text([text_ids[q]["raw"] for q in batch], device)
        t, m, e = (x.repeat_interleave(group, 0) for x in (t, m, e))
        logits = model(t, m, e, train_tokens[rows.reshape(-1)].to(device)).view(len(batch), group)
        loss = itm_loss(logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % steps_per_epoch == 0:
            val = validate(cfg, model, feats, val_tokens, device)
            history.append({"step": step, "loss": loss.item(), **val})
            tracker.log({"train/loss": loss.item(), **{f"val/itm/{k}": v for k, v in val["itm"].items()}}, step=step)
            write_metrics(out, {"history": history})
            print(f"[itm] epoch {epoch + 1}: loss {loss.item():.3f} val itm {val['itm']} dense {val['dense']}")
            if best.update(val["itm"]["R@1"]):
                save_checkpoint(out / BEST, stage=ITM_STAGE, model=model, step=step, config=cfg,
                                extra={"val": val}, model_files=save_itm_files(model))
            save_checkpoint(out / LAST, stage=ITM_STAGE, model=model, step=step, optimizer=optimizer, config=cfg,
                            extra={"best": best.best}, model_files=save_itm_files(model))
    bar.close()
    meta = read_meta(out / BEST, ITM_STAGE)
    atomic_write_json(out / BEST / "meta.json", {**meta, "done": True})
    tracker.finish()
    return out / BEST


if __name__ == "__main__":
    main()
