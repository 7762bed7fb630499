"""Train the RQ-VAE tokenizer on dense image embeddings (`train_rqvae` of the ComGTIR pipeline).

Reads `emb_dir/{image,text}_{train,val}` (written by `retriever.dense.encode`); writes `output_dir/checkpoint-last/`
(resumable), `output_dir/checkpoint-best/` (lowest validation reconstruction error), each with `rqvae.json`,
and `output_dir/metrics.json`. A finished run is not redone unless `--overwrite true`.
Runs under `torchrun` unchanged: each rank trains on its share of every global batch (DDP), rank 0 validates
and writes.
"""
from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from core.checkpoint import BEST, LAST, BestTracker, read_meta, resume, save_checkpoint
from core.config import parse_config, save_config
from core.device import autocast, seed_everything
from core.distributed import (DistInfo, all_reduce_mean, barrier, check_batch_divisible, cleanup, init_distributed,
                              rank_share, world_size_from_env, wrap_model)
from core.errors import InputError
from core.io import atomic_write_json, load_embeddings
from core.logging import Tracker, progress, write_metrics
from core.run_folder import CONFIG, open_run_folder
from rqvae.model import RQVAE, ResidualQuantizer, RQVAESpec, rqvae_loss

STAGE = "rqvae"


@dataclass
class RQVAETrainConfig:
    emb_dir: str = "runs/shapes/dense/emb"
    output_dir: str = "runs/shapes/comgtir/rqvae"
    train_split: str = "train"
    val_split: str = "val"
    hidden_dim: int = 256
    latent_dim: int = 64
    levels: int = 3  # L: code levels of the sequential identifier
    codebook_size: int = 64  # K: codes per level
    shared_codebook: bool = False  # one codebook applied residually at every level (the paper) or one per level
    beta: float = 0.25  # commitment weight
    align_weight: float = 0.5  # caption-alignment term (0 = off)
    epochs: int = 150
    batch_size: int = 512  # global batch, split over ranks
    lr: float = 1e-3
    restart_every: int = 50  # steps between dead-code restarts (0 = never)
    restart_threshold: float = 1.0  # a code used fewer times than this since the last check is dead
    overwrite: bool = False  # start afresh where output_dir holds another run (core.run_folder)
    wandb_project: str = "genretrieval"
    seed: int = 0


def caption_table(text_ids: list[dict], image_ids: list) -> list[np.ndarray]:
    """For each image (in `image_ids` order), the rows of its captions in the text matrix."""
    rows = defaultdict(list)
    for r, t in enumerate(text_ids):
        rows[t["imgid"]].append(r)
    return [np.array(rows.get(i, []), dtype=np.int64) for i in image_ids]


