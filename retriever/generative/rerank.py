"""Hybrid retrieval: re-rank the generated top-k (`test_tir_clip_rerank` / `test_tir_blip_rerank`).

Reads `candidates.jsonl` (retriever.generative.evaluate) and re-scores each query's first `depth` candidates:
- `dense`: cosine of the query's dense text embedding (encoded with the dense checkpoint) with the gallery's
  stored dense image embeddings (`emb_dir/image_{split}`: image-only, never a test caption);
- `itm`: a cross-encoder on (query, image) pairs — the Shapes ITM head (`itm_checkpoint`) or BLIP ITM
  (`blip_model`, real data), reading the gallery images themselves through a DataLoader, a batch at a time.
Candidates past `depth` keep their generated order. Writes `output_dir/metrics.json` and the re-ranked
candidates, and adds a row to results.json if asked.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Hashable, Sequence

import numpy as np
import torch

from core.config import parse_config
from core.data import ImageDataset, LoaderOptions, image_batches, load_karpathy, make_loader, verify_images
from core.device import get_device
from core.encoders import load_dual_encoder
from core.errors import InputError
from core.io import atomic_write_jsonl, load_embeddings, read_json, read_jsonl
from core.logging import Tracker, format_table, progress, write_metrics
from core.metrics import HEADLINE_INTERVALS, recall_from_rankings
from core.results import update_summary

METHODS = ("dense", "itm")


@dataclass
class RerankConfig(LoaderOptions):
    method: str = "dense"  # dense (CLIP-style) or itm (cross-encoder)
    candidates: str = "runs/shapes/comgtir/eval/dual-id/candidates.jsonl"
    emb_dir: str = "runs/shapes/dense/emb"
    split: str = "test"
    depth: int = 20  # candidates re-scored per query
    dense_checkpoint: str = "runs/shapes/dense/checkpoint-best"
    itm_checkpoint: str = "runs/shapes/comgtir/itm/checkpoint-best"  # Shapes ITM head
    blip_model: str = ""  # a BLIP ITM model name/folder (real data); overrides itm_checkpoint
    data_json: str = "runs/shapes/data/dataset_shapes.json"  # gallery images for itm
    image_root: str = "runs/shapes/data/images"
    batch_size: int = 256
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    output_dir: str = "runs/shapes/comgtir/eval/dual-id+dense-rerank"
    summary: str = ""
    summary_row: str = "comgtir/dual-id+dense-rerank"
    wandb_project: str = "genretrieval"


def rerank(ranked: Sequence[Sequence[Hashable]], score: Callable[[int, list], np.ndarray], depth: int) -> list[list]:
    """Re-order each list's first `depth` items by `score(query_index, items)` (higher first, stable)."""
    out = []
    for q, items in enumerate(ranked):
        head, tail = list(items[:depth]), list(items[depth:])
        if head:
            order = np.argsort(-np.asarray(score(q, head), dtype=np.float64), kind="stable")
            head = [head[i] for i in order]
        out.append(head + tail)
    return out


def dense_scorer(query_emb: np.ndarray, gallery_emb: np.ndarray, gallery_ids: Sequence[Hashable]):
    row = {i: r for r, i in enumerate(gallery_ids)}
    return lambda q, items: gallery_emb[[row[i] for i in items]] @ query_emb[q]


def encode_queries(checkpoint: str, texts: list[str], batch_size: int) -> np.ndarray:
    from retriever.dense.common import encode_texts  # the dense stage's own encoding (same tokenisation/batching)

    device = get_device()
    model = load_dual_encoder(checkpoint).to(device)
    return encode_texts(model, texts, device, batch_size, desc="encoding queries")


def itm_scores(cfg: RerankConfig, texts: list[str], ranked: list[list]) -> list[np.ndarray]:
    """Cross-encoder scores of every (query, candidate) pair within depth; the images are decoded by DataLoader
    workers a batch at a time and never held for the gallery."""
    device = get_device()
    records = {r.imgid: r for r in load_karpathy(cfg.data_json, cfg.image_root, cfg.split)}
    pairs = [(q, i) for q, items in enumerate(ranked) for i in items[:cfg.depth]]
    missing = [i for _, i in pairs if i not in records]
    if missing:
        raise InputError(cfg.data_json, "images[].imgid", f"candidate image {missing[0]} is not in split {cfg.split}")
    if cfg.verify_images:
        verify_images(sorted({str(records[i].path) for _, i in pairs}), cfg.data_json, cfg)
    flat_scores = (blip_scores if cfg.blip_model else shapes_itm_scores)(cfg, texts, pairs, records, device)
    out, k = [], 0
    for items in ranked:
        n = len(items[:cfg.depth])
        out.append(flat_scores[k:k + n])
        k += n
    return out


def _decoded(image):
    """The loader's workers decode; BLIP's processor prepares the batch in the main process."""
    return image


