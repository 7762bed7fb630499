"""Train the Shapes ITM cross-encoder (the re-ranker that stands in for BLIP's ITM head on the Shapes world).

Reads the dense checkpoint (frozen features), the Karpathy JSON + images of the train/val splits and the dense
embeddings (`emb_dir`, to mine hard negatives: the dense model's top images that are not the caption's own).
Each training query is its caption with its image and `negatives` hard negatives (softmax over the group).
Validation: re-rank the dense top-`val_depth` of validation captions; the best R@1 is kept in `checkpoint-best/`.
The frozen encoder's image tokens are cached in `output_dir/cache/image_tokens_{train,val}` (float16 rows written
as they are made from DataLoader batches, one shard per rank, read back by memory map) and kept while the same
encoder, pooling and image list would make them again. Runs under `torchrun` unchanged: each rank trains on its
share of every global batch (DDP), rank 0 validates and writes.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from core.checkpoint import BEST, LAST, BestTracker, read_meta, resume, save_checkpoint
from core.config import parse_config, save_config
from core.data import LoaderOptions, image_batches, load_karpathy_splits, verify_images
from core.device import autocast, seed_everything
from core.distributed import (DistInfo, all_reduce_mean, barrier, broadcast_object, check_batch_divisible, cleanup,
                              init_distributed, rank_share, shard_range, world_size_from_env, wrap_model)
from core.encoders import load_dual_encoder
from core.errors import InputError
from core.io import (EmbeddingWriter, ShardedRows, atomic_write_json, embeddings_made_by, file_digest, json_digest,
                     load_embeddings, open_embeddings)
from core.logging import Tracker, progress, write_metrics
from core.metrics import recall_from_rankings
from core.run_folder import CONFIG, open_run_folder
from retriever.generative.itm import ITM_STAGE, DenseTokenFeatures, ITMSpec, ShapesITM, itm_loss, save_itm_files


@dataclass
class ITMTrainConfig(LoaderOptions):
    dense_checkpoint: str = "runs/shapes/dense/checkpoint-best"
    emb_dir: str = "runs/shapes/dense/emb"
    data_json: str = "runs/shapes/data/dataset_shapes.json"
    image_root: str = "runs/shapes/data/images"
    output_dir: str = "runs/shapes/comgtir/itm"
    width: int = 128
    layers: int = 2
    heads: int = 4
    dropout: float = 0.1  # in the fusion transformer
    pool: int = 2  # average-pool the patch grid by this factor (fewer image tokens, cheaper pairs)
    negatives: int = 3  # hard negatives per query
    hard_k: int = 16  # negatives are drawn from the dense top-k
    queries_per_epoch: int = 4000  # captions drawn per epoch (one per image first)
    epochs: int = 3
    batch_size: int = 64  # global batch of queries, split over ranks
    encode_batch_size: int = 256  # images per batch when caching the image tokens
    lr: float = 5e-4
    val_queries: int = 300
    val_depth: int = 10
    overwrite: bool = False  # start afresh where output_dir holds another run (core.run_folder)
    wandb_project: str = "genretrieval"
    seed: int = 0


def hard_negatives(emb_dir: Path, split: str, k: int, block: int = 4096) -> tuple[list[dict], list, np.ndarray]:
    """For each caption of the split, the dense top-k image rows that are not its own image (captions a block at a
    time: the table of similarities is never held for the whole split)."""
    image_emb, image_ids = load_embeddings(emb_dir / f"image_{split}")
    text_emb, text_ids = open_embeddings(emb_dir / f"text_{split}")
    row_of = {i: r for r, i in enumerate(image_ids)}
    own = np.array([row_of[t["imgid"]] for t in text_ids])
    top = np.empty((len(text_ids), min(k, len(image_ids))), dtype=np.int64)
    for start in range(0, len(text_ids), block):
        sims = np.asarray(text_emb[start:start + block], dtype=np.float32) @ image_emb.T
        sims[np.arange(len(sims)), own[start:start + len(sims)]] = -np.inf
        top[start:start + len(sims)] = np.argsort(-sims, axis=1)[:, :k]
    return text_ids, image_ids, top


def score_pairs(model: ShapesITM, feats: DenseTokenFeatures, texts: Sequence[str], image_tokens: torch.Tensor,
                device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """ITM logits for aligned (text, image-token) rows. Each distinct text goes through the text tower once: a
    query re-ranked at depth k appears k times in `texts`."""
    unique = list(dict.fromkeys(texts))
    row = {t: i for i, t in enumerate(unique)}
    return score_rows(model, text_features(feats, unique, device, batch_size), [row[t] for t in texts],
                      image_tokens, device, batch_size)


def score_rows(model: ShapesITM, text_feats: tuple[torch.Tensor, torch.Tensor, torch.Tensor], text_rows: Sequence[int],
               image_tokens: torch.Tensor, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """ITM logits of (text row `text_rows[i]` of `text_feats`, image tokens `image_tokens[i]`) for every i."""
    tokens, masks, embs = text_feats
    out = []
    for i in range(0, len(text_rows), batch_size):
        idx = torch.as_tensor(text_rows[i:i + batch_size], dtype=torch.long)
        length = int(masks[idx].sum(1).max())  # drop the all-padding tail of this batch
        with autocast(device):
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


def token_shape(feats: DenseTokenFeatures, device: torch.device) -> tuple[int, int]:
    """(rows, width) of one image's tokens (patches + the pooled row), from one blank image."""
    size = feats.encoder.image_size
    return tuple(feats.image(torch.zeros(1, 3, size, size), device).shape[1:])


