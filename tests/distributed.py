"""Run an entry point under torchrun (gloo, CPU) for the tests that compare a 2-rank run with a 1-rank run on the
same global batch: equal weights after a few optimizer steps mean equal losses and gradients, which is what a
missing all-gather or a wrong batch split breaks."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]


def run_torchrun(module: str, args: Sequence[str], nproc: int, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --standalone --nproc_per_node nproc -m module args`, one thread per rank;
    raises with the ranks' output when it fails."""
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", TQDM_DISABLE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", module, *map(str, args)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_state(a: str | Path, b: str | Path, atol: float = 1e-5, rtol: float = 1e-4) -> None:
    """Two saved state dicts hold the same tensors to a tolerance (float reductions differ in order across ranks)."""
    sa, sb = load_state(a), load_state(b)
    assert sa.keys() == sb.keys(), f"different keys: {set(sa) ^ set(sb)}"
    for key in sa:
        if sa[key].is_floating_point():
            torch.testing.assert_close(sa[key], sb[key], atol=atol, rtol=rtol, msg=lambda m: f"{key}: {m}")
        else:
            assert torch.equal(sa[key], sb[key]), key


def assert_same_training(a: str | Path | dict, b: str | Path | dict, initial: dict[str, torch.Tensor],
                         max_ratio: float = 1e-2, min_moved: float = 1e-3) -> None:
    """Two runs from the same `initial` weights took the same steps: the distance between their weights is a small
    fraction of how far training moved them (global L2 norms over every float tensor).

    An element-wise tolerance is the wrong test under Adam: a parameter whose true gradient is zero (the attention
    key bias, say) is moved by lr·sign(rounding noise), which differs between one and two processes, while a real
    difference in gradients (a missing gather) moves every parameter by a comparable amount."""
    sa, sb = (s if isinstance(s, dict) else load_state(s) for s in (a, b))
    assert sa.keys() == sb.keys(), f"different keys: {set(sa) ^ set(sb)}"
    keys = [k for k in sa if sa[k].is_floating_point()]
    gap = {k: float((sa[k] - sb[k]).double().norm()) for k in keys}
    moved = sum(float((sa[k] - initial[k]).double().norm()) ** 2 for k in keys) ** 0.5
    distance = sum(g ** 2 for g in gap.values()) ** 0.5
    assert moved > min_moved, f"training moved the weights by only {moved:.2e}: the comparison would mean nothing"
    worst = sorted(gap, key=gap.get, reverse=True)[:3]
    assert distance <= max_ratio * moved, (f"runs differ by {distance:.3e}, {distance / moved:.1%} of the "
                                           f"{moved:.3e} training moved them; most in {worst}")
