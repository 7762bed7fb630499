"""Hard-negative mining: real retrieval over the training images only, with exactly the encoder evaluation uses;
the reference and the ground truth are never hard negatives."""
from __future__ import annotations

import numpy as np
import torch

from cir.iterative.backbones import load_backbone
from cir.iterative.data import Corpus, ImagePixels, load_split
from cir.iterative.retrieval import mine_hard_negatives, score_queries
from cir.metrics import rank_gallery


def test_mining_ranks_like_evaluation(shapes_world, round0_retriever):
    model = load_backbone("composed_retriever", str(round0_retriever))
    triplets, paths = load_split(shapes_world / "cirr", None, "train")
    _, val_paths = load_split(shapes_world / "cirr", None, "val")
    corpus = Corpus({**paths, **val_paths})  # val images are in the corpus but must never be mined
    corpus.prepare(model)
    gallery = sorted(paths)
    records, stats = mine_hard_negatives(model, corpus, triplets, gallery, k=3, batch_size=64)

    # the token path the loop uses is the retriever's own pixel path (the embedding inference uses)
    pixels = torch.stack([model.retriever.preprocess(corpus.image(t.reference)) for t in triplets[:4]])
    with torch.no_grad():
        direct = model.retriever.encode_queries(pixels, [t.caption for t in triplets[:4]])
        cached = model.encode_queries(corpus.batch([t.reference for t in triplets[:4]]),
                                      [t.caption for t in triplets[:4]])
    # the tokens are cached in float16 (DESIGN §6): equal to the pixel path up to that rounding
    assert torch.allclose(direct, cached, atol=2e-3)
    model.cache_tokens = False  # the frozen encoder run live on each batch of pixels instead: the pixel path itself
    corpus.prepare(model)
    assert isinstance(corpus.prepared, ImagePixels)
    with torch.no_grad():
        live = model.encode_queries(corpus.batch([t.reference for t in triplets[:4]]), [t.caption for t in triplets[:4]])
    assert torch.allclose(direct, live, atol=1e-5)
    model.cache_tokens = True
    corpus.prepare(model)

    scores = score_queries(model, corpus, triplets, gallery, batch_size=64)
    # scored as the CIR stage trains and evaluates the retriever: each target's best query token (official PTHA),
    # computed here from the pixel path, brute force
    assert model.retriever.variant == "official"
    with torch.no_grad():
        gallery_px = torch.stack([model.retriever.preprocess(corpus.image(n)) for n in gallery])
        tokens = model.retriever.encode_target_tokens_from_tokens(model.retriever.image_tokens(gallery_px))
        assert tokens.shape[1] > 1
        brute = torch.stack([torch.stack([(tokens[j] @ q).max() for j in range(len(gallery))]) for q in direct])
    column = {name: j for j, name in enumerate(gallery)}
    for i, t in enumerate(triplets[:4]):
        brute[i, column[t.reference]] = float("-inf")
    assert np.allclose(scores[:4], brute.numpy(), atol=5e-3)
    ranked = rank_gallery(scores, gallery, triplets)  # the evaluation's ranking (cir.metrics)
    missed = [t for t, r in zip(triplets, ranked) if r[0] != t.target]
    assert stats["missed_top1"] == len(records) == len(missed)
    assert 0 < len(records) <= len(triplets)  # a briefly trained round-0 model may miss every top-1
    by_id = {t.pairid: (t, r) for t, r in zip(triplets, ranked)}
    for rec in records:
        t, r = by_id[rec["pairid"]]
        negatives = [h["image"] for h in rec["hard_negatives"]]
        assert len(negatives) == 3
        assert t.reference not in negatives and t.target not in negatives
        assert all(n in paths for n in negatives)  # training images only
        assert negatives == [n for n in r if n != t.target][:3]  # the evaluation's top wrong candidates
        assert rec["target_rank"] == r.index(t.target)
    assert np.isclose(stats["train_R@1"], 100 * (1 - len(records) / len(triplets)))
