import numpy as np

from core.index import VectorIndex


def _data(n=400, d=16, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_flat_index_is_exact_and_returns_ids():
    x = _data()
    ids = [f"img{i}" for i in range(len(x))]
    index = VectorIndex(16, "flat").add(x[:200], ids[:200]).add(x[200:], ids[200:])
    scores, hits = index.search(x[:5], 3)
    brute = np.argsort(-(x[:5] @ x.T), axis=1)[:, :3]
    assert hits == [[ids[j] for j in row] for row in brute]
    assert np.allclose(scores[:, 0], 1.0, atol=1e-5)


def test_ivf_saves_and_reopens(tmp_path):
    x = _data(2000)
    index = VectorIndex(16, "ivf", nlist=16, nprobe=16).add(x, list(range(2000)))
    index.save(tmp_path / "idx")
    again = VectorIndex.load(tmp_path / "idx")
    _, a = index.search(x[:20], 5)
    _, b = again.search(x[:20], 5)
    assert a == b and [row[0] for row in a] == list(range(20))
