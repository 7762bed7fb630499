"""Image–text matching cross-encoders for re-ranking: a small ITM head trained in the project (Shapes) and BLIP's
ITM head through transformers (real data).

The Shapes ITM reads the frozen dense encoder's last-layer tokens — the caption's word tokens and the image's
patch tokens (2×2-pooled) — and lets them attend to each other in a small transformer: a [CLS] logit says whether
the caption matches the image (the ITM objective of ALBEF/BLIP, Eq. "L_itm"). It is a cross-encoder: every
(query, image) pair is scored jointly, which is why it only re-ranks a short candidate list.
A trained head is a folder: `model.pt`, `itm.json` (its shape), `meta.json` (stage "comgtir-itm").
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from core.checkpoint import load_model_weights, read_meta
from core.device import autocast, pretrained_dtype_kwargs
from core.encoders import DualEncoder
from core.errors import InputError

ITM_STAGE = "comgtir-itm"


class DenseTokenFeatures:
    """Per-token features from a frozen dense encoder: text [B, Lt, W] with a mask, image patches [B, P, W]."""

    def __init__(self, encoder: DualEncoder, pool: int = 2):
        self.encoder, self.pool = encoder.eval(), pool

    @torch.no_grad()
    def text(self, texts: Sequence[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(token features [B, Lt, W], mask [B, Lt], pooled normalised embedding [B, E])."""
        tokens = self.encoder.tokenize(texts).to(device)
        with autocast(torch.device(device)):
            out = self.encoder.clip.forward_intermediates(text=tokens, text_indices=1, normalize_intermediates=True)
        feats = out["text_intermediates"][-1]
        mask = tokens != 0  # open_clip pads with 0
        length = int(mask.sum(1).max())  # drop the all-padding tail: most of the context is empty
        return feats[:, :length].float(), mask[:, :length], out["text_features"].float()

    @torch.no_grad()
    def image(self, pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Patch features [B, P, W] with the pooled normalised embedding appended as the last row's first E dims."""
        with autocast(torch.device(device)):
            out = self.encoder.clip.forward_intermediates(image=pixels.to(device), image_indices=1,
                                                          normalize_intermediates=True, image_output_fmt="NCHW")
        grid = out["image_intermediates"][-1].float()
        if self.pool > 1:
            grid = F.avg_pool2d(grid, self.pool)
        tokens = grid.flatten(2).transpose(1, 2)
        pooled = out["image_features"].float()
        if pooled.shape[-1] > tokens.shape[-1]:
            raise ValueError(f"embedding dim {pooled.shape[-1]} exceeds the token width {tokens.shape[-1]}")
        # carry the pooled embedding as one extra row (zero-padded to the token width) so one tensor holds both
        extra = F.pad(pooled, (0, max(0, tokens.shape[-1] - pooled.shape[-1])))[:, None, : tokens.shape[-1]]
        return torch.cat([tokens, extra], dim=1)


@dataclass
class ITMSpec:
    text_dim: int
    image_dim: int
    width: int = 128
    layers: int = 2
    heads: int = 4
    max_image_tokens: int = 64
    dense_scale: float = 10.0  # initial temperature of the dense similarity term
    dropout: float = 0.1  # in the fusion transformer


class ShapesITM(nn.Module):
    """[CLS] + projected text tokens + projected image tokens → transformer → match logit."""

    def __init__(self, spec: ITMSpec):
        super().__init__()
        self.spec = spec
        w = spec.width
        self.text_proj, self.image_proj = nn.Linear(spec.text_dim, w), nn.Linear(spec.image_dim, w)
        self.cls = nn.Parameter(torch.zeros(1, 1, w))
        self.type_embed = nn.Parameter(torch.randn(2, w) * 0.02)
        self.image_pos = nn.Parameter(torch.randn(spec.max_image_tokens, w) * 0.02)
        layer = nn.TransformerEncoderLayer(w, spec.heads, 2 * w, dropout=spec.dropout, batch_first=True,
                                           norm_first=True)
        self.fusion = nn.TransformerEncoder(layer, spec.layers, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.LayerNorm(w), nn.Linear(w, 1))
        nn.init.zeros_(self.head[1].weight)  # start as the dense score; the fusion learns a correction
        nn.init.zeros_(self.head[1].bias)
        self.dense_scale = nn.Parameter(torch.tensor(float(spec.dense_scale)).log())

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor, text_emb: torch.Tensor,
                image: torch.Tensor) -> torch.Tensor:
        """Match logits [B] for aligned rows of text tokens [B, Lt, Dt] (mask [B, Lt]), the text's pooled dense
        embedding [B, E] and image rows [B, P + 1, Di] (patch tokens, then the pooled image embedding).

        logit = s · cos(text, image) + f(text tokens, image tokens): the dense similarity is the ITC score the
        cross-encoder starts from (BLIP's ITM sits on ITC-aligned encoders); the fusion transformer learns what
        the pooled vectors miss (which object is where, which colour goes with which shape)."""
        image, image_emb = image[:, :-1], image[:, -1, : text_emb.shape[-1]]
        dense = self.dense_scale.exp() * (F.normalize(text_emb, dim=-1) * F.normalize(image_emb, dim=-1)).sum(-1)
        b = len(text)
        t = self.text_proj(text) + self.type_embed[0]
        v = self.image_proj(image) + self.type_embed[1] + self.image_pos[: image.shape[1]]
        x = torch.cat([self.cls.expand(b, -1, -1), t, v], dim=1)
        pad = torch.cat([torch.zeros(b, 1, dtype=torch.bool, device=x.device), ~text_mask.bool(),
                         torch.zeros(b, v.shape[1], dtype=torch.bool, device=x.device)], dim=1)
        return dense + self.head(self.fusion(x, src_key_padding_mask=pad)[:, 0]).squeeze(-1)


