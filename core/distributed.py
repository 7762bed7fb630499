"""Distributed training under torchrun: gloo on CPU, nccl on GPU; a single process needs no launcher.

Every trainer uses the same pieces: `init_distributed` joins the group, `check_batch_divisible` refuses a global
batch the world size does not divide (before any work), `rank_share` takes this rank's contiguous part of a
global batch, `gather_with_grad` joins features across ranks for in-batch negatives (gradients flow back to
every rank), `wrap_model` adds DDP (gradients averaged over ranks), and only `is_main` writes files.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence, TypeVar

import torch
import torch.distributed as dist

from core.device import get_device
from core.errors import InputError

T = TypeVar("T")


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistInfo:
    """Join the process group torchrun set up (RANK/WORLD_SIZE in the environment), else run alone."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return DistInfo(device=get_device())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = get_device(local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def world_size_from_env() -> int:
    """The world size torchrun announces, readable before the process group is joined (for checks before work)."""
    return int(os.environ.get("WORLD_SIZE", "1")) if "RANK" in os.environ else 1


def rank_from_env() -> int:
    """This process's global rank as torchrun announces it (0 outside torchrun), readable before the group is joined."""
    return int(os.environ.get("RANK", "0"))


def check_batch_divisible(batch_size: int, world_size: int, source: str = "config", key: str = "batch_size") -> None:
    """A global batch is split evenly over ranks, so that DDP's gradient average equals the global batch's."""
    if batch_size < 1:
        raise InputError(source, key, f"must be >= 1, got {batch_size}")
    if batch_size % world_size:
        raise InputError(source, key, f"the global batch of {batch_size} cannot be split evenly over {world_size} "
                         f"processes; choose a multiple of {world_size}")


def rank_share(items: Sequence[T], info: DistInfo) -> Sequence[T]:
    """This rank's contiguous part of a global batch: rank r holds rows [r·n/w, (r+1)·n/w). Gathering the parts
    in rank order gives back the global batch in its own order."""
    if not info.enabled:
        return items
    n = len(items)
    return items[info.rank * n // info.world_size:(info.rank + 1) * n // info.world_size]


def shard_range(n: int, info: DistInfo) -> range:
    """The rows [start, stop) of an n-row pass (encoding, caching) that this rank computes."""
    return range(info.rank * n // info.world_size, (info.rank + 1) * n // info.world_size)


def gather_with_grad(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """All ranks' `tensor`s concatenated in rank order along dim 0, differentiable: each rank's gradient of a loss on
    the gathered tensor flows back to the rank that made the rows (torch.distributed.nn's autograd all_gather)."""
    if not info.enabled:
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor.contiguous()), dim=0)


def all_reduce_mean(value: float | torch.Tensor, info: DistInfo) -> float:
    """The mean over ranks of a scalar (a logged loss), the same on every rank."""
    t = torch.as_tensor(value, dtype=torch.float64, device=info.device if info.device.type == "cuda" else "cpu")
    if info.enabled:
        dist.all_reduce(t)
        t /= info.world_size
    return float(t)


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's `obj` on every rank (a validation result, a decision to stop)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap_model(model: torch.nn.Module, info: DistInfo, find_unused_parameters: bool = False) -> torch.nn.Module:
    """DDP over ranks, alone the model as it is. On GPUs batch norms become synchronised (in place: the caller's
    module keeps its parameters), so their statistics are the global batch's as in one process; torch has no
    synchronised batch norm on the CPU, where each rank normalises with its own share."""
    if not info.enabled:
        return model
    if info.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [info.device.index] if info.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                                     find_unused_parameters=find_unused_parameters)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
