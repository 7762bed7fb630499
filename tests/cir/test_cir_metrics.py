"""CIRR / FashionIQ metrics, the test-server files, text overlap and the contrastive loss, on hand-computed cases."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cir.data import CIRTriplet, join_fashioniq_captions
from cir.losses import prototype_alignment, ptha_loss, query_target_contrastive
from cir.metrics import (cirr_avg_interval, cirr_metrics, cirr_submission, fashioniq_recall, fashioniq_summary, generation_scores,
                         rank_subsets, rouge_1, rouge_l)

GALLERY = ["a", "b", "c", "d", "e", "f", "g"]
MEMBERS = ("a", "b", "c", "d", "e", "f")


def _cirr_case():
    triplets = [CIRTriplet(10, "a", "x", "c", MEMBERS), CIRTriplet(11, "d", "y", "e", MEMBERS)]
    scores = np.array([
        # a    b    c    d    e     f    g
        [0.9, 0.8, 0.7, 0.1, 0.0, -0.1, 0.75],  # ref a excluded: b, g, c -> target c at rank 3; subset: b, c -> 2
        [0.2, 0.1, 0.0, 1.0, 0.95, 0.3, 0.5],  # ref d (highest) excluded: e first
    ])
    return scores, triplets


def test_cirr_metrics_by_hand():
    scores, triplets = _cirr_case()
    m = cirr_metrics(scores, GALLERY, triplets)
    assert m == pytest.approx({"R@1": 50.0, "R@5": 100.0, "R@10": 100.0, "R@50": 100.0,
                               "Rs@1": 50.0, "Rs@2": 100.0, "Rs@3": 100.0, "Avg": 75.0})


def test_cirr_avg_interval_by_hand():
    scores, triplets = _cirr_case()
    # query 10: R@5 hit, Rs@1 miss -> 0.5; query 11: both hits -> 1.0; resamples of two values span [0.5, 1]
    low, high = cirr_avg_interval(scores, GALLERY, triplets)
    assert 50.0 <= low < 75.0 < high <= 100.0
    same = cirr_avg_interval(np.repeat(scores[1:], 20, axis=0), GALLERY, [triplets[1]] * 20)
    assert same == [100.0, 100.0]  # every query hits both: no spread


def test_cirr_reference_is_excluded_from_gallery_and_subset():
    scores, triplets = _cirr_case()
    ranked = rank_subsets(scores, GALLERY, triplets)
    assert ranked[1] == ["e", "f", "a", "b", "c"]  # 5 candidates, the reference d is gone
    assert all(len(r) == 5 for r in ranked)


def test_cirr_submission_files():
    scores, triplets = _cirr_case()
    recall, subset = cirr_submission(scores, GALLERY, triplets)
    assert recall["version"] == "rc2" and recall["metric"] == "recall"
    assert subset["version"] == "rc2" and subset["metric"] == "recall_subset"
    assert recall["10"] == ["b", "g", "c", "d", "e", "f"]  # top-50 of a 7-image gallery minus the reference
    assert subset["10"] == ["b", "c", "d"] and subset["11"] == ["e", "f", "a"]


def test_fashioniq_keeps_reference_and_averages():
    gallery = [f"i{k}" for k in range(12)]
    # reference i0 scores highest; the target i10 is 11th with the reference counted (10th without it)
    s = np.linspace(1.0, 0.0, 12)[None, :]
    t = [CIRTriplet(0, "i0", "longer and darker", "i10")]
    assert fashioniq_recall(s, gallery, t) == {"R@10": 0.0, "R@50": 100.0}
    summary = fashioniq_summary({"dress": {"R@10": 20.0, "R@50": 40.0}, "shirt": {"R@10": 10.0, "R@50": 30.0},
                                 "toptee": {"R@10": 30.0, "R@50": 50.0}})
    assert summary["mean/R@10"] == pytest.approx(20.0) and summary["mean/R@50"] == pytest.approx(40.0)
    assert summary["Avg"] == pytest.approx(30.0) and summary["dress/R@50"] == 40.0


def test_fashioniq_caption_join():
    assert join_fashioniq_captions(["is shorter.", "has long sleeves "]) == "Is shorter and has long sleeves"


def test_rouge_by_hand():
    assert rouge_l("make the circle blue", "make the big circle red") == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert rouge_1("make the circle blue", "make the big circle red") == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert rouge_l("a b c", "c b a") == pytest.approx(1 / 3)  # LCS 1: order matters, unlike ROUGE-1
    assert rouge_1("a b c", "c b a") == pytest.approx(1.0)
    g = generation_scores(["remove the star", "x"], ["remove the star", "y"])
    assert g["exact"] == 50.0 and g["ROUGE-L"] == pytest.approx(50.0)


def test_contrastive_loss_extra_targets_by_hand():
    q = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    t = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), dim=-1)  # third = appended negative
    loss = query_target_contrastive(q, t, temperature=1.0)
    c = 1 / math.sqrt(2)
    expect = -math.log(math.e / (math.e + 1 + math.exp(c)))  # both rows: own 1, other 0, extra 1/sqrt(2)
    assert loss.item() == pytest.approx(expect, rel=1e-5)


def test_duplicate_targets_are_not_negatives():
    q = F.normalize(torch.randn(3, 4), dim=-1)
    t = F.normalize(torch.randn(4, 4), dim=-1)
    # queries 0 and 1 share their target image "x" (and target 3 is "x" again): only other images are negatives
    masked = query_target_contrastive(q, t, 0.1, target_ids=["x", "x", "y", "x"])
    logits = q @ t.T / 0.1
    manual = 0.0
    for i, allowed in enumerate([[0, 2], [1, 2], [0, 1, 2, 3]]):
        manual += -(logits[i, i] - torch.logsumexp(logits[i, allowed], 0))
    assert masked.item() == pytest.approx(manual.item() / 3, rel=1e-5)
    assert query_target_contrastive(q[:2], t[:2], 0.1, target_ids=["x", "x"]).item() == pytest.approx(0.0, abs=1e-6)


def test_ptha_total_and_detached_reverse():
    fwd = F.normalize(torch.randn(4, 8), dim=-1).requires_grad_(True)
    rev = F.normalize(torch.randn(4, 8), dim=-1).requires_grad_(True)
    prototype_alignment(fwd, rev, 0.1).backward()
    assert fwd.grad is not None and rev.grad is None  # the reverse branch is a fixed anchor
    total = ptha_loss(torch.tensor(1.0), torch.tensor(2.0), torch.tensor(4.0))
    assert total.item() == pytest.approx(1 + 2 + 0.5 * 4)