def itm_loss(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, 1 + n_neg], the positive first: a softmax over the pair and its hard negatives (ITM with
    hard-negative mining, as BLIP's ITM is trained)."""
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


def save_itm_files(model: ShapesITM):
    def write(folder: Path) -> None:
        (Path(folder) / "itm.json").write_text(json.dumps(dataclasses.asdict(model.spec)))
    return write


def load_itm(folder: str | Path) -> ShapesITM:
    folder = Path(folder)
    read_meta(folder, stage=ITM_STAGE)
    spec_path = folder / "itm.json"
    if not spec_path.is_file():
        raise InputError(spec_path, None, "not an ITM folder (itm.json is missing)")
    model = ShapesITM(ITMSpec(**json.loads(spec_path.read_text())))
    load_model_weights(folder, model, stage=ITM_STAGE)
    return model.eval()


class BlipITM:
    """BLIP's image–text matching head (`BlipForImageTextRetrieval`, use_itm_head=True) through transformers:
    p(match) for aligned (text, image) rows, in bf16 on CUDA (core.device). `model`/`processor` may be passed in
    (tests use a tiny random BLIP)."""

    def __init__(self, name_or_path: str = "", model=None, processor=None, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        if model is None:
            from transformers import BlipForImageTextRetrieval, BlipProcessor

            model = BlipForImageTextRetrieval.from_pretrained(name_or_path, **pretrained_dtype_kwargs(self.device))
            processor = BlipProcessor.from_pretrained(name_or_path)
        self.model, self.processor = model.to(self.device).eval(), processor

    @torch.no_grad()
    def image_embeds(self, images: Sequence) -> torch.Tensor:
        """The vision tower's tokens [n, P, D] of each image, to be scored against many texts (score_embeds)."""
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        # the processor makes float32 pixels; the vision tower's first convolution wants the weights' dtype
        pixels = pixels.to(self.device, next(self.model.parameters()).dtype)
        with autocast(self.device):
            return self.model.vision_model(pixel_values=pixels).last_hidden_state

    @torch.no_grad()
    def score_embeds(self, texts: Sequence[str], image_embeds: torch.Tensor) -> torch.Tensor:
        """p(match) for aligned (text, image tokens) rows: the ITM branch of BlipForImageTextRetrieval.forward —
        the text encoder cross-attending to the image tokens, then the ITM head on [CLS]."""
        inputs = self.processor(text=list(texts), return_tensors="pt", padding=True).to(self.device)
        mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        with autocast(self.device):
            hidden = self.model.text_encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                             encoder_hidden_states=image_embeds.to(self.device),
                                             encoder_attention_mask=mask).last_hidden_state
            logits = self.model.itm_head(hidden[:, 0, :])
        return logits.float().softmax(-1)[:, 1].cpu()

    @torch.no_grad()
    def score(self, texts: Sequence[str], images: Sequence) -> torch.Tensor:
        """p(match) for aligned (text, image) rows, through the model's own forward (use_itm_head=True)."""
        inputs = self.processor(images=list(images), text=list(texts), return_tensors="pt", padding=True).to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(next(self.model.parameters()).dtype)
        with autocast(self.device):
            out = self.model(**inputs, use_itm_head=True)
        return out.itm_score.float().softmax(-1)[:, 1].cpu()
