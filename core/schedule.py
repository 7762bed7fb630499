"""The learning-rate schedule every trainer uses: linear warmup, then a half cosine down to a floor."""
from __future__ import annotations

import math

import torch


def warmup_cosine_factor(step: int, warmup: int, total: int, floor: float = 0.0) -> float:
    """The factor on the base rate at 0-based `step`: (step + 1) / warmup over the first `warmup` steps, then
    floor + (1 - floor) · ½(1 + cos(π · t)) with t going from 0 to 1 over the remaining steps (and held at 1)."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int,
                  floor: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """`warmup_cosine_factor` as a scheduler (its state goes into a checkpoint like any other)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine_factor(step, warmup, total, floor))
