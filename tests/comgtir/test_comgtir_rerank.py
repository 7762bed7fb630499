"""Hybrid re-ranking: dense re-ranking of the whole gallery reproduces the dense baseline exactly, re-ranking never
lifts R@1 above the candidates' R@k, the Shapes ITM head trains past chance, and BLIP's ITM path runs
(on a tiny random BLIP: no hub)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from core.io import load_embeddings
from core.metrics import recall_from_rankings
from retriever.dense.evaluate import evaluate_embeddings
from retriever.generative.rerank import dense_scorer, rerank


def test_dense_rerank_of_the_whole_gallery_is_the_dense_baseline(dense_run):
    image_emb, image_ids = load_embeddings(dense_run / "emb" / "image_test")
    text_emb, text_ids = load_embeddings(dense_run / "emb" / "text_test")
    rng = np.random.default_rng(0)
    candidates = [list(rng.permutation(image_ids)) for _ in text_ids]  # every image, in a random order
    reranked = rerank(candidates, dense_scorer(text_emb, image_emb, image_ids), depth=len(image_ids))
    ours = recall_from_rankings(reranked, [[t["imgid"]] for t in text_ids])
    assert ours == evaluate_embeddings(dense_run / "emb", "test")["text→image"]


def test_rerank_never_beats_the_candidates_recall_at_depth(dense_run):
    image_emb, image_ids = load_embeddings(dense_run / "emb" / "image_test")
    text_emb, text_ids = load_embeddings(dense_run / "emb" / "text_test")
    rng = np.random.default_rng(1)
    candidates = [list(rng.permutation(image_ids)[:10]) for _ in text_ids]
    positives = [[t["imgid"]] for t in text_ids]
    reranked = rerank(candidates, dense_scorer(text_emb, image_emb, image_ids), depth=10)
    assert recall_from_rankings(reranked, positives, [1])["R@1"] <= recall_from_rankings(candidates, positives, [10])["R@10"]
    assert all(sorted(map(str, a)) == sorted(map(str, b)) for a, b in zip(reranked, candidates))


def test_shapes_itm_beats_chance(shapes_world, dense_run, tmp_path):
    from retriever.generative import train_itm

    best = train_itm.main([
        "--dense_checkpoint", str(dense_run / "checkpoint-best"), "--emb_dir", str(dense_run / "emb"),
        "--data_json", str(shapes_world / "dataset_shapes.json"), "--image_root", str(shapes_world / "images"),
        "--output_dir", str(tmp_path / "itm"), "--width", "64", "--epochs", "4", "--queries_per_epoch", "640",
        "--batch_size", "32", "--lr", "1e-3", "--val_queries", "120", "--val_depth", "10"])
    import json

    history = json.loads((tmp_path / "itm" / "metrics.json").read_text())["history"]
    trained = [h for h in history if h["step"] > 0]  # the start (= dense score) is validated too; judge training
    assert trained
    # re-ranking the dense top-10 of 60 validation images: chance R@1 is the top-10's R@10 / 10
    chance = trained[0]["dense"]["R@10"] / 10
    assert max(h["itm"]["R@1"] for h in trained) > 2 * chance, trained


def test_blip_itm_path_on_a_tiny_random_blip():
    from PIL import Image
    from transformers import BlipConfig, BlipForImageTextRetrieval

    from retriever.generative.itm import BlipITM

    config = BlipConfig(
        text_config={"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "intermediate_size": 64, "encoder_hidden_size": 32},
        vision_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16)
    model = BlipForImageTextRetrieval(config)

    class Processor:  # the real BlipProcessor needs a downloaded tokenizer; the model path is what we test
        def __call__(self, images, text, return_tensors, padding):
            from transformers.tokenization_utils_base import BatchEncoding

            pixels = torch.stack([torch.from_numpy(np.asarray(i.resize((32, 32)), dtype=np.float32) / 255).permute(2, 0, 1)
                                  for i in images])
            ids = torch.tensor([[1 + (len(t) + j) % 60 for j in range(6)] for t in text])
            return BatchEncoding({"pixel_values": pixels, "input_ids": ids, "attention_mask": torch.ones_like(ids)})

    scorer = BlipITM(model=model, processor=Processor())
    images = [Image.new("RGB", (40, 40), (200, 10, 10)), Image.new("RGB", (40, 40), (10, 10, 200))]
    p = scorer.score(["a red square", "a blue square"], images)
    assert p.shape == (2,) and ((p >= 0) & (p <= 1)).all()


@pytest.mark.parametrize("name", ["shapes", "flickr30k", "coco"])
def test_configs_parse(name):
    from pathlib import Path

    from core.config import parse_config
    from retriever.generative.evaluate import EvaluateConfig
    from retriever.generative.rerank import RerankConfig
    from retriever.generative.train import RetrieverTrainConfig
    from rqvae.train import RQVAETrainConfig
    from tools.generate_pseudo_query import PseudoQueryConfig

    folder = Path("configs/comgtir") / name
    for cls, file in [(RQVAETrainConfig, "rqvae"), (PseudoQueryConfig, "pseudo_query"), (RetrieverTrainConfig, "retriever"),
                      (EvaluateConfig, "evaluate"), (RerankConfig, "rerank")]:
        parse_config(cls, ["--config", str(folder / f"{file}.yaml")])
