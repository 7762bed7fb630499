"""Fine-tune the table's rows in one process (they share the data, the image-token cache and the pretrained start):
no-pretrain (from scratch, L_q2t), pretrain (L_q2t), pretrain+ptha (PTHA, α from the config: 0.5), ptha-alpha0 and
ptha-alpha1. Each row is a `cir.train` run in `{run_root}/{row}/` (resumable; finished rows are skipped); then
`{run_root}/best_model.txt` names the pretrain+ptha checkpoint (iterative CIR starts from it). Under torchrun every
row trains on all ranks (cir.train) in one process group; rank 0 writes the summary.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from cir.train import TrainConfig, run
from core.checkpoint import BEST
from core.config import parse_config
from core.distributed import DistInfo, cleanup, init_distributed, world_size_from_env
from core.errors import InputError
from core.io import atomic_write_text
from core.logging import format_table

ROWS = ("no-pretrain", "pretrain", "pretrain+ptha", "ptha-alpha0", "ptha-alpha1")
BEST_ROW = "pretrain+ptha"


@dataclass
class RowsConfig(TrainConfig):
    run_root: str = "runs/shapes/cir"
    rows: list[str] = field(default_factory=lambda: list(ROWS))
    lr_scratch: float = 1e-3  # the no-pretrain row trains from scratch; the others fine-tune at `lr`


def row_config(cfg: RowsConfig, row: str) -> TrainConfig:
    base = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainConfig)}
    base["output_dir"] = str(Path(cfg.run_root) / row)
    if row == "no-pretrain":
        return TrainConfig(**{**base, "init_from": "", "objective": "q2t", "lr": cfg.lr_scratch})
    if not cfg.init_from:
        raise InputError("config", "init_from", f"row {row!r} starts from the pretrained retriever; name its folder")
    overrides = {"pretrain": {"objective": "q2t"}, "pretrain+ptha": {"objective": "ptha"},
                 "ptha-alpha0": {"objective": "ptha", "alpha": 0.0}, "ptha-alpha1": {"objective": "ptha", "alpha": 1.0}}
    if row not in overrides:
        raise InputError("config", "rows", f"unknown row {row!r}; rows are {ROWS}")
    return TrainConfig(**{**base, **overrides[row]})


def main(argv: Sequence[str] | None = None) -> dict:
    cfg = parse_config(RowsConfig, argv)
    configs = {row: row_config(cfg, row) for row in cfg.rows}  # every row checked before any trains
    try:
        results = {row: run(c) for row, c in configs.items()}
        if init_distributed().is_main:
            if BEST_ROW in results:
                atomic_write_text(Path(cfg.run_root) / "best_model.txt",
                                  str(Path(cfg.run_root) / BEST_ROW / BEST) + "\n")
            print(format_table({r: {k: v for k, v in m["val"].items() if k != "step"} for r, m in results.items()},
                               title="CIR fine-tuning: best val (Shapes)"))
        return results
    finally:
        cleanup(DistInfo(world_size=world_size_from_env()))


if __name__ == "__main__":
    main()
