"""Exhaustive MaxSim streamed over passage blocks with a running top-k: the same ranking as one pass over the whole
corpus, from arrays or float16 memory maps, never scoring more than one block of passages at a time."""
from __future__ import annotations

import numpy as np
import torch

from retriever.ret import retrieval
from retriever.ret.retrieval import exact_topk, maxsim_scores


def _data(seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((7, 4, 8)).astype(np.float32), rng.standard_normal((53, 6, 8)).astype(np.float32)


def test_streamed_topk_equals_one_pass_over_the_corpus():
    q, p = _data()
    full = maxsim_scores(q, p)
    want = torch.sort(full, dim=1, descending=True, stable=True)
    for k, block, passage_block in ((10, 3, 5), (1, 7, 53), (60, 2, 8)):
        scores, rows = exact_topk(q, p, k, block=block, passage_block=passage_block)
        kk = min(k, len(p))
        assert rows.shape == (7, kk)
        assert (rows == want.indices[:, :kk].numpy()).all()
        np.testing.assert_allclose(scores, want.values[:, :kk].numpy(), rtol=1e-5, atol=1e-5)


def test_streamed_topk_reads_a_float16_memory_map_block_by_block(tmp_path, monkeypatch):
    q, p = _data(1)
    stored = np.lib.format.open_memmap(tmp_path / "passages.npy", mode="w+", dtype=np.float16, shape=p.shape)
    stored[:] = p
    stored.flush()
    mapped = np.load(tmp_path / "passages.npy", mmap_mode="r")
    seen = []
    real = retrieval.maxsim_scores
    monkeypatch.setattr(retrieval, "maxsim_scores", lambda a, b: seen.append(len(b)) or real(a, b))
    _, rows = exact_topk(q, mapped, 5, passage_block=16)
    assert max(seen) <= 16 and sum(seen) == len(p) * 1  # one query block (7 ≤ 32), every passage scored once
    want = torch.topk(real(q, p.astype(np.float16).astype(np.float32)), 5, dim=1).indices.numpy()
    assert (rows == want).all()


def test_ties_keep_the_earlier_passage_first():
    q = np.ones((1, 2, 4), dtype=np.float32)
    p = np.ones((9, 3, 4), dtype=np.float32)  # every passage scores the same
    _, rows = exact_topk(q, p, 4, passage_block=2)
    assert rows.tolist() == [[0, 1, 2, 3]]


def test_nlist_grows_with_the_square_root_of_the_token_count():
    from retriever.ret.token_index import TokenIndex

    assert TokenIndex.nlist_for_tokens(32 * 10_000) == 2262  # 4·√320,000
    assert TokenIndex.nlist_for_tokens(32 * 110_000) == 7504  # 4·√3,520,000
    assert TokenIndex.nlist_for_tokens(0) == 4
