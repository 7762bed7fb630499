"""Encoding items with one side of ReT, and exhaustive MaxSim search (the reference the faiss index is checked against)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from core.device import autocast
from core.logging import progress
from retriever.ret.data import M2KRSplit
from retriever.ret.features import CachedSource, Item, LiveSource
from retriever.ret.model import RetModel


@torch.no_grad()
def encode_items(model: RetModel, source: CachedSource | LiveSource, items: Sequence[Item], batch_size: int = 256,
                 desc: str = "encoding") -> np.ndarray:
    """L2-normalised late-interaction tokens [N, 32, 128] (float32) of (text, image) items."""
    model.eval()
    out = []
    for i in progress(range(0, len(items), batch_size), desc=desc):
        inputs = source.side(items[i:i + batch_size], model.cfg).to(model.device)
        with autocast(model.device):
            out.append(model.encode(inputs).float().cpu())
    return torch.cat(out).numpy()


def query_items(split: M2KRSplit, use_instruction: bool) -> list[Item]:
    return [(q.text(use_instruction), q.image) for q in split.queries]


def passage_items(split: M2KRSplit) -> list[Item]:
    return [(p.text, p.image) for p in split.passages]


def maxsim_scores(queries: np.ndarray | torch.Tensor, passages: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Σ_i max_j <q_i, d_j> as one matrix product per query block: [Nq, Lq, D] × [Np, Lp, D] → [Nq, Np]."""
    q = torch.as_tensor(queries, dtype=torch.float32)
    p = torch.as_tensor(passages, dtype=torch.float32)
    nq, lq, d = q.shape
    np_, lp, _ = p.shape
    sim = q.reshape(nq * lq, d) @ p.reshape(np_ * lp, d).T
    return sim.reshape(nq, lq, np_, lp).amax(-1).sum(1)


def exact_topk(queries: np.ndarray, passages: np.ndarray, k: int, block: int = 32,
               desc: str = "exact MaxSim") -> tuple[np.ndarray, np.ndarray]:
    """Exhaustive MaxSim over the whole corpus: top-k (scores, passage rows) per query, best first."""
    k = min(k, len(passages))
    p = torch.as_tensor(passages, dtype=torch.float32)
    scores, rows = [], []
    for i in progress(range(0, len(queries), block), desc=desc):
        s = maxsim_scores(queries[i:i + block], p)
        top = torch.topk(s, k, dim=1)
        scores.append(top.values.numpy())
        rows.append(top.indices.numpy())
    return np.concatenate(scores), np.concatenate(rows)
