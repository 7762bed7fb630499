"""CIRR metrics of a backbone on one split: Recall@K over every image of the split (reference excluded) and
Recall_subset@K among the query's `img_set.members` (reference excluded), Avg = (R@5 + Rs@1) / 2. Under torchrun
every rank calls it (the embeddings are computed in shards) and gets the same numbers."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from cir.iterative.backbones import EmbeddingBackbone
from cir.iterative.data import SINGLE, Corpus, Triplet
from cir.iterative.retrieval import score_queries
from core.distributed import DistInfo


def evaluate_split(backbone: EmbeddingBackbone, corpus: Corpus, triplets: Sequence[Triplet], gallery: Sequence[str],
                   batch_size: int, info: DistInfo = SINGLE) -> dict[str, float]:
    scores = score_queries(backbone, corpus, triplets, gallery, batch_size, info)
    return cirr_metrics_from_scores(scores, triplets, gallery)


def cirr_metrics_from_scores(scores: np.ndarray, triplets: Sequence[Triplet], gallery: Sequence[str]) -> dict[str, float]:
    """The CIR stage's tested implementation of the benchmark's definitions (cir.metrics)."""
    from cir.metrics import cirr_metrics

    return cirr_metrics(scores, list(gallery), list(triplets))
