"""The dense dual encoder, built through open_clip: a small custom CLIP from a config dict (the Shapes world)
or a pretrained model by name (`{"pretrained_name": "ViT-B-32-quickgelu", "pretrained": "openai"}`) for real runs.
A trained encoder is saved as a folder (`encoder.json` + `model.pt`) that reloads without its training config.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import open_clip
import torch
from PIL import Image

from core.errors import InputError
from core.io import atomic_write_json

# A small ViT + text transformer that trains from scratch on 64 px Shapes images in minutes on a CPU.
SHAPES_ENCODER: dict[str, Any] = {
    "embed_dim": 128,
    "image_size": 64,
    "vision": {"layers": 4, "width": 128, "patch_size": 8, "head_width": 32, "mlp_ratio": 2.0},
    "text": {"context_length": 32, "width": 128, "heads": 4, "layers": 4, "mlp_ratio": 2.0},
}


class DualEncoder(torch.nn.Module):
    """An open_clip CLIP with its preprocessing and tokenizer attached."""

    def __init__(self, clip: torch.nn.Module, preprocess: Callable[[Image.Image], torch.Tensor],
                 tokenizer: Callable[..., torch.Tensor], spec: dict[str, Any]):
        super().__init__()
        self.clip = clip
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.spec = copy.deepcopy(spec)

    @property
    def embed_dim(self) -> int:
        return int(self.clip.text_projection.shape[-1]) if hasattr(self.clip, "text_projection") else self.spec["embed_dim"]

    @property
    def image_size(self) -> int:
        size = self.clip.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.clip.encode_image(pixels, normalize=normalize)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.clip.encode_text(tokens, normalize=normalize)

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.encode_image(pixels), self.encode_text(tokens), self.clip.logit_scale.exp()

    def similarity(self, pixels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of each text to each image: [n_texts, n_images]."""
        return self.encode_text(tokens) @ self.encode_image(pixels).T

    def write_spec(self, folder: str | Path) -> None:
        """Write `encoder.json`, which with the checkpoint's `model.pt` makes the folder loadable alone."""
        atomic_write_json(Path(folder) / "encoder.json", self.spec)

    def save(self, folder: str | Path) -> None:
        self.write_spec(folder)
        torch.save(self.state_dict(), Path(folder) / "model.pt")


def build_dual_encoder(spec: dict[str, Any] | None = None) -> DualEncoder:
    spec = copy.deepcopy(spec if spec is not None else SHAPES_ENCODER)
    if "pretrained_name" in spec:
        require_matching_activation(spec)
        clip, _, preprocess = open_clip.create_model_and_transforms(
            spec["pretrained_name"], pretrained=spec.get("pretrained"))
        tokenizer = open_clip.get_tokenizer(spec["pretrained_name"])
        return DualEncoder(clip, preprocess, tokenizer, spec)
    _check_spec(spec)
    vision = dict(spec["vision"], image_size=spec["image_size"])
    text = dict(spec["text"], vocab_size=spec["text"].get("vocab_size", 49408))
    clip = open_clip.model.CLIP(embed_dim=spec["embed_dim"], vision_cfg=vision, text_cfg=text)
    preprocess = open_clip.image_transform(spec["image_size"], is_train=False)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=text["context_length"])
    return DualEncoder(clip, preprocess, tokenizer, spec)


def require_matching_activation(spec: dict[str, Any]) -> None:
    """Refuse weights trained with QuickGELU (OpenAI's CLIP) in a config that builds GELU towers: open_clip loads
    them into plain `ViT-L-14` with only a warning, and every feature is then wrong. `ViT-L-14-quickgelu` is right."""
    name, tag = spec["pretrained_name"], spec.get("pretrained")
    trained_quick = bool(tag and open_clip.get_pretrained_cfg(name, tag).get("quick_gelu"))
    if trained_quick and not (open_clip.get_model_config(name) or {}).get("quick_gelu"):
        raise InputError("model spec", "pretrained_name", f"the {tag!r} weights of {name} were trained with QuickGELU, "
                         f"this config builds GELU towers; use '{name}-quickgelu'")


def require_vit_image_tower(encoder: DualEncoder, source: str | Path | None, reader: str) -> None:
    """Stages that read the image tower's patch tokens (ReT, the CIR retriever, the modification-text generator)
    need a ViT; a ResNet tower (`vision.layers` given as a list) has feature maps of a different width per stage."""
    if not hasattr(encoder.clip.visual, "transformer"):
        raise InputError(source, "model.vision", f"{reader} reads a ViT image tower's patch tokens; this encoder's "
                         f"image tower is {type(encoder.clip.visual).__name__}")


def load_dual_encoder(folder: str | Path, map_location: str | torch.device = "cpu") -> DualEncoder:
    """Rebuild a saved encoder from `encoder.json` and load `model.pt` (a checkpoint folder works too)."""
    folder = Path(folder)
    spec_path = folder / "encoder.json"
    if not spec_path.is_file():
        raise InputError(spec_path, None, "not a dual-encoder folder (encoder.json is missing)")
    spec = json.loads(spec_path.read_text())
    if "pretrained_name" in spec and not (folder / "model.pt").is_file():
        return build_dual_encoder(spec)
    spec.pop("pretrained", None)  # the fine-tuned weights below replace any pretrained download
    model = build_dual_encoder(spec) if "pretrained_name" not in spec else _untrained_named(spec)
    state = torch.load(folder / "model.pt", map_location=map_location, weights_only=True)
    model.load_state_dict(state)
    return model


def _untrained_named(spec: dict[str, Any]) -> DualEncoder:
    clip, _, preprocess = open_clip.create_model_and_transforms(spec["pretrained_name"], pretrained=None)
    return DualEncoder(clip, preprocess, open_clip.get_tokenizer(spec["pretrained_name"]), spec)


def _check_spec(spec: dict[str, Any]) -> None:
    for key in ("embed_dim", "image_size", "vision", "text"):
        if key not in spec:
            raise InputError("model spec", key, "missing (a custom encoder needs embed_dim, image_size, vision, text)")
    if spec["image_size"] % spec["vision"].get("patch_size", 16):
        raise InputError("model spec", "vision.patch_size", "must divide image_size")

