"""Contrastive losses of composed retrieval: query→target (L_q2t), the reverse branch (L_t2t) and the prototype
alignment (L_p2p) of PTHA, combined as Eq. (total loss) of the MTST/PTHA paper: L = L_q2t + L_t2t + α·L_p2p.

Under torchrun a rank holds rows [row_offset, row_offset + b) of the global batch's queries and every rank's targets
(gathered with gradients, `gather_target_rows`): its loss is the mean over its own rows, and DDP's average over ranks
is then the global batch's mean, as in one process."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from core.distributed import DistInfo, gather_with_grad


def query_target_contrastive(query_emb: torch.Tensor, target_emb: torch.Tensor, temperature: float,
                             target_ids: Sequence | torch.Tensor | None = None, row_offset: int = 0) -> torch.Tensor:
    """InfoNCE of each query against the batch's targets (PTHA paper, L_q2t).

    query_emb [B, D] and target_emb [M, D] are L2-normalised, M >= B: target i is query i's positive and targets
    B..M-1 are appended negatives. With `target_ids` (length M), a target that is the same image as the query's own
    positive is not counted as a negative (it is masked out), so a batch holding one target twice does not push a
    query away from its own answer. With `row_offset`, the queries are rows row_offset.. of the global batch whose
    targets `target_emb` holds (one rank's share): query i's positive is target row_offset + i.
    """
    b, m = query_emb.shape[0], target_emb.shape[0]
    if m < row_offset + b:
        raise ValueError(f"{m} targets for queries {row_offset}..{row_offset + b - 1}: every query needs its own "
                         "positive target")
    logits = query_emb.float() @ target_emb.float().T / temperature
    positive = torch.arange(b, device=logits.device) + row_offset
    if target_ids is not None:
        ids = _as_index(target_ids, m, logits.device)
        same = ids[positive, None] == ids[None, :]  # [b, M]: column j shows query i's own target image
        own = torch.zeros_like(same)
        own[torch.arange(b, device=logits.device), positive] = True
        logits = logits.masked_fill(same & ~own, float("-inf"))
    return F.cross_entropy(logits, positive)


def _as_index(ids: Sequence | torch.Tensor, m: int, device: torch.device) -> torch.Tensor:
    if isinstance(ids, torch.Tensor):
        out = ids.to(device)
    else:
        lookup: dict = {}
        out = torch.tensor([lookup.setdefault(i, len(lookup)) for i in ids], device=device)
    if out.shape[0] != m:
        raise ValueError(f"{out.shape[0]} target ids for {m} targets")
    return out


def prototype_alignment(proto_forward: torch.Tensor, proto_reverse: torch.Tensor, temperature: float,
                        row_offset: int = 0) -> torch.Tensor:
    """L_p2p of PTHA: the forward prototype (reference + text) is pulled to the reverse branch's prototype (target +
    reverse text) of the same triplet and pushed from the others'; the reverse side is a fixed anchor (detached)."""
    return query_target_contrastive(proto_forward, proto_reverse.detach(), temperature, row_offset=row_offset)


def gather_target_rows(parts: Sequence[torch.Tensor], sizes: Sequence[Sequence[int]], info: DistInfo) -> torch.Tensor:
    """Every rank's target embeddings in the global batch's column order, with gradients back to the rank that made
    them. A rank's targets come in `parts` (its own targets, then its appended negatives); `sizes[k][r]` is how many
    rows part k has on rank r (known on every rank from the global batch). The columns are part 0 of every rank in
    rank order, then part 1 of every rank, ..., which is one process's order for contiguous shares. Parts of unequal
    size are padded for the all-gather and the padding dropped."""
    if not info.enabled:
        return torch.cat(list(parts))
    columns = []
    for part, counts in zip(parts, sizes):
        longest = max(counts)
        if longest == 0:
            continue
        padding = part.new_zeros(longest - len(part), *part.shape[1:])
        padded = torch.cat([part, padding]) if len(padding) else part
        gathered = gather_with_grad(padded, info)
        columns += [gathered[r * longest:r * longest + n] for r, n in enumerate(counts)]
    return torch.cat(columns)


def ptha_loss(l_q2t: torch.Tensor, l_t2t: torch.Tensor, l_p2p: torch.Tensor, w_q2t: float = 1.0, w_t2t: float = 1.0,
              alpha: float = 0.5) -> torch.Tensor:
    """PTHA paper, total fine-tuning loss: L = L_q2t + L_t2t + α·L_p2p (weights 1, 1, 0.5 by default)."""
    return w_q2t * l_q2t + w_t2t * l_t2t + alpha * l_p2p
