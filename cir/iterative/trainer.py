"""One round of training: original + augmented triplets, batched by reference, with mined hard negatives appended
to the contrastive targets; the optimizer and schedule start afresh from the previous round's best model, and the
epoch with the best validation Avg is the round's checkpoint.

Inside a round, `checkpoint-last/` (core.checkpoint: weights, optimizer, scheduler, step, RNG, plus the epoch history
and the best epoch's weights) is written every `save_every` steps and after each epoch's validation, so a run killed
mid-round continues that round's training from its last saved step. The folder records the round's training
manifest and is resumed only when it matches."""
from __future__ import annotations

import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from cir.iterative.backbones import EmbeddingBackbone
from cir.iterative.data import Corpus, Triplet
from cir.losses import query_target_contrastive
from core.checkpoint import LAST, BestTracker, read_meta, resume, save_checkpoint
from core.device import autocast
from core.logging import progress

logger = logging.getLogger("cir.iterative")
ROUND_STAGE = "cir-iterative-round"   # stage name of the in-round checkpoint-last/
BEST_WEIGHTS = "best_model.pt"        # inside checkpoint-last/: the best epoch's weights so far


def same_reference_batches(triplets: Sequence[Triplet], batch_size: int, rng: np.random.Generator) -> list[list[int]]:
    """Batches in which all triplets of one reference sit together, so an original target and the hard negatives
    made positives from it are each other's in-batch negatives. Groups larger than a batch are split."""
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(triplets):
        groups.setdefault(t.reference, []).append(i)
    pieces = []
    for members in groups.values():
        members = [members[j] for j in rng.permutation(len(members))]
        pieces += [members[s:s + batch_size] for s in range(0, len(members), batch_size)]
    batches, current = [], []
    for p in rng.permutation(len(pieces)):
        piece = pieces[p]
        if len(current) + len(piece) > batch_size:
            batches.append(current)
            current = []
        current = current + piece
    if current:
        batches.append(current)
    return batches


def batch_targets(batch: Sequence[Triplet], negatives_per_query: int) -> list[str]:
    """Target images of a batch: each query's own target first (column i = query i's positive), then the mined hard
    negatives of its queries that are not already a column, in order."""
    targets = [t.target for t in batch]
    seen = set(targets)
    for t in batch:
        for neg in t.negatives[:negatives_per_query]:
            if neg not in seen and neg != t.reference:
                seen.add(neg)
                targets.append(neg)
    return targets


def contrastive_step(backbone: EmbeddingBackbone, corpus: Corpus, batch: Sequence[Triplet], temperature: float,
                     negatives_per_query: int) -> torch.Tensor:
    """L_q2t (InfoNCE) over the batch's targets plus appended hard negatives; duplicate targets are not negatives."""
    targets = batch_targets(batch, negatives_per_query)
    query = backbone.encode_queries(corpus.batch(backbone, [t.reference for t in batch]), [t.caption for t in batch])
    target = backbone.encode_targets(corpus.batch(backbone, targets))
    return query_target_contrastive(query, target, temperature, target_ids=targets)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class RoundState:
    """What a resumed round needs besides weights/optimizer/scheduler/RNG: the epochs' history, the losses of the
    epoch in progress, and the best epoch's value and weights."""

    def __init__(self) -> None:
        self.history: list[dict[str, Any]] = []
        self.epoch_losses: list[float] = []
        self.tracker = BestTracker()
        self.best_state: dict[str, torch.Tensor] | None = None

    def extra(self) -> dict[str, Any]:
        return {"history": self.history, "epoch_losses": self.epoch_losses, "best": self.tracker.best}

    def write_best(self, folder: Path) -> None:
        if self.best_state is not None:
            torch.save(self.best_state, folder / BEST_WEIGHTS)


def save_progress(state_dir: Path, backbone: EmbeddingBackbone, optimizer: torch.optim.Optimizer, scheduler: Any,
                  step: int, state: RoundState, manifest: dict[str, Any]) -> None:
    """One atomic checkpoint-last/ holding everything the round's training needs to go on from `step`."""
    save_checkpoint(state_dir / LAST, stage=ROUND_STAGE, model=backbone, step=step, optimizer=optimizer,
                    scheduler=scheduler, extra={"manifest": manifest, **state.extra()}, model_files=state.write_best)


def recover_interrupted_swap(folder: Path) -> None:
    """core.io.atomic_dir replaces a folder by renaming the old one aside, then the new one in; a kill between the
    two renames leaves only `.{name}.old`, which is still a complete checkpoint: put it back."""
    old = folder.with_name(f".{folder.name}.old")
    if not folder.exists() and old.is_dir():
        os.replace(old, folder)


