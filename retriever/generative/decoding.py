"""Constrained, set-guided beam search over a corpus of identifiers, vectorised and kept on the model's device.

The corpus is a code tensor [N, L+1]. For each prefix length t, the distinct prefixes are kept as sorted integer
keys with a boolean table of the codes allowed next, so one decoding step is a `searchsorted` and a gather for
all beams at once — no Python trie walk, no host round trip. One `LogitsProcessor` applies the mask and adds the
set identifier's prior, in one of two forms (or both):

- `token`: weight × log p(code | level) from the set head, added to every allowed code (a per-code bonus);
- `prefix`: every gallery image is scored by the set head once per query batch, the best `prefix_top` are kept,
  and each candidate extension of a beam gets weight × the best such score among the images its new prefix can
  still reach — so the beam is pulled toward the prefixes of the images the set identifier likes best, not only
  toward codes it likes one level at a time.

`PythonTrie` / `python_trie_rankings` are the reference it is measured and checked against: a dict-of-dicts trie
walked per beam in `prefix_allowed_tokens_fn`, as the original code constrains decoding.
"""
from __future__ import annotations

from typing import Hashable, Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.modeling_outputs import BaseModelOutput

from core.device import autocast
from core.errors import InputError
from core.logging import progress
from retriever.generative.vocab import CodeVocab

PRIOR_MODES = ("token", "prefix", "both")


def check_prior_mode(mode: str) -> None:
    if mode not in PRIOR_MODES:
        raise InputError("config", "prior", f"must be one of {PRIOR_MODES}, got {mode!r}")


