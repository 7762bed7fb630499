"""Constrained, set-guided beam search over a corpus of identifiers, vectorised.

The corpus is a code tensor [N, L+1]. For each prefix length t, the distinct prefixes are kept as sorted integer
keys with a boolean table of the codes allowed next, so one decoding step is a `searchsorted` and a gather for
all beams at once — no Python trie walk per step. One `LogitsProcessor` applies the mask and adds the set
identifier's prior (weight × log p(code | level) from the set head), so beams are steered by the order-invariant
identifier and not only by the left-to-right prefix.
"""
from __future__ import annotations

from typing import Hashable, Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.modeling_outputs import BaseModelOutput

from core.device import autocast
from core.logging import progress
from retriever.generative.vocab import CodeVocab


class CorpusTrie:
    """The valid identifiers of a corpus as prefix tables; maps complete identifiers back to image ids."""

    def __init__(self, codes: torch.Tensor, imgids: Sequence[Hashable], width: int):
        if codes.ndim != 2 or len(codes) != len(imgids):
            raise ValueError("codes must be [n_images, length] with one image id per row")
        self.codes, self.imgids, self.width = codes.long(), list(imgids), int(width)
        self.length = codes.shape[1]
        if int(self.codes.max()) >= width:
            raise ValueError(f"a code ({int(self.codes.max())}) is outside the vocabulary width {width}")
        # base^length must fit in int64 (checked once, so keys never overflow)
        if self.length * torch.log2(torch.tensor(float(width + 1))) >= 62:
            raise ValueError("identifiers too long for 64-bit prefix keys")
        self.prefix_keys: list[torch.Tensor] = []
        self.allowed: list[torch.Tensor] = []
        for t in range(self.length):
            keys = self.key(self.codes[:, :t])
            unique, inverse = torch.unique(keys, sorted=True, return_inverse=True)
            table = torch.zeros(len(unique), width, dtype=torch.bool)
            table[inverse, self.codes[:, t]] = True
            self.prefix_keys.append(unique)
            self.allowed.append(table)
        full = self.key(self.codes)
        self.full_keys, order = torch.sort(full)
        if len(torch.unique(full)) != len(full):
            raise ValueError("identifiers are not unique: disambiguate them first (rqvae.codes)")
        self.full_rows = order

    def key(self, prefix: torch.Tensor) -> torch.Tensor:
        """Integer key of each prefix row (Horner's rule in base width + 1)."""
        key = torch.zeros(len(prefix), dtype=torch.long)
        for i in range(prefix.shape[1]):
            key = key * (self.width + 1) + prefix[:, i] + 1
        return key

    def allowed_next(self, prefix: torch.Tensor) -> torch.Tensor:
        """Bool [R, width]: the codes that extend each prefix [R, t] to a valid identifier prefix."""
        t = prefix.shape[1]
        keys, table = self.prefix_keys[t], self.allowed[t]
        k = self.key(prefix)
        pos = torch.searchsorted(keys, k).clamp(max=len(keys) - 1)
        found = keys[pos] == k
        return table[pos] & found.unsqueeze(1)

    def rows_of(self, codes: torch.Tensor) -> torch.Tensor:
        """Corpus row of each complete identifier [R, length], or -1 if it is not in the corpus."""
        k = self.key(codes)
        pos = torch.searchsorted(self.full_keys, k).clamp(max=len(self.full_keys) - 1)
        return torch.where(self.full_keys[pos] == k, self.full_rows[pos], torch.full_like(pos, -1))


class SetGuidedConstraint(LogitsProcessor):
    """Masks every token that would leave the corpus's identifiers and adds the set identifier's prior.

    At decoding step t (0-based, after the decoder start token) the allowed tokens are the level-t codes that
    extend the beam's prefix; after the last level only </s>. `prior` is [batch, L, K] (log p(code | level)) or None.
    """

    def __init__(self, trie: CorpusTrie, vocab: CodeVocab, num_beams: int, prior: torch.Tensor | None = None,
                 weight: float = 0.0):
        self.trie, self.vocab, self.num_beams = trie, vocab, num_beams
        self.prior = prior.repeat_interleave(num_beams, 0) if prior is not None and weight else None
        self.weight = weight

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        t = input_ids.shape[1] - 1
        out = torch.full_like(scores, float("-inf"))
        if t >= self.trie.length:
            out[:, self.vocab.eos_id] = 0.0  # identifier complete: end it without changing the beam's score
            return out
        prefix = self.vocab.code_of_token.to(input_ids.device)[input_ids[:, 1:]]
        mask = self.trie.allowed_next(prefix.cpu()).to(scores.device)
        level_tokens = self.vocab.token_ids[t].to(scores.device)
        valid = level_tokens >= 0
        tokens = level_tokens[valid]
        cand = scores[:, tokens]
        if self.prior is not None and t < self.vocab.levels:
            cand = cand + self.weight * self.prior[:, t, : len(tokens)].to(cand.dtype)
        out[:, tokens] = cand.masked_fill(~mask[:, valid], float("-inf"))
        return out


@torch.no_grad()
def generate_rankings(model, tokenizer, vocab: CodeVocab, trie: CorpusTrie, queries: Sequence[str], num_beams: int = 20,
                      guidance: float = 0.0, batch_size: int = 64, max_query_len: int = 64,
                      device: torch.device | str = "cpu", desc: str = "generating") -> tuple[list[list], list[list[float]]]:
    """Top-`num_beams` image ids (and beam scores) for each query, best first; only corpus identifiers."""
    model.eval()
    ranked, scored = [], []
    for start in progress(range(0, len(queries), batch_size), desc=desc):
        batch = tokenizer(list(queries[start:start + batch_size]), padding=True, truncation=True,
                          max_length=max_query_len, return_tensors="pt").to(device)
        with autocast(torch.device(device)):
            hidden = model.encode(batch["input_ids"], batch["attention_mask"])
            prior = model.level_log_prior(model.set_logits(hidden, batch["attention_mask"]).float()) if guidance else None
            proc = SetGuidedConstraint(trie, vocab, num_beams, prior, guidance)
            out = model.t5.generate(
                encoder_outputs=BaseModelOutput(last_hidden_state=hidden), attention_mask=batch["attention_mask"],
                num_beams=num_beams, num_return_sequences=num_beams, max_new_tokens=trie.length + 1,
                logits_processor=LogitsProcessorList([proc]), do_sample=False, length_penalty=0.0,
                output_scores=True, return_dict_in_generate=True, decoder_start_token_id=vocab.pad_id,
                pad_token_id=vocab.pad_id, eos_token_id=vocab.eos_id)
        seqs = out.sequences[:, 1:1 + trie.length].cpu()
        scores = out.sequences_scores.float().cpu()
        ok = (seqs.shape[1] == trie.length) & (vocab.code_of_token[seqs] >= 0).all(1) & torch.isfinite(scores)
        rows = torch.full((len(seqs),), -1, dtype=torch.long)
        if ok.any():
            rows[ok] = trie.rows_of(vocab.code_of_token[seqs[ok]])
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
