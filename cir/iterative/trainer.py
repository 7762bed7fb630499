"""One round of training: original + augmented triplets, batched by reference, with mined hard negatives appended
to the contrastive targets; the optimizer and schedule start afresh from the previous round's best model, and the
epoch with the best validation Avg is the round's checkpoint."""
from __future__ import annotations

import copy
import math
from typing import Any, Callable, Sequence

import numpy as np
import torch

from cir.iterative.backbones import EmbeddingBackbone
from cir.iterative.data import Corpus, Triplet
from cir.losses import query_target_contrastive
from core.checkpoint import BestTracker
from core.device import autocast
from core.logging import progress


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


def train_round(backbone: EmbeddingBackbone, corpus: Corpus, triplets: Sequence[Triplet], *, epochs: int,
                batch_size: int, lr: float, weight_decay: float, warmup_steps: int, temperature: float,
                negatives_per_query: int, seed: int, round_index: int,
                validate: Callable[[EmbeddingBackbone], dict[str, float]],
                log: Callable[[dict[str, float], int], None] = lambda m, s: None) -> dict[str, Any]:
    """Train in place, then load the best epoch's weights back; returns the training history."""
    device = next(backbone.parameters()).device
    params = [p for p in backbone.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    rng = np.random.default_rng((seed, round_index, 104729))
    plans = [same_reference_batches(triplets, batch_size, rng) for _ in range(epochs)]
    scheduler = warmup_cosine(optimizer, warmup_steps, sum(len(p) for p in plans))
    tracker, best_state, history, step = BestTracker(), None, [], 0
    for epoch, plan in enumerate(plans):
        backbone.train()
        losses = []
        for idx in progress(plan, desc=f"round {round_index} epoch {epoch + 1}/{epochs}"):
            with autocast(device):
                loss = contrastive_step(backbone, corpus, [triplets[i] for i in idx], temperature, negatives_per_query)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            step += 1
            log({"train/loss": losses[-1], "train/lr": scheduler.get_last_lr()[0]}, step)
        val = validate(backbone)
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else None, **val})
        log({f"val/{k}": v for k, v in val.items()}, step)
        if tracker.update(val["Avg"]):
            best_state = {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()}
    if best_state is not None:
        backbone.load_state_dict(best_state)
    return {"history": history, "best_val_Avg": tracker.best, "steps": step, "triplets": len(triplets)}
