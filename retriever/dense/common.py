"""Encoding helpers of the dense retriever shared by its train, encode and evaluate steps."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from core.device import autocast
from core.encoders import DualEncoder
from core.logging import progress


@torch.no_grad()
def encode_pixels(model: DualEncoder, pixels: torch.Tensor, device: torch.device, batch_size: int = 256,
                  desc: str = "encoding images") -> np.ndarray:
    model.eval()
    out = []
    for i in progress(range(0, len(pixels), batch_size), desc=desc):
        with autocast(device):
            out.append(model.encode_image(pixels[i:i + batch_size].to(device)).float().cpu())
    return torch.cat(out).numpy()


@torch.no_grad()
def encode_texts(model: DualEncoder, texts: Sequence[str], device: torch.device, batch_size: int = 512,
                 desc: str = "encoding captions") -> np.ndarray:
    model.eval()
    out = []
    for i in progress(range(0, len(texts), batch_size), desc=desc):
        tokens = model.tokenize(texts[i:i + batch_size]).to(device)
        with autocast(device):
            out.append(model.encode_text(tokens).float().cpu())
    return torch.cat(out).numpy()