def image_token_cache(prefix: Path, paths: Sequence[Path], ids: list, feats: DenseTokenFeatures, made_by: dict,
                      cfg: ITMTrainConfig, dist: DistInfo) -> np.ndarray | ShardedRows:
    """The frozen encoder's image tokens of `paths` as rows [n, T·W] (float16, memory-mapped), made from DataLoader
    batches when the stored ones are missing or were made otherwise (`made_by`); each rank makes its shard."""
    # rank 0 decides for all: a rank that looked after rank 0 rewrote the manifest would see it fresh and skip its shard
    if not broadcast_object(dist.is_main and _fresh(prefix, ids, made_by), dist):
        rows = shard_range(len(paths), dist)
        t, w = made_by["shape"]
        writer = EmbeddingWriter(prefix, len(rows), t * w, dist.rank, dist.world_size)
        try:
            for pixels in image_batches([paths[i] for i in rows], feats.encoder.preprocess, cfg, cfg.encode_batch_size,
                                        dist.device, cfg.data_json, desc=f"caching {prefix.name}"):
                writer.write(feats.image(pixels, dist.device).cpu().flatten(1).numpy())
        except BaseException:
            writer.abort()
            raise
        # rank 0 writes the manifest (with made_by) last, so it never lists a shard that is not complete
        if not dist.is_main:
            writer.close([ids[i] for i in rows], made_by)
        barrier(dist)
        if dist.is_main:
            writer.close([ids[i] for i in rows], made_by)
        barrier(dist)
    return open_embeddings(prefix)[0]


def _fresh(prefix: Path, ids: list, made_by: dict) -> bool:
    if embeddings_made_by(prefix) != made_by:
        return False
    try:
        return open_embeddings(prefix)[1] == list(ids)
    except InputError:
        return False


def token_rows(cache: np.ndarray | ShardedRows, rows: np.ndarray, shape: tuple[int, int]) -> torch.Tensor:
    """Image tokens [len(rows), T, W] (float32) of the cache's `rows`; only those rows are read from disk."""
    return torch.from_numpy(np.asarray(cache[np.asarray(rows)], dtype=np.float32)).view(len(rows), *shape)


@contextlib.contextmanager
def _rng_kept() -> Iterator[None]:
    """Each DataLoader draws its base seed from torch's global generator: keep the model's initialisation the same
    whether or not the caches were made in this run."""
    state = torch.get_rng_state()
    try:
        yield
    finally:
        torch.set_rng_state(state)


@dataclass
class ValQueries:
    """The validation queries and their dense top-`depth` candidates (fixed by the seed), loaded once."""
    texts: list[str]  # each query repeated `depth` times, aligned with `candidates`
    candidates: np.ndarray  # [queries, depth] rows of the validation images
    positives: list[list]
    image_ids: list

    @classmethod
    def load(cls, cfg: ITMTrainConfig) -> "ValQueries":
        image_emb, image_ids = load_embeddings(Path(cfg.emb_dir) / "image_val")
        text_emb, text_ids = load_embeddings(Path(cfg.emb_dir) / "text_val")
        pick = np.sort(np.random.default_rng(cfg.seed).permutation(len(text_ids))[:cfg.val_queries])
        top = np.argsort(-(text_emb[pick] @ image_emb.T), axis=1)[:, :cfg.val_depth]
        return cls([text_ids[i]["raw"] for i in pick for _ in range(top.shape[1])], top,
                   [[text_ids[i]["imgid"]] for i in pick], image_ids)


