"""The JSONL record store: one line per (target, round), appended as rounds finish, read back to resume.

A line is written and flushed whole; a killed run can leave at most one partial last line, which is
dropped on reopening (that round is redone). Every metric is computed from these records: a missing
(target, round) is an error, never a silent skip.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from core.errors import InputError

REQUIRED = ("target", "round", "query", "rank")


class RecordStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows = self._read()

    def _read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        text = self.path.read_text()
        lines = text.split("\n")
        rows = []
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if lineno == len(lines):  # a partial last line from a killed run: drop it, redo that round
                    self._rewrite(rows)
                    break
                raise InputError(self.path, f"line {lineno}", "not valid JSON") from None
            for key in REQUIRED:
                if key not in row:
                    raise InputError(self.path, f"line {lineno}: {key}", "required field is missing")
            rows.append(row)
        return rows

    def _rewrite(self, rows: Sequence[dict]) -> None:
        from core.io import atomic_write_jsonl

        atomic_write_jsonl(self.path, rows)

    def append(self, rows: Iterable[dict]) -> None:
        rows = list(rows)
        with open(self.path, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
            f.flush()
            os.fsync(f.fileno())
        self.rows += rows

    def last(self) -> dict[str, dict]:
        """Each target's latest record."""
        out: dict[str, dict] = {}
        for row in self.rows:
            if row["target"] not in out or row["round"] > out[row["target"]]["round"]:
                out[row["target"]] = row
        return out

    def next_round(self, target: str) -> int:
        row = self.last().get(target)
        return 0 if row is None else int(row["round"]) + 1


def rank_matrix(rows: Sequence[dict], targets: Sequence[str], rounds: int, key: str = "rank",
                source: str | Path = "records") -> np.ndarray:
    """[len(targets), rounds + 1] ranks; any missing (target, round) raises InputError."""
    table = {(r["target"], int(r["round"])): r for r in rows}
    out = np.zeros((len(targets), rounds + 1))
    for i, t in enumerate(targets):
        for r in range(rounds + 1):
            row = table.get((t, r))
            if row is None or row.get(key) is None:
                raise InputError(source, f"{t} round {r}", f"no record with {key!r}: the run is incomplete (rerun to resume)")
            out[i, r] = row[key]
    return out
