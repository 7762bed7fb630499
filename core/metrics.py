"""Retrieval metrics shared by every stage: Recall@K from rankings, text→image with several captions per
image (each caption a query, the standard Flickr30K/COCO protocol) and image→text (a hit if any of the
image's captions is in the top K). All figures are percentages.

Ties never favour the target. Recall from scores is its expectation over a random order of tied items, so a model
that scores everything the same gets chance (k / N), never 100 %; an integer rank (`rank_counting_ties`) counts every
tied item as ranked above the target. With distinct scores both equal the usual strict count."""
from __future__ import annotations

from typing import Hashable, Iterable, Sequence

import numpy as np


def recall_from_rankings(ranked: Sequence[Sequence[Hashable]], positives: Sequence[Iterable[Hashable]],
                         ks: Sequence[int] = (1, 5, 10), prefix: str = "R@",
                         intervals: Sequence[int] = ()) -> dict[str, float]:
    """Share (in %) of queries with at least one positive among their first k ranked items; for each k in
    `intervals`, also `"{prefix}{k} 95% CI"`: [low, high], a bootstrap over the queries (`bootstrap_interval`)."""
    if len(ranked) != len(positives):
        raise ValueError(f"{len(ranked)} rankings for {len(positives)} queries")
    if len(ranked) == 0:
        raise ValueError("no queries to evaluate")
    first_hit = np.array([first_positive_rank(r, p) for r, p in zip(ranked, positives)], dtype=float)
    out: dict = {f"{prefix}{k}": float(100.0 * np.mean(first_hit < k)) for k in ks}
    for k in intervals:
        out[f"{prefix}{k} {INTERVAL_SUFFIX}"] = [float(v) for v in bootstrap_interval(100.0 * (first_hit < k))]
    return out


INTERVAL_SUFFIX = "95% CI"  # the key suffix of an interval beside its figure, e.g. "R@10 95% CI"
HEADLINE_INTERVALS = (1, 10)  # the Recall@K whose intervals the stages' evaluations report


def first_positive_rank(ranked: Sequence[Hashable], positives: Iterable[Hashable]) -> float:
    """0-based rank of the first positive in `ranked`, or inf if none is there."""
    pos = set(positives) if not isinstance(positives, (str, int, np.integer)) else {positives}
    for i, item in enumerate(ranked):
        if item in pos:
            return i
    return float("inf")


def hit_probability(above: np.ndarray, tied: np.ndarray, k: int, positives_tied: np.ndarray | int = 1) -> np.ndarray:
    """Chance that one of `positives_tied` positives is in the top `k` when `above` items score higher and the
    positives share their score with `tied` other items, in a random order: 1 - C(tied, s) / C(tied + p, s) for the
    s = k - above places left (s / (tied + 1) for one positive)."""
    above, tied = np.asarray(above, dtype=np.int64), np.asarray(tied, dtype=np.int64)
    p = np.broadcast_to(np.asarray(positives_tied, dtype=np.int64), above.shape)
    slots = np.clip(k - above, 0, None)
    miss = np.ones(above.shape, dtype=np.float64)  # chance that every one of the first `slots` tied places is a negative
    for i in range(int(slots.max(initial=0))):
        step = i < slots
        miss = np.where(step, miss * np.clip(tied - i, 0, None) / np.maximum(tied + p - i, 1), miss)
    return 1.0 - miss


def rank_counting_ties(scores: np.ndarray, target: np.ndarray) -> np.ndarray:
    """0-based rank of each row's target score: every other item scoring at least as high is counted above it."""
    scores, target = np.asarray(scores), np.asarray(target)
    return (scores >= target[..., None]).sum(axis=-1) - 1


def t2i_recall(similarity: np.ndarray, caption_to_image: Sequence[int], ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """similarity: [n_captions, n_images]; caption_to_image[i] is the column of caption i's image."""
    similarity, caption_to_image = np.asarray(similarity), np.asarray(caption_to_image)
    target = similarity[np.arange(len(similarity)), caption_to_image][:, None]
    above, tied = (similarity > target).sum(axis=1), (similarity == target).sum(axis=1) - 1
    return {f"R@{k}": float(100.0 * np.mean(hit_probability(above, tied, k))) for k in ks}


def i2t_recall(similarity: np.ndarray, caption_to_image: Sequence[int], ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """similarity: [n_images, n_captions]; an image is a hit at k if any of its captions ranks below k."""
    similarity, caption_to_image = np.asarray(similarity), np.asarray(caption_to_image)
    n_images = similarity.shape[0]
    above, tied, own_tied = (np.zeros(n_images, dtype=np.int64) for _ in range(3))
    for img in range(n_images):
        own = caption_to_image == img
        if not own.any():
            raise ValueError(f"image column {img} has no caption")
        best_own = similarity[img, own].max()
        above[img] = (similarity[img] > best_own).sum()
        own_tied[img] = (similarity[img, own] == best_own).sum()
        tied[img] = (similarity[img] == best_own).sum() - own_tied[img]
    return {f"R@{k}": float(100.0 * np.mean(hit_probability(above, tied, k, own_tied))) for k in ks}


def mean_recall(metrics: dict[str, float]) -> float:
    """Mean of the R@K figures: the usual model-selection criterion (rsum / n)."""
    values = [v for k, v in metrics.items() if k.startswith("R@") and not k.endswith(INTERVAL_SUFFIX)]
    return float(np.mean(values))


def bootstrap_interval(values: np.ndarray | Sequence[float], level: float = 0.95, resamples: int = 2000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-query `values` ([N], or [N, ...] for one interval per
    column, e.g. per round): queries are resampled with replacement, `resamples` times, from a fixed seed so a
    table is reproducible. Returns (low, high) in the units of `values` (arrays when `values` has columns)."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim == 0 or len(x) == 0:
        raise ValueError("a bootstrap interval needs at least one value")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    means = np.stack([x[rng.integers(len(x), size=len(x))].mean(axis=0) for _ in range(resamples)])
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail], axis=0)
    return (float(low), float(high)) if x.ndim == 1 else (low, high)
