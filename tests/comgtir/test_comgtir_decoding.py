"""Constrained decoding: the vectorised prefix tables agree with a plain trie, and the rankings hold distinct corpus
images, best first, with or without set guidance (the constraint itself is tested on the raw beams, before any
filtering, in tests/mechanisms/test_comgtir.py)."""
from __future__ import annotations

import numpy as np
import torch

from retriever.generative.decoding import (CorpusTrie, PythonTrie, SetGuidedConstraint, generate_rankings,
                                            python_trie_rankings)
from retriever.generative.model import GenerativeRetriever, RetrieverSpec, build_t5
from retriever.generative.vocab import CodeVocab, build_tokenizer

TINY_T5 = {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1, "num_decoder_layers": 1, "num_heads": 4}


def random_corpus(n=60, levels=3, k=5, seed=0):
    rng = np.random.default_rng(seed)
    codes = np.unique(rng.integers(0, k, size=(n, levels)), axis=0)
    full = np.concatenate([codes, np.zeros((len(codes), 1), dtype=int)], axis=1)
    return torch.from_numpy(full), [f"img{i}" for i in range(len(full))]


def test_prefix_tables_match_a_python_trie():
    codes, ids = random_corpus()
    trie = CorpusTrie(codes, ids, width=5)
    rng = np.random.default_rng(1)
    for t in range(codes.shape[1]):
        prefixes = torch.from_numpy(rng.integers(0, 5, size=(40, t)))
        prefixes[:10] = codes[rng.integers(0, len(codes), 10), :t]  # some valid ones for sure
        got = trie.allowed_next(prefixes)
        for p, row in zip(prefixes.tolist(), got):
            expected = {c[t] for c in codes.tolist() if c[:t] == p}
            assert set(np.flatnonzero(row.numpy()).tolist()) == expected
    assert trie.rows_of(codes).tolist() == list(range(len(codes)))
    assert trie.rows_of(torch.tensor([[4, 4, 4, 3]])).tolist() == [-1]


def tiny_model(levels=3, k=5, suffix=1, shared=False, set_pooling="mean", set_head="mlp"):
    tok = build_tokenizer("word", ["a red circle", "a blue square"], levels, k, suffix)
    vocab = CodeVocab(tok, levels, k, suffix)
    torch.manual_seed(0)
    t5 = build_t5(TINY_T5, len(tok), vocab.pad_id, vocab.eos_id)
    spec = RetrieverSpec(levels, k, suffix, k if shared else levels * k, shared, set_pooling, set_head)
    return GenerativeRetriever(t5, spec).eval(), tok, vocab


def test_processor_masks_everything_outside_the_corpus():
    codes, ids = random_corpus()
    model, tok, vocab = tiny_model()
    trie = CorpusTrie(codes, ids, width=5)
    proc = SetGuidedConstraint(trie, vocab, num_beams=1)
    prefix = vocab.encode(codes[:1])[:, :1]
    input_ids = torch.cat([torch.tensor([[vocab.pad_id]]), prefix], dim=1)
    out = proc(input_ids, torch.zeros(1, vocab.vocab_size))
    finite = set(torch.isfinite(out[0]).nonzero().flatten().tolist())
    allowed = {int(vocab.token_ids[1, c]) for c in codes[codes[:, 0] == codes[0, 0]][:, 1].tolist()}
    assert finite == allowed


def test_rankings_are_distinct_corpus_images_best_first():
    codes, ids = random_corpus()
    for shared in (False, True):
        model, tok, vocab = tiny_model(shared=shared)
        trie = CorpusTrie(codes, ids, width=5)
        for guidance in (0.0, 2.0):
            ranked, scores = generate_rankings(model, tok, vocab, trie, ["a red circle", "a blue square", "circle"],
                                               num_beams=8, guidance=guidance)
            for r, s in zip(ranked, scores):
                assert 0 < len(r) <= 8 and len(set(r)) == len(r)
                assert set(r) <= set(ids)
                assert s == sorted(s, reverse=True)


def test_python_trie_reference_gives_the_same_rankings_without_guidance():
    codes, ids = random_corpus()
    model, tok, vocab = tiny_model()
    queries = ["a red circle", "a blue square", "circle", "red"]
    got, got_scores = generate_rankings(model, tok, vocab, CorpusTrie(codes, ids, width=5), queries, num_beams=8)
    ref = PythonTrie(vocab.encode(codes).tolist(), ids)
    assert ref.allowed(vocab.encode(codes[:1])[0, :2].tolist()) == \
        [int(vocab.token_ids[2, c]) for c in codes[(codes[:, :2] == codes[0, :2]).all(1)][:, 2].tolist()]
    expected, expected_scores = python_trie_rankings(model, tok, ref, queries, 8, vocab.pad_id, vocab.eos_id)
    assert got == expected
    np.testing.assert_allclose(np.concatenate(got_scores), np.concatenate(expected_scores), rtol=1e-5, atol=1e-5)
