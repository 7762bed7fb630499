"""ComGTIR-D's decoding mechanisms, each asserted so that it fails when the mechanism is switched off: the corpus
constraint on the raw beams (before anything drops an invalid one), the set identifier's guidance steering the
ranking, and the set head's pooling, max or mean over the query's own tokens (padding never changes its set scores).

A tiny random T5 over a random corpus is enough: the constraint and the guidance are properties of decoding, not of
a trained model, and a random model is the hardest case for the constraint (it would leave the corpus at once)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from retriever.generative.decoding import CorpusTrie, generate_rankings
from tests.comgtir.test_comgtir_decoding import random_corpus, tiny_model

QUERIES = ["a red circle", "a blue square", "circle", "a red square"]


def _spy_on_generate(model, monkeypatch) -> list:
    """Record what the T5's beam search returns, before `generate_rankings` filters anything."""
    seen = []
    real = model.t5.generate

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(out.sequences.clone())  # (the decoder keeps its own beam scores: no output_scores)
        return out

    monkeypatch.setattr(model.t5, "generate", spy)
    return seen


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("guidance", [0.0, 2.0])
def test_every_raw_beam_is_a_corpus_identifier(shared, guidance, monkeypatch):
    codes, ids = random_corpus()
    model, tok, vocab = tiny_model(shared=shared)
    trie = CorpusTrie(codes, ids, width=5)
    raw = _spy_on_generate(model, monkeypatch)
    num_beams = 8  # fewer than the corpus's identifiers: every returned beam can and must be a valid one
    generate_rankings(model, tok, vocab, trie, QUERIES, num_beams=num_beams, guidance=guidance)
    sequences = torch.cat(raw)
    assert len(sequences) == len(QUERIES) * num_beams
    body = sequences[:, 1:1 + trie.length]
    assert (body == vocab.token_ids[torch.arange(trie.length), vocab.code_of_token[body].clamp(min=0)]).all(), \
        "a beam holds a token of the wrong level"
    rows = trie.rows_of(vocab.code_of_token[body])
    assert (rows >= 0).all(), f"{int((rows < 0).sum())} of {len(rows)} raw beams are not corpus identifiers"
    assert (sequences[:, 1 + trie.length] == vocab.eos_id).all()


def _set_prior_scores(model, tok, codes: torch.Tensor, levels: int) -> np.ndarray:
    """[n_queries, n_corpus]: Σ_level log p(code | level) of each corpus identifier under the query's set head."""
    batch = tok(QUERIES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model.encode(batch["input_ids"], batch["attention_mask"])
        prior = model.level_log_prior(model.set_logits(hidden, batch["attention_mask"]))
    per_level = torch.stack([prior[:, t, codes[:, t]] for t in range(levels)], -1)  # [Q, N, L]
    return per_level.sum(-1).numpy()


@pytest.mark.parametrize("shared", [False, True])
def test_set_guidance_steers_the_ranking_to_the_set_identifier(shared):
    codes, ids = random_corpus()
    model, tok, vocab = tiny_model(shared=shared)
    trie = CorpusTrie(codes, ids, width=5)
    beams = 64  # more than the corpus's 60 identifiers: the search is exhaustive, so only the scores decide
    plain, _ = generate_rankings(model, tok, vocab, trie, QUERIES, num_beams=beams, guidance=0.0)
    guided, _ = generate_rankings(model, tok, vocab, trie, QUERIES, num_beams=beams, guidance=1e4)
    assert plain != guided, "the set guidance did not change any ranking"
    prior = _set_prior_scores(model, tok, codes, levels=3)
    row = {imgid: j for j, imgid in enumerate(ids)}
    for q, ranking in enumerate(guided):
        # overwhelming guidance: the top identifier is the one the set head scores highest (ties: permutations of
        # one code set under a shared codebook)
        assert prior[q, row[ranking[0]]] == pytest.approx(prior[q].max(), abs=1e-4), QUERIES[q]
    assert any(prior[q, row[g[0]]] > prior[q, row[p[0]]] + 1e-4 for q, (g, p) in enumerate(zip(guided, plain)))


@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_set_scores_of_a_query_do_not_depend_on_the_padding_of_its_batch(pooling):
    model, tok, _ = tiny_model(set_pooling=pooling)
    alone = tok(["circle"], return_tensors="pt")
    padded = tok(["circle", "a red circle a blue square a red circle"], padding=True, return_tensors="pt")
    assert padded["attention_mask"][0].sum() < padded["attention_mask"].shape[1]  # the short query is padded
    with torch.no_grad():
        one = model.set_logits(model.encode(alone["input_ids"], alone["attention_mask"]), alone["attention_mask"])
        two = model.set_logits(model.encode(padded["input_ids"], padded["attention_mask"]), padded["attention_mask"])
    assert torch.allclose(one[0], two[0], atol=1e-5)
