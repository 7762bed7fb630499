"""Kill-and-resume checks shared by the trainer tests: a trainer run in a child process is killed with SIGKILL right
after it writes a `checkpoint-last/`; rerunning the same command resumes it, and the resumed run must end
at the very weights of a run that was never interrupted, having taken only the steps that were left."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch

from core.checkpoint import LAST, read_meta

ROOT = Path(__file__).resolve().parents[1]
# The child patches core.checkpoint.save_checkpoint before the trainer imports it, so the kill lands after a
# complete checkpoint-last/ (the real SIGKILL a crash or a pre-empted job sends: no cleanup, no flush).
_KILLED_AFTER_A_CHECKPOINT = """
import importlib, json, os, signal, sys
from pathlib import Path
import torch
torch.set_num_threads(int(sys.argv[4]))  # as the parent runs: float sums in the same order on both sides
import core.checkpoint as checkpoint
written, saves = checkpoint.save_checkpoint, []
def save_then_die(folder, **kw):
    made = written(folder, **kw)
    if Path(folder).name == checkpoint.LAST:
        saves.append(folder)
        if len(saves) == int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)
    return made
checkpoint.save_checkpoint = save_then_die
importlib.import_module(sys.argv[1]).main(json.loads(sys.argv[2]))
"""


def run_killed_after_checkpoint(module: str, argv: Sequence[str], nth: int = 1, timeout: int = 600) -> None:
    """Run `module.main(argv)` in a child process that SIGKILLs itself once its `nth` checkpoint-last/ is written.
    The child uses this process's torch thread count (an earlier test may have changed it), since the resumed and
    the uninterrupted runs happen here and a different count sums floats in another order."""
    env = {**os.environ, "WANDB_MODE": "disabled", "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _KILLED_AFTER_A_CHECKPOINT, module, json.dumps(list(map(str, argv))),
                           str(nth), str(torch.get_num_threads())], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == -signal.SIGKILL, f"the run was not killed at its first checkpoint:\n{proc.stderr[-3000:]}"


class OptimizerSteps:
    """Counts AdamW steps taken while it is installed (every trainer here uses AdamW)."""

    def __init__(self, monkeypatch):
        self.count = 0
        step = torch.optim.AdamW.step

        def counted(opt, *args, **kwargs):
            self.count += 1
            return step(opt, *args, **kwargs)

        monkeypatch.setattr(torch.optim.AdamW, "step", counted)


def assert_resume_replays_the_run(module: str, argv_for: Callable[[Path], list[str]], tmp_path: Path, monkeypatch,
                                  run_dir: Callable[[Path], Path] = lambda out: out,
                                  weights: Callable[[Path], dict[str, torch.Tensor]] | None = None,
                                  prepare: Callable[[Path], None] | None = None, kill_at_save: int = 1,
                                  extra_optimizer_steps: int = 0) -> None:
    """`argv_for(out)` is the trainer's command line writing under `out`; `run_dir(out)` is the folder holding
    checkpoint-last/ (a variant's subfolder, say); `prepare(out)` readies each output folder; the run is killed after
    its `kill_at_save`-th checkpoint-last/; `extra_optimizer_steps` are taken outside the counted steps (a first
    phase before the kill). Checks: killed after a first checkpoint before the end; the same
    command resumes (only the remaining optimizer steps are taken) and ends at the uninterrupted run's weights."""
    import importlib

    trainer = importlib.import_module(module)
    weights = weights or (lambda folder: torch.load(folder / LAST / "model.pt", map_location="cpu", weights_only=True))
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    for out in (killed, whole) if prepare is not None else ():
        prepare(out)  # e.g. cached helper models both runs reuse
    run_killed_after_checkpoint(module, argv_for(killed), kill_at_save)
    killed_at = read_meta(run_dir(killed) / LAST)["step"]

    steps = OptimizerSteps(monkeypatch)
    trainer.main(argv_for(killed))
    resumed_steps, steps.count = steps.count, 0
    trainer.main(argv_for(whole))
    total = read_meta(run_dir(whole) / LAST)["step"]
    assert 0 < killed_at < total, (killed_at, total)
    assert read_meta(run_dir(killed) / LAST)["step"] == total
    assert steps.count == total + extra_optimizer_steps
    assert resumed_steps == total - killed_at, \
        f"the rerun took {resumed_steps} optimizer steps; {total - killed_at} training steps were left after the kill"
    a, b = weights(run_dir(killed)), weights(run_dir(whole))
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"resumed weights differ from the uninterrupted run's in {len(differ)} tensors, e.g. {differ[:3]}"
