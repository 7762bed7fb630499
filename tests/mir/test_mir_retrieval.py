"""The MIR search space: encoded through the DataLoader into a float16 embedding cache that records what made it,
reused for the same (model, preprocessing, corpus) and rebuilt when one changes; blocked scoring ranks as a
brute-force float32 search over the cached vectors does; a corrupt image is an InputError naming the file."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from core.data import LoaderOptions
from core.errors import InputError
from core.io import embeddings_made_by, open_embeddings
from mir import retrieval
from mir.retrieval import DenseSearcher

SERIAL = LoaderOptions(num_workers=0)  # decoding in the test process: the worker path is the default elsewhere


@pytest.fixture(scope="module")
def corpus(shapes_world):
    ids = json.loads((shapes_world / "chatir" / "search_space_test.json").read_text())
    return [shapes_world / p for p in ids], ids


def _count_encodes(monkeypatch) -> list[int]:
    calls: list[int] = []
    encode = DenseSearcher.encode_pixels

    def counted(self, pixels):
        calls.append(len(pixels))
        return encode(self, pixels)

    monkeypatch.setattr(DenseSearcher, "encode_pixels", counted)
    return calls


def test_search_space_cache_is_float16_reused_and_rebuilt(corpus, dense_checkpoint, tmp_path, monkeypatch):
    paths, ids = corpus
    calls = _count_encodes(monkeypatch)
    first = DenseSearcher(dense_checkpoint, paths, ids, tmp_path / "cache", batch_size=32, loader=SERIAL)
    assert sum(calls) == len(ids)  # encoded once, 32 images a batch
    matrix, stored_ids = open_embeddings(first.cache_prefix)
    assert isinstance(matrix, np.memmap) and matrix.dtype == np.float16 and matrix.shape == (len(ids), 64)
    assert stored_ids == ids
    made_by = embeddings_made_by(first.cache_prefix)
    assert made_by == first.made_by() and {"model", "preprocessing", "corpus"} <= set(made_by)
    assert made_by["model"].startswith("dense:") and "Normalize" in made_by["preprocessing"]

    calls.clear()
    again = DenseSearcher(dense_checkpoint, paths, ids, tmp_path / "cache", batch_size=32, loader=SERIAL)
    assert calls == [] and again.cache_prefix == first.cache_prefix  # same model, preprocessing, corpus: reused
    assert np.array_equal(again.corpus.cpu().numpy(), first.corpus.cpu().numpy())

    smaller = DenseSearcher(dense_checkpoint, paths[:-1], ids[:-1], tmp_path / "cache", batch_size=32, loader=SERIAL)
    assert sum(calls) == len(ids) - 1  # another corpus: encoded anew, under its own key
    assert smaller.cache_prefix != first.cache_prefix
    assert embeddings_made_by(smaller.cache_prefix)["corpus"] != made_by["corpus"]

    # A cache under the right name that another model made (its manifest says so) is never trusted.
    manifest = first.cache_prefix.with_name(first.cache_prefix.name + ".shards.json")
    stale = json.loads(manifest.read_text())
    stale["made_by"]["model"] = "dense:another"
    manifest.write_text(json.dumps(stale))
    calls.clear()
    DenseSearcher(dense_checkpoint, paths, ids, tmp_path / "cache", batch_size=32, loader=SERIAL)
    assert sum(calls) == len(ids) and embeddings_made_by(first.cache_prefix) == made_by


def test_blocked_scoring_ranks_like_brute_force(corpus, dense_checkpoint, tmp_path, monkeypatch):
    paths, ids = corpus
    monkeypatch.setattr(retrieval, "SCORE_BLOCK", 7)  # many blocks, the last one short
    searcher = DenseSearcher(dense_checkpoint, paths, ids, tmp_path / "cache", loader=SERIAL)
    queries = searcher.encode_texts(["a red circle", "a blue square in the top left", "a green star", "something"])
    targets = [ids[3], ids[50], ids[len(ids) - 1], ids[0]]
    ranks, tops = searcher.rank(queries, targets, topk=5)
    corpus_f32 = np.asarray(open_embeddings(searcher.cache_prefix)[0], dtype=np.float32)
    sim = queries @ corpus_f32.T
    target_sim = sim[np.arange(len(targets)), [ids.index(t) for t in targets]]
    assert ranks == [int(r) for r in (sim > target_sim[:, None]).sum(1)]
    assert tops == [[ids[j] for j in np.argsort(-row, kind="stable")[:5]] for row in sim]


def test_corrupt_search_space_image_names_the_file(corpus, dense_checkpoint, tmp_path):
    paths, ids = corpus
    root = tmp_path / "space"
    root.mkdir()
    for p in paths[:6]:
        shutil.copy(p, root / p.name)
    bad = root / paths[4].name
    bad.write_bytes(bad.read_bytes()[:60])  # a truncated PNG
    loader = LoaderOptions(num_workers=1, persistent_workers=False)  # the error crosses from a worker process
    with pytest.raises(InputError, match=paths[4].name) as err:
        DenseSearcher(dense_checkpoint, [root / p.name for p in paths[:6]], ids[:6], tmp_path / "cache",
                      batch_size=2, loader=loader, listed_in="search_space.json")
    assert "search_space.json" in str(err.value)
    assert not any((tmp_path / "cache").iterdir())  # two batches were written before the bad one: none is left
