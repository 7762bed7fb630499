"""Encoding items with one side of ReT, and exhaustive MaxSim search (the reference the faiss index is checked against)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from core.data import LoaderOptions
from core.device import autocast
from core.logging import progress
from retriever.ret.data import M2KRSplit
from retriever.ret.features import CachedSource, Item, ItemDataset, LiveSource, item_loader
from retriever.ret.model import RetModel


@torch.no_grad()
def encode_items(model: RetModel, source: CachedSource | LiveSource, items: Sequence[Item], batch_size: int = 256,
                 desc: str = "encoding", options: LoaderOptions | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """L2-normalised late-interaction tokens [N, 32, 128] of (text, image) items, in order, their images read by a
    DataLoader. Float32 in memory, or written as made into `out` (e.g. a float16 memory map of a whole corpus)."""
    model.eval()
    loader = item_loader(source, ItemDataset(items, source.load), options or LoaderOptions(), model.device,
                         batch_size=batch_size)
    blocks, row = [], 0
    for batch in progress(loader, desc=desc, unit="batch"):
        inputs = source.side(batch, model.cfg).to(model.device)
        with autocast(model.device):
            emb = model.encode(inputs).float().cpu().numpy()
        if out is not None:
            out[row:row + len(emb)] = emb
        else:
            blocks.append(emb)
        row += len(emb)
    return out if out is not None else np.concatenate(blocks)


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
    p = torch.from_numpy(np.asarray(passages, dtype=np.float32)) if isinstance(passages, np.ndarray) \
        else torch.as_tensor(passages, dtype=torch.float32)
    scores, rows = [], []
    for i in progress(range(0, len(queries), block), desc=desc):
        s = maxsim_scores(queries[i:i + block], p)
        top = torch.topk(s, k, dim=1)
        scores.append(top.values.numpy())
        rows.append(top.indices.numpy())
    return np.concatenate(scores), np.concatenate(rows)
