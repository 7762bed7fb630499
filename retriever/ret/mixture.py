"""The multi-task training recipe of ReT on M2KR: several training sets mixed into one stream of batches, a held-out
slice of each set's queries for validation during training, and the step budget sized from the mixture.

Mixture: set s of n_s queries is drawn with probability p_s ∝ n_s^(1/T) (T = `temperature`; T = 1 is proportional
to size, i.e. the union of the sets shuffled; T → ∞ is uniform over sets; the temperature-sampling rule of
multilingual pre-training, e.g. mT5). One epoch is Σ n_s draws. Each epoch's slots are dealt to the sets by largest
remainder (so an epoch holds each set in its proportion up to one slot), shuffled, and each set fills its slots from
its own permutations, one after the other: with T = 1 every query is seen once per epoch, and a set drawn more often
than its size cycles through all its queries before it repeats one. Everything is fixed by (seed, epoch), so
every rank builds the same global batches and a resumed run replays the rest of an epoch exactly.
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
import torch

from core.errors import InputError


def mixture_weights(sizes: Sequence[int], temperature: float = 1.0, source: str = "config") -> np.ndarray:
    """p_s ∝ n_s^(1/T), summing to 1."""
    if temperature <= 0 or not math.isfinite(temperature):
        raise InputError(source, "mixture_temperature", f"must be a positive number, got {temperature}")
    sizes = np.asarray(sizes, dtype=np.float64)
    if len(sizes) == 0 or (sizes <= 0).any():
        raise InputError(source, "datasets", f"every training set needs at least one query, got sizes {sizes.tolist()}")
    scaled = np.exp(np.log(sizes) / temperature)  # in log space: n^(1/T) of a 10⁶-query set overflows for small T
    return scaled / scaled.sum()


def slot_counts(weights: np.ndarray, total: int) -> np.ndarray:
    """`total` slots dealt in proportion to `weights` by largest remainder (the counts sum to `total`)."""
    exact = weights * total
    counts = np.floor(exact).astype(np.int64)
    short = total - int(counts.sum())
    counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
    return counts


def epoch_mixture_batches(sizes: Sequence[int], weights: np.ndarray, batch_size: int, steps: int, seed: int,
                          epoch: int) -> list[np.ndarray]:
    """The `steps` global batches of one epoch, as indices into the sets laid end to end (set s's query i is
    offset_s + i), fixed by (seed, epoch)."""
    rng = np.random.default_rng((seed, epoch, 104729))
    total = steps * batch_size
    counts = slot_counts(weights, total)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    slots = rng.permutation(np.repeat(np.arange(len(sizes)), counts))
    drawn = np.empty(total, dtype=np.int64)
    for s, (n, count) in enumerate(zip(sizes, counts)):
        rounds = -(-int(count) // int(n)) if count else 0
        order = np.concatenate([rng.permutation(n) for _ in range(rounds)])[:count] if rounds else []
        drawn[slots == s] = offsets[s] + np.asarray(order, dtype=np.int64)
    return [drawn[i:i + batch_size] for i in range(0, total, batch_size)]


class MixtureBatchSampler(torch.utils.data.Sampler):
    """This rank's share of each global batch of `epoch_mixture_batches`, as `(epoch, index)` items (the interface
    of core.data.EpochBatchSampler); `set_epoch(epoch, skip)` starts an epoch `skip` batches in."""

    def __init__(self, sizes: Sequence[int], weights: np.ndarray, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not a multiple of the world size {world_size}")
        self.sizes, self.weights = [int(n) for n in sizes], np.asarray(weights)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.steps_per_epoch = sum(self.sizes) // batch_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def global_batches(self) -> list[np.ndarray]:
        return epoch_mixture_batches(self.sizes, self.weights, self.batch_size, self.steps_per_epoch, self.seed,
                                     self.epoch)[self.skip:]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        share = self.batch_size // self.world_size
        for batch in self.global_batches():
            yield [(self.epoch, int(i)) for i in batch[self.rank * share:(self.rank + 1) * share]]

    def __len__(self) -> int:
        return self.steps_per_epoch - self.skip


def heldout_count(heldout: float, n_ids: int, source: str) -> int:
    """How many of a set's n_ids question ids `heldout` keeps out of training: a fraction when < 1, a count when
    ≥ 1, none when 0. At least one id must stay for training."""
    if heldout < 0 or not math.isfinite(heldout) or (heldout >= 1 and heldout != int(heldout)):
        raise InputError(source, "heldout_queries", f"must be 0, a fraction in (0, 1) or a whole count, got {heldout}")
    count = int(heldout) if heldout >= 1 else int(round(heldout * n_ids))
    if heldout > 0:
        count = max(count, 1)
    if count >= n_ids:
        raise InputError(source, "heldout_queries",
                         f"holds out {count} of the {n_ids} question ids, leaving none to train on")
    return count


def split_heldout(question_ids: Sequence[str], heldout: float, seed: int, source: str) -> tuple[list[int], list[int]]:
    """(training rows, held-out rows) of a set's queries. Whole question ids are held out (a file may give one
    question several rows), chosen by `seed` alone, so the slice is the same on every rank and on every rerun."""
    ids = list(dict.fromkeys(question_ids))
    count = heldout_count(heldout, len(ids), source)
    rng = np.random.default_rng((seed, 15485863))
    held = {ids[i] for i in rng.permutation(len(ids))[:count]}
    train = [i for i, q in enumerate(question_ids) if q not in held]
    kept = [i for i, q in enumerate(question_ids) if q in held]
    return train, kept


def schedule_steps(n_queries: int, batch_size: int, epochs: int, max_steps: int, warmup_steps: int,
                   warmup_ratio: float, source: str = "config") -> tuple[int, int, int]:
    """(steps per epoch, total steps, warmup steps) of a run over `n_queries` training queries: the total is
    `max_steps` when given, else `epochs` passes over the mixture; the warmup is `warmup_steps` when given, else
    `warmup_ratio` of the total. A warmup as long as the run, where the learning rate would never reach its peak,
    is refused."""
    steps_per_epoch = n_queries // batch_size
    if steps_per_epoch == 0:
        raise InputError(source, "batch_size", f"{batch_size} is larger than the training queries ({n_queries})")
    if not 0 <= warmup_ratio < 1:
        raise InputError(source, "warmup_ratio", f"must be in [0, 1), got {warmup_ratio}")
    total = max_steps if max_steps > 0 else epochs * steps_per_epoch
    if total <= 0:
        raise InputError(source, "epochs", f"the run has no steps (epochs {epochs}, max_steps {max_steps})")
    warmup = warmup_steps if warmup_steps > 0 else int(round(warmup_ratio * total))
    if warmup >= total:
        field = "warmup_steps" if warmup_steps > 0 else "warmup_ratio"
        raise InputError(source, field, f"a warmup of {warmup} steps does not end before the run's last step "
                         f"({total} steps: {steps_per_epoch} per epoch of {n_queries} queries at batch {batch_size})")
    return steps_per_epoch, total, warmup
