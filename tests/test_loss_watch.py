"""LossSpikeWatch: a run whose smoothed loss settles at several times its best is flagged once, at the step the
smoothed loss crosses the line; noise and a single bad batch are not."""
from __future__ import annotations

import numpy as np

from core.logging import LossSpikeWatch


def _losses(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return 0.8 * np.exp(-np.arange(n) / 60) + 0.02 + rng.uniform(-0.008, 0.008, n)  # a healthy diffusion loss curve


def test_healthy_run_and_single_outlier_are_not_flagged():
    watch = LossSpikeWatch()
    losses = _losses(1000)
    losses[600] = 0.5  # one bad batch
    assert not any(watch.update(step, float(v)) for step, v in enumerate(losses))
    assert watch.tripped_at is None


def test_divergence_is_flagged_once_at_the_crossing():
    watch = LossSpikeWatch(factor=3.0, decay=0.98, after=200)
    losses = np.concatenate([_losses(800), np.full(400, 0.08)])  # the loss jumps to 4x its floor at step 800
    flags = [watch.update(step, float(v)) for step, v in enumerate(losses)]
    assert sum(flags) == 1
    # smoothed loss crosses 3x the ~0.02 floor after about ln(1/4)/ln(0.98) ~ 69 steps of the jump
    assert 800 < watch.tripped_at < 900, watch.tripped_at
