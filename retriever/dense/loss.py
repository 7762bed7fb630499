"""CLIP's symmetric InfoNCE with extra negative captions on the image→text side (NegCLIP, Yuksekgonul et al. 2023).

Each image is scored against every caption in the global batch plus every hard-negative caption; a caption that has
no hard negative is marked invalid and its column is masked out. Under DDP the features are gathered with their
gradients, as open_clip's `ClipLoss(gather_with_grad=True)` does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.loss import gather_features


class HardNegativeClipLoss(torch.nn.Module):
    def __init__(self, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.rank, self.world_size = rank, world_size

    def forward(self, image: torch.Tensor, text: torch.Tensor, negatives: torch.Tensor, valid: torch.Tensor,
                logit_scale: torch.Tensor) -> torch.Tensor:
        """image, text, negatives: [n, d] normalised; valid: [n] bool, whether row i of `negatives` is a caption."""
        if self.world_size > 1:
            # one gather for captions, negatives and the mask keeps the three aligned across ranks
            packed = torch.cat([text, negatives, valid.to(text.dtype)[:, None]], dim=1)
            image, packed = gather_features(image, packed, gather_with_grad=True, rank=self.rank,
                                            world_size=self.world_size)
            d = text.shape[1]
            text, negatives, valid = packed[:, :d], packed[:, d:2 * d], packed[:, 2 * d] > 0.5
        labels = torch.arange(len(image), device=image.device)
        negative_logits = (logit_scale * image @ negatives.T).masked_fill(~valid[None, :], float("-inf"))
        per_image = torch.cat([logit_scale * image @ text.T, negative_logits], dim=1)
        per_text = logit_scale * text @ image.T
        return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2