def set_index_lists(sets: Sequence[Sequence[int]]) -> torch.Tensor:
    """Each image's set identifier as a row of element indices, padded with -1: [n, largest set].

    Index lists instead of a multi-hot [n, set size]: a shared 1024-code book makes the dense form 256× larger."""
    width = max((len(s) for s in sets), default=0)
    out = torch.full((len(sets), max(width, 1)), -1, dtype=torch.long)
    for n, s in enumerate(sets):
        out[n, :len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return out


def multi_hot(set_index: torch.Tensor, set_size: int) -> torch.Tensor:
    """The multi-hot [n, set_size] of index lists [n, S] (padding -1), built only for the rows at hand."""
    out = torch.zeros(len(set_index), set_size + 1, device=set_index.device)
    out.scatter_(1, torch.where(set_index >= 0, set_index, set_size), 1.0)
    return out[:, :set_size]


def set_scores(values: torch.Tensor, set_index: torch.Tensor) -> torch.Tensor:
    """[B, N]: the mean of `values` [B, E] over each image's set elements (index lists [N, S]), one column of the
    lists at a time so memory stays B × N. With the set head's logits this is the trained set score s(q, I)."""
    valid = set_index >= 0
    total = values.new_zeros(len(values), len(set_index))
    for s in range(set_index.shape[1]):
        total += values[:, set_index[:, s].clamp(min=0)] * valid[:, s].to(values.dtype)
    return total / valid.sum(1).clamp(min=1).to(values.dtype)


class CorpusTrie:
    """The valid identifiers of a corpus as prefix tables; maps complete identifiers back to image ids.

    `sets` (index lists [N, S], see set_index_lists) are the rows' set identifiers, needed by the prefix prior."""

    def __init__(self, codes: torch.Tensor, imgids: Sequence[Hashable], width: int, sets: torch.Tensor | None = None):
        if codes.ndim != 2 or len(codes) != len(imgids):
            raise ValueError("codes must be [n_images, length] with one image id per row")
        if sets is not None and len(sets) != len(codes):
            raise ValueError("sets must have one row per identifier")
        self.codes, self.imgids, self.width = codes.long(), list(imgids), int(width)
        self.sets = sets
        self.length = codes.shape[1]
        if int(self.codes.max()) >= width:
            raise ValueError(f"a code ({int(self.codes.max())}) is outside the vocabulary width {width}")
        # base^length must fit in int64 (checked once, so keys never overflow)
        if self.length * torch.log2(torch.tensor(float(width + 1))) >= 62:
            raise ValueError("identifiers too long for 64-bit prefix keys")
        # prefix_keys[t]: the sorted distinct prefixes of length t (t = 0..length; length = the identifiers);
        # row_prefix[t][i]: which of them is row i's; allowed[t]: the codes that may follow each (t < length)
        self.prefix_keys: list[torch.Tensor] = []
        self.row_prefix: list[torch.Tensor] = []
        self.allowed: list[torch.Tensor] = []
        for t in range(self.length + 1):
            unique, inverse = torch.unique(self.key(self.codes[:, :t]), sorted=True, return_inverse=True)
            self.prefix_keys.append(unique)
            self.row_prefix.append(inverse)
            if t < self.length:
                table = torch.zeros(len(unique), width, dtype=torch.bool)
                table[inverse, self.codes[:, t]] = True
                self.allowed.append(table)
        if len(self.prefix_keys[-1]) != len(self.codes):
            raise ValueError("identifiers are not unique: disambiguate them first (rqvae.codes)")
        self.full_keys = self.prefix_keys[-1]
        self.full_rows = torch.empty_like(self.row_prefix[-1])
        self.full_rows[self.row_prefix[-1]] = torch.arange(len(self.codes))
        # children of a prefix are contiguous among the next length's sorted keys, in code order (Horner keys)
        self.child_start = [torch.searchsorted(self.prefix_keys[t + 1], self.prefix_keys[t] * (width + 1) + 1)
                            for t in range(self.length)]
        self.device = torch.device("cpu")

    def to(self, device: torch.device | str) -> "CorpusTrie":
        """Move every table to `device` (once, before decoding: no step then leaves the device)."""
        device = torch.device(device)
        if device == self.device:
            return self
        move = lambda xs: [x.to(device) for x in xs]  # noqa: E731
        self.codes, self.full_keys, self.full_rows = self.codes.to(device), self.full_keys.to(device), self.full_rows.to(device)
        self.prefix_keys, self.row_prefix = move(self.prefix_keys), move(self.row_prefix)
        self.allowed, self.child_start = move(self.allowed), move(self.child_start)
        self.sets = self.sets.to(device) if self.sets is not None else None
        self.device = device
        return self

    def key(self, prefix: torch.Tensor) -> torch.Tensor:
        """Integer key of each prefix row (Horner's rule in base width + 1)."""
        key = torch.zeros(len(prefix), dtype=torch.long, device=prefix.device)
        for i in range(prefix.shape[1]):
            key = key * (self.width + 1) + prefix[:, i] + 1
        return key

    def locate(self, prefix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(index among the length-t prefixes, found) of each prefix row [R, t]."""
        keys, k = self.prefix_keys[prefix.shape[1]], self.key(prefix)
        pos = torch.searchsorted(keys, k).clamp(max=len(keys) - 1)
        return pos, keys[pos] == k

    def allowed_next(self, prefix: torch.Tensor) -> torch.Tensor:
        """Bool [R, width]: the codes that extend each prefix [R, t] to a valid identifier prefix."""
        pos, found = self.locate(prefix)
        return self.allowed[prefix.shape[1]][pos] & found.unsqueeze(1)

    def child_index(self, t: int, pos: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """[R, width]: the index among the length-(t+1) prefixes of (prefix `pos`, code c), meaningful where
        `allowed`: children are numbered in code order from the prefix's first child."""
        return (self.child_start[t][pos].unsqueeze(1) + allowed.cumsum(1) - 1).clamp(min=0)

    def rows_of(self, codes: torch.Tensor) -> torch.Tensor:
        """Corpus row of each complete identifier [R, length], or -1 if it is not in the corpus."""
        k = self.key(codes.to(self.full_keys.device))
        pos = torch.searchsorted(self.full_keys, k).clamp(max=len(self.full_keys) - 1)
        return torch.where(self.full_keys[pos] == k, self.full_rows[pos], torch.full_like(pos, -1))


def prefix_prior_tables(trie: CorpusTrie, image_scores: torch.Tensor, top: int) -> list[torch.Tensor]:
    """For t = 1..length, [B, prefixes of length t]: the best score among each query's `top` best images that
    share the prefix (scatter-max), built once per query batch. A prefix that reaches none of them gets the
    query's lowest kept score, so it ranks below every prefix that does; a per-query constant does not change a
    ranking, only the differences count."""
    best = image_scores.topk(min(top, image_scores.shape[1]), dim=1)
    floor = best.values[:, -1:]
    tables = []
    for t in range(1, trie.length + 1):
        table = floor.expand(len(image_scores), len(trie.prefix_keys[t])).clone()
        tables.append(table.scatter_reduce_(1, trie.row_prefix[t][best.indices], best.values, reduce="amax"))
    return tables


class SetGuidedConstraint(LogitsProcessor):
    """Masks every token that would leave the corpus's identifiers and adds the set identifier's prior.

    At decoding step t (0-based, after the decoder start token) the allowed tokens are the level-t codes that
    extend the beam's prefix; after the last level only </s>. `prior` is [batch, L, K] (log p(code | level)) or
    None; `prefix_tables` the output of prefix_prior_tables or None; both are weighted by `weight`.

    Only the level's code tokens are scored; all else is -inf. Each step's scores over those codes are kept
    ([rows, width], not the vocabulary), so `beam_scores` can give the beams' scores without `output_scores`.
    """

    def __init__(self, trie: CorpusTrie, vocab: CodeVocab, num_beams: int, prior: torch.Tensor | None = None,
                 weight: float = 0.0, prefix_tables: list[torch.Tensor] | None = None):
        self.trie, self.vocab, self.num_beams, self.weight = trie, vocab, num_beams, weight
        device = trie.device
        self.prior = prior.repeat_interleave(num_beams, 0).to(device) if prior is not None and weight else None
        self.prefix_tables = prefix_tables if weight else None
        self.code_of_token = vocab.code_of_token.to(device)
        self.level_tokens = [ids[ids >= 0].to(device) for ids in vocab.token_ids]
        self.trace: list[tuple[torch.Tensor, torch.Tensor]] = []  # per step: (prefix keys [R], code scores [R, K_t])

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        t = input_ids.shape[1] - 1
        out = torch.full_like(scores, float("-inf"))
        if t >= self.trie.length:
            out[:, self.vocab.eos_id] = 0.0  # identifier complete: end it without changing the beam's score
            return out
        prefix = self.code_of_token[input_ids[:, 1:].to(self.code_of_token.device)]
        pos, found = self.trie.locate(prefix)
        allowed = self.trie.allowed[t][pos] & found.unsqueeze(1)
        tokens = self.level_tokens[t].to(scores.device)
        n = len(tokens)
        cand = scores[:, tokens]
        if self.prior is not None and t < self.vocab.levels:
            cand = cand + self.weight * self.prior[:, t, :n].to(cand.dtype)
        if self.prefix_tables is not None:
            table = self.prefix_tables[t]  # scores of the length-(t+1) prefixes, per query
            child = self.trie.child_index(t, pos, allowed)[:, :n]
            query = torch.arange(len(child), device=child.device) // self.num_beams
            bonus = table.flatten()[query.unsqueeze(1) * table.shape[1] + child]
            cand = cand + self.weight * bonus.to(cand.dtype)
        cand = cand.masked_fill(~allowed[:, :n].to(cand.device), float("-inf"))
        out[:, tokens] = cand
        self.trace.append((self.trie.key(prefix), cand))
        return out

    def beam_scores(self, codes: torch.Tensor) -> torch.Tensor:
        """Score of each returned beam [R, length] (beams grouped by query as generated): the sum, step by step in
        the order beam search adds them, of the scores this processor gave its tokens — so equal to Hugging
        Face's `sequences_scores` (length_penalty 0) without keeping the vocabulary's scores at every step.

        Only for a corpus with fewer identifiers than beams does beam search return beams grown from its placeholder
        beams (started at -1e9); each repeats a better beam's identifier, is given that beam's score here, and is
        dropped as a duplicate after it. One processor serves one `generate` call (its trace is that call's)."""
        n_queries = len(codes) // self.num_beams
        total = torch.zeros(len(codes), device=codes.device)
        for t, (keys, cand) in enumerate(self.trace):
            mine = self.trie.key(codes[:, :t]).view(n_queries, self.num_beams, 1)
            running = keys.to(codes.device).view(n_queries, 1, -1)
            # the running beam with this prefix in the same query (beams of a query have distinct prefixes)
            row = (mine == running).float().argmax(-1) + torch.arange(n_queries, device=codes.device).unsqueeze(1) * running.shape[-1]
            code = codes[:, t].clamp(0, cand.shape[1] - 1)
            total = total + cand.to(codes.device)[row.flatten(), code].float()
        return total


@torch.no_grad()
def generate_rankings(model, tokenizer, vocab: CodeVocab, trie: CorpusTrie, queries: Sequence[str], num_beams: int = 20,
                      guidance: float = 0.0, batch_size: int = 64, max_query_len: int = 64,
                      device: torch.device | str = "cpu", desc: str = "generating", prior: str = "token",
                      prefix_top: int = 500) -> tuple[list[list], list[list[float]]]:
    """Top-`num_beams` image ids (and beam scores) for each query, best first; only corpus identifiers.

    `prior` (token, prefix or both) is the form of the set identifier's guidance, `guidance` its weight."""
    check_prior_mode(prior)
    use_token, use_prefix = bool(guidance) and prior in ("token", "both"), bool(guidance) and prior in ("prefix", "both")
    if use_prefix and trie.sets is None:
        raise ValueError("the prefix prior needs the corpus's set identifiers (CorpusTrie(..., sets=...))")
    model.eval()
    trie = trie.to(device)
    ranked, scored = [], []
    for start in progress(range(0, len(queries), batch_size), desc=desc):
        batch = tokenizer(list(queries[start:start + batch_size]), padding=True, truncation=True,
                          max_length=max_query_len, return_tensors="pt").to(device)
        with autocast(torch.device(device)):
            hidden = model.encode(batch["input_ids"], batch["attention_mask"])
            logits = model.set_logits(hidden, batch["attention_mask"]).float() if guidance else None
            tables = prefix_prior_tables(trie, set_scores(model.set_log_prob(logits), trie.sets), prefix_top) \
                if use_prefix else None
            proc = SetGuidedConstraint(trie, vocab, num_beams, model.level_log_prior(logits) if use_token else None,
                                       guidance, tables)
            out = model.t5.generate(
                encoder_outputs=BaseModelOutput(last_hidden_state=hidden), attention_mask=batch["attention_mask"],
                num_beams=num_beams, num_return_sequences=num_beams, max_new_tokens=trie.length + 1,
                logits_processor=LogitsProcessorList([proc]), do_sample=False, length_penalty=0.0,
                return_dict_in_generate=True, decoder_start_token_id=vocab.pad_id,
                pad_token_id=vocab.pad_id, eos_token_id=vocab.eos_id)
        seqs = out.sequences[:, 1:1 + trie.length]
        rows = torch.full((len(seqs),), -1, dtype=torch.long, device=seqs.device)
        scores = torch.full((len(seqs),), float("-inf"), device=seqs.device)
        if seqs.shape[1] == trie.length:
            codes = proc.code_of_token[seqs]
            scores = proc.beam_scores(codes)
            ok = (codes >= 0).all(1) & torch.isfinite(scores)
            rows[ok] = trie.rows_of(codes[ok])
        rows, scores = rows.cpu(), scores.cpu()
        # beam search returns each query's beams best first; a stable sort keeps that order on equal scores
        for q in range(len(seqs) // num_beams):
            block = range(q * num_beams, (q + 1) * num_beams)
            hits = sorted(((float(scores[j]), int(rows[j])) for j in block if rows[j] >= 0), key=lambda h: -h[0])
            ids, sc, seen = [], [], set()
            for s, r in hits:
                if r not in seen:
                    seen.add(r)
                    ids.append(trie.imgids[r])
                    sc.append(s)
            ranked.append(ids)
            scored.append(sc)
    return ranked, scored


class PythonTrie:
    """Reference path: the corpus's identifiers as a dict-of-dicts trie over token ids, walked in Python one beam
    at a time through Hugging Face's `prefix_allowed_tokens_fn` — how the original GENRE-style code constrains
    decoding. Kept to measure `CorpusTrie` against and to check that both give the same beams; not used to rank.

    Identifiers have a fixed length, so the walk ends at `max_new_tokens = length` rather than on an end token, and
    a beam's score is the same sum of code log-probabilities `SetGuidedConstraint` gives (no guidance): rankings
    can then be compared exactly. A complete identifier's last token maps to its image id."""

    def __init__(self, token_rows: Sequence[Sequence[int]], imgids: Sequence[Hashable]):
        if len(token_rows) != len(imgids):
            raise ValueError("one image id per identifier")
        self.root: dict = {}
        self.length = len(token_rows[0]) if len(token_rows) else 0
        for row, imgid in zip(token_rows, imgids):
            node = self.root
            for tok in row[:-1]:
                node = node.setdefault(tok, {})
            node[row[-1]] = imgid

    def allowed(self, tokens: Sequence[int]) -> list[int]:
        node = self.root
        for tok in tokens:
            node = node.get(tok, {})
        return list(node) if isinstance(node, dict) else []

    def lookup(self, tokens: Sequence[int]) -> Hashable | None:
        node = self.root
        for tok in tokens:
            if not isinstance(node, dict) or tok not in node:
                return None
            node = node[tok]
        return None if isinstance(node, dict) else node


@torch.no_grad()
def python_trie_rankings(model, tokenizer, trie: PythonTrie, queries: Sequence[str], num_beams: int, pad_id: int,
                         eos_id: int, batch_size: int = 64, max_query_len: int = 64,
                         ) -> tuple[list[list], list[list[float]]]:
    """Top-`num_beams` image ids (and beam scores) per query by beam search constrained with `trie` (no set
    guidance: `prefix_allowed_tokens_fn` can only mask). CPU reference, see PythonTrie."""
    model.eval()
    ranked, scored = [], []

    def allowed(batch_id: int, sent: torch.Tensor) -> list[int]:
        return trie.allowed(sent[1:].tolist())  # sent[0] is the decoder start token

    for start in range(0, len(queries), batch_size):
        batch = tokenizer(list(queries[start:start + batch_size]), padding=True, truncation=True,
                          max_length=max_query_len, return_tensors="pt")
        hidden = model.encode(batch["input_ids"], batch["attention_mask"])
        out = model.t5.generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=hidden), attention_mask=batch["attention_mask"],
            num_beams=num_beams, num_return_sequences=num_beams, max_new_tokens=trie.length,
            prefix_allowed_tokens_fn=allowed, do_sample=False, length_penalty=0.0, output_scores=True,
            return_dict_in_generate=True, decoder_start_token_id=pad_id, pad_token_id=pad_id, eos_token_id=eos_id)
        seqs, scores = out.sequences[:, 1:].tolist(), out.sequences_scores.tolist()
        for q in range(len(seqs) // num_beams):
            hits = sorted(((scores[j], trie.lookup(seqs[j])) for j in range(q * num_beams, (q + 1) * num_beams)),
                          key=lambda h: -h[0])
            ids, sc, seen = [], [], set()
            for s, imgid in hits:
                if imgid is not None and imgid not in seen and s > float("-inf"):
                    seen.add(imgid)
                    ids.append(imgid)
                    sc.append(s)
            ranked.append(ids)
            scored.append(sc)
    return ranked, scored
