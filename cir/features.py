"""Cached patch tokens of the frozen image encoder, shared by every CIR step (generator, synthesis, retriever).

The encoder is frozen, so its tokens for an image never change: each step loads `{cache_dir}/{key}.pt` (tokens +
image names + the encoder's fingerprint) or computes and writes it. A cache of another encoder is recomputed, never
reused. Embedding functions still run from tokens (`encode_*_from_tokens`), the same code `encode_*` (pixels) runs.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Mapping

import torch

from core.data import load_images
from core.logging import progress
from core.modtext import ImageTokens


class TokenBank:
    """Tokens [N, T, D] (float32, exactly what the encoder returns) with a name → row index."""

    def __init__(self, names: list[str], tokens: torch.Tensor):
        self.names, self.tokens = names, tokens
        self.index = {n: i for i, n in enumerate(names)}

    def get(self, names: list[str], device: torch.device) -> torch.Tensor:
        rows = torch.tensor([self.index[n] for n in names])
        return self.tokens[rows].to(device=device, dtype=torch.float32)

    def merge(self, other: "TokenBank") -> "TokenBank":
        new = [n for n in other.names if n not in self.index]
        rows = torch.tensor([other.index[n] for n in new], dtype=torch.long)
        return TokenBank(self.names + new, torch.cat([self.tokens, other.tokens[rows]]) if new else self.tokens)


def encoder_fingerprint(encoder: ImageTokens) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(encoder.model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().float().numpy().tobytes()[:4096])  # a prefix of each tensor is enough to tell
        h.update(str(tuple(tensor.shape)).encode())
    return h.hexdigest()[:16]


@torch.no_grad()
def token_bank(encoder: ImageTokens, images: Mapping[str, Path], cache_path: str | Path | None = None,
               batch_size: int = 256, device: torch.device | None = None) -> TokenBank:
    """Tokens of `images` (name → file), from the cache when it holds exactly these images for this encoder."""
    names = list(images)
    fingerprint = encoder_fingerprint(encoder)
    cache_path = Path(cache_path) if cache_path is not None else None
    if cache_path is not None and cache_path.is_file():
        saved = torch.load(cache_path, map_location="cpu", weights_only=True)
        if saved.get("fingerprint") == fingerprint and saved.get("names") == names:
            return TokenBank(names, saved["tokens"])
    device = device or next(encoder.model.parameters()).device
    chunks = []
    for i in progress(range(0, len(names), batch_size), desc="image tokens", unit="batch"):
        paths = [images[n] for n in names[i:i + batch_size]]
        pixels = load_images(paths, encoder.preprocess, desc="") if len(paths) else None
        chunks.append(encoder(pixels.to(device)).float().cpu())
    tokens = torch.cat(chunks)
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        # A private temporary name: several processes may build the same cache at once; the last rename wins.
        tmp = cache_path.with_name(f".{cache_path.name}.{os.getpid()}.tmp")
        torch.save({"fingerprint": fingerprint, "names": names, "tokens": tokens}, tmp)
        tmp.replace(cache_path)
    return TokenBank(names, tokens)
