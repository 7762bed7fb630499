"""MIR metrics from per-(target, round) ranks, as ChatIR computes them.

`ranks[i, r]` is the 0-based rank of target i at round r. Cumulative Hits@k at round r is the share of
targets ranked below k at some round ≤ r (ChatIR's `get_first_hitting_time` / `cumulative_hits_per_round`),
so it never decreases; per-round Recall@k looks at round r alone; the mean log rank is the mean of
ln(1-based rank), lower is better.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def first_hit_round(ranks: np.ndarray, k: int = 10) -> np.ndarray:
    """The first round at which each target is within the top k (inf if never)."""
    hits = ranks < k
    first = np.where(hits.any(1), hits.argmax(1), np.inf)
    return first.astype(float)


def cumulative_hits(ranks: np.ndarray, k: int = 10) -> list[float]:
    """Hits@k per round r: % of targets found within rounds 0..r."""
    first = first_hit_round(ranks, k)
    return [float(100.0 * np.mean(first <= r)) for r in range(ranks.shape[1])]


def recall_per_round(ranks: np.ndarray, k: int = 10) -> list[float]:
    return [float(100.0 * np.mean(ranks[:, r] < k)) for r in range(ranks.shape[1])]


def mean_log_rank(ranks: np.ndarray) -> list[float]:
    return [float(np.mean(np.log(ranks[:, r] + 1.0))) for r in range(ranks.shape[1])]


def hits_interval(ranks: np.ndarray, k: int = 10, level: float = 0.95) -> list[float]:
    """A bootstrap interval (over targets, in %) of the last round's cumulative Hits@k."""
    from core.metrics import bootstrap_interval

    found = first_hit_round(ranks, k) <= ranks.shape[1] - 1
    return [100 * v for v in bootstrap_interval(found.astype(float), level)]


def summarise(ranks: np.ndarray, ks: Sequence[int] = (1, 10)) -> dict[str, object]:
    """The row a mode writes into results.json (Hits@10 first: the figure DESIGN §4 asks for)."""
    out: dict[str, object] = {"Hits@10": cumulative_hits(ranks, 10),
                              "Hits@10 last round 95% CI": hits_interval(ranks, 10)}
    for k in ks:
        out[f"R@{k} per round"] = recall_per_round(ranks, k)
    out["mean log rank"] = mean_log_rank(ranks)
    out["N"] = int(ranks.shape[0])
    return out