def load_split(emb_dir: Path, split: str) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Image embeddings, one caption embedding per image (the first; training samples afresh), image ids."""
    image_emb, image_ids = load_embeddings(emb_dir / f"image_{split}")
    text_emb, text_ids = load_embeddings(emb_dir / f"text_{split}")
    table = caption_table(text_ids, image_ids)
    if any(len(t) == 0 for t in table):
        bad = next(i for i, t in zip(image_ids, table) if len(t) == 0)
        raise InputError(emb_dir / f"text_{split}_ids.json", "imgid", f"image {bad} has no caption embedding")
    return torch.from_numpy(image_emb), torch.from_numpy(text_emb), image_ids


def load_rqvae(folder: str | Path) -> RQVAE:
    """Rebuild a trained tokenizer from a checkpoint folder (`rqvae.json` + `model.pt`)."""
    folder = Path(folder)
    read_meta(folder, stage=STAGE)
    spec_path = folder / "rqvae.json"
    if not spec_path.is_file():
        raise InputError(spec_path, None, "not an RQ-VAE folder (rqvae.json is missing)")
    model = RQVAE(RQVAESpec(**json.loads(spec_path.read_text())))
    model.load_state_dict(torch.load(folder / "model.pt", map_location="cpu", weights_only=True))
    return model.eval()


@torch.no_grad()
def reconstruction_error(model: RQVAE, x: torch.Tensor) -> dict[str, float]:
    """MSE and mean cosine similarity between embeddings and their reconstructions from codes."""
    model.eval()
    recon = model.reconstruct(x)
    cos = torch.nn.functional.cosine_similarity(recon, x, dim=-1).mean()
    return {"mse": float(torch.nn.functional.mse_loss(recon, x)), "cosine": float(cos)}


def main(argv: Sequence[str] | None = None) -> Path:
    cfg = parse_config(RQVAETrainConfig, argv)
    check_batch_divisible(cfg.batch_size, world_size_from_env())
    if cfg.levels < 1 or cfg.codebook_size < 2:
        raise InputError("config", "levels/codebook_size", "need levels >= 1 and codebook_size >= 2")
    emb_dir, out = Path(cfg.emb_dir), Path(cfg.output_dir)
    x_train, t_train, train_ids = load_split(emb_dir, cfg.train_split)
    x_val, _, _ = load_split(emb_dir, cfg.val_split)
    _, text_ids = load_embeddings(emb_dir / f"text_{cfg.train_split}")
    captions_of = caption_table(text_ids, train_ids)
    start = open_run_folder(out, cfg, overwrite=cfg.overwrite)
    if start.reuse_finished and (out / BEST).is_dir() and read_meta(out / BEST, STAGE).get("done"):
        print(f"RQ-VAE already trained in {out} (--overwrite true to retrain)")
        return out / BEST

    dist = init_distributed()
    # one batch of the whole split when the split is smaller, cut to a multiple of the ranks (no-op for one process)
    batch_size = min(cfg.batch_size, len(x_train)) // dist.world_size * dist.world_size
    if batch_size < 1:
        raise InputError(emb_dir / f"image_{cfg.train_split}.npy", "rows",
                         f"{len(x_train)} training embeddings cannot be split over {dist.world_size} processes")
    seed_everything(cfg.seed)  # the same seed on every rank: the same initial model (DDP also broadcasts it)
    device = dist.device
    spec = RQVAESpec(x_train.shape[1], cfg.hidden_dim, cfg.latent_dim, cfg.levels, cfg.codebook_size,
                     cfg.shared_codebook, cfg.beta)
    model = RQVAE(spec).to(device)
    # usage is counted below from the whole batch's codes, so the dead-code restarts see the same counts on every rank
    model.quantizer.track_usage = False
    ddp_model = wrap_model(model, dist)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    steps_per_epoch = max(1, len(x_train) // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    # k-means and restarts draw from this generator on rank 0 only; their codebooks are broadcast to the others.
    # It is saved with checkpoint-last, so a resumed run restarts the same dead codes with the same picks.
    gen = torch.Generator().manual_seed(cfg.seed)
    step, best = 0, BestTracker()
    if not start.fresh and (out / LAST).is_dir():
        step, meta = resume(out / LAST, stage=STAGE, model=model, optimizer=optimizer, generators={"codebook": gen})
        best = BestTracker(meta.get("best"))
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / CONFIG)
    tracker = Tracker(out, cfg, project=cfg.wandb_project, name=f"rqvae-{out.parent.parent.name}", enabled=dist.is_main)
    write_spec = lambda folder: atomic_write_json(Path(folder) / "rqvae.json", dataclasses.asdict(spec))  # noqa: E731

    bar = progress(total=total, initial=step, desc="training rqvae", enabled=dist.is_main)
    while step < total:
        epoch = step // steps_per_epoch
        # the global batch and its captions are drawn alike on every rank; each rank trains on its share
        rng = np.random.default_rng((cfg.seed, epoch))
        order = rng.permutation(len(x_train))
        batch = order[(step % steps_per_epoch) * cfg.batch_size:][:batch_size]
        caption_rows = np.array([rng.choice(captions_of[i]) for i in batch])
        mine = rank_share(batch, dist)
        x = x_train[mine].to(device)
        # every caption of the global batch is a column of the alignment term, so each rank holds them all
        t = t_train[caption_rows].to(device)
        model.train()
        if not bool(model.quantizer.initialised):
            # k-means on the first batch (the whole train set when it fits: a better start, same cost here)
            _on_main_then_broadcast(model.quantizer, dist, lambda: model.quantizer.init_kmeans(
                _encode(model, x_train[:4096], device), generator=gen))
        with autocast(device):
            recon, codes, q_loss = ddp_model(x)
            loss, parts = rqvae_loss(x, recon.float(), q_loss, t, cfg.align_weight,
                                     first_caption=dist.rank * len(mine))
        model.quantizer.count_usage(_gather(codes, dist))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if cfg.restart_every and step % cfg.restart_every == 0 and step < total * 0.8:
            # restarts stop before the end so the last codes settle
            _on_main_then_broadcast(model.quantizer, dist, lambda: model.quantizer.restart_dead_codes(
                _encode(model, x_train, device), cfg.restart_threshold, gen))
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % steps_per_epoch == 0 and (epoch % 10 == 9 or step == total):
            logged = {"train/loss": all_reduce_mean(loss.item(), dist),
                      **{f"train/{k}": all_reduce_mean(v, dist) for k, v in parts.items()}}
            if dist.is_main:
                val = reconstruction_error(model, x_val.to(device))
                tracker.log({**logged, "val/mse": val["mse"], "val/cosine": val["cosine"]}, step=step)
                if best.update(-val["mse"]):
                    save_checkpoint(out / BEST, stage=STAGE, model=model, step=step, config=cfg,
                                    extra={"val_mse": val["mse"], "val_cosine": val["cosine"]}, model_files=write_spec)
                save_checkpoint(out / LAST, stage=STAGE, model=model, step=step, optimizer=optimizer, config=cfg,
                                extra={"best": best.best}, model_files=write_spec, generators={"codebook": gen})
            barrier(dist)
    bar.close()
    if dist.is_main:
        # mark the best checkpoint finished, so a rerun of the main job skips this step
        meta = read_meta(out / BEST, STAGE)
        atomic_write_json(out / BEST / "meta.json", {**meta, "done": True})
        write_metrics(out, {"val_mse": meta.get("val_mse"), "val_cosine": meta.get("val_cosine"), "steps": total})
        print(f"RQ-VAE: best val mse {meta.get('val_mse'):.5f}, cosine {meta.get('val_cosine'):.4f} → {out / BEST}")
    tracker.finish()
    barrier(dist)
    cleanup(dist)
    return out / BEST


@torch.no_grad()
def _encode(model: RQVAE, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return model.encoder(x.to(device))


def _on_main_then_broadcast(quantizer: ResidualQuantizer, dist: DistInfo, update: Callable[[], object]) -> None:
    """Rank 0 changes the codebooks (k-means, dead-code restarts: data-dependent, random draws); every other rank
    takes rank 0's books, so the models never diverge. The usage counts, the same everywhere, are reset alike."""
    if dist.is_main:
        update()
    if dist.enabled:
        torch.distributed.broadcast(quantizer.codebooks.data, src=0)
        if not dist.is_main:
            quantizer.initialised.fill_(True)
            quantizer.usage.zero_()


def _gather(codes: torch.Tensor, dist: DistInfo) -> torch.Tensor:
    """The whole batch's codes [B, L] in rank order (every share has the same size)."""
    if not dist.enabled:
        return codes
    parts = [torch.empty_like(codes) for _ in range(dist.world_size)]
    torch.distributed.all_gather(parts, codes.contiguous())
    return torch.cat(parts)


if __name__ == "__main__":
    main()
