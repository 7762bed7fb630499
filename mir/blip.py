"""BLIP's image–text contrastive (ITC) embeddings through transformers, as ChatIR retrieves with them, and the
conversion of a checkpoint in the original BLIP repository's layout (ChatIR's `chatir_weights.ckpt`) into a
`BlipForImageTextRetrieval` folder.

ChatIR's retriever (Levy et al., 2023) is BLIP's retrieval model: the image is the normalised `vision_proj` of the
ViT's [CLS] token, the dialogue the normalised `text_proj` of the text encoder's [CLS] token, read in its
unimodal mode (no cross-attention to the image), the rounds joined by ", " and tokenised with BERT's tokenizer
up to 200 tokens (padding to the longest, longer dialogues truncated), images resized to 224 px (bicubic) and
normalised with CLIP's mean and std. transformers exposes the same two vectors in `BlipForImageTextRetrieval`'s
`use_itm_head=False` path; `BlipRetriever` computes them per side so the search space is encoded once.

Reads a transformers BLIP folder or hub name (`from_pretrained`) and, for conversion, a `.ckpt` whose `model`
entry is the original state dict; writes the converted folder (weights, config, processor) atomically.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from core.device import pretrained_dtype_kwargs
from core.errors import InputError
from core.io import atomic_dir

CHATIR_TEXT_LENGTH = 200  # ChatIR tokenises dialogues up to 200 tokens (BLIP's text encoder has 512 positions)
CHATIR_IMAGE_SIZE = 224  # ChatIR builds its BLIP at 224 px; the hub's BLIP retrieval models are 384 px
BLIP_VIT_LAYER_NORM_EPS = 1e-6  # BLIP's ViT builds its LayerNorms with eps 1e-6 (transformers' default is 1e-5)


class BlipPixels:
    """PIL image → the [3, H, W] pixels BLIP's image processor makes. A named class, not a closure, so DataLoader
    workers can receive it; its repr names every setting, because it is part of the corpus cache's key."""

    def __init__(self, image_processor: Any):
        self.image_processor = image_processor

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.image_processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]

    def __repr__(self) -> str:
        p = self.image_processor
        size = {k: v for k, v in dict(p.size).items() if v is not None}
        return (f"BlipPixels(size={size}, resample={int(p.resample)}, rescale={p.do_rescale}, "
                f"mean={list(p.image_mean)}, std={list(p.image_std)})")