@torch.no_grad()
def validate(model: ShapesITM, feats: DenseTokenFeatures, val: ValQueries, cache: np.ndarray | ShardedRows,
             shape: tuple[int, int], device: torch.device) -> dict:
    model.eval()
    top = val.candidates
    scores = score_pairs(model, feats, val.texts, token_rows(cache, top.reshape(-1), shape), device).view(len(top), -1)
    reranked = np.take_along_axis(top, np.argsort(-scores.numpy(), axis=1, kind="stable"), 1)
    as_ids = lambda rows: [[val.image_ids[r] for r in row] for row in rows]  # noqa: E731
    return {"itm": recall_from_rankings(as_ids(reranked), val.positives),
            "dense": recall_from_rankings(as_ids(top), val.positives)}


def _paths(records: Sequence, ids: list, ids_file: Path, data_json: str) -> list[Path]:
    path_of = {r.imgid: r.path for r in records}
    missing = [i for i in ids if i not in path_of]
    if missing:
        raise InputError(ids_file, None, f"image {missing[0]!r} is not in {data_json} ({len(missing)} missing)")
    return [path_of[i] for i in ids]


def main(argv: Sequence[str] | None = None) -> Path:
    cfg = parse_config(ITMTrainConfig, argv)
    check_batch_divisible(cfg.batch_size, world_size_from_env())
    out, emb_dir = Path(cfg.output_dir), Path(cfg.emb_dir)
    read_meta(cfg.dense_checkpoint, stage="dense")
    splits = load_karpathy_splits(cfg.data_json, cfg.image_root, ["train", "val"])
    train_recs, val_recs = splits["train"], splits["val"]
    text_ids, image_ids, negs = hard_negatives(emb_dir, "train", cfg.hard_k)
    start = open_run_folder(out, cfg, overwrite=cfg.overwrite)
    if start.reuse_finished and (out / BEST).is_dir() and read_meta(out / BEST, ITM_STAGE).get("done"):
        print(f"ITM already trained in {out} (--overwrite true to retrain)")
        return out / BEST
    val_ids = open_embeddings(emb_dir / "image_val")[1]
    train_paths = _paths(train_recs, image_ids, emb_dir / "image_train_ids.json", cfg.data_json)
    val_paths = _paths(val_recs, val_ids, emb_dir / "image_val_ids.json", cfg.data_json)
    if cfg.verify_images:
        verify_images(train_paths + val_paths, cfg.data_json, cfg)
    n_q = min(cfg.queries_per_epoch, len(text_ids))
    dist = init_distributed()
    # one batch of the whole epoch when it is smaller, cut to a multiple of the ranks (no-op for one process)
    batch_size = min(cfg.batch_size, n_q) // dist.world_size * dist.world_size
    if batch_size < 1:
        raise InputError(emb_dir / "text_train_ids.json", None,
                         f"{n_q} training queries cannot be split over {dist.world_size} processes")
    seed_everything(cfg.seed)  # the same seed on every rank: the same initial head (DDP also broadcasts it)
    device = dist.device
    encoder = load_dual_encoder(cfg.dense_checkpoint).to(device)
    for p in encoder.parameters():
        p.requires_grad_(False)
    feats = DenseTokenFeatures(encoder, cfg.pool)
    shape = token_shape(feats, device)
    weights = Path(cfg.dense_checkpoint) / "model.pt"
    weights = weights if weights.is_file() else weights.with_name("encoder.json")  # a named model without weights
    made_by = {"kind": "itm image tokens", "encoder": file_digest(weights), "preprocess": repr(encoder.preprocess),
               "pool": cfg.pool, "shape": list(shape)}
    listing = lambda paths: {**made_by, "images": json_digest(list(map(str, paths)))}  # noqa: E731
    with _rng_kept():
        train_cache = image_token_cache(out / "cache" / "image_tokens_train", train_paths, image_ids, feats,
                                        listing(train_paths), cfg, dist)
        val_cache = image_token_cache(out / "cache" / "image_tokens_val", val_paths, val_ids, feats,
                                      listing(val_paths), cfg, dist)
    t_dim = int(feats.text(["a"], device)[0].shape[-1])
    spec = ITMSpec(t_dim, shape[1], cfg.width, cfg.layers, cfg.heads, shape[0] - 1,
                   float(encoder.clip.logit_scale.exp()), cfg.dropout)
    model = ShapesITM(spec).to(device)
    ddp_model = wrap_model(model, dist)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    row_of = {i: r for r, i in enumerate(image_ids)}
    steps_per_epoch = max(1, n_q // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    step, best = 0, BestTracker()
    if not start.fresh and (out / LAST).is_dir():
        step, meta = resume(out / LAST, stage=ITM_STAGE, model=model, optimizer=optimizer)
        best = BestTracker(meta.get("best"))
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / CONFIG)
    tracker = Tracker(out, cfg, project=cfg.wandb_project, name=f"comgtir-itm-{out.parent.parent.name}",
                      enabled=dist.is_main)
    val = ValQueries.load(cfg) if dist.is_main else None
    history = []
    if step == 0:
        if dist.is_main:
            # the head starts as the dense score: validating the start keeps a correction that does not help out of best
            scores = validate(model, feats, val, val_cache, shape, device)
            history.append({"step": 0, **scores})
            print(f"[itm] start: val itm {scores['itm']} dense {scores['dense']}")
            best.update(scores["itm"]["R@1"])
            save_checkpoint(out / BEST, stage=ITM_STAGE, model=model, step=0, config=cfg, extra={"val": scores},
                            model_files=save_itm_files(model))
        barrier(dist)
    group = 1 + cfg.negatives
    bar = progress(total=total, initial=step, desc="training itm", enabled=dist.is_main)
    while step < total:
        epoch = step // steps_per_epoch
        # the global batch and its negatives are drawn alike on every rank; each rank trains on its share
        rng = np.random.default_rng((cfg.seed, epoch))
        queries = rng.permutation(len(text_ids))[:n_q]
        batch = queries[(step % steps_per_epoch) * cfg.batch_size:][:batch_size]
        pos = np.array([row_of[text_ids[q]["imgid"]] for q in batch])
        neg = np.stack([rng.choice(negs[q], cfg.negatives, replace=False) for q in batch])
        rows = np.concatenate([pos[:, None], neg], axis=1)  # [B, 1 + n]
        mine = rank_share(np.arange(len(batch)), dist)
        model.train()
        t, m, e = feats.text([text_ids[q]["raw"] for q in batch[mine]], device)
        t, m, e = (x.repeat_interleave(group, 0) for x in (t, m, e))
        with autocast(device):
            logits = ddp_model(t, m, e, token_rows(train_cache, rows[mine].reshape(-1), shape).to(device))
        loss = itm_loss(logits.float().view(len(mine), group))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % steps_per_epoch == 0:
            mean_loss = all_reduce_mean(loss.item(), dist)  # the global batch's loss
            if dist.is_main:
                scores = validate(model, feats, val, val_cache, shape, device)
                history.append({"step": step, "loss": mean_loss, **scores})
                tracker.log({"train/loss": mean_loss, **{f"val/itm/{k}": v for k, v in scores["itm"].items()}},
                            step=step)
                write_metrics(out, {"history": history})
                print(f"[itm] epoch {epoch + 1}: loss {mean_loss:.3f} val itm {scores['itm']} dense {scores['dense']}")
                if best.update(scores["itm"]["R@1"]):
                    save_checkpoint(out / BEST, stage=ITM_STAGE, model=model, step=step, config=cfg,
                                    extra={"val": scores}, model_files=save_itm_files(model))
                save_checkpoint(out / LAST, stage=ITM_STAGE, model=model, step=step, optimizer=optimizer, config=cfg,
                                extra={"best": best.best}, model_files=save_itm_files(model))
            barrier(dist)  # the other ranks wait for validation and the checkpoints
    bar.close()
    if dist.is_main:
        meta = read_meta(out / BEST, ITM_STAGE)
        atomic_write_json(out / BEST / "meta.json", {**meta, "done": True})
    tracker.finish()
    barrier(dist)
    cleanup(dist)
    return out / BEST


if __name__ == "__main__":
    main()
