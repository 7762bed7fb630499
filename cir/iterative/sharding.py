"""Uneven shares of a global batch or pass under torchrun. The iterative loop's batches vary in size (all triplets
of one reference sit together), so a share is padded to ceil(n / world) rows with copies of a real item: every rank
then runs the same shapes through all_gather, and the padding rows are dropped from what is gathered. Reads and
writes no files.
"""
from __future__ import annotations

from typing import Any, Sequence, TypeVar

import torch

from core.distributed import DistInfo, gather_with_grad

T = TypeVar("T")


def share_bounds(n: int, info: DistInfo, rank: int | None = None) -> tuple[int, int]:
    """Rows [start, stop) of an n-row global batch that `rank` holds: the contiguous split of core.distributed's
    rank_share / shard_range, so gathering in rank order gives back the global order."""
    r = info.rank if rank is None else rank
    return r * n // info.world_size, (r + 1) * n // info.world_size


def padded_share(items: Sequence[T], info: DistInfo) -> tuple[list[T], int]:
    """(this rank's share padded to ceil(n / world) items, how many of them are real). The padding copies the
    global batch's first item, so a rank whose share is empty still runs a forward pass of the common shape."""
    start, stop = share_bounds(len(items), info)
    share = list(items[start:stop])
    if not info.enabled or not items:
        return share, len(share)
    width = -(-len(items) // info.world_size)
    return share + [items[0]] * (width - len(share)), len(share)


def gather_share_rows(rows: torch.Tensor, n: int, info: DistInfo) -> torch.Tensor:
    """The n rows of a global batch from every rank's padded share (`padded_share`), in global order; differentiable
    (core.distributed.gather_with_grad), so a loss on another rank's rows sends its gradient back here."""
    if not info.enabled:
        return rows
    gathered = gather_with_grad(rows, info)
    width, keep = rows.shape[0], []
    for r in range(info.world_size):
        start, stop = share_bounds(n, info, r)
        keep += range(r * width, r * width + stop - start)
    return gathered[torch.as_tensor(keep, dtype=torch.long, device=gathered.device)]


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (generated texts of a sharded generation pass).
    core.distributed has broadcast_object only; this is its all-gather counterpart."""
    if not info.enabled:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out
