"""Iterative CIR's mechanisms through the round loop's own steps (mine → generate → training set) on the tiny
world's training split, each asserted so that it fails when the mechanism breaks: mining keeps only queries whose
target is not strictly first (a tie is a miss) and picks only wrong images (never the target or the reference); the
training set of round N holds the texts the foundation model wrote in rounds 1..N (the previous rounds' included),
each a positive for its hard negative, with the original target as that triplet's negative.

The retrieval scores and the foundation model are stand-ins (the mechanisms are what the loop does with them); the
triplets, images, corpus, filter and files are the real ones."""
from __future__ import annotations

import numpy as np
import pytest

from cir.iterative import retrieval, train_iterative
from cir.iterative.config import TrainIterativeConfig
from cir.iterative.data import Corpus, load_split
from core.distributed import DistInfo

K = 3  # hard negatives kept per missed query


def _scores(round_index: int):
    """score_queries' stand-in: query i%4 == 0 finds its target strictly first (not mined); i%4 == 1 ties its target
    with another image at the top (mined); otherwise the reference scores highest (mining must skip it)."""
    def score(backbone, corpus, triplets, gallery, batch_size, info):
        rng = np.random.default_rng(round_index)
        s = rng.random((len(triplets), len(gallery)))
        col = {name: j for j, name in enumerate(gallery)}
        for i, t in enumerate(triplets):
            if i % 4 == 0:
                s[i, col[t.reference]], s[i, col[t.target]] = -np.inf, 2.0
            elif i % 4 == 1:
                other = next(j for j in rng.permutation(len(gallery)) if gallery[j] not in (t.reference, t.target))
                s[i, col[t.target]] = s[i, other] = 2.0
            else:
                s[i, col[t.reference]] = 3.0
        return s
    return score


class StubFoundation:
    """Writes a new text per pair; every third is a refusal, which the filter must drop."""

    def generate(self, references, targets, originals, seed):
        return ["sorry, no change" if k % 3 == 2 else f"instead of that, {o}" for k, o in enumerate(originals)]


@pytest.fixture
def loop(shapes_world, tmp_path, monkeypatch):
    triplets, paths = load_split(shapes_world / "cirr", None, "train")
    cfg = TrainIterativeConfig(hard_negative_k=K, augment_per_query=2, generation_batch_size=8,
                               accumulate_augmented=True, eval_batch_size=16)
    run = train_iterative.RoundLoop.__new__(train_iterative.RoundLoop)  # no models to load: stand-ins below
    run.cfg, run.exp, run.info, run.device = cfg, tmp_path, DistInfo(), "cpu"
    run.train_triplets, run.train_gallery = triplets[:24], sorted(paths)
    run.corpus, run.data_hash = Corpus(paths), "tiny-world-train"
    monkeypatch.setattr(run, "model_of", lambda n: None)
    monkeypatch.setattr(run, "model_hash", lambda n: f"model-of-round-{n}")
    monkeypatch.setattr(train_iterative, "foundation_settings", lambda *args: {"stub": True})
    monkeypatch.setattr(train_iterative, "load_foundation_model", lambda *args, **kw: StubFoundation())
    return run


def _round(loop, n, monkeypatch):
    monkeypatch.setattr(retrieval, "score_queries", _scores(n))
    hn_path, hard_negatives = loop.mine(n, reuse=False)
    _, augmented = loop.generate(n, hn_path, hard_negatives, reuse=False)
    return hard_negatives, augmented


def test_mining_keeps_missed_queries_and_only_wrong_candidates(loop, monkeypatch):
    hard_negatives, _ = _round(loop, 1, monkeypatch)
    triplets = loop.train_triplets
    scores = _scores(1)(None, None, triplets, loop.train_gallery, 0, None)
    records = {r["pairid"]: r for r in hard_negatives["queries"]}
    assert sorted(records) == sorted(t.pairid for i, t in enumerate(triplets) if i % 4), "mined the wrong queries"
    col = {name: j for j, name in enumerate(loop.train_gallery)}
    for i, t in enumerate(triplets):
        if t.pairid not in records:
            continue
        picked = [h["image"] for h in records[t.pairid]["hard_negatives"]]
        assert t.target not in picked and t.reference not in picked
        order = [loop.train_gallery[j] for j in np.argsort(-scores[i], kind="stable")]
        assert picked == [name for name in order if name not in (t.target, t.reference)][:K]
        assert records[t.pairid]["target_rank"] >= 1 and scores[i, col[t.target]] == records[t.pairid]["target_score"]


def test_a_round_trains_on_the_texts_written_in_this_and_the_previous_rounds(loop, monkeypatch):
    _round(loop, 1, monkeypatch)
    hard_negatives, _ = _round(loop, 2, monkeypatch)
    triplets = loop.training_set(2, hard_negatives)
    written = {r: train_iterative.read_json(loop.exp / f"augmented_samples_iter_{r}.json")["data"]["samples"]
               for r in (1, 2)}
    kept = [(s["pairid"], s["reference"], s["caption"], s["hard_negative"], (s["original_target"],), f"round {r}")
            for r in (1, 2) for s in written[r] if s["kept"]]
    got = [(t.pairid, t.reference, t.caption, t.target, t.negatives, t.source) for t in triplets
           if t.source != "original"]
    assert got == kept
    assert {src for *_, src in got} == {"round 1", "round 2"}  # round 1's texts are trained on again in round 2
    assert all(s["caption"] != s["original_caption"] for r in written for s in written[r] if s["kept"])
    assert sum(not s["kept"] for r in written for s in written[r]) > 0  # the refusals were dropped, not trained on
    originals = [t for t in triplets if t.source == "original"]
    mined = {r["pairid"]: tuple(h["image"] for h in r["hard_negatives"]) for r in hard_negatives["queries"]}
    assert [t.pairid for t in originals] == [t.pairid for t in loop.train_triplets]
    assert all(t.negatives == mined.get(t.pairid, ()) for t in originals)
