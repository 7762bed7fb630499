"""One round of training: original + augmented triplets, batched by reference, with mined hard negatives appended
to the contrastive targets; the optimizer and schedule start afresh from the previous round's best model, and the
epoch with the best validation Avg is the round's checkpoint.

Inside a round, `checkpoint-last/` (core.checkpoint: weights, optimizer, scheduler, step, RNG, plus the epoch history
and the best epoch's weights) is written every `save_every` steps and after each epoch's validation, so a run killed
mid-round continues that round's training from its last saved step. The folder records the round's training
manifest and is resumed only when it matches. It holds the trainable weights only: the frozen image encoder is the
round's starting model's (named by the manifest), never copied.

Under torchrun (core.distributed) every rank trains on its contiguous share of each global batch: the batch's target
embeddings are gathered across ranks with gradients, each rank's loss rows are its own queries against all the
batch's targets, and the loss is scaled so that DDP's average over ranks is the global batch's mean. Only rank 0
writes; validation is computed in shards by every rank."""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cir.iterative.backbones import EmbeddingBackbone
from cir.iterative.data import SINGLE, Corpus, Triplet
from cir.iterative.sharding import gather_share_rows, padded_share, share_bounds
from core.checkpoint import LAST, BestTracker, read_meta, resume, save_checkpoint
from core.device import autocast
from core.distributed import DistInfo, all_reduce_mean, barrier, broadcast_object, wrap_model
from core.schedule import warmup_cosine

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


@dataclass(frozen=True)
class StepShare:
    """One rank's part of a global batch: its queries' rows in the batch (padding rows weigh 0) and the batch's
    target columns (`target_ids`: column i is query i's positive, then the appended hard negatives)."""
    rows: tuple[int, ...]
    weights: tuple[float, ...]
    target_ids: tuple[str, ...]
    batch_size: int


def step_share(batch: Sequence[Triplet], negatives_per_query: int,
               info: DistInfo = SINGLE) -> tuple[list[Triplet], list[str], StepShare]:
    """(this rank's queries, this rank's targets to encode, the share's rows) of a global batch; both lists are
    padded to ceil(n / world) so every rank gathers the same shapes (sharding.padded_share)."""
    targets = batch_targets(batch, negatives_per_query)
    queries, real = padded_share(list(batch), info)
    start, _ = share_bounds(len(batch), info)
    # A padding row copies query 0, so column 0 is its positive: its loss is finite, and weighs nothing.
    rows = tuple(range(start, start + real)) + (0,) * (len(queries) - real)
    weights = (1.0,) * real + (0.0,) * (len(queries) - real)
    return queries, padded_share(targets, info)[0], StepShare(rows, weights, tuple(targets), len(batch))


def share_contrastive(query: torch.Tensor, target: torch.Tensor, temperature: float, share: StepShare,
                      world_size: int = 1, similarity: Callable | None = None) -> torch.Tensor:
    """L_q2t of PTHA (cir.losses.query_target_contrastive: InfoNCE of each query against the batch's targets plus the
    appended hard negatives, a duplicate of the query's own target image not counted as a negative), for this rank's
    rows of the global batch, scored by `similarity` (the backbone's; the inner product by default). The sum over the
    rank's rows times world / B: DDP averages the ranks' gradients, so their mean is the gradient of the global
    batch's mean loss, whatever the (uneven) shares."""
    logits = (similarity(query, target) if similarity is not None else query @ target.T) / temperature
    lookup: dict[str, int] = {}
    ids = torch.tensor([lookup.setdefault(i, len(lookup)) for i in share.target_ids], device=logits.device)
    rows = torch.tensor(share.rows, device=logits.device)
    same = ids[rows][:, None] == ids[None, :]
    own = torch.zeros_like(same)
    own[torch.arange(len(rows), device=logits.device), rows] = True
    logits = logits.masked_fill(same & ~own, float("-inf"))
    per_row = F.cross_entropy(logits, rows, reduction="none")
    weights = torch.tensor(share.weights, dtype=per_row.dtype, device=per_row.device)
    return (per_row * weights).sum() * (world_size / share.batch_size)


