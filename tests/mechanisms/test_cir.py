"""Composed retrieval's mechanisms on the tiny world's CIRR-layout split, each asserted so that it fails when the
mechanism is switched off: the reference image is never ranked (R@K over the split), subset recall ranks only the
query's `img_set` members, and PTHA's reverse branch is a fixed anchor for L_p2p (no gradient reaches it), in both
variants."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cir.data import load_cirr
from cir.features import TokenBank
from cir.metrics import cirr_metrics, rank_gallery, rank_subsets
from cir.retriever import SHAPES_RETRIEVER, ComposedRetriever
from cir.train import TrainConfig, step_loss
from core.encoders import build_dual_encoder
from core.modtext import ImageTokens, build_word_tokenizer
from tests.conftest import TINY_ENCODER


@pytest.fixture(scope="module")
def test_split(shapes_world):
    split = load_cirr(shapes_world / "cirr", "test")
    return split, split.gallery


def _scores(split, gallery, seed: int, rule) -> np.ndarray:
    """Random scores in [0, 1) with `rule(triplet, column, row)` overriding some of them."""
    scores = np.random.default_rng(seed).random((len(split.triplets), len(gallery)))
    col = {name: j for j, name in enumerate(gallery)}
    for q, t in enumerate(split.triplets):
        rule(t, col, scores[q])
    return scores


def test_the_reference_is_never_ranked(test_split):
    split, gallery = test_split

    def reference_first_target_second(t, col, row):
        row[col[t.reference]], row[col[t.target]] = 3.0, 2.0

    scores = _scores(split, gallery, 0, reference_first_target_second)
    for t, ranked in zip(split.triplets, rank_gallery(scores, gallery, split.triplets)):
        assert t.reference not in ranked and len(ranked) == len(gallery) - 1
    metrics = cirr_metrics(scores, gallery, split.triplets)
    assert metrics["R@1"] == 100.0 and metrics["Rs@1"] == 100.0  # the target comes first once the reference is gone


def test_subset_recall_ranks_only_the_subset_members(test_split):
    split, gallery = test_split

    def outsiders_first_then_target(t, col, row):
        for name in gallery:
            if name not in t.members:
                row[col[name]] += 5.0  # every image outside the subset outscores every member
        row[col[t.target]] = 4.0  # the target is the best member, below every outsider

    scores = _scores(split, gallery, 1, outsiders_first_then_target)
    for t, ranked in zip(split.triplets, rank_subsets(scores, gallery, split.triplets)):
        assert sorted(ranked) == sorted(set(t.members) - {t.reference}) and ranked[0] == t.target
    metrics = cirr_metrics(scores, gallery, split.triplets)
    assert metrics["Rs@1"] == 100.0 and metrics["R@1"] == 0.0


def _tiny_retriever(texts, variant: str = "official") -> ComposedRetriever:
    torch.manual_seed(0)
    encoder = build_dual_encoder(TINY_ENCODER)  # untrained: the gradient paths do not depend on training
    width = int(encoder.clip.visual.ln_post.normalized_shape[0])
    spec = {**SHAPES_RETRIEVER, "qformer": {**SHAPES_RETRIEVER["qformer"], "hidden_size": 32, "num_hidden_layers": 1,
                                            "num_attention_heads": 2, "intermediate_size": 64},
            "num_query_tokens": 4, "embed_dim": 16, "kind": "shapes", "ptha_variant": variant}
    return ComposedRetriever(ImageTokens("dense", encoder, encoder.preprocess, width, {}), build_word_tokenizer(texts),
                             spec)


def _ptha_step(shapes_world, variant: str):
    """(model, batch, token bank, reverse texts) for one PTHA step on random frozen tokens."""
    train = load_cirr(shapes_world / "cirr", "train")
    batch = train.triplets[:8]
    reverse = {t.pairid: f"undo this: {t.caption}" for t in batch}
    model = _tiny_retriever([t.caption for t in train.triplets] + ["undo this:"], variant)
    names = train.gallery
    tokens = np.random.default_rng(0).standard_normal((len(names), 5, model.image_encoder.hidden_size))
    return model, batch, TokenBank(names, [tokens.astype(np.float16)]), reverse


def _spy(model, name: str, pick, monkeypatch) -> list:
    """Wraps model.<name> so that the tensors `pick` selects from its output keep their gradients; returns them."""
    seen: list = []
    real = getattr(model, name)

    def spy(*args):
        out = real(*args)
        for tensor in pick(out):
            tensor.retain_grad()
        seen.append(pick(out))
        return out

    monkeypatch.setattr(model, name, spy)
    return seen


def test_no_gradient_reaches_the_reverse_branch_through_the_prototype_loss(shapes_world, monkeypatch):
    """The official variant (the default): the reverse branch (target + reverse text, hop one) feeds L_p2p only, as a
    detached anchor, so nothing flows back into it."""
    model, batch, bank, reverse = _ptha_step(shapes_world, "official")
    forward = _spy(model, "encode_queries_with_prototype", lambda out: out, monkeypatch)
    backward = _spy(model, "encode_reverse_prototype", lambda out: (out,), monkeypatch)
    loss, parts = step_loss(model, batch, bank, reverse, TrainConfig(objective="ptha", alpha=0.5))
    loss.backward()
    ((fwd_query, fwd_proto),), ((rev_proto,),) = forward, backward
    assert parts["p2p"] > 0 and fwd_proto.grad is not None and fwd_proto.grad.abs().sum() > 0  # L_p2p is live
    assert fwd_query.grad is not None and fwd_query.grad.abs().sum() > 0
    assert rev_proto.requires_grad and rev_proto.grad is None, "L_p2p sent a gradient into the reverse branch"


def test_no_gradient_reaches_the_project_variants_reverse_prototype(shapes_world, monkeypatch):
    """The project variant: the reverse branch trains through its own L_t2t, but its prototype is a fixed anchor."""
    model, batch, bank, reverse = _ptha_step(shapes_world, "project")
    encoded = _spy(model, "encode_queries_with_prototype", lambda out: out, monkeypatch)
    loss, parts = step_loss(model, batch, bank, reverse, TrainConfig(objective="ptha", ptha_variant="project"))
    loss.backward()
    (fwd_query, fwd_proto), (rev_query, rev_proto) = encoded
    assert parts["p2p"] > 0 and fwd_proto.grad is not None and fwd_proto.grad.abs().sum() > 0  # L_p2p is live
    assert rev_query.grad is not None and rev_query.grad.abs().sum() > 0  # the reverse branch trains through L_t2t
    assert rev_proto.grad is None, "L_p2p sent a gradient into the reverse branch's prototype"
