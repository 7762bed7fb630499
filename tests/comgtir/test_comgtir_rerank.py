"""Hybrid re-ranking: dense re-ranking of the whole gallery reproduces the dense baseline exactly, re-ranking never
lifts R@1 above the candidates' R@k, the Shapes ITM head trains past chance, and BLIP's ITM path runs
(on a tiny random BLIP: no hub)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from core.io import load_embeddings
from core.metrics import HEADLINE_INTERVALS, recall_from_rankings
from retriever.dense.evaluate import evaluate_embeddings
from retriever.generative.rerank import dense_scorer, rerank


def test_dense_rerank_of_the_whole_gallery_is_the_dense_baseline(dense_run):
    image_emb, image_ids = load_embeddings(dense_run / "emb" / "image_test")
    text_emb, text_ids = load_embeddings(dense_run / "emb" / "text_test")
    rng = np.random.default_rng(0)
    candidates = [list(rng.permutation(image_ids)) for _ in text_ids]  # every image, in a random order
    reranked = rerank(candidates, dense_scorer(text_emb, image_emb, image_ids), depth=len(image_ids))
    ours = recall_from_rankings(reranked, [[t["imgid"]] for t in text_ids], intervals=HEADLINE_INTERVALS)
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


@pytest.fixture(scope="module")
def itm_run(shapes_world, dense_run, tmp_path_factory):
    """A Shapes ITM head trained four short epochs (its run folder)."""
    from retriever.generative import train_itm

    out = tmp_path_factory.mktemp("itm") / "itm"
    train_itm.main([
        "--dense_checkpoint", str(dense_run / "checkpoint-best"), "--emb_dir", str(dense_run / "emb"),
        "--data_json", str(shapes_world / "dataset_shapes.json"), "--image_root", str(shapes_world / "images"),
        "--output_dir", str(out), "--width", "64", "--epochs", "4", "--queries_per_epoch", "640",
        "--batch_size", "32", "--lr", "1e-3", "--val_queries", "120", "--val_depth", "10"])
    return out


def test_shapes_itm_beats_chance(itm_run):
    import json

    history = json.loads((itm_run / "metrics.json").read_text())["history"]
    trained = [h for h in history if h["step"] > 0]  # the start (= dense score) is validated too; judge training
    assert trained
    # re-ranking the dense top-10 of 60 validation images: chance R@1 is the top-10's R@10 / 10
    chance = trained[0]["dense"]["R@10"] / 10
    assert max(h["itm"]["R@1"] for h in trained) > 2 * chance, trained


def random_candidates(dense_run, queries: int, depth: int, seed: int = 0) -> tuple[list[dict], list[list]]:
    """The first test captions, each with `depth` random test images as its candidates."""
    import json

    text_ids = json.loads((dense_run / "emb" / "text_test_ids.json").read_text())[:queries]
    image_ids = json.loads((dense_run / "emb" / "image_test_ids.json").read_text())
    rng = np.random.default_rng(seed)
    return text_ids, [[int(i) for i in rng.permutation(image_ids)[:depth]] for _ in text_ids]


def test_streamed_itm_scores_are_the_in_memory_gallery_scores(itm_run, shapes_world, dense_run):
    """Re-ranking reads the gallery a loader batch at a time; the scores are those of the whole gallery in memory."""
    from core.data import load_images_small, load_karpathy
    from core.encoders import load_dual_encoder
    from retriever.generative.itm import DenseTokenFeatures, load_itm
    from retriever.generative.rerank import RerankConfig, itm_scores
    from retriever.generative.train_itm import score_pairs

    text_ids, ranked = random_candidates(dense_run, queries=30, depth=8)
    texts = [t["raw"] for t in text_ids]
    cfg = RerankConfig(method="itm", depth=8, itm_checkpoint=str(itm_run / "checkpoint-best"),
                       dense_checkpoint=str(dense_run / "checkpoint-best"),
                       data_json=str(shapes_world / "dataset_shapes.json"), image_root=str(shapes_world / "images"),
                       batch_size=16, num_workers=0)
    streamed = np.stack(itm_scores(cfg, texts, ranked))
    model = load_itm(itm_run / "checkpoint-best")
    feats = DenseTokenFeatures(load_dual_encoder(dense_run / "checkpoint-best"), pool=2)
    path = {r.imgid: r.path for r in load_karpathy(cfg.data_json, cfg.image_root, "test")}
    pairs = [(q, i) for q, items in enumerate(ranked) for i in items]
    tokens = feats.image(load_images_small([path[i] for _, i in pairs], feats.encoder.preprocess), "cpu")
    with torch.no_grad():
        whole = score_pairs(model, feats, [texts[q] for q, _ in pairs], tokens, torch.device("cpu"))
    np.testing.assert_allclose(streamed, whole.numpy().reshape(len(ranked), -1), rtol=1e-4, atol=1e-4)


def test_itm_token_cache_is_kept_while_its_maker_is_the_same(itm_run, shapes_world, dense_run, tmp_path):
    import shutil

    from core.data import load_karpathy
    from core.distributed import DistInfo
    from core.encoders import load_dual_encoder
    from core.io import embeddings_made_by, open_embeddings
    from retriever.generative.itm import DenseTokenFeatures
    from retriever.generative.train_itm import ITMTrainConfig, image_token_cache, token_shape

    shutil.copytree(itm_run / "cache", tmp_path / "cache")
    prefix = tmp_path / "cache" / "image_tokens_val"
    made_by, ids = embeddings_made_by(prefix), open_embeddings(prefix)[1]
    assert made_by["kind"] == "itm image tokens" and made_by["pool"] == 2
    records = load_karpathy(shapes_world / "dataset_shapes.json", shapes_world / "images", "val")
    path = {r.imgid: r.path for r in records}
    paths = [path[i] for i in ids]
    cfg = ITMTrainConfig(data_json=str(shapes_world / "dataset_shapes.json"), num_workers=0)
    encoder = load_dual_encoder(dense_run / "checkpoint-best")
    npy = prefix.with_name(prefix.name + ".npy")
    stamp = npy.stat().st_mtime_ns
    kept = image_token_cache(prefix, paths, ids, DenseTokenFeatures(encoder, 2), made_by, cfg, DistInfo())
    assert npy.stat().st_mtime_ns == stamp and kept.dtype == np.float16
    # another pooling makes other tokens: the cache is made again, and says so
    feats = DenseTokenFeatures(encoder, 1)
    shape = token_shape(feats, torch.device("cpu"))
    other = {**made_by, "pool": 1, "shape": list(shape)}
    remade = image_token_cache(prefix, paths, ids, feats, other, cfg, DistInfo())
    assert remade.shape == (len(ids), shape[0] * shape[1]) and embeddings_made_by(prefix) == other
    assert shape[0] > made_by["shape"][0]


def test_blip_itm_rerank_reads_the_gallery_through_the_loader(tiny_blip, shapes_world, dense_run, tmp_path):
    from core.io import atomic_write_jsonl, read_jsonl
    from retriever.generative import rerank

    text_ids, ranked = random_candidates(dense_run, queries=6, depth=6)
    atomic_write_jsonl(tmp_path / "candidates.jsonl", [{"sentid": t["sentid"], "imgid": t["imgid"], "ranked": r}
                                                       for t, r in zip(text_ids, ranked)])
    rerank.main(["--method", "itm", "--candidates", str(tmp_path / "candidates.jsonl"),
                 "--emb_dir", str(dense_run / "emb"), "--blip_model", str(tiny_blip / "itm"),
                 "--data_json", str(shapes_world / "dataset_shapes.json"), "--image_root", str(shapes_world / "images"),
                 "--depth", "4", "--batch_size", "8", "--num_workers", "0", "--output_dir", str(tmp_path / "out")])
    for before, after in zip(ranked, read_jsonl(tmp_path / "out" / "candidates.jsonl")):
        assert sorted(after["ranked"][:4]) == sorted(before[:4]) and after["ranked"][4:] == before[4:]


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


def image_sensitive_blip(tiny_blip, folder):
    """The tiny BLIP ITM with its patch embedding and cross-attention redrawn larger: at its initial scale the
    image barely moves the score (≈1e-6), so a test could not tell one image's tokens from another's."""
    from transformers import BlipForImageTextRetrieval, BlipProcessor

    model = BlipForImageTextRetrieval.from_pretrained(tiny_blip / "itm")
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "patch_embedding.weight" in name or ("crossattention" in name and name.endswith("weight")
                                                    and "LayerNorm" not in name):
                p.normal_(0, 0.5)
    model.save_pretrained(folder)
    BlipProcessor.from_pretrained(tiny_blip / "itm").save_pretrained(folder)
    return folder


def test_blip_itm_runs_the_vision_tower_once_per_image_and_scores_as_the_model(tiny_blip, shapes_world, monkeypatch,
                                                                               tmp_path):
    from core.data import load_karpathy, open_image
    from retriever.generative import rerank
    from retriever.generative.itm import BlipITM

    blip = image_sensitive_blip(tiny_blip, tmp_path / "itm")
    cfg = rerank.RerankConfig(method="itm", blip_model=str(blip), data_json=str(shapes_world / "dataset_shapes.json"),
                              image_root=str(shapes_world / "images"), batch_size=3, num_workers=0)
    records = {r.imgid: r for r in load_karpathy(cfg.data_json, cfg.image_root, cfg.split)}
    imgs = list(records)[:4]
    texts = ["a red circle", "a blue square top left", "star"]
    pairs = [(0, imgs[0]), (0, imgs[1]), (1, imgs[1]), (1, imgs[2]), (2, imgs[0]), (2, imgs[3]), (1, imgs[0])]
    seen, embeds = [], BlipITM.image_embeds
    monkeypatch.setattr(BlipITM, "image_embeds", lambda self, images: seen.append(len(images)) or embeds(self, images))
    got = rerank.blip_scores(cfg, texts, pairs, records, torch.device("cpu"))
    assert sum(seen) == len(set(imgs))  # each candidate image once, not once per pair
    scorer = BlipITM(str(blip))
    expected = [float(scorer.score([texts[q]], [open_image(records[i].path)])) for q, i in pairs]
    assert got.tolist() == pytest.approx(expected, abs=1e-5)
    assert abs(expected[0] - expected[1]) > 1e-3  # the same query, two images: the image counts
