import numpy as np
import pytest

from core.metrics import i2t_recall, recall_from_rankings, t2i_recall


def test_recall_from_rankings_hand_computed():
    ranked = [["a", "b", "c"], ["b", "a", "c"], ["c", "b", "a"]]
    positives = [["a"], ["a"], ["x"]]
    assert recall_from_rankings(ranked, positives, ks=(1, 2, 3)) == {
        "R@1": pytest.approx(100 / 3), "R@2": pytest.approx(200 / 3), "R@3": pytest.approx(200 / 3)}


def test_t2i_matches_brute_force():
    rng = np.random.default_rng(0)
    sim = rng.normal(size=(50, 10))
    owner = rng.integers(0, 10, size=50)
    expected = {}
    for k in (1, 5, 10):
        hits = [owner[i] in np.argsort(-sim[i])[:k] for i in range(50)]
        expected[f"R@{k}"] = 100 * np.mean(hits)
    assert t2i_recall(sim, owner) == pytest.approx(expected)


def test_i2t_hit_if_any_caption_in_top_k():
    # image 0 owns captions 0 and 1; its best caption (1) ranks second overall.
    sim = np.array([[0.1, 0.8, 0.9, 0.0],
                    [0.0, 0.1, 0.2, 0.9]])
    owner = [0, 0, 1, 1]
    assert i2t_recall(sim, owner, ks=(1, 2)) == {"R@1": 50.0, "R@2": 100.0}
