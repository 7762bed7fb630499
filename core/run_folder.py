"""One policy for a trainer's existing run folder, decided before any work starts.

A run folder holds the resolved `config.yaml` of the run that made it (or, in folders written before it did, its
`checkpoint-last/` holds it). Rerunning with the same config resumes the
run (from `checkpoint-last/`) or reuses it when it is finished. A different config is refused with the keys that
differ, unless `--overwrite true` (the folder is cleared and the run starts afresh) or every differing key is one that
may change on resume — the step budget, logging, evaluation and checkpoint intervals, data-loading knobs — and those
are then honoured, with a line saying so. A larger step budget reopens a finished run.
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import yaml

from core.checkpoint import LAST
from core.config import config_to_dict
from core.distributed import rank_from_env
from core.errors import InputError

CONFIG = "config.yaml"
# Keys that may take a new value when a run is resumed: they change how long or how visibly a run trains, not what
# it trains. The step budget reopens a finished run; the others do not.
BUDGET_KEYS = frozenset({"max_steps", "epochs", "steps"})
IGNORED = frozenset({"overwrite"})
MAY_CHANGE_ON_RESUME = BUDGET_KEYS | frozenset({
    "log_every", "eval_every", "save_every", "wandb_project", "wandb", "num_workers", "pin_memory",
    "persistent_workers", "verify_images", "max_val_images", "encode_batch_size",
    "threads", "summary", "sample_every",
})


@dataclasses.dataclass(frozen=True)
class RunStart:
    """What a trainer does with its folder: `fresh` (nothing to restore), or resume from `checkpoint-last/`;
    `reuse_finished` is False when the step budget changed, so a finished run trains on."""
    folder: Path
    fresh: bool
    changed: dict[str, tuple[Any, Any]]

    @property
    def reuse_finished(self) -> bool:
        return not (self.fresh or BUDGET_KEYS & set(self.changed))


def open_run_folder(folder: str | Path, cfg: Any, *, overwrite: bool = False,
                    may_change: frozenset[str] = MAY_CHANGE_ON_RESUME) -> RunStart:
    """Apply the policy to `folder` for the run configured by `cfg` (a config dataclass). Call it before any work,
    on every rank; with `overwrite`, rank 0 empties a folder that holds an earlier run."""
    folder = Path(folder)
    saved_path = next((p for p in (folder / CONFIG, folder / LAST / CONFIG) if p.is_file()), None)
    if saved_path is None:
        return RunStart(folder, fresh=True, changed={})
    if overwrite:
        if rank_from_env() == 0:
            _clear(folder)
        return RunStart(folder, fresh=True, changed={})
    saved = _read_saved(saved_path)
    changed = config_changes(saved, config_to_dict(cfg))
    refused = sorted(k for k in changed if k not in may_change)
    if refused:
        listing = "; ".join(f"{k}: {changed[k][0]!r} -> {changed[k][1]!r}" for k in refused)
        raise InputError(saved_path, refused[0],
                         f"this run folder was made with another config ({listing}); rerun with the same values to "
                         f"resume it, pass --overwrite true to start afresh, or choose another output folder")
    if changed:
        print(f"{folder}: resuming with new values of {', '.join(f'{k}={v[1]!r}' for k, v in sorted(changed.items()))}")
    return RunStart(folder, fresh=False, changed=changed)


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Keys of the current config whose value differs from the saved one, as (saved, current). Keys only the saved
    file has (an option since removed) are ignored; so is `overwrite`, which says how to start, not what to train."""
    return {k: (saved.get(k), v) for k, v in sorted(current.items())
            if k not in IGNORED and _normalise(saved.get(k)) != _normalise(v)}


def _normalise(value: Any) -> Any:
    # The YAML round trip turns tuples into lists and Paths into strings; compare what the file can hold.
    return yaml.safe_load(yaml.safe_dump(value)) if value is not None else None


def _read_saved(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise InputError(path, None, f"the saved config is not valid YAML ({e}); remove the folder or pass "
                                     f"--overwrite true") from None
    if not isinstance(data, dict):
        raise InputError(path, None, "the saved config is not a mapping; remove the folder or pass --overwrite true")
    return data


def _clear(folder: Path) -> None:
    """Empty a run folder in place (the folder itself may be a mount point or watched)."""
    for child in folder.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
