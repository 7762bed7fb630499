"""Real retrieval with the current model: query and gallery embeddings through the backbone's `encode_queries` /
`encode_targets`, scored by the backbone's `similarity` (the inner product, or the max over a target's tokens).
Mining and evaluation both call `score_queries`, so hard negatives are
mined with exactly the encoder that evaluation ranks with. The batches are read by DataLoader workers
(cir.iterative.data.Corpus.batches); under torchrun each rank encodes its share and the embeddings are gathered, so
every rank holds the same scores."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from cir.iterative.backbones import EmbeddingBackbone
from cir.iterative.data import SINGLE, Corpus, Triplet
from cir.iterative.sharding import gather_share_rows, padded_share
from core.device import autocast
from core.distributed import DistInfo
from core.logging import progress
from core.metrics import rank_counting_ties


def _device_of(backbone: EmbeddingBackbone) -> torch.device:
    return next(backbone.parameters()).device


@torch.no_grad()
def encode_gallery(backbone: EmbeddingBackbone, corpus: Corpus, names: Sequence[str], batch_size: int,
                   info: DistInfo = SINGLE) -> torch.Tensor:
    """[n, D] (or [n, T, D], see `EmbeddingBackbone.encode_targets`) target embeddings on the CPU; under torchrun
    each rank encodes its share and every rank gets all."""
    backbone.eval()
    device = _device_of(backbone)
    share, _ = padded_share(list(names), info)
    specs = [([share[s:s + batch_size]], None) for s in range(0, len(share), batch_size)]
    out = []
    for (images,), _ in corpus.batches(specs, device, desc="encoding gallery" if info.is_main else ""):
        with autocast(device):
            out.append(backbone.encode_targets(images).float())
    return gather_share_rows(torch.cat(out), len(names), info).cpu()


@torch.no_grad()
def encode_queries(backbone: EmbeddingBackbone, corpus: Corpus, triplets: Sequence[Triplet], batch_size: int,
                   info: DistInfo = SINGLE) -> torch.Tensor:
    """[n, D] query embeddings of (reference, modification text), sharded over ranks like `encode_gallery`."""
    backbone.eval()
    device = _device_of(backbone)
    share, _ = padded_share(list(triplets), info)
    specs = [([[t.reference for t in share[s:s + batch_size]]], [t.caption for t in share[s:s + batch_size]])
             for s in range(0, len(share), batch_size)]
    out = []
    for (refs,), texts in corpus.batches(specs, device, desc="encoding queries" if info.is_main else ""):
        with autocast(device):
            out.append(backbone.encode_queries(refs, texts).float())
    return gather_share_rows(torch.cat(out), len(triplets), info).cpu()


def score_queries(backbone: EmbeddingBackbone, corpus: Corpus, triplets: Sequence[Triplet], gallery: Sequence[str],
                  batch_size: int, info: DistInfo = SINGLE) -> np.ndarray:
    """[n_queries, n_gallery] similarities, each query's own reference image set to -inf (CIRR excludes it).
    Under torchrun every rank calls it and gets the same matrix."""
    g = encode_gallery(backbone, corpus, list(gallery), batch_size, info)
    q = encode_queries(backbone, corpus, list(triplets), batch_size, info)
    scores = torch.cat([backbone.similarity(q[i:i + batch_size], g) for i in range(0, len(q), batch_size)]).numpy()
    column = {name: j for j, name in enumerate(gallery)}
    for i, t in enumerate(triplets):
        if t.reference in column:
            scores[i, column[t.reference]] = -np.inf
    return scores


def mine_hard_negatives(backbone: EmbeddingBackbone, corpus: Corpus, triplets: Sequence[Triplet],
                        gallery: Sequence[str], k: int, batch_size: int,
                        info: DistInfo = SINGLE) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Queries whose target is not ranked first over the training images, each with its top-k wrong candidates
    (reference and ground truth filtered out). Returns (records, statistics), the same on every rank."""
    scores = score_queries(backbone, corpus, triplets, gallery, batch_size, info)
    column = {name: j for j, name in enumerate(gallery)}
    records, ranks = [], []
    for i, t in enumerate(progress(triplets, desc="mining hard negatives", enabled=info.is_main)):
        row = scores[i]
        target_score = row[column[t.target]]
        rank = int(rank_counting_ties(row, target_score))  # a target tied with another image is not ranked first
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