def try_resume(state_dir: Path | None, manifest: dict[str, Any], backbone: EmbeddingBackbone,
               optimizer: torch.optim.Optimizer, scheduler: Any, state: RoundState) -> int:
    """Restore the round's checkpoint-last/ when it was written for this very round (same manifest); returns the
    step to continue from (0 = start the round's training afresh)."""
    if state_dir is None:
        return 0
    folder = state_dir / LAST
    recover_interrupted_swap(folder)
    if not (folder / "meta.json").is_file():
        return 0
    meta = read_meta(folder, stage=ROUND_STAGE)
    if meta.get("manifest") != manifest:
        logger.info("%s was written for other inputs or options (manifest differs): training starts afresh", folder)
        return 0
    step, meta = resume(folder, stage=ROUND_STAGE, model=backbone, optimizer=optimizer, scheduler=scheduler)
    state.history, state.epoch_losses = list(meta["history"]), list(meta["epoch_losses"])
    state.tracker = BestTracker(meta["best"])
    if (folder / BEST_WEIGHTS).is_file():
        state.best_state = torch.load(folder / BEST_WEIGHTS, map_location="cpu", weights_only=True)
    return step


def train_round(backbone: EmbeddingBackbone, corpus: Corpus, triplets: Sequence[Triplet], *, epochs: int,
                batch_size: int, lr: float, weight_decay: float, warmup_steps: int, temperature: float,
                negatives_per_query: int, seed: int, round_index: int,
                validate: Callable[[EmbeddingBackbone], dict[str, float]],
                log: Callable[[dict[str, float], int], None] = lambda m, s: None,
                state_dir: str | Path | None = None, save_every: int = 0,
                manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train in place, then load the best epoch's weights back; returns the training history.

    With `state_dir`, checkpoint-last/ is saved there every `save_every` steps (0 = only after each epoch's
    validation) and a matching one left by a killed run is resumed from its step."""
    device = next(backbone.parameters()).device
    params = [p for p in backbone.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    # The epoch plans depend only on (seed, round), so a resumed run replays the same batches in the same order.
    rng = np.random.default_rng((seed, round_index, 104729))
    plans = [same_reference_batches(triplets, batch_size, rng) for _ in range(epochs)]
    total = sum(len(p) for p in plans)
    scheduler = warmup_cosine(optimizer, warmup_steps, total)
    state_dir = Path(state_dir) if state_dir is not None else None
    manifest = manifest or {}
    state = RoundState()
    start = try_resume(state_dir, manifest, backbone, optimizer, scheduler, state)
    if start:
        logger.info("round %d: training resumed from step %d of %d (%s)", round_index, start, total, state_dir / LAST)

    def checkpoint(step: int) -> None:
        if state_dir is not None:
            save_progress(state_dir, backbone, optimizer, scheduler, step, state, manifest)

    step = 0
    for epoch, plan in enumerate(plans):
        if len(state.history) > epoch:  # finished and validated before the kill
            step += len(plan)
            continue
        skip = max(0, min(len(plan), start - step))  # batches of this epoch done before the kill
        if skip == 0:
            state.epoch_losses = []
        step += skip
        backbone.train()
        for idx in progress(plan[skip:], desc=f"round {round_index} epoch {epoch + 1}/{epochs}"):
            with autocast(device):
                loss = contrastive_step(backbone, corpus, [triplets[i] for i in idx], temperature, negatives_per_query)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            state.epoch_losses.append(float(loss.detach()))
            step += 1
            log({"train/loss": state.epoch_losses[-1], "train/lr": scheduler.get_last_lr()[0]}, step)
            if save_every and step % save_every == 0 and step < total:
                checkpoint(step)
        val = validate(backbone)
        losses = state.epoch_losses
        state.history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else None, **val})
        log({f"val/{k}": v for k, v in val.items()}, step)
        if state.tracker.update(val["Avg"]):
            state.best_state = {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()}
        state.epoch_losses = []
        checkpoint(step)
    if state.best_state is not None:
        backbone.load_state_dict(state.best_state)
    return {"history": state.history, "best_val_Avg": state.tracker.best, "steps": step, "triplets": len(triplets),
            "resumed_from_step": start}


def discard_round_state(state_dir: str | Path) -> None:
    """The in-round checkpoints are scratch once the round's checkpoint_iter_N/ is written (or must be redone)."""
    shutil.rmtree(state_dir, ignore_errors=True)
