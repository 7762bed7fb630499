from math import comb

import numpy as np
import pytest

from core.metrics import i2t_recall, rank_counting_ties, recall_from_rankings, t2i_recall


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


def test_a_constant_score_model_scores_chance_not_a_hit():
    assert t2i_recall(np.zeros((30, 20)), np.arange(30) % 20) == pytest.approx({"R@1": 5.0, "R@5": 25.0, "R@10": 50.0})
    # 4 images, 3 captions each: P(one of the 3 own captions among the first k of 12 in a random order)
    chance = {f"R@{k}": 100 * (1 - comb(9, k) / comb(12, k)) for k in (1, 5, 10)}
    assert i2t_recall(np.zeros((4, 12)), np.arange(12) // 3) == pytest.approx(chance)


def test_a_tie_is_shared_with_the_tied_images_by_a_random_order():
    # the target ties with two others and one image is above: ranks 1-3 are equally likely
    sim = np.array([[0.9, 0.5, 0.5, 0.5, 0.1]])
    assert t2i_recall(sim, [1], ks=(1, 2, 3, 4)) == pytest.approx({"R@1": 0.0, "R@2": 100 / 3, "R@3": 200 / 3,
                                                                   "R@4": 100.0})
    mean_over_orders = np.mean([np.argsort(-sim[0] + 1e-9 * rng_order)[:2].tolist().count(1)
                                for rng_order in (np.random.default_rng(s).permutation(5) for s in range(3000))])
    assert mean_over_orders == pytest.approx(1 / 3, abs=0.03)


def test_an_integer_rank_counts_every_tie_above_the_target():
    assert rank_counting_ties(np.array([0.2, 0.7, 0.7, 0.1]), np.float64(0.7)) == 1
    assert rank_counting_ties(np.zeros((2, 6)), np.zeros(2)).tolist() == [5, 5]


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_more_queries():
    from core.metrics import bootstrap_interval

    rng = np.random.default_rng(1)
    small, large = rng.random(50) < 0.3, rng.random(5000) < 0.3
    lo, hi = bootstrap_interval(small)
    assert lo < small.mean() < hi
    lo2, hi2 = bootstrap_interval(large)
    assert lo2 < large.mean() < hi2 and (hi2 - lo2) < (hi - lo) / 5  # width ~ 1/sqrt(N): 10x the queries, ~1/10
    # the normal approximation of a proportion's 95 % interval, for comparison
    half = 1.96 * np.sqrt(0.3 * 0.7 / 5000)
    assert abs((hi2 - lo2) / 2 - half) < 0.2 * half
    assert bootstrap_interval(np.ones(10)) == (1.0, 1.0)
    cols_lo, cols_hi = bootstrap_interval(np.stack([small, ~small], axis=1).astype(float))
    assert cols_lo.shape == (2,) and (cols_lo < cols_hi).all()


def test_recall_intervals_bootstrap_the_queries_hits_and_stay_out_of_the_mean():
    from core.metrics import bootstrap_interval, mean_recall

    ranked = [["a", "b"], ["b", "a"], ["c", "a"], ["a", "c"]] * 25
    positives = [["a"]] * 100  # hits at 1: 50 of 100; at 2: all
    out = recall_from_rankings(ranked, positives, ks=(1, 2), intervals=(1,))
    assert out["R@1"] == 50.0 and "R@2 95% CI" not in out
    low, high = out["R@1 95% CI"]
    assert low < 50.0 < high and 35.0 < low and high < 65.0  # about ±10 points for 100 coin flips
    assert [low, high] == list(bootstrap_interval(100.0 * np.array([1, 0, 0, 1] * 25)))
    assert mean_recall(out) == 75.0