class RoundLoss(torch.nn.Module):
    """One step's loss on this rank's share as one forward pass, so DDP (core.distributed.wrap_model) sees one
    forward per step: queries encoded locally, targets encoded locally and gathered from every rank with
    gradients."""

    def __init__(self, backbone: EmbeddingBackbone, temperature: float, info: DistInfo = SINGLE):
        super().__init__()
        self.backbone, self.temperature, self.info = backbone, temperature, info

    def forward(self, references: Any, texts: Sequence[str], targets: Any, share: StepShare) -> torch.Tensor:
        query = self.backbone.encode_queries(references, texts)
        target = gather_share_rows(self.backbone.encode_targets(targets), len(share.target_ids), self.info)
        return share_contrastive(query, target, self.temperature, share, self.info.world_size,
                                 self.backbone.similarity)


def step_specs(triplets: Sequence[Triplet], plan: Sequence[Sequence[int]], negatives_per_query: int,
               info: DistInfo) -> list[tuple[list[list[str]], tuple[list[str], StepShare]]]:
    """For Corpus.batches: per step, ([reference names, target names], (texts, share)) of this rank's share."""
    specs = []
    for idx in plan:
        queries, targets, share = step_share([triplets[i] for i in idx], negatives_per_query, info)
        specs.append(([[t.reference for t in queries], targets], ([t.caption for t in queries], share)))
    return specs


def trainable_state(backbone: EmbeddingBackbone) -> dict[str, torch.Tensor]:
    """A copy (on the CPU) of the backbone's state without its frozen parameters: those are the round's starting
    model's, which the round's manifest names, so no checkpoint of a round copies them."""
    frozen = {name for name, p in backbone.named_parameters() if not p.requires_grad}
    return {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items() if k not in frozen}


def load_trainable(backbone: EmbeddingBackbone, state: dict[str, torch.Tensor]) -> None:
    """Load a `trainable_state`; every key must be the backbone's and only frozen parameters may be missing."""
    frozen = {name for name, p in backbone.named_parameters() if not p.requires_grad}
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    if unexpected or set(missing) - frozen:
        raise RuntimeError(f"saved round weights do not fit the model: missing {sorted(set(missing) - frozen)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")


class _TrainableWeights(torch.nn.Module):
    """What core.checkpoint saves and restores of a backbone (its `model.pt`): the trainable state only."""

    def __init__(self, backbone: EmbeddingBackbone):
        super().__init__()
        object.__setattr__(self, "backbone", backbone)  # not a submodule: nothing else of it is seen

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        return trainable_state(self.backbone)

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True, assign: bool = False) -> Any:
        load_trainable(self.backbone, state)


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
    save_checkpoint(state_dir / LAST, stage=ROUND_STAGE, model=_TrainableWeights(backbone), step=step,
                    optimizer=optimizer, scheduler=scheduler, extra={"manifest": manifest, **state.extra()},
                    model_files=state.write_best)


def recover_interrupted_swap(folder: Path) -> None:
    """core.io.atomic_dir replaces a folder by renaming the old one aside, then the new one in; a kill between the
    two renames leaves only `.{name}.old`, which is still a complete checkpoint: put it back."""
    old = folder.with_name(f".{folder.name}.old")
    if not folder.exists() and old.is_dir():
        os.replace(old, folder)


