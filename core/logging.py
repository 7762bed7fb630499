"""Progress bars, wandb tracking (offline unless WANDB_MODE says otherwise) and metrics.json."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

from tqdm.auto import tqdm

from core.config import config_to_dict
from core.io import atomic_write_json


def progress(iterable: Iterable | None = None, *, desc: str = "", total: int | None = None,
             enabled: bool = True, **kwargs: Any) -> tqdm:
    """tqdm with rate and ETA; off on non-main ranks and when TQDM_DISABLE=1."""
    disable = not enabled or os.environ.get("TQDM_DISABLE") == "1"
    return tqdm(iterable, desc=desc, total=total, disable=disable, dynamic_ncols=True,
                mininterval=1.0, file=sys.stderr, **kwargs)


class Tracker:
    """Logs scalars to wandb (offline by default) and keeps the latest evaluation in metrics.json."""

    def __init__(self, run_dir: str | Path, config: Any = None, project: str = "genretrieval",
                 name: str | None = None, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.run = None
        os.environ.setdefault("WANDB_MODE", "offline")
        if enabled and os.environ["WANDB_MODE"] != "disabled":
            import wandb

            self.run_dir.mkdir(parents=True, exist_ok=True)
            run_id = _wandb_id(self.run_dir)
            # The id follows the run folder, so a resumed run continues the same wandb run, and so does the name:
            # two run folders of one stage never share a name in the wandb table.
            run_name = f"{name or self.run_dir.name}-{run_id[:6]}"
            self.run = wandb.init(
                project=project, name=run_name, id=run_id, resume="allow",
                dir=str(self.run_dir), config=config_to_dict(config) if config is not None else None,
                settings=wandb.Settings(silent=True, console="off"),
            )
            if os.environ["WANDB_MODE"] == "offline":
                print(f"wandb: offline run '{run_name}' in {Path(self.run.dir).parent} "
                      f"(wandb sync {Path(self.run.dir).parent} to upload it)", file=sys.stderr)

    def log(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self.run is not None:
            # an interval ([low, high]) goes to metrics.json and the summary, not to a wandb chart
            self.run.log({k: v for k, v in metrics.items() if not isinstance(v, (list, tuple))}, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def _wandb_id(run_dir: Path) -> str:
    import hashlib

    return hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]


class LossSpikeWatch:
    """Flags a diverged run: the first step at which the smoothed training loss exceeds `factor` times the lowest
    smoothed loss seen after `after` steps (a late jump that never recovers, not the noise of one batch)."""

    def __init__(self, factor: float = 3.0, decay: float = 0.98, after: int = 200):
        self.factor, self.decay, self.after = factor, decay, after
        self.smoothed: float | None = None
        self.best = float("inf")
        self.tripped_at: int | None = None

    def update(self, step: int, loss: float) -> bool:
        """Feed one step's loss; True only on the step where the run is first judged diverged."""
        self.smoothed = loss if self.smoothed is None else self.decay * self.smoothed + (1 - self.decay) * loss
        if step < self.after or self.tripped_at is not None:
            return False
        self.best = min(self.best, self.smoothed)
        if self.smoothed > self.factor * self.best:
            self.tripped_at = step
            return True
        return False


def write_metrics(run_dir: str | Path, metrics: Mapping[str, Any], name: str = "metrics.json") -> Path:
    path = Path(run_dir) / name
    atomic_write_json(path, dict(metrics))
    return path


def format_table(rows: Mapping[str, Mapping[str, Any]], title: str = "", row_header: str = "") -> str:
    """A Markdown table: one line per row, one column per metric (union over rows, in first-seen order)."""
    columns: list[str] = []
    for metrics in rows.values():
        for key in metrics:
            if key not in columns:
                columns.append(key)
    lines = [f"### {title}", ""] if title else []
    lines.append("| " + " | ".join([row_header or "run", *columns]) + " |")
    lines.append("|" + "---|" * (len(columns) + 1))
    for row, metrics in rows.items():
        lines.append("| " + " | ".join([row, *(_fmt(metrics.get(c)) for c in columns)]) + " |")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, (list, tuple)):
        return " / ".join(_fmt(v) for v in value)
    return str(value)
