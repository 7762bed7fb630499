"""A short supervised fit for the small helper models a stage trains in its first minute (the MIR scene reader, the
caption → layout encoder): AdamW with a one-cycle learning rate over shuffled epoch batches."""
from __future__ import annotations

from typing import Callable

import torch

from core.data import epoch_batches


def fit(model: torch.nn.Module, n_items: int, batch_loss: Callable[[torch.Tensor], torch.Tensor], epochs: int,
        batch_size: int, lr: float, seed: int, desc: str, progress: Callable | None = None,
        pct_start: float = 0.3, weight_decay: float = 1e-4) -> torch.nn.Module:
    """Minimise `batch_loss(indices)` over `epochs` passes of `n_items` in batches fixed by `seed`; returns the
    model in eval mode. Gradients are on even when the caller runs under torch.no_grad (an evaluation)."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    n_batches = max(1, n_items // batch_size)
    steps = epochs * n_batches
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=pct_start)
    it = range(steps) if progress is None else progress(range(steps), desc=desc)
    with torch.enable_grad():
        for step in it:
            idx = torch.from_numpy(epoch_batches(n_items, batch_size, seed, step // n_batches)[step % n_batches])
            loss = batch_loss(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()
