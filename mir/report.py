"""Metrics, plot and example sheet of the MIR runs, computed from their record stores only.

Reads `output_dir/<mode>/{run.json, records.jsonl}` for each mode; every mode must cover the same targets
and every (target, round) must be recorded. Writes `output_dir/metrics.json`, `hits_at_10.png` (cumulative
Hits@10 against the round, one line per mode), `dialogues_genir.png` (target, generated image and query per
round for a few targets) and, with `--summary`, the rows mir/{genir, prediction, text-only, ...} of results.json.

    python -m mir.report --output_dir runs/shapes/mir --summary runs/shapes/results.json
"""
from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from core.config import parse_config
from core.errors import InputError
from core.io import read_json, save_figure
from core.logging import write_metrics
from core.results import update_summary
from mir.metrics import summarise
from mir.records import RecordStore, rank_matrix


@dataclass
class ReportConfig:
    output_dir: str = "runs/shapes/mir"
    modes: list[str] = field(default_factory=lambda: ["genir", "prediction", "text-only", "image-query"])
    summary: str = ""  # results.json to merge the rows into (empty: none)
    examples: int = 4  # dialogues drawn in the example sheet
    image_root: str = "data/shapes"  # where the targets' paths point


# results.json row name → (mode, which rank)
ROWS = {
    "genir": ("genir", "rank"),
    "prediction": ("prediction", "rank"),
    "text-only": ("text-only", "rank"),
    "genir (generated image as query)": ("genir", "rank_image"),
    "image-query, no feedback (ablation)": ("image-query", "rank_image"),
}


def load_mode(out: Path, mode: str) -> tuple[dict, list[dict]]:
    run = read_json(out / mode / "run.json", required=["targets", "rounds"])
    return run, RecordStore(out / mode / "records.jsonl").rows


def build_rows(out: Path, modes: Sequence[str]) -> tuple[dict[str, dict[str, Any]], dict[str, list[dict]], dict]:
    runs, rows_by_mode = {}, {}
    for mode in modes:
        runs[mode], rows_by_mode[mode] = load_mode(out, mode)
    first = runs[modes[0]]
    for mode in modes[1:]:
        if runs[mode]["targets"] != first["targets"] or runs[mode]["rounds"] != first["rounds"]:
            raise InputError(out / mode / "run.json", "targets", f"mode {mode} ran on other targets or rounds than {modes[0]}")
    table: dict[str, dict[str, Any]] = {}
    for name, (mode, key) in ROWS.items():
        if mode not in modes:
            continue
        ranks = rank_matrix(rows_by_mode[mode], first["targets"], first["rounds"], key, out / mode / "records.jsonl")
        row = summarise(ranks)
        recs = rows_by_mode[mode]
        row["truncated queries %"] = float(100 * np.mean([r["query_tokens_truncated"] for r in recs]))
        row["seconds per target"] = seconds_per_target(recs, len(first["targets"]))
        fed = [r for r in recs if r.get("feedback")]
        if fed:
            row["feedback clauses not parsed (per feedback)"] = float(np.mean([r.get("feedback_unparsed", 0) for r in fed]))
        table[name] = row
    return table, rows_by_mode, first


def seconds_per_target(records: Sequence[dict], n_targets: int) -> float:
    """The loop's measured time per target over all its rounds: each record's `seconds_*` fields are that target's
    share of a batched call (captioning, retrieval, generation, user, refiner), so their sum over the records, over
    the targets, is the mean cost of one target's episode (model loading and encoding the search space excluded)."""
    total = sum(v for r in records for k, v in r.items() if k.startswith("seconds_") and isinstance(v, (int, float)))
    return float(total / max(n_targets, 1))


def plot_hits(table: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, row in table.items():
        h = row["Hits@10"]
        ax.plot(range(len(h)), h, marker="o", ms=3, label=name)
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative Hits@10 (%)")
    n = next(iter(table.values()))["N"]
    ax.set_title(f"Mental image retrieval on Shapes (N = {n} targets)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def dialogue_sheet(out: Path, rows: list[dict], targets: Sequence[str], image_root: Path, n: int, path: Path) -> None:
    """Per target: the target, then each round's generated image with that round's query and target rank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = {(r["target"], r["round"]): r for r in rows}
    rounds = 1 + max(r["round"] for r in rows)
    picked = list(targets[:n])
    fig, axes = plt.subplots(len(picked), rounds + 1, figsize=(1.45 * (rounds + 1), 1.9 * len(picked)), squeeze=False)
    for i, t in enumerate(picked):
        with Image.open(image_root / t) as img:
            axes[i][0].imshow(img.convert("RGB"))
        axes[i][0].set_title("target", fontsize=6)
        for r in range(rounds):
            rec = table[(t, r)]
            ax = axes[i][r + 1]
            with Image.open(out / rec["image"]) as img:
                ax.imshow(img.convert("RGB"))
            found = " ✓" if rec["rank"] < 10 else ""
            ax.set_title(f"r{r} rank {rec['rank'] + 1}{found}", fontsize=5)
            ax.set_xlabel("\n".join(textwrap.wrap(rec["query"], 26)[:6]), fontsize=3.6)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    save_figure(fig, path, dpi=170)


def hits_table(table: dict[str, dict[str, Any]]) -> str:
    rounds = len(next(iter(table.values()))["Hits@10"])
    lines = ["| mode | " + " | ".join(f"r{r}" for r in range(rounds)) + " | N | s / target |",
             "|---|" + "---|" * (rounds + 2)]
    for name, row in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{h:.1f}" for h in row["Hits@10"])
                     + f" | {row['N']} | {row.get('seconds per target', float('nan')):.3f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    cfg = parse_config(ReportConfig, argv)
    out = Path(cfg.output_dir)
    table, rows_by_mode, run = build_rows(out, cfg.modes)
    write_metrics(out, table)
    plot_hits(table, out / "hits_at_10.png")
    if "genir" in rows_by_mode:
        dialogue_sheet(out, rows_by_mode["genir"], run["targets"], Path(cfg.image_root), cfg.examples,
                       out / "dialogues_genir.png")
    print("cumulative Hits@10 per round (%)")
    print(hits_table(table))
    if cfg.summary:
        update_summary(cfg.summary, "mir", table)
    return table


if __name__ == "__main__":
    main()
