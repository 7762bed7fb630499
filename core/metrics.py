"""Retrieval metrics shared by every stage: Recall@K from rankings, text→image with several captions per
image (each caption a query, the standard Flickr30K/COCO protocol) and image→text (a hit if any of the
image's captions is in the top K). All figures are percentages."""
from __future__ import annotations

from typing import Hashable, Iterable, Sequence

import numpy as np


def recall_from_rankings(ranked: Sequence[Sequence[Hashable]], positives: Sequence[Iterable[Hashable]],
                         ks: Sequence[int] = (1, 5, 10), prefix: str = "R@") -> dict[str, float]:
    """Share (in %) of queries with at least one positive among their first k ranked items."""
    if len(ranked) != len(positives):
        raise ValueError(f"{len(ranked)} rankings for {len(positives)} queries")
    if len(ranked) == 0:
        raise ValueError("no queries to evaluate")
    first_hit = np.array([first_positive_rank(r, p) for r, p in zip(ranked, positives)], dtype=float)
    return {f"{prefix}{k}": float(100.0 * np.mean(first_hit < k)) for k in ks}


def first_positive_rank(ranked: Sequence[Hashable], positives: Iterable[Hashable]) -> float:
    """0-based rank of the first positive in `ranked`, or inf if none is there."""
    pos = set(positives) if not isinstance(positives, (str, int, np.integer)) else {positives}
    for i, item in enumerate(ranked):
        if item in pos:
            return i
    return float("inf")


def t2i_recall(similarity: np.ndarray, caption_to_image: Sequence[int], ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """similarity: [n_captions, n_images]; caption_to_image[i] is the column of caption i's image."""
    caption_to_image = np.asarray(caption_to_image)
    target = similarity[np.arange(len(similarity)), caption_to_image]
    # rank = number of images scored strictly higher than the target (ties favour the target, as argsort does not
    # guarantee an order; strict comparison is the convention of the CLIP evaluation code)
    rank = (similarity > target[:, None]).sum(axis=1)
    return {f"R@{k}": float(100.0 * np.mean(rank < k)) for k in ks}


def i2t_recall(similarity: np.ndarray, caption_to_image: Sequence[int], ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """similarity: [n_images, n_captions]; an image is a hit at k if any of its captions ranks below k."""
    caption_to_image = np.asarray(caption_to_image)
    n_images = similarity.shape[0]
    best_rank = np.full(n_images, np.inf)
    for img in range(n_images):
        own = np.flatnonzero(caption_to_image == img)
        if len(own) == 0:
            raise ValueError(f"image column {img} has no caption")
        best_own = similarity[img, own].max()
        best_rank[img] = (similarity[img] > best_own).sum()
    return {f"R@{k}": float(100.0 * np.mean(best_rank < k)) for k in ks}


def mean_recall(metrics: dict[str, float]) -> float:
    """Mean of the R@K figures: the usual model-selection criterion (rsum / n)."""
    values = [v for k, v in metrics.items() if k.startswith("R@")]
    return float(np.mean(values))
