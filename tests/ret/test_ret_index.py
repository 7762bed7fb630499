"""The token index: built in chunks, saved, reopened, and checked against exhaustive MaxSim."""
from __future__ import annotations

import numpy as np

from retriever.ret.retrieval import exact_topk
from retriever.ret.token_index import TokenIndex


def _corpus(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Passages of 32 tokens, each near one of 2048 topics; queries are noisy views of passages."""
    rng = np.random.default_rng(seed)
    topics = rng.normal(size=(2048, 128))
    picks = rng.integers(2048, size=(n, 32))
    passages = topics[picks] + rng.normal(size=(n, 32, 128))  # topic-mates at cosine ~0.5
    passages /= np.linalg.norm(passages, axis=-1, keepdims=True)
    queries = passages[rng.integers(n, size=40)] + 0.3 * rng.normal(size=(40, 32, 128))
    queries /= np.linalg.norm(queries, axis=-1, keepdims=True)
    return passages.astype(np.float32), queries.astype(np.float32)


def test_ivfpq_index_agrees_with_exact_maxsim(tmp_path):
    passages, queries = _corpus(400)
    ids = [f"p{i}" for i in range(len(passages))]
    index = TokenIndex(128, "ivfpq", nlist=16, nprobe=8, pq_m=16, pq_bits=6).build(passages, ids, chunk_size=100)
    index.save(tmp_path / "index", extra={"note": "test"})
    reopened = TokenIndex.load(tmp_path / "index")
    assert len(reopened) == 400 and reopened.tokens_per_passage == 32
    _, found = reopened.search(queries, 10, per_token=64)
    _, exact = exact_topk(queries, reopened.passages, 10)
    agree = np.mean([set(f) == {ids[r] for r in e} for f, e in zip(found, exact)])
    assert agree >= 0.95
    # the candidates of a query are a small part of the corpus: the index does prune
    assert np.mean([len(c) for c in reopened.candidates(queries, 4)]) < 0.8 * len(passages)
    assert (tmp_path / "index" / "index.faiss").stat().st_size < passages.nbytes / 4  # PQ codes, not raw floats
