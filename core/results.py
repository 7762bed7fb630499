"""The main job's summary: `$RUN_DIR/results.json` as {stage: {row: {metric: value}}}, and results.md."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from core.io import atomic_write_json, atomic_write_text
from core.logging import format_table


def update_summary(results_path: str | Path, stage: str, rows: Mapping[str, Mapping[str, Any]]) -> None:
    """Merge `rows` into the stage's entry of results.json and re-render results.md beside it."""
    path = Path(results_path)
    results = json.loads(path.read_text()) if path.is_file() else {}
    results.setdefault(stage, {}).update({row: dict(m) for row, m in rows.items()})
    atomic_write_json(path, results)
    atomic_write_text(path.with_suffix(".md"), render_summary(results))


def render_summary(results: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    parts = ["# Results on the Shapes world", "", "Recall figures are percentages (0–100).", ""]
    for stage, rows in results.items():
        parts += [format_table(rows, title=stage), ""]
    return "\n".join(parts)
