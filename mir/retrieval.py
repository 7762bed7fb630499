"""Retrieval over the MIR search space with the dense towers: text query → image and generated image → image.

Corpus embeddings are cached under a hash of (retriever checkpoint weights, preprocessing, corpus list), so
every mode and every resumed run reuses one encoding pass and a changed checkpoint or corpus never reuses
a stale one.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from core.device import autocast, get_device
from core.encoders import load_dual_encoder
from core.io import load_embeddings, save_embeddings
from core.logging import progress
from mir.generator import context_length, token_count, weights_digest


class DenseSearcher:
    """The dense retriever over a fixed list of corpus images (the search space)."""

    def __init__(self, checkpoint: str | Path, corpus_paths: Sequence[Path], corpus_ids: Sequence[str],
                 cache_dir: str | Path, device: torch.device | None = None, batch_size: int = 256):
        self.device = device or get_device()
        self.checkpoint = Path(checkpoint)
        self.encoder = load_dual_encoder(self.checkpoint).to(self.device).eval()
        self.model_id = f"dense:{weights_digest(self.checkpoint / 'model.pt')}"
        self.ids = list(corpus_ids)
        self.index_of = {c: i for i, c in enumerate(self.ids)}
        self.batch_size = batch_size
        self.context = context_length(self.encoder)
        self.corpus = torch.from_numpy(self._corpus_embeddings(list(corpus_paths), Path(cache_dir))).to(self.device)

    def corpus_key(self) -> str:
        payload = json.dumps([self.model_id, repr(self.encoder.preprocess), self.ids])
        return hashlib.sha256(payload.encode()).hexdigest()[:20]

    def _corpus_embeddings(self, paths: list[Path], cache_dir: Path) -> np.ndarray:
        prefix = cache_dir / f"corpus_{self.corpus_key()}"
        if prefix.with_name(prefix.name + ".npy").is_file():
            matrix, ids = load_embeddings(prefix)
            if ids == self.ids:
                return matrix
        images = []
        out = []
        for i in progress(range(0, len(paths), self.batch_size), desc="encoding search space"):
            images = [Image.open(p).convert("RGB") for p in paths[i:i + self.batch_size]]
            out.append(self.encode_images(images))
        matrix = np.concatenate(out)
        save_embeddings(prefix, matrix, self.ids)
        return matrix

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        px = torch.stack([self.encoder.preprocess(im) for im in images]).to(self.device)
        with autocast(self.device):
            return self.encoder.encode_image(px).float().cpu().numpy()

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        tokens = self.encoder.tokenize(list(texts)).to(self.device)
        with autocast(self.device):
            return self.encoder.encode_text(tokens).float().cpu().numpy()

    def truncated(self, text: str) -> bool:
        """Whether the text tower cuts the query (it reads at most `context` tokens)."""
        return token_count(self.encoder, text) > self.context

    def rank(self, queries: np.ndarray, targets: Sequence[str], topk: int = 10) -> tuple[list[int], list[list[str]]]:
        """0-based rank of each query's target (corpus items scored strictly higher) and the top-k ids."""
        q = torch.from_numpy(queries).to(self.corpus)
        sim = q @ self.corpus.T
        idx = torch.tensor([self.index_of[t] for t in targets], device=sim.device)
        target_sim = sim.gather(1, idx[:, None])
        ranks = (sim > target_sim).sum(1).tolist()
        top = sim.topk(min(topk, sim.shape[1]), dim=1).indices.tolist()
        return [int(r) for r in ranks], [[self.ids[j] for j in row] for row in top]

    def rank_texts(self, texts: Sequence[str], targets: Sequence[str], topk: int = 10) -> tuple[list[int], list[list[str]]]:
        return self.rank(self.encode_texts(texts), targets, topk)

    def rank_images(self, images: Sequence[Image.Image], targets: Sequence[str], topk: int = 10) -> tuple[list[int], list[list[str]]]:
        return self.rank(self.encode_images(images), targets, topk)
