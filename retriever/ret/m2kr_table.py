"""The ReT-M2KR results table, in the layout of the ReT paper's release table: one column per reported metric of
each test set, as fractions (0.734 = 73.4%).

Reads `eval_dir/{set}/metrics.json` (python -m retriever.ret.evaluate with configs/ret/m2kr_test/{set}.yaml) for
the sets measured so far; writes `eval_dir/table.md` and `eval_dir/table.json` ('—' / null for a set not yet run).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from core.config import parse_config
from core.errors import InputError
from core.io import atomic_write_json, atomic_write_text, read_json

# (test set folder, its name in the table, metric key, the metric's name in the table)
COLUMNS = (
    ("wit", "WIT", "R@10", "Recall@10"),
    ("iglue", "IGLUE", "R@1", "Recall@1"),
    ("kvqa", "KVQA", "R@5", "Recall@5"),
    ("oven", "OVEN", "R@5", "Recall@5"),
    ("llava", "LLaVA", "R@1", "Recall@1"),
    ("infoseek", "InfoSeek", "R@5", "Recall@5"),
    ("infoseek", "InfoSeek", "PR@5", "Pseudo Recall@5"),
    ("evqa", "EVQA", "R@5", "Recall@5"),
    ("evqa", "EVQA", "PR@5", "Pseudo Recall@5"),
    ("okvqa", "OKVQA", "R@5", "Recall@5"),
    ("okvqa", "OKVQA", "PR@5", "Pseudo Recall@5"),
)


@dataclass
class TableConfig:
    eval_dir: str = "runs/m2kr/eval"  # holds {set}/metrics.json
    row: str = "ret"  # the row of each metrics.json to report (evaluate's `row`)
    model: str = "ReT"  # the table's row label


def table_values(eval_dir: str | Path, row: str) -> dict[str, float | None]:
    """`"{set} {metric}"` → fraction, None for a set not measured yet."""
    values: dict[str, float | None] = {}
    for folder, label, key, metric in COLUMNS:
        path = Path(eval_dir) / folder / "metrics.json"
        value = None
        if path.is_file():
            metrics = read_json(path)
            if row not in metrics:
                raise InputError(path, row, f"no such row; rows: {', '.join(k for k, v in metrics.items() if isinstance(v, dict))}")
            if key not in metrics[row]:
                raise InputError(path, f"{row}.{key}", "missing (Pseudo Recall needs queries with answers)")
            value = metrics[row][key] / 100.0
        values[f"{label} {metric}"] = value
    return values


def render(values: dict[str, float | None], model: str) -> str:
    header = "| Model | " + " | ".join(values) + " |"
    rule = "|---" * (len(values) + 1) + "|"
    cells = " | ".join("—" if v is None else f"{v:.3f}" for v in values.values())
    return "\n".join([header, rule, f"| {model} | {cells} |", ""])


def main(argv: Sequence[str] | None = None) -> dict[str, float | None]:
    cfg = parse_config(TableConfig, argv)
    values = table_values(cfg.eval_dir, cfg.row)
    text = render(values, cfg.model)
    atomic_write_text(Path(cfg.eval_dir) / "table.md", text)
    atomic_write_json(Path(cfg.eval_dir) / "table.json", {"model": cfg.model, "row": cfg.row, "values": values})
    print(text)
    return values


if __name__ == "__main__":
    main()