class BlipRetriever(torch.nn.Module):
    """The ITC side of a `BlipForImageTextRetrieval`: normalised image and text embeddings in one space."""

    def __init__(self, model: torch.nn.Module, processor: Any, max_length: int = CHATIR_TEXT_LENGTH):
        super().__init__()
        self.model = model.eval()
        self.tokenizer = processor.tokenizer
        self.preprocess = BlipPixels(processor.image_processor)
        positions = model.config.text_config.max_position_embeddings
        if max_length > positions:
            raise InputError(None, "max_length", f"{max_length} tokens, but the text encoder has {positions} positions")
        self.context_length = max_length

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, device: torch.device | str = "cpu",
                        max_length: int = CHATIR_TEXT_LENGTH) -> BlipRetriever:
        from transformers import BlipForImageTextRetrieval, BlipProcessor

        device = torch.device(device)
        model = BlipForImageTextRetrieval.from_pretrained(str(name_or_path), **pretrained_dtype_kwargs(device))
        return cls(model.to(device), BlipProcessor.from_pretrained(str(name_or_path)), max_length)

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_proj.out_features)

    def tokenize(self, texts: Sequence[str]):
        """Input ids and attention mask as ChatIR makes them: padded to the longest text, cut at `context_length`."""
        return self.tokenizer(list(texts), padding="longest", truncation=True, max_length=self.context_length,
                              return_tensors="pt")

    def token_count(self, text: str) -> int:
        """Tokens the text needs, [CLS] and [SEP] included, before truncation."""
        return len(self.tokenizer(text)["input_ids"])

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        vision = self.model.vision_model
        pixels = pixels.to(vision.embeddings.patch_embedding.weight.dtype)
        cls_token = vision(pixel_values=pixels).last_hidden_state[:, 0]
        return F.normalize(self.model.vision_proj(cls_token), dim=-1)

    def encode_text(self, tokens) -> torch.Tensor:
        # No encoder_hidden_states: BLIP's text encoder then skips its cross-attention (BLIP's "text" mode).
        out = self.model.text_encoder(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return F.normalize(self.model.text_proj(out.last_hidden_state[:, 0]), dim=-1)


# ---------------------------------------------------------------------------------------------- conversion
# Original BLIP name (salesforce/BLIP: models/vit.py's VisionTransformer as `visual_encoder`, models/med.py's
# BertModel as `text_encoder`) → transformers BlipForImageTextRetrieval name. The text encoder is the same BERT
# module tree in both; the ViT's parts are renamed.
_RENAMES: list[tuple[str, str]] = [
    (r"visual_encoder\.cls_token", "vision_model.embeddings.class_embedding"),
    (r"visual_encoder\.pos_embed", "vision_model.embeddings.position_embedding"),
    (r"visual_encoder\.patch_embed\.proj\.(weight|bias)", r"vision_model.embeddings.patch_embedding.\1"),
    (r"visual_encoder\.blocks\.(\d+)\.norm1\.(weight|bias)", r"vision_model.encoder.layers.\1.layer_norm1.\2"),
    (r"visual_encoder\.blocks\.(\d+)\.norm2\.(weight|bias)", r"vision_model.encoder.layers.\1.layer_norm2.\2"),
    (r"visual_encoder\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"vision_model.encoder.layers.\1.self_attn.qkv.\2"),
    (r"visual_encoder\.blocks\.(\d+)\.attn\.proj\.(weight|bias)",
     r"vision_model.encoder.layers.\1.self_attn.projection.\2"),
    (r"visual_encoder\.blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"vision_model.encoder.layers.\1.mlp.\2.\3"),
    (r"visual_encoder\.norm\.(weight|bias)", r"vision_model.post_layernorm.\1"),
    (r"(text_encoder\.(?:embeddings|encoder)\..+)", r"\1"),
    (r"(vision_proj|text_proj|itm_head)\.(weight|bias)", r"\1.\2"),
]
# What a BLIP retrieval checkpoint holds besides the model: the momentum encoders and feature queues of its
# training (BLIP_Retrieval), its temperature, and the text encoder's position-id buffer.
_TRAINING_ONLY = re.compile(r"(visual_encoder_m|text_encoder_m|vision_proj_m|text_proj_m)\..+"
                            r"|(image|text|idx|ptr)_queue|temp|text_encoder\.embeddings\.position_ids")


def transformers_key(original: str) -> str | None:
    """The transformers name of an original BLIP key; None for what retrieval does not use; KeyError if unknown."""
    if _TRAINING_ONLY.fullmatch(original):
        return None
    for pattern, replacement in _RENAMES:
        if re.fullmatch(pattern, original):
            return re.sub(pattern, replacement, original)
    raise KeyError(original)


def resize_positions(pos: torch.Tensor, positions: int) -> torch.Tensor:
    """[1, 1 + g², D] → [1, positions, D]: the patch grid's embeddings resized bicubically, the [CLS] row kept, as
    BLIP does when a checkpoint meets another image size (models/vit.py, interpolate_pos_embed)."""
    if pos.shape[1] == positions:
        return pos
    old, new = round((pos.shape[1] - 1) ** 0.5), round((positions - 1) ** 0.5)
    if old * old != pos.shape[1] - 1 or new * new != positions - 1:
        raise ValueError(f"position embeddings of {pos.shape[1]} and {positions} rows are not [CLS] + a square grid")
    grid = pos[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, new * new, -1).to(pos.dtype)], dim=1)


def read_original_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of an original-layout BLIP checkpoint (its `model` entry, as BLIP saves and loads them)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, None, "checkpoint file not found")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = ckpt.get("model") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise InputError(path, "model", "expected BLIP's checkpoint layout: a dict whose 'model' entry is the state dict")
    return state


def convert_original_state(state: dict[str, torch.Tensor], model: torch.nn.Module,
                           source: str | Path = "checkpoint") -> dict[str, torch.Tensor]:
    """Original-layout weights renamed for `model` (a BlipForImageTextRetrieval), position embeddings resized to its
    image size; every model weight must be found and every checkpoint key known."""
    target = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        try:
            name = transformers_key(key)
        except KeyError:
            raise InputError(source, key, "not a key of BLIP's retrieval model (visual_encoder.*, text_encoder.*, "
                                          "vision_proj, text_proj, itm_head, momentum copies, queues)") from None
        if name is None:
            continue
        if name not in target:
            raise InputError(source, key, f"maps to {name}, which the model has not (more layers than its config?)")
        if name == "vision_model.embeddings.position_embedding":
            value = resize_positions(value, target[name].shape[1])
        if tuple(value.shape) != tuple(target[name].shape):
            raise InputError(source, key, f"shape {tuple(value.shape)}, the model's {name} is {tuple(target[name].shape)}")
        out[name] = value.to(target[name].dtype)
    missing = sorted(set(target) - set(out))
    if missing:
        raise InputError(source, None, f"{len(missing)} model weights are not in the checkpoint, first {missing[0]}")
    return out


def convert_checkpoint(checkpoint: str | Path, base: str | Path, output_dir: str | Path,
                       image_size: int = CHATIR_IMAGE_SIZE) -> Path:
    """Write a transformers folder holding the original checkpoint's weights in `base`'s architecture (a BLIP
    retrieval name or folder: config, tokenizer, image processor) at `image_size` px."""
    from transformers import BlipConfig, BlipForImageTextRetrieval, BlipProcessor

    state = read_original_state(checkpoint)
    config = BlipConfig.from_pretrained(str(base))
    config.vision_config.image_size = image_size
    config.vision_config.layer_norm_eps = BLIP_VIT_LAYER_NORM_EPS
    model = BlipForImageTextRetrieval(config)
    model.load_state_dict(convert_original_state(state, model, checkpoint), strict=True)
    processor = BlipProcessor.from_pretrained(str(base))
    processor.image_processor.size = {"height": image_size, "width": image_size}
    with atomic_dir(output_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return Path(output_dir)
