"""The main job's headline figures side by side over several runs (seeds), each with its 95% interval, as markdown:

    python -m tools.seed_table runs/shapes runs/shapes_seed1 > seeds.md

For each stage and row of the runs' `results.json`, the row's headline metric (R@10 for recall tables, CIRR's Avg,
the last round's Hits@10 for MIR) in each run, with the bootstrap interval the stage wrote beside it, and the mean
over the runs. A row missing from a run is shown as "—"."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

from core.errors import InputError

# metric → the key of its interval, in the order a row's headline is looked for
HEADLINES = (("Avg", "Avg 95% CI"), ("Hits@10", "Hits@10 last round 95% CI"), ("R@10", "R@10 95% CI"))


def headline(row: dict[str, Any]) -> tuple[str, float, list[float] | None] | None:
    """(metric, value, interval or None) of a results row, or None for a row with no recall figure."""
    for metric, interval in HEADLINES:
        if metric in row:
            value = row[metric]
            value = value[-1] if isinstance(value, list) else value  # Hits@10 per round: the last round's
            return metric, float(value), row.get(interval)
    return None


def load_results(run: Path) -> dict[str, dict[str, dict[str, Any]]]:
    path = run / "results.json"
    if not path.is_file():
        raise InputError(path, "", "no results.json: run the main job in this folder first")
    return json.loads(path.read_text())


def seed_table(runs: Sequence[Path]) -> str:
    results = [load_results(r) for r in runs]
    stages = list(dict.fromkeys(stage for res in results for stage in res))
    lines = []
    for stage in stages:
        rows = list(dict.fromkeys(row for res in results for row in res.get(stage, {})))
        body = []
        for row in rows:
            cells, values, metric = [], [], ""
            for res in results:
                found = headline(res.get(stage, {}).get(row, {}))
                if found is None:
                    cells.append("—")
                    continue
                metric, value, interval = found
                values.append(value)
                cells.append(f"{value:.1f}" + (f" ({interval[0]:.1f}–{interval[1]:.1f})" if interval else ""))
            if values:
                mean = f"{sum(values) / len(values):.1f}" if len(values) == len(results) else "—"
                body.append(f"| {row} | {metric} | " + " | ".join(cells) + f" | {mean} |")
        if body:
            lines += [f"### {stage}", "", "| row | metric | " + " | ".join(r.name for r in runs) + " | mean |",
                      "|---|---|" + "---|" * (len(runs) + 1), *body, ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders, each holding a main job's results.json")
    table = seed_table(parser.parse_args(argv).runs)
    print(table)
    return table


if __name__ == "__main__":
    main()
