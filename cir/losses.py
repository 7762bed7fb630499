"""Contrastive losses of composed retrieval: query→target (L_q2t), L_t2t and the prototype alignment (L_p2p) of
PTHA, combined as the paper's total fine-tuning loss (Sec. III, two-hop alignment): L = L_q2t + L_t2t + α·L_p2p.

Targets are scored by `max_over_tokens`: a query against each of a target's token embeddings, keeping the best (the
released model's rule over its 32 query tokens; one token gives the plain inner product).

Under torchrun a rank holds rows [row_offset, row_offset + b) of the global batch's queries and every rank's targets
(gathered with gradients, `gather_target_rows`): its loss is the mean over its own rows, and DDP's average over ranks
is then the global batch's mean, as in one process."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from core.distributed import DistInfo, gather_with_grad


def max_over_tokens(query: torch.Tensor, target_tokens: torch.Tensor) -> torch.Tensor:
    """scores[i, j] = max_t <query_i, target_tokens[j, t]> for query [B, D] and target_tokens [M, T, D] (or [M, D],
    one token each): the PTHA paper's query–target similarity over the target's Q-Former query tokens."""
    if target_tokens.dim() == 2:
        return query @ target_tokens.T
    return torch.einsum("bd,mtd->bmt", query, target_tokens).amax(dim=-1)


def query_target_contrastive(query_emb: torch.Tensor, target_emb: torch.Tensor, temperature: float | torch.Tensor,
                             target_ids: Sequence | torch.Tensor | None = None, row_offset: int = 0,
                             label_smoothing: float = 0.0) -> torch.Tensor:
    """InfoNCE of each query against the batch's targets (PTHA paper, L_q2t), scored by `max_over_tokens`.

    query_emb [B, D] and target_emb [M, D] or [M, T, D] are L2-normalised, M >= B: target i is query i's positive
    and targets B..M-1 are appended negatives. With `target_ids` (length M), a target that is the same image as the
    query's own positive is not counted as a negative (it is masked out), so a batch holding one target twice does
    not push a query away from its own answer. With `row_offset`, the queries are rows row_offset.. of the global
    batch whose targets `target_emb` holds (one rank's share): query i's positive is target row_offset + i.
    `label_smoothing` spreads that share of the target mass uniformly over the columns not masked out (the released
    model's L_q2t uses 0.1); with nothing masked it is `F.cross_entropy`'s label smoothing.
    """
    b, m = query_emb.shape[0], target_emb.shape[0]
    if m < row_offset + b:
        raise ValueError(f"{m} targets for queries {row_offset}..{row_offset + b - 1}: every query needs its own "
                         "positive target")
    logits = max_over_tokens(query_emb.float(), target_emb.float()) / temperature
    positive = torch.arange(b, device=logits.device) + row_offset
    if target_ids is not None:
        ids = _as_index(target_ids, m, logits.device)
        same = ids[positive, None] == ids[None, :]  # [b, M]: column j shows query i's own target image
        own = torch.zeros_like(same)
        own[torch.arange(b, device=logits.device), positive] = True
        logits = logits.masked_fill(same & ~own, float("-inf"))
    if not label_smoothing:
        return F.cross_entropy(logits, positive)
    valid = torch.isfinite(logits)  # the columns not masked out
    log_p = F.log_softmax(logits, dim=-1)
    nll = -log_p.gather(1, positive[:, None])[:, 0]
    uniform = -(log_p.masked_fill(~valid, 0.0).sum(dim=-1) / valid.sum(dim=-1))
    return ((1.0 - label_smoothing) * nll + label_smoothing * uniform).mean()


def _as_index(ids: Sequence | torch.Tensor, m: int, device: torch.device) -> torch.Tensor:
    if isinstance(ids, torch.Tensor):
        out = ids.to(device)
    else:
        lookup: dict = {}
        out = torch.tensor([lookup.setdefault(i, len(lookup)) for i in ids], device=device)
    if out.shape[0] != m:
        raise ValueError(f"{out.shape[0]} target ids for {m} targets")
    return out


def prototype_mse(forward_tokens: torch.Tensor, reverse_tokens: torch.Tensor) -> torch.Tensor:
    """L_p2p of the released PTHA model: the mean squared error between the mean-pooled first-hop tokens [B, Q, H]
    of the forward branch (reference + text) and of the reverse branch (target + reverse text), the reverse side a
    fixed anchor (detached). Row-local, so under torchrun each rank's mean is averaged by DDP."""
    return F.mse_loss(forward_tokens.float().mean(dim=1), reverse_tokens.float().mean(dim=1).detach())


def prototype_alignment(proto_forward: torch.Tensor, proto_reverse: torch.Tensor, temperature: float,
                        row_offset: int = 0) -> torch.Tensor:
    """L_p2p of the project variant: the forward prototype (reference + text) is pulled to the reverse branch's
    prototype (target + reverse text) of the same triplet and pushed from the others'; the reverse side is a fixed
    anchor (detached)."""
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
