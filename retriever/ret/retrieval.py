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
    p = torch.as_tensor(passages, dtype=torch.float32, device=q.device)
    nq, lq, d = q.shape
    np_, lp, _ = p.shape
    sim = q.reshape(nq * lq, d) @ p.reshape(np_ * lp, d).T
    return sim.reshape(nq, lq, np_, lp).amax(-1).sum(1)


def exact_topk(queries: np.ndarray, passages: np.ndarray, k: int, block: int = 32, passage_block: int = 4096,
               desc: str = "exact MaxSim", device: torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exhaustive MaxSim over the whole corpus: top-k (scores, passage rows) per query, best first.

    Streamed: passages are read `passage_block` at a time (a memory map stays on disk but for the block in use) and
    merged into a running top-k per query, so memory is bounded by the blocks, [block·Lq, passage_block·Lp] scores,
    whatever the corpus size. On the GPU when `device` is one (default: the CPU)."""
    device = device or torch.device("cpu")
    n = len(passages)
    k = min(k, n)
    scores, rows = [], []
    for i in progress(range(0, len(queries), block), desc=desc):
        q = torch.as_tensor(np.asarray(queries[i:i + block], dtype=np.float32), device=device)
        best = torch.full((len(q), 0), float("-inf"), device=device)
        best_rows = torch.zeros((len(q), 0), dtype=torch.long, device=device)
        for j in range(0, n, passage_block):
            chunk = torch.as_tensor(np.asarray(passages[j:j + passage_block], dtype=np.float32), device=device)
            s = maxsim_scores(q, chunk)
            merged = torch.cat([best, s], 1)
            merged_rows = torch.cat([best_rows, torch.arange(j, j + len(chunk), device=device).expand(len(q), -1)], 1)
            # stable sort keeps earlier rows first among equal scores, as one topk over the whole corpus would
            order = torch.sort(merged, dim=1, descending=True, stable=True).indices[:, :k]
            best, best_rows = merged.gather(1, order), merged_rows.gather(1, order)
        scores.append(best.cpu().numpy())
        rows.append(best_rows.cpu().numpy())
    return np.concatenate(scores), np.concatenate(rows)