def blip_scores(cfg: RerankConfig, texts: list[str], pairs: list[tuple], records: dict,
                device: torch.device) -> np.ndarray:
    """p(match) of BLIP's ITM head for every pair, in pair order. Each candidate image is decoded and passed through
    the vision tower once, a loader batch at a time, and its tokens are scored against every query that has it
    among its candidates (not once per (query, candidate) pair)."""
    from retriever.generative.itm import BlipITM

    scorer = BlipITM(cfg.blip_model, device=device)
    gallery, pairs_of = _pairs_by_image(pairs)
    loader = make_loader(ImageDataset([records[i].path for i in gallery], _decoded, cfg.data_json), cfg,
                         batch_size=cfg.batch_size, device=device, collate_fn=list)
    flat, start = np.zeros(len(pairs), dtype=np.float32), 0
    for images in progress(loader, desc="BLIP ITM", unit="batch"):
        embeds = scorer.image_embeds(images)
        chunk = gallery[start:start + len(images)]
        rows = [n for i in chunk for n in pairs_of[i]]
        image_rows = torch.tensor([k for k, i in enumerate(chunk) for _ in pairs_of[i]], device=embeds.device)
        for at in range(0, len(rows), cfg.batch_size):
            part = slice(at, at + cfg.batch_size)
            flat[rows[part]] = scorer.score_embeds([texts[pairs[n][0]] for n in rows[part]],
                                                   embeds[image_rows[part]]).numpy()
        start += len(images)
    return flat


def _pairs_by_image(pairs: list[tuple]) -> tuple[list, dict]:
    """The distinct candidate images (sorted) and, for each, the indices of its (query, image) pairs."""
    gallery = sorted({i for _, i in pairs}, key=str)
    pairs_of: dict = {i: [] for i in gallery}
    for n, (_, i) in enumerate(pairs):
        pairs_of[i].append(n)
    return gallery, pairs_of


@torch.no_grad()
def shapes_itm_scores(cfg: RerankConfig, texts: list[str], pairs: list[tuple], records: dict,
                      device: torch.device) -> np.ndarray:
    """The Shapes ITM head's logit for every pair, in pair order: each gallery image's tokens are made once, a
    loader batch at a time, and scored against every query that has the image among its candidates."""
    from retriever.generative.itm import DenseTokenFeatures, load_itm
    from retriever.generative.train_itm import score_rows, text_features

    model = load_itm(cfg.itm_checkpoint).to(device)
    encoder = load_dual_encoder(cfg.dense_checkpoint).to(device)
    feats = DenseTokenFeatures(encoder, pool=_pool_of(cfg.itm_checkpoint))
    queries = sorted({q for q, _ in pairs})
    text_row = {q: n for n, q in enumerate(queries)}
    text_feats = text_features(feats, [texts[q] for q in queries], device, cfg.batch_size)
    gallery, pairs_of = _pairs_by_image(pairs)
    flat = np.zeros(len(pairs), dtype=np.float32)
    start = 0
    for pixels in image_batches([records[i].path for i in gallery], encoder.preprocess, cfg, cfg.batch_size, device,
                                cfg.data_json, desc="scoring gallery images"):
        tokens = feats.image(pixels, device).cpu()
        chunk = gallery[start:start + len(pixels)]
        rows = [n for i in chunk for n in pairs_of[i]]
        image_rows = [k for k, i in enumerate(chunk) for _ in pairs_of[i]]
        flat[rows] = score_rows(model, text_feats, [text_row[pairs[n][0]] for n in rows], tokens[image_rows],
                                device, cfg.batch_size).numpy()
        start += len(pixels)
    return flat


def _pool_of(itm_checkpoint: str) -> int:
    from core.config import load_saved_config
    from retriever.generative.train_itm import ITMTrainConfig

    return load_saved_config(ITMTrainConfig, Path(itm_checkpoint) / "config.yaml").pool


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    cfg = parse_config(RerankConfig, argv)
    if cfg.method not in METHODS:
        raise InputError("config", "method", f"must be one of {METHODS}, got {cfg.method!r}")
    cands = read_jsonl(cfg.candidates, required=["sentid", "imgid", "ranked"])
    text_ids = read_json(Path(cfg.emb_dir) / f"text_{cfg.split}_ids.json")
    raw = {t["sentid"]: t["raw"] for t in text_ids}
    unknown = [c["sentid"] for c in cands if c["sentid"] not in raw]
    if unknown:
        raise InputError(cfg.candidates, "sentid", f"query {unknown[0]} is not a {cfg.split} caption of {cfg.emb_dir}")
    texts = [raw[c["sentid"]] for c in cands]
    ranked = [c["ranked"] for c in cands]
    if cfg.method == "dense":
        gallery_emb, gallery_ids = load_embeddings(Path(cfg.emb_dir) / f"image_{cfg.split}")
        query_emb = encode_queries(cfg.dense_checkpoint, texts, cfg.batch_size)
        reranked = rerank(ranked, dense_scorer(query_emb, gallery_emb, gallery_ids), cfg.depth)
    else:
        scores = itm_scores(cfg, texts, ranked)
        reranked = rerank(ranked, lambda q, items: scores[q], cfg.depth)
    positives = [[c["imgid"]] for c in cands]
    recall = recall_from_rankings(reranked, positives, cfg.ks, intervals=HEADLINE_INTERVALS)
    before = recall_from_rankings(ranked, positives, cfg.ks)
    out = Path(cfg.output_dir)
    atomic_write_jsonl(out / "candidates.jsonl", [{"sentid": c["sentid"], "imgid": c["imgid"], "ranked": r}
                                                  for c, r in zip(cands, reranked)])
    write_metrics(out, {"method": cfg.method, "depth": cfg.depth, "split": cfg.split, **recall,
                        "before": before, "candidates": cfg.candidates})
    tracker = Tracker(out, cfg, project=cfg.wandb_project, name=f"comgtir-rerank-{out.name}")
    tracker.log({f"test/{k}": v for k, v in recall.items()})
    tracker.finish()
    stage, _, row = cfg.summary_row.partition("/")
    print(format_table({"generated": before, row: recall}, title=f"{cfg.method} re-ranking (depth {cfg.depth})"))
    if cfg.summary:
        update_summary(cfg.summary, stage, {row: recall})
    return recall


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
