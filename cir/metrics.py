"""Composed-retrieval metrics exactly as CIRR and FashionIQ define them, the CIRR test-server files, and the
overlap scores (ROUGE-1/ROUGE-L F1) of generated modification texts. Recall figures are percentages.

CIRR: Recall@1/5/10/50 rank every image of the split except the reference (positive = `target_hard`);
Recall_subset@1/2/3 rank the query's `img_set.members` except the reference (5 candidates); Avg = (R@5 + Rs@1) / 2.
FashionIQ (val, per category against its own gallery): the reference is NOT excluded; R@10 and R@50 per category,
their means over categories, and (mean R@10 + mean R@50) / 2.
Ties are broken by gallery order (a stable sort), so a ranking is reproducible.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from cir.data import CIRTriplet
from core.errors import InputError
from core.io import atomic_write_json

CIRR_KS = (1, 5, 10, 50)
SUBSET_KS = (1, 2, 3)
FASHIONIQ_KS = (10, 50)


def _check(scores: np.ndarray, gallery: Sequence[str], triplets: Sequence[CIRTriplet]) -> dict[str, int]:
    scores = np.asarray(scores)
    if scores.shape != (len(triplets), len(gallery)):
        raise ValueError(f"scores are {scores.shape}, expected (queries={len(triplets)}, gallery={len(gallery)})")
    if not triplets:
        raise ValueError("no queries to evaluate")
    return {name: j for j, name in enumerate(gallery)}


def rank_gallery(scores: np.ndarray, gallery: Sequence[str], triplets: Sequence[CIRTriplet], k: int | None = None,
                 exclude_reference: bool = True) -> list[list[str]]:
    """Per query, gallery names by decreasing score (the reference dropped if `exclude_reference`), top `k`."""
    col = _check(scores, gallery, triplets)
    out = []
    for q, t in enumerate(triplets):
        order = np.argsort(-np.asarray(scores[q], dtype=np.float64), kind="stable")
        if exclude_reference:
            order = order[order != col[t.reference]]
        out.append([gallery[j] for j in order[:k]])
    return out


def rank_subsets(scores: np.ndarray, gallery: Sequence[str], triplets: Sequence[CIRTriplet]) -> list[list[str]]:
    """Per query, its subset members except the reference, by decreasing score (ties in member order)."""
    col = _check(scores, gallery, triplets)
    out = []
    for q, t in enumerate(triplets):
        cands = [m for m in t.members if m != t.reference]
        if not cands:
            raise InputError(None, f"pairid {t.pairid}: img_set.members", "no candidate besides the reference")
        s = np.array([scores[q][col[m]] for m in cands], dtype=np.float64)
        out.append([cands[j] for j in np.argsort(-s, kind="stable")])
    return out


def _recall(ranked: Sequence[Sequence[str]], targets: Sequence[str], ks: Sequence[int], prefix: str) -> dict[str, float]:
    hits = {k: 0 for k in ks}
    for r, target in zip(ranked, targets):
        for k in ks:
            hits[k] += target in r[:k]
    return {f"{prefix}{k}": 100.0 * hits[k] / len(targets) for k in ks}


def cirr_metrics(scores: np.ndarray, gallery: Sequence[str], triplets: Sequence[CIRTriplet]) -> dict[str, float]:
    """R@1/5/10/50, Rs@1/2/3 and Avg of one split; scores[q, j] = similarity of query q to gallery image j."""
    targets = [t.target for t in triplets]
    if any(t is None for t in targets):
        raise InputError(None, "target_hard", "this split hides its targets (CIRR test1): write the server files instead")
    ranked = rank_gallery(scores, gallery, triplets, k=max(CIRR_KS))
    out = _recall(ranked, targets, CIRR_KS, "R@")
    out.update(_recall(rank_subsets(scores, gallery, triplets), targets, SUBSET_KS, "Rs@"))
    out["Avg"] = (out["R@5"] + out["Rs@1"]) / 2
    return out


def cirr_avg_interval(scores: np.ndarray, gallery: Sequence[str], triplets: Sequence[CIRTriplet],
                      level: float = 0.95) -> list[float]:
    """A bootstrap interval (over queries) of CIRR's Avg = (R@5 + Rs@1) / 2, in %: each query contributes the mean
    of its two hits, so the interval's centre is the split's Avg."""
    from core.metrics import bootstrap_interval

    targets = [t.target for t in triplets]
    if any(t is None for t in targets):
        raise InputError(None, "target_hard", "this split hides its targets (CIRR test1): no interval without them")
    global_top = rank_gallery(scores, gallery, triplets, k=5)
    subset_top = rank_subsets(scores, gallery, triplets)
    per_query = [(t in g) / 2 + (t in s[:1]) / 2 for t, g, s in zip(targets, global_top, subset_top)]
    return [100 * v for v in bootstrap_interval(per_query, level)]


def cirr_submission(scores: np.ndarray, gallery: Sequence[str],
                    triplets: Sequence[CIRTriplet]) -> tuple[dict[str, object], dict[str, object]]:
    """The two CIRR test-server files: top-50 per pairid ("recall") and the subset top-3 ("recall_subset")."""
    recall: dict[str, object] = {"version": "rc2", "metric": "recall"}
    subset: dict[str, object] = {"version": "rc2", "metric": "recall_subset"}
    for t, top, sub in zip(triplets, rank_gallery(scores, gallery, triplets, k=50),
                           rank_subsets(scores, gallery, triplets)):
        recall[str(t.pairid)] = top
        subset[str(t.pairid)] = sub[:3]
    return recall, subset


def write_cirr_submission(out_dir: str | Path, scores: np.ndarray, gallery: Sequence[str],
                          triplets: Sequence[CIRTriplet], name: str = "test1") -> tuple[Path, Path]:
    """Both server files, written atomically as `recall_submission_{name}.json` and
    `recall_subset_submission_{name}.json` (the names the CIRR server's instructions use); the one writer of the
    CIR stage and the iterative loop. Any triplet with `pairid`, `reference` and `members` will do."""
    recall, subset = cirr_submission(scores, gallery, triplets)
    out_dir = Path(out_dir)
    paths = out_dir / f"recall_submission_{name}.json", out_dir / f"recall_subset_submission_{name}.json"
    atomic_write_json(paths[0], recall, indent=None)
    atomic_write_json(paths[1], subset, indent=None)
    return paths


def fashioniq_recall(scores: np.ndarray, gallery: Sequence[str], triplets: Sequence[CIRTriplet],
                     ks: Sequence[int] = FASHIONIQ_KS) -> dict[str, float]:
    """R@10/R@50 of one category; the reference stays in the gallery (the FashionIQ protocol)."""
    ranked = rank_gallery(scores, gallery, triplets, k=max(ks), exclude_reference=False)
    return _recall(ranked, [t.target for t in triplets], ks, "R@")


def fashioniq_summary(per_category: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Flatten {category: {R@10, R@50}} into `{cat}/R@10`, ..., `mean/R@10`, `mean/R@50` and `Avg`."""
    if not per_category:
        raise ValueError("no category evaluated")
    out = {f"{cat}/{k}": v for cat, m in per_category.items() for k, v in m.items()}
    for k in ("R@10", "R@50"):
        out[f"mean/{k}"] = float(np.mean([m[k] for m in per_category.values()]))
    out["Avg"] = (out["mean/R@10"] + out["mean/R@50"]) / 2
    return out


# ---------------------------------------------------------------------------------------------- text overlap
def _words(text: str) -> list[str]:
    import re

    return re.findall(r"[a-z0-9]+(?:-[a-z0-9]+)*", text.lower())


def _f1(overlap: int, n_pred: int, n_ref: int) -> float:
    if overlap == 0 or n_pred == 0 or n_ref == 0:
        return 0.0
    p, r = overlap / n_pred, overlap / n_ref
    return 2 * p * r / (p + r)


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_1(pred: str, ref: str) -> float:
    """Unigram-overlap F1 (ROUGE-1, clipped counts), lower-cased words."""
    from collections import Counter

    p, r = Counter(_words(pred)), Counter(_words(ref))
    return _f1(sum((p & r).values()), sum(p.values()), sum(r.values()))


def rouge_l(pred: str, ref: str) -> float:
    """Longest-common-subsequence F1 (ROUGE-L, β = 1), lower-cased words."""
    p, r = _words(pred), _words(ref)
    return _f1(_lcs(p, r), len(p), len(r))


def generation_scores(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1 / ROUGE-L F1 (in %) and the share of exact matches, over pairs."""
    if len(preds) != len(refs) or not preds:
        raise ValueError(f"{len(preds)} predictions for {len(refs)} references")
    return {
        "ROUGE-1": 100.0 * float(np.mean([rouge_1(p, r) for p, r in zip(preds, refs)])),
        "ROUGE-L": 100.0 * float(np.mean([rouge_l(p, r) for p, r in zip(preds, refs)])),
        "exact": 100.0 * float(np.mean([_words(p) == _words(r) for p, r in zip(preds, refs)])),
    }
