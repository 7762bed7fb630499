"""Encoding helpers of the dense retriever shared by its train, encode, probe and evaluate steps."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from core.data import LoaderOptions, image_batches
from core.device import autocast
from core.encoders import DualEncoder
from core.logging import progress


@torch.no_grad()
def embed_image_batches(model: DualEncoder, batches: Iterable[torch.Tensor],
                        device: torch.device) -> Iterator[np.ndarray]:
    """L2-normalised image embeddings (float32, on the host), one block per batch of pixels."""
    model.eval()
    for pixels in batches:
        with autocast(device):
            yield model.encode_image(pixels.to(device, non_blocking=True)).float().cpu().numpy()


def encode_image_files(model: DualEncoder, paths: Sequence[str | Path], device: torch.device,
                       options: LoaderOptions, batch_size: int = 256, listed_in: str | Path | None = None,
                       desc: str = "encoding images") -> np.ndarray:
    """Embeddings [n, d] of image files, decoded by the loader's workers (for a split a stage holds anyway:
    validation, a probe; a corpus is written as it is made by retriever.dense.encode)."""
    batches = image_batches(paths, model.preprocess, options, batch_size, device, listed_in, desc)
    blocks = list(embed_image_batches(model, batches, device))
    return np.concatenate(blocks) if blocks else np.zeros((0, model.embed_dim), dtype=np.float32)


@torch.no_grad()
def encode_texts(model: DualEncoder, texts: Sequence[str], device: torch.device, batch_size: int = 512,
                 desc: str = "encoding captions") -> np.ndarray:
    model.eval()
    out = []
    for i in progress(range(0, len(texts), batch_size), desc=desc):
        tokens = model.tokenize(texts[i:i + batch_size]).to(device)
        with autocast(device):
            out.append(model.encode_text(tokens).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, model.embed_dim), dtype=np.float32)
