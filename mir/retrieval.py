"""Retrieval over the MIR search space with the dense towers: text query → image and generated image → image.

The search space is encoded once through the DataLoader (`core.data.image_batches`: one image opened per item,
decoded by workers) and written as it is made to a float16 embedding file (`core.io.EmbeddingWriter`) under
`cache_dir/corpus_{key}`, the key a hash of (retriever weights, preprocessing, corpus list); the file's manifest
records the same three (`made_by`), so every mode and every resumed run reuses one encoding pass and a changed
checkpoint or corpus never reuses a stale one. The cache is read back by memory map and scored block by block.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from core.data import LoaderOptions, image_batches
from core.device import autocast, get_device
from core.encoders import load_dual_encoder
from core.errors import InputError
from core.io import EmbeddingWriter, embeddings_made_by, file_digest, json_digest, open_embeddings
from mir.generator import context_length, token_count

SCORE_BLOCK = 8192  # corpus rows scored at once: a float32 copy of one block (16 MB at 512-d), never of the corpus


def retriever_id(checkpoint: Path) -> str:
    """The dense checkpoint's identity: the hash of its fine-tuned weights, or for a folder that only names a
    pretrained tower (no model.pt) the name and tag it loads."""
    if (checkpoint / "model.pt").is_file():
        return f"dense:{file_digest(checkpoint / 'model.pt')}"
    spec_path = checkpoint / "encoder.json"
    if not spec_path.is_file():
        raise InputError(spec_path, None, "not a dual-encoder folder (encoder.json is missing)")
    spec = json.loads(spec_path.read_text())
    return f"dense:{spec.get('pretrained_name')}:{spec.get('pretrained')}"


class DenseSearcher:
    """The dense retriever over a fixed list of corpus images (the search space)."""

    def __init__(self, checkpoint: str | Path, corpus_paths: Sequence[Path], corpus_ids: Sequence[str],
                 cache_dir: str | Path, device: torch.device | None = None, batch_size: int = 256,
                 loader: LoaderOptions | None = None, listed_in: str | Path | None = None):
        self.device = device or get_device()
        self.checkpoint = Path(checkpoint)
        self.encoder = load_dual_encoder(self.checkpoint).to(self.device).eval()
        self.model_id = retriever_id(self.checkpoint)
        self.ids = list(corpus_ids)
        if len(corpus_paths) != len(self.ids):
            raise ValueError(f"{len(corpus_paths)} corpus paths but {len(self.ids)} ids")
        self.index_of = {c: i for i, c in enumerate(self.ids)}
        self.batch_size = batch_size
        self.loader, self.listed_in = loader or LoaderOptions(), listed_in
        self.context = context_length(self.encoder)
        self.cache_prefix = Path(cache_dir) / f"corpus_{self.corpus_key()}"
        self.corpus = self._device_corpus(self._corpus_embeddings(list(corpus_paths)))

    def corpus_key(self) -> str:
        return json_digest([self.model_id, repr(self.encoder.preprocess), self.ids])

    def made_by(self) -> dict:
        """What the cached corpus embeddings depend on, stored in their manifest."""
        corpus = json_digest(self.ids)
        return {"model": self.model_id, "preprocessing": repr(self.encoder.preprocess), "corpus": corpus,
                "corpus_size": len(self.ids)}

    def _corpus_embeddings(self, paths: list[Path]) -> np.ndarray:
        """The corpus embeddings by memory map (float16), encoded first when no matching cache exists."""
        prefix = self.cache_prefix
        if embeddings_made_by(prefix) == self.made_by():
            matrix, ids = open_embeddings(prefix)
            if ids == self.ids:
                return matrix
        writer = None
        try:
            for px in image_batches(paths, self.encoder.preprocess, self.loader, self.batch_size, self.device,
                                    self.listed_in, desc="encoding search space"):
                block = self.encode_pixels(px)
                writer = writer or EmbeddingWriter(prefix, len(paths), block.shape[1])
                writer.write(block)
            writer.close(self.ids, self.made_by())
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        return open_embeddings(prefix)[0]

    def _device_corpus(self, matrix: np.ndarray) -> torch.Tensor:
        """The corpus as float16 on the device, copied block by block from the memory map (no float32 copy and,
        on a GPU, none in host memory): ChatIR's 50K × 512 search space is 50 MB there."""
        corpus = torch.empty(matrix.shape, dtype=torch.float16, device=self.device)
        for start in range(0, len(matrix), SCORE_BLOCK):
            block = np.array(matrix[start:start + SCORE_BLOCK], dtype=np.float16)  # a writable copy of one block
            corpus[start:start + len(block)] = torch.from_numpy(block).to(self.device)
        return corpus

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        with autocast(self.device):
            return self.encoder.encode_image(pixels.to(self.device, non_blocking=True)).float().cpu().numpy()

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.encode_pixels(torch.stack([self.encoder.preprocess(im) for im in images]))

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        tokens = self.encoder.tokenize(list(texts)).to(self.device)
        with autocast(self.device):
            return self.encoder.encode_text(tokens).float().cpu().numpy()

    def truncated(self, text: str) -> bool:
        """Whether the text tower cuts the query (it reads at most `context` tokens)."""
        return token_count(self.encoder, text) > self.context

    @torch.no_grad()
    def similarities(self, queries: np.ndarray) -> torch.Tensor:
        """[Q, N] float32 scores of the queries against every corpus item, one corpus block at a time."""
        q = torch.from_numpy(np.asarray(queries, dtype=np.float32)).to(self.device)
        return torch.cat([q @ self.corpus[i:i + SCORE_BLOCK].float().T for i in range(0, len(self.corpus), SCORE_BLOCK)],
                         dim=1)

    def rank(self, queries: np.ndarray, targets: Sequence[str], topk: int = 10) -> tuple[list[int], list[list[str]]]:
        """0-based rank of each query's target (every other corpus item scored at least as high is above it, so a
        tie never finds a target) and the top-k ids."""
        sim = self.similarities(queries)
        idx = torch.tensor([self.index_of[t] for t in targets], device=sim.device)
        target_sim = sim.gather(1, idx[:, None])
        ranks = ((sim >= target_sim).sum(1) - 1).tolist()
        top = sim.topk(min(topk, sim.shape[1]), dim=1).indices.tolist()
        return [int(r) for r in ranks], [[self.ids[j] for j in row] for row in top]

    def rank_texts(self, texts: Sequence[str], targets: Sequence[str], topk: int = 10) -> tuple[list[int], list[list[str]]]:
        return self.rank(self.encode_texts(texts), targets, topk)

    def rank_images(self, images: Sequence[Image.Image], targets: Sequence[str], topk: int = 10) -> tuple[list[int], list[list[str]]]:
        return self.rank(self.encode_images(images), targets, topk)
