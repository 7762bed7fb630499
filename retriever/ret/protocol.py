"""The M2KR evaluation protocol (PreFLMR's, as ReT reports it): Recall@K over the positive passage ids and
Pseudo Recall@K, where a retrieved passage counts when its text contains one of the query's answers.

Both follow the reference evaluation (FLMR's `example_use_preflmr.py`, ReT's `inference.py`): K in
{1, 2, 3, 5, 10, 50, 100}; ids compared as strings; an answer matches when `answer.strip().lower()` is a
substring of the lower-cased passage text (no other normalisation); a query whose positives are absent from the
corpus is a miss. Figures are percentages (0-100), as everywhere in this project.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from core.metrics import HEADLINE_INTERVALS, recall_from_rankings
from retriever.ret.data import Query

M2KR_KS = (1, 2, 3, 5, 10, 50, 100)


def contains_answer(text: str, answers: Sequence[str]) -> bool:
    text = text.lower()
    return any(answer.strip().lower() in text for answer in answers)


def pseudo_recall(ranked_texts: Sequence[Sequence[str]], answers: Sequence[Sequence[str]],
                  ks: Sequence[int] = M2KR_KS, prefix: str = "PR@") -> dict[str, float]:
    """Share (in %) of queries with a passage holding one of their answers among the first k retrieved."""
    if len(ranked_texts) != len(answers):
        raise ValueError(f"{len(ranked_texts)} rankings for {len(answers)} queries")
    if not ranked_texts:
        raise ValueError("no queries to evaluate")
    first = []
    for texts, wanted in zip(ranked_texts, answers):
        first.append(next((i for i, t in enumerate(texts) if contains_answer(t, wanted)), float("inf")))
    first_hit = np.asarray(first, dtype=float)
    return {f"{prefix}{k}": float(100.0 * np.mean(first_hit < k)) for k in ks}


def m2kr_metrics(ranked_ids: Sequence[Sequence[str]], queries: Sequence[Query], passage_text: dict[str, str],
                 ks: Sequence[int] = M2KR_KS) -> dict[str, float]:
    """Recall@K (`R@K`) and, when any query has answers, Pseudo Recall@K (`PR@K`) of rankings of passage ids."""
    ks = sorted(set(int(k) for k in ks))
    metrics = recall_from_rankings([[str(p) for p in r] for r in ranked_ids], [q.positives for q in queries], ks,
                                   intervals=[k for k in HEADLINE_INTERVALS if k in ks])
    if any(q.answers for q in queries):
        texts = [[passage_text[str(p)] for p in r] for r in ranked_ids]
        metrics.update(pseudo_recall(texts, [q.answers for q in queries], ks))
    return metrics
