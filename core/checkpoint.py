"""Checkpoints: `checkpoint-last/` (model, optimizer, scheduler, step, RNG) to resume a killed run exactly,
and `checkpoint-best/` by validation metric. Each folder holds `model.pt`, `meta.json` and, for `last`,
`training_state.pt`; the resolved `config.yaml` sits beside them so a folder reloads on its own.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.config import save_config
from core.errors import InputError
from core.io import atomic_dir, atomic_write_json, read_json

LAST, BEST = "checkpoint-last", "checkpoint-best"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    folder: str | Path,
    *,
    stage: str,
    model: torch.nn.Module,
    step: int,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    config: Any = None,
    extra: dict[str, Any] | None = None,
    model_files: Any = None,
    generators: dict[str, torch.Generator] | None = None,
) -> Path:
    """Write a checkpoint folder atomically. `model_files(folder)` may add files (e.g. an encoder spec);
    `generators` are the run's own random generators (beside the global ones), restored by `resume`."""
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        torch.save(unwrap(model).state_dict(), tmp / "model.pt")
        if optimizer is not None:
            torch.save(
                {
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "step": step,
                    "rng": rng_state(),
                    "generators": {k: g.get_state() for k, g in (generators or {}).items()},
                },
                tmp / "training_state.pt",
            )
        if config is not None:
            save_config(config, tmp / "config.yaml")
        if model_files is not None:
            model_files(tmp)
        atomic_write_json(tmp / "meta.json", {"stage": stage, "step": step, **(extra or {})})
    return folder


def read_meta(folder: str | Path, stage: str | None = None) -> dict[str, Any]:
    """Read a checkpoint's meta.json, checking that it was written by `stage`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, None, "checkpoint folder not found")
    meta = read_json(folder / "meta.json", required=["stage"])
    if stage is not None and meta["stage"] != stage:
        raise InputError(folder / "meta.json", "stage",
                         f"this checkpoint was written by stage '{meta['stage']}', expected '{stage}'")
    return meta


def load_model_weights(folder: str | Path, model: torch.nn.Module, stage: str | None = None) -> dict[str, Any]:
    meta = read_meta(folder, stage)
    state = torch.load(Path(folder) / "model.pt", map_location="cpu", weights_only=True)
    unwrap(model).load_state_dict(state)
    return meta


def resume(folder: str | Path, *, stage: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
           scheduler: Any = None, generators: dict[str, torch.Generator] | None = None) -> tuple[int, dict[str, Any]]:
    """Restore model, optimizer, scheduler, RNG and the run's own `generators` from `checkpoint-last/`; return
    (step, meta)."""
    folder = Path(folder)
    meta = load_model_weights(folder, model, stage)
    path = folder / "training_state.pt"
    if not path.is_file():
        raise InputError(path, None, "no training state to resume from")
    state = torch.load(path, map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    saved = state.get("generators", {})
    for name, generator in (generators or {}).items():
        if name not in saved:
            raise InputError(path, "generators", f"no state of the '{name}' generator: this checkpoint was written by "
                                                 f"an older version; resuming it would not replay the run")
        generator.set_state(saved[name])
    return int(state["step"]), meta


class BestTracker:
    """Keeps the best value of a validation metric (higher is better) across a run, resumable via meta."""

    def __init__(self, best: float | None = None):
        self.best = best

    def update(self, value: float) -> bool:
        if self.best is None or value > self.best:
            self.best = value
            return True
        return False
