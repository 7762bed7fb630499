"""The set identifier's prefix prior and the device-resident decoder: the prefix bonus is a brute-force max over the
images a prefix can still reach; the form of the prior changes the ranking; the decoder gives the same rankings and
beam scores as the plain one it replaced (Python trie, whole vocabulary filled, `output_scores`)."""
from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.modeling_outputs import BaseModelOutput

from retriever.generative.decoding import (CorpusTrie, SetGuidedConstraint, generate_rankings, multi_hot,
                                           prefix_prior_tables, set_index_lists, set_scores)
from retriever.generative.vocab import CodeVocab, build_tokenizer
from tests.comgtir.test_comgtir_decoding import random_corpus, tiny_model

QUERIES = ["a red circle", "a blue square", "circle", "red", "blue a", "square circle"]

# 2 levels of 4 codes + a suffix of 2: prefixes shared by several images at each level
HAND_CODES = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 1, 0], [1, 2, 0], [1, 3, 0], [2, 0, 0], [2, 0, 1], [3, 3, 0]])
HAND_SCORES = torch.tensor([[0.9, -0.2, 0.4, 1.3, 0.1, -1.0, 0.7, 0.2],
                            [-0.5, 0.8, 0.3, -0.1, 1.1, 0.6, -0.3, 0.0]])


def brute_force_bonus(query: int, prefix: list[int], top: int) -> float:
    """Best score among the query's `top` best images whose identifier starts with `prefix`; else the lowest kept."""
    kept = HAND_SCORES[query].topk(top).indices.tolist()
    reach = [float(HAND_SCORES[query, i]) for i in kept if HAND_CODES[i, :len(prefix)].tolist() == prefix]
    return max(reach) if reach else float(HAND_SCORES[query, kept].min())


