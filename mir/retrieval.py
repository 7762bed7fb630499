"""Retrieval over the MIR search space: text query → image and generated image → image.

The retriever is one of
- a dense folder of the project (`core.encoders`: `encoder.json` + `model.pt`, or `encoder.json` alone naming a
  pretrained open_clip model), identified by the hash of its weights (or the name it loads);
- a transformers BLIP retrieval folder (`config.json` of model type "blip", e.g. ChatIR's weights converted by
  `mir.convert_blip`), identified by the hash of its weight files;
- a pretrained model by name: `open_clip:<model>[:<pretrained tag>]` (any open_clip name, `hf-hub:` and
  `local-dir:` included) or `blip:<name or path>` (`BlipForImageTextRetrieval.from_pretrained`; ChatIR's ITC
  embeddings, mir.blip), identified by that name: a name stands for fixed weights, nothing is hashed.

The search space is encoded once through the DataLoader (`core.data.image_batches`: one image opened per item,
decoded by workers) and written as it is made to a float16 embedding file (`core.io.EmbeddingWriter`) under
`cache_dir/corpus_{key}`, the key a hash of (retriever id, preprocessing, corpus list); the file's manifest
records the same three (`made_by`), so every mode and every resumed run reuses one encoding pass and a changed
checkpoint or corpus never reuses a stale one. The cache is read back by memory map and scored block by block.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch
from PIL import Image

from core.data import LoaderOptions, image_batches
from core.device import autocast, get_device
from core.encoders import DualEncoder, build_dual_encoder, load_dual_encoder
from core.errors import InputError
from core.io import EmbeddingWriter, embeddings_made_by, file_digest, json_digest, open_embeddings
from mir.generator import context_length, token_count

SCORE_BLOCK = 8192  # corpus rows scored at once: a float32 copy of one block (16 MB at 512-d), never of the corpus
OPEN_CLIP_PREFIX, BLIP_PREFIX = "open_clip:", "blip:"


class Retriever(Protocol):
    """What DenseSearcher needs of a text–image retriever: normalised embeddings in one space."""

    preprocess: Callable[[Image.Image], torch.Tensor]
    context_length: int

    def tokenize(self, texts: Sequence[str]) -> Any: ...
    def token_count(self, text: str) -> int: ...
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor: ...
    def encode_text(self, tokens: Any) -> torch.Tensor: ...


class OpenCLIPRetriever(torch.nn.Module):
    """A `core.encoders.DualEncoder` (open_clip) as a Retriever."""

    def __init__(self, encoder: DualEncoder):
        super().__init__()
        self.encoder = encoder
        self.preprocess = encoder.preprocess
        self.context_length = context_length(encoder)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.encoder.tokenize(texts)

    def token_count(self, text: str) -> int:
        return token_count(self.encoder, text)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encoder.encode_image(pixels)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.encoder.encode_text(tokens)


def retriever_id(checkpoint: Path) -> str:
    """A dense folder's identity: the hash of its fine-tuned weights, or for a folder that only names a
    pretrained tower (no model.pt) the name and tag it loads."""
    if (checkpoint / "model.pt").is_file():
        return f"dense:{file_digest(checkpoint / 'model.pt')}"
    spec_path = checkpoint / "encoder.json"
    if not spec_path.is_file():
        raise InputError(spec_path, None, "not a dual-encoder folder (encoder.json is missing)")
    spec = json.loads(spec_path.read_text())
    return f"dense:{spec.get('pretrained_name')}:{spec.get('pretrained')}"


def is_blip_folder(folder: Path) -> bool:
    config = folder / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "blip"


def blip_folder_id(folder: Path) -> str:
    """A BLIP folder's identity: the hash of its weight files (a re-converted checkpoint gets a new one)."""
    weights = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
    if not weights:
        raise InputError(folder, None, "a BLIP folder without weights (no .safetensors or .bin file)")
    return f"blip-weights:{json_digest([file_digest(p) for p in weights])}"


def open_retriever(spec: str | Path, device: torch.device) -> tuple[Retriever, str]:
    """The retriever a config names (see the module's docstring) on `device`, and its identity."""
    text = str(spec)
    if text.startswith(OPEN_CLIP_PREFIX):
        name, tag = _open_clip_name(text[len(OPEN_CLIP_PREFIX):])
        encoder = build_dual_encoder({"pretrained_name": name, "pretrained": tag})
        return OpenCLIPRetriever(encoder).to(device).eval(), text
    if text.startswith(BLIP_PREFIX):
        from mir.blip import BlipRetriever

        return BlipRetriever.from_pretrained(text[len(BLIP_PREFIX):], device), text
    folder = Path(spec)
    if (folder / "encoder.json").is_file():
        return OpenCLIPRetriever(load_dual_encoder(folder)).to(device).eval(), retriever_id(folder)
    if folder.is_dir() and is_blip_folder(folder):
        from mir.blip import BlipRetriever

        return BlipRetriever.from_pretrained(folder, device), blip_folder_id(folder)
    raise InputError(spec, None, "not a retriever: expected a dense folder (encoder.json), a BLIP folder "
                                 "(config.json of model type blip), open_clip:<model>[:<tag>] or blip:<name>")


def _open_clip_name(rest: str) -> tuple[str, str | None]:
    """open_clip:<model>[:<tag>]; a model given by schema (hf-hub:…, local-dir:…) carries its own weights."""
    if rest.startswith(("hf-hub:", "local-dir:")):
        return rest, None
    name, _, tag = rest.partition(":")
    if not name or not tag:  # open_clip would build the model with random weights
        raise InputError(None, "dense_checkpoint", f"open_clip:{rest} names no pretrained weights; write "
                                                   "open_clip:<model>:<tag> (open_clip:ViT-L-14-quickgelu:openai)")
    return name, tag


class DenseSearcher:
    """A retriever (`open_retriever`: a folder or a pretrained name) over a fixed list of corpus images (the search
    space), whose embeddings are cached by (retriever id, preprocessing, corpus)."""

    def __init__(self, checkpoint: str | Path, corpus_paths: Sequence[Path], corpus_ids: Sequence[str],
                 cache_dir: str | Path, device: torch.device | None = None, batch_size: int = 256,
                 loader: LoaderOptions | None = None, listed_in: str | Path | None = None):
        self.device = device or get_device()
        self.encoder, self.model_id = open_retriever(checkpoint, self.device)
        self.ids = list(corpus_ids)
        if len(corpus_paths) != len(self.ids):
            raise ValueError(f"{len(corpus_paths)} corpus paths but {len(self.ids)} ids")
        self.index_of = {c: i for i, c in enumerate(self.ids)}
        self.batch_size = batch_size
        self.loader, self.listed_in = loader or LoaderOptions(), listed_in
        self.context = self.encoder.context_length
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
        tokens = self.encoder.tokenize(list(texts)).to(self.device)  # a tensor (open_clip) or a BatchEncoding (BLIP)
        with autocast(self.device):
            return self.encoder.encode_text(tokens).float().cpu().numpy()

    def truncated(self, text: str) -> bool:
        """Whether the text tower cuts the query (it reads at most `context` tokens)."""
        return self.encoder.token_count(text) > self.context

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
