"""CIRR metrics of a backbone on one split: Recall@K over every image of the split (reference excluded) and
Recall_subset@K among the query's `img_set.members` (reference excluded), Avg = (R@5 + Rs@1) / 2."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from cir.iterative.backbones import EmbeddingBackbone
from cir.iterative.data import Corpus, Triplet
from cir.iterative.retrieval import score_queries


def evaluate_split(backbone: EmbeddingBackbone, corpus: Corpus, triplets: Sequence[Triplet], gallery: Sequence[str],
                   batch_size: int) -> dict[str, float]:
    scores = score_queries(backbone, corpus, triplets, gallery, batch_size)
    return cirr_metrics_from_scores(scores, triplets, gallery)


def cirr_metrics_from_scores(scores: np.ndarray, triplets: Sequence[Triplet], gallery: Sequence[str]) -> dict[str, float]:
    """`scores` already hold -inf at each query's reference (see score_queries)."""
    from core.metrics import recall_from_rankings

    column = {name: j for j, name in enumerate(gallery)}
    order = np.argsort(-scores, axis=1, kind="stable")
    ranked = [[gallery[j] for j in row if gallery[j] != t.reference] for row, t in zip(order, triplets)]
    positives = [[t.target] for t in triplets]
    metrics = recall_from_rankings(ranked, positives, ks=(1, 5, 10, 50))
    subset_ranked = []
    for i, t in enumerate(triplets):
        candidates = [m for m in t.members if m != t.reference]
        cols = [column[m] for m in candidates]
        subset_ranked.append([candidates[k] for k in np.argsort(-scores[i, cols], kind="stable")])
    metrics.update(recall_from_rankings(subset_ranked, positives, ks=(1, 2, 3), prefix="Rs@"))
    metrics["Avg"] = (metrics["R@5"] + metrics["Rs@1"]) / 2
    return metrics
