import numpy as np
import pytest

from core.errors import InputError
from core.index import (VectorIndex, choose_kind, default_nlist, default_nprobe, pq_subquantizers, sample_rows)


def _data(n=400, d=16, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _clustered(n=6000, d=32, clusters=64, seed=0, spread=0.35):
    """Unit vectors around `clusters` random centres, and queries near the data (noisy copies of corpus rows)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d))
    x = centres[rng.integers(clusters, size=n)] + spread * rng.normal(size=(n, d))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    q = x[rng.choice(n, size=100, replace=False)] + 0.1 * rng.normal(size=(100, d)).astype(np.float32)
    return x, q / np.linalg.norm(q, axis=1, keepdims=True)


def _recall_at_10(index, x, q):
    exact = np.argsort(-(q @ x.T), axis=1)[:, :10]
    _, hits = index.search(q, 10)
    return np.mean([len(set(h) & set(e)) / 10 for h, e in zip(hits, exact)])


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


@pytest.mark.parametrize("kind, kwargs, floor", [
    ("flat", {}, 1.0),
    ("ivf", {"nlist": 64, "nprobe": 16}, 0.9),
    ("ivfpq", {"nlist": 64, "nprobe": 16, "pq_m": 8}, 0.5),  # 8-byte codes for 128-byte vectors: lossy by design
    ("hnsw", {"ef_search": 64}, 0.9),
])
def test_each_kind_finds_the_exact_neighbours(kind, kwargs, floor):
    x, q = _clustered()
    index = VectorIndex(32, kind, **kwargs).add(x, list(range(len(x))))
    assert index.kind == kind
    assert _recall_at_10(index, x, q) >= floor


def test_auto_picks_the_kind_by_size_and_about_four_root_n_lists():
    assert [choose_kind(n) for n in (49_999, 50_000, 1_999_999, 2_000_000)] == ["flat", "ivf", "ivf", "ivfpq"]
    assert default_nlist(1_000_000) == 4000 and default_nprobe(4000) == 63
    x, _ = _clustered(n=40_000)
    small = VectorIndex(32, flat_below=50_000).add(x, list(range(len(x))))
    assert small.kind == "flat"
    ivf = VectorIndex(32, flat_below=10_000, ivfpq_from=50_000).add(x, list(range(len(x))))
    assert ivf.kind == "ivf" and ivf.nlist == 800 == round(4 * np.sqrt(40_000))
    assert ivf.nprobe == default_nprobe(800) == 28 and ivf._index.nprobe == 28
    pq = VectorIndex(32, flat_below=1000, ivfpq_from=5000).add(x[:6000], list(range(6000)))
    assert pq.kind == "ivfpq" and pq.pq_m == 4 and pq.nlist == 6000 // 39  # 8 dims a sub-vector; 39 points a list


def test_nlist_is_clamped_to_39_training_points_per_list():
    x, _ = _clustered(n=3900)
    index = VectorIndex(32, "ivf", nlist=1000).add(x, list(range(len(x))))
    assert index.nlist == 100


def test_blockwise_add_from_float16_memmap_matches_float32(tmp_path):
    x, q = _clustered(n=5000)
    mm = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float16, shape=x.shape)
    mm[:] = x
    mm.flush()
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    as_f32 = np.asarray(mm, dtype=np.float32)
    for kind in ("flat", "ivf", "ivfpq"):
        blocked = VectorIndex(32, kind, nlist=32, nprobe=8).add_blocks(mm, list(range(5000)), block_size=700)
        whole = VectorIndex(32, kind, nlist=32, nprobe=8).add(as_f32, list(range(5000)))
        sa, ha = blocked.search(q, 10)
        sb, hb = whole.search(q, 10)
        assert ha == hb and np.allclose(sa, sb, atol=1e-5), kind


class _SliceOnly:
    """A lazily-read matrix that only slices, and records the largest slice read."""

    def __init__(self, x):
        self.x, self.shape, self.largest = x, x.shape, 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, rows):
        assert isinstance(rows, slice)
        block = self.x[rows]
        self.largest = max(self.largest, len(block))
        return block


def test_add_blocks_reads_a_slice_only_matrix_a_block_at_a_time():
    x, q = _clustered(n=20_000)
    lazy = _SliceOnly(x.astype(np.float16))
    index = VectorIndex(32, "ivf", nlist=64, nprobe=16, train_size=4096).add_blocks(lazy, list(range(20_000)),
                                                                                  block_size=1000)
    assert lazy.largest <= 1000
    assert len(index) == 20_000 and _recall_at_10(index, x, q) >= 0.9


def test_sample_rows_draws_across_the_whole_matrix():
    x = np.arange(100_000, dtype=np.float32)[:, None].repeat(4, axis=1)
    sample = sample_rows(x, 5000, seed=0)
    assert sample.shape == (5000, 4) and sample.dtype == np.float32
    assert len(np.unique(sample[:, 0])) == 5000
    assert sample[:, 0].min() < 10_000 and sample[:, 0].max() > 90_000


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfpq", "hnsw"])
def test_save_and_load_round_trip_every_kind(tmp_path, kind):
    x, q = _clustered(n=3000)
    ids = [f"img{i}" for i in range(len(x))]
    index = VectorIndex(32, kind, nlist=32, nprobe=4, ef_search=48).add(x, ids)
    index.save(tmp_path / kind)
    again = VectorIndex.load(tmp_path / kind)
    assert again.settings() == index.settings()
    sa, ha = index.search(q, 10)
    sb, hb = again.search(q, 10)
    assert ha == hb and np.allclose(sa, sb)


def test_bad_kinds_and_pq_sizes_are_refused():
    with pytest.raises(InputError, match="index kind"):
        VectorIndex(16, "lsh")
    with pytest.raises(InputError, match="pq_m"):
        VectorIndex(16, "ivfpq", pq_m=3)
    with pytest.raises(InputError, match="pq_m"):
        pq_subquantizers(17)  # prime: no sub-vector size between 4 and 16 dims
    assert pq_subquantizers(512) == 64 and pq_subquantizers(768) == 96 and pq_subquantizers(17, 17) == 17
