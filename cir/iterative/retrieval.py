"""Real retrieval with the current model: query and gallery embeddings through the backbone's `encode_queries` /
`encode_targets`, scores by inner product. Mining and evaluation both call `score_queries`, so hard negatives are
mined with exactly the encoder that evaluation ranks with."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from cir.iterative.backbones import EmbeddingBackbone
from cir.iterative.data import Corpus, Triplet
from core.device import autocast
from core.logging import progress


@torch.no_grad()
def encode_gallery(backbone: EmbeddingBackbone, corpus: Corpus, names: Sequence[str], batch_size: int) -> torch.Tensor:
    backbone.eval()
    device = next(backbone.parameters()).device
    out = []
    for start in progress(range(0, len(names), batch_size), desc="encoding gallery"):
        with autocast(device):
            out.append(backbone.encode_targets(corpus.batch(backbone, names[start:start + batch_size])).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def encode_queries(backbone: EmbeddingBackbone, corpus: Corpus, triplets: Sequence[Triplet], batch_size: int) -> torch.Tensor:
    backbone.eval()
    device = next(backbone.parameters()).device
    out = []
    for start in progress(range(0, len(triplets), batch_size), desc="encoding queries"):
        chunk = triplets[start:start + batch_size]
        refs = corpus.batch(backbone, [t.reference for t in chunk])
        with autocast(device):
            out.append(backbone.encode_queries(refs, [t.caption for t in chunk]).float().cpu())
    return torch.cat(out)


def score_queries(backbone: EmbeddingBackbone, corpus: Corpus, triplets: Sequence[Triplet], gallery: Sequence[str],
                  batch_size: int) -> np.ndarray:
    """[n_queries, n_gallery] similarities, each query's own reference image set to -inf (CIRR excludes it)."""
    g = encode_gallery(backbone, corpus, list(gallery), batch_size)
    q = encode_queries(backbone, corpus, list(triplets), batch_size)
    scores = (q @ g.T).numpy()
    column = {name: j for j, name in enumerate(gallery)}
    for i, t in enumerate(triplets):
        if t.reference in column:
            scores[i, column[t.reference]] = -np.inf
    return scores


def mine_hard_negatives(backbone: EmbeddingBackbone, corpus: Corpus, triplets: Sequence[Triplet],
                        gallery: Sequence[str], k: int, batch_size: int) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Queries whose target is not ranked first over the training images, each with its top-k wrong candidates
    (reference and ground truth filtered out). Returns (records, statistics)."""
    scores = score_queries(backbone, corpus, triplets, gallery, batch_size)
    column = {name: j for j, name in enumerate(gallery)}
    records, ranks = [], []
    for i, t in enumerate(progress(triplets, desc="mining hard negatives")):
        row = scores[i]
        target_score = row[column[t.target]]
        rank = int((row > target_score).sum())  # strict: a tie does not push the target down (core.metrics convention)
        ranks.append(rank)
        if rank == 0:
            continue
        order = np.argsort(-row, kind="stable")
        wrong = [j for j in order[: k + 2] if gallery[j] not in (t.reference, t.target)][:k]
        records.append({"pairid": t.pairid, "reference": t.reference, "caption": t.caption, "target": t.target,
                        "target_rank": rank, "target_score": float(target_score),
                        "hard_negatives": [{"image": gallery[j], "score": float(row[j])} for j in wrong]})
    ranks_a = np.array(ranks)
    stats = {"queries": len(triplets), "missed_top1": len(records),
             "missed_top1_%": float(100.0 * len(records) / max(1, len(triplets))),
             "train_R@1": float(100.0 * np.mean(ranks_a == 0)), "train_R@10": float(100.0 * np.mean(ranks_a < 10)),
             "hard_negatives": int(sum(len(r["hard_negatives"]) for r in records))}
    return records, stats