def try_resume(state_dir: Path | None, manifest: dict[str, Any], backbone: EmbeddingBackbone,
               optimizer: torch.optim.Optimizer, scheduler: Any, state: RoundState, info: DistInfo = SINGLE) -> int:
    """Restore the round's checkpoint-last/ when it was written for this very round (same manifest); returns the
    step to continue from (0 = start the round's training afresh). Every rank reads the same folder."""
    if state_dir is None:
        return 0
    folder = state_dir / LAST
    if info.is_main:
        recover_interrupted_swap(folder)
    barrier(info)
    if not (folder / "meta.json").is_file():
        return 0
    meta = read_meta(folder, stage=ROUND_STAGE)
    if meta.get("manifest") != manifest:
        logger.info("%s was written for other inputs or options (manifest differs): training starts afresh", folder)
        return 0
    step, meta = resume(folder, stage=ROUND_STAGE, model=_TrainableWeights(backbone), optimizer=optimizer,
                        scheduler=scheduler)
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
                manifest: dict[str, Any] | None = None, info: DistInfo = SINGLE) -> dict[str, Any]:
    """Train in place, then load the best epoch's weights back; returns the training history.

    With `state_dir`, checkpoint-last/ is saved there every `save_every` steps (0 = only after each epoch's
    validation) and a matching one left by a killed run is resumed from its step. Under torchrun every rank calls
    it with the same arguments (`validate` included: it runs on every rank) and rank 0 writes."""
    device = next(backbone.parameters()).device
    params = [p for p in backbone.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    # The epoch plans depend only on (seed, round), so a resumed run replays the same batches in the same order,
    # and every rank plans the same global batches.
    rng = np.random.default_rng((seed, round_index, 104729))
    plans = [same_reference_batches(triplets, batch_size, rng) for _ in range(epochs)]
    total = sum(len(p) for p in plans)
    scheduler = warmup_cosine(optimizer, warmup_steps, total)
    state_dir = Path(state_dir) if state_dir is not None else None
    manifest = manifest or {}
    state = RoundState()
    start = try_resume(state_dir, manifest, backbone, optimizer, scheduler, state, info)
    if start and info.is_main:
        logger.info("round %d: training resumed from step %d of %d (%s)", round_index, start, total, state_dir / LAST)
    # Parameters the loss does not reach (a projection only the CIR stage's L_p2p uses, a VLM's LM head) are
    # left to DDP's unused-parameter search, so their gradients stay None as in one process.
    step_loss = wrap_model(RoundLoss(backbone, temperature, info), info, find_unused_parameters=True)

    def checkpoint(step: int) -> None:
        if state_dir is not None and info.is_main:
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
        specs = step_specs(triplets, plan[skip:], negatives_per_query, info)
        desc = f"round {round_index} epoch {epoch + 1}/{epochs}" if info.is_main else ""
        for (references, targets), (texts, share) in corpus.batches(specs, device, desc=desc):
            with autocast(device):
                loss = step_loss(references, texts, targets, share)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            state.epoch_losses.append(all_reduce_mean(loss.detach(), info))  # the global batch's mean loss
            step += 1
            log({"train/loss": state.epoch_losses[-1], "train/lr": scheduler.get_last_lr()[0]}, step)
            if save_every and step % save_every == 0 and step < total:
                checkpoint(step)
        val = broadcast_object(validate(backbone), info)  # every rank takes rank 0's numbers and best epoch
        losses = state.epoch_losses
        state.history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else None, **val})
        log({f"val/{k}": v for k, v in val.items()}, step)
        if state.tracker.update(val["Avg"]):
            state.best_state = trainable_state(backbone)
        state.epoch_losses = []
        checkpoint(step)
    del step_loss  # the DDP wrapper's hooks go with it: the next round wraps the same weights afresh
    if state.best_state is not None:
        load_trainable(backbone, state.best_state)
    return {"history": state.history, "best_val_Avg": state.tracker.best, "steps": step, "triplets": len(triplets),
            "resumed_from_step": start}


def discard_round_state(state_dir: str | Path) -> None:
    """The in-round checkpoints are scratch once the round's checkpoint_iter_N/ is written (or must be redone)."""
    shutil.rmtree(state_dir, ignore_errors=True)