def test_prefix_bonus_equals_a_brute_force_max_over_reachable_images():
    tok = build_tokenizer("word", ["a"], 2, 4, 2)
    vocab = CodeVocab(tok, 2, 4, 2)
    trie = CorpusTrie(HAND_CODES, list("abcdefgh"), width=4)
    weight, top, beams = 1.5, 4, 3
    proc = SetGuidedConstraint(trie, vocab, beams, weight=weight, prefix_tables=prefix_prior_tables(trie, HAND_SCORES, top))
    beam_prefixes = {0: [[], [], []], 1: [[0], [1], [2], [3], [0], [2]], 2: [[0, 0], [2, 0], [1, 3], [0, 1], [1, 2], [3, 1]]}
    for t, prefixes in beam_prefixes.items():
        input_ids = torch.tensor([[vocab.pad_id] + [int(vocab.token_ids[level, c]) for level, c in enumerate(p)]
                                  for p in prefixes], dtype=torch.long).view(len(prefixes), t + 1)
        out = proc(input_ids, torch.zeros(len(prefixes), vocab.vocab_size))
        for row, prefix in enumerate(prefixes):
            allowed = {c[t] for c in HAND_CODES.tolist() if c[:t] == prefix}
            for c in range(vocab.token_ids.shape[1]):
                token = int(vocab.token_ids[t, c])
                if token < 0:
                    continue
                got = float(out[row, token])
                if c in allowed:
                    assert got == pytest.approx(weight * brute_force_bonus(row // beams, prefix + [c], top)), (t, prefix, c)
                else:
                    assert got == float("-inf")  # also every code after [3, 1], which is no prefix of the corpus


def test_set_index_lists_give_the_dense_set_scores():
    sets = [[0, 3, 5], [1], [2, 4], [0, 1, 2, 3]]
    index = set_index_lists(sets)
    dense = torch.zeros(len(sets), 6)
    for n, s in enumerate(sets):
        dense[n, s] = 1.0
    assert torch.equal(multi_hot(index, 6), dense)
    values = torch.randn(3, 6)
    expected = values @ (dense / dense.sum(1, keepdim=True)).T
    assert torch.allclose(set_scores(values, index), expected, atol=1e-6)


def corpus_sets(codes: torch.Tensor, k: int, shared: bool) -> torch.Tensor:
    from rqvae.codes import set_identifier

    return set_index_lists([set_identifier(row[:-1], k, shared) for row in codes.tolist()])


def test_prior_mode_changes_the_ranking():
    codes, ids = random_corpus(n=120, k=5)
    model, tok, vocab = tiny_model()
    trie = CorpusTrie(codes, ids, width=5, sets=corpus_sets(codes, 5, False))
    ranked = {mode: generate_rankings(model, tok, vocab, trie, QUERIES, num_beams=8, guidance=8.0, prior=mode,
                                      prefix_top=10)[0] for mode in ("token", "prefix", "both")}
    for a, b in [("token", "prefix"), ("token", "both"), ("prefix", "both")]:
        assert ranked[a] != ranked[b], (a, b)
    with pytest.raises(ValueError, match="set identifiers"):
        generate_rankings(model, tok, vocab, CorpusTrie(codes, ids, width=5), QUERIES, guidance=1.0, prior="prefix")


class PlainConstraint(LogitsProcessor):
    """The decoder as it was: a Python trie walked for every beam, the whole vocabulary filled, per-code prior."""

    def __init__(self, codes: torch.Tensor, vocab: CodeVocab, prior: torch.Tensor | None, weight: float):
        self.next, self.vocab, self.prior, self.weight = defaultdict(set), vocab, prior, weight
        for row in codes.tolist():
            for t in range(len(row)):
                self.next[tuple(row[:t])].add(row[t])
        self.length = codes.shape[1]

    def __call__(self, input_ids, scores):
        t = input_ids.shape[1] - 1
        out = torch.full_like(scores, float("-inf"))
        if t >= self.length:
            out[:, self.vocab.eos_id] = 0.0
            return out
        for r, row in enumerate(input_ids[:, 1:].tolist()):
            for c in self.next.get(tuple(int(self.vocab.code_of_token[x]) for x in row), ()):
                token = int(self.vocab.token_ids[t, c])
                value = scores[r, token]
                if self.prior is not None and t < self.vocab.levels:
                    value = value + self.weight * self.prior[r, t, c]
                out[r, token] = value
        return out


def plain_rankings(model, tok, vocab, codes, ids, queries, beams, guidance):
    """Rankings and beam scores from Hugging Face's `sequences_scores` (output_scores) with the plain constraint."""
    image_of = {tuple(c): i for c, i in zip(codes.tolist(), ids)}
    batch = tok(queries, padding=True, return_tensors="pt")
    hidden = model.encode(batch["input_ids"], batch["attention_mask"])
    prior = model.level_log_prior(model.set_logits(hidden, batch["attention_mask"])).repeat_interleave(beams, 0) \
        if guidance else None
    out = model.t5.generate(
        encoder_outputs=BaseModelOutput(last_hidden_state=hidden), attention_mask=batch["attention_mask"],
        num_beams=beams, num_return_sequences=beams, max_new_tokens=codes.shape[1] + 1,
        logits_processor=LogitsProcessorList([PlainConstraint(codes, vocab, prior, guidance)]), do_sample=False,
        length_penalty=0.0, output_scores=True, return_dict_in_generate=True, decoder_start_token_id=vocab.pad_id,
        pad_token_id=vocab.pad_id, eos_token_id=vocab.eos_id)
    ranked, scored = [], []
    for q in range(len(queries)):
        hits = []
        for j in range(q * beams, (q + 1) * beams):
            key = tuple(int(vocab.code_of_token[x]) for x in out.sequences[j, 1:1 + codes.shape[1]])
            if key in image_of and torch.isfinite(out.sequences_scores[j]):
                hits.append((float(out.sequences_scores[j]), image_of[key]))
        hits.sort(key=lambda h: -h[0])
        seen = list(dict.fromkeys(i for _, i in hits))
        ranked.append(seen)
        scored.append([next(s for s, i in hits if i == img) for img in seen])
    return ranked, scored


@pytest.mark.parametrize("n, shared", [(60, False), (60, True), (5, False)])  # 5 identifiers < 8 beams
def test_rankings_equal_the_plain_decoder(n, shared):
    codes, ids = random_corpus(n=n)
    model, tok, vocab = tiny_model(shared=shared)
    trie = CorpusTrie(codes, ids, width=5)
    with torch.no_grad():
        for guidance in (0.0, 2.0):
            ranked, scores = generate_rankings(model, tok, vocab, trie, QUERIES, num_beams=8, guidance=guidance)
            ref_ranked, ref_scores = plain_rankings(model, tok, vocab, codes, ids, QUERIES, 8, guidance)
            assert ranked == ref_ranked
            for s, r in zip(scores, ref_scores):
                assert s == pytest.approx(r, abs=1e-5)


@pytest.mark.parametrize("mode", ["token", "prefix", "both"])
def test_beam_scores_equal_hugging_face_sequence_scores(mode):
    codes, ids = random_corpus(n=80)
    model, tok, vocab = tiny_model()
    trie = CorpusTrie(codes, ids, width=5, sets=corpus_sets(codes, 5, False))
    batch = tok(QUERIES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model.encode(batch["input_ids"], batch["attention_mask"])
        logits = model.set_logits(hidden, batch["attention_mask"])
        tables = prefix_prior_tables(trie, set_scores(model.set_log_prob(logits), trie.sets), 12) if mode != "token" else None
        prior = model.level_log_prior(logits) if mode != "prefix" else None
        proc = SetGuidedConstraint(trie, vocab, 6, prior, 3.0, tables)
        out = model.t5.generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=hidden), attention_mask=batch["attention_mask"],
            num_beams=6, num_return_sequences=6, max_new_tokens=trie.length + 1,
            logits_processor=LogitsProcessorList([proc]), do_sample=False, length_penalty=0.0, output_scores=True,
            return_dict_in_generate=True, decoder_start_token_id=vocab.pad_id, pad_token_id=vocab.pad_id,
            eos_token_id=vocab.eos_id)
    got = proc.beam_scores(vocab.code_of_token[out.sequences[:, 1:1 + trie.length]])
    assert torch.allclose(got, out.sequences_scores, atol=1e-5)
