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


def dual_encoder_spec_keys() -> dict[str, Any]:
    """What an encoder spec may hold (core.config.nested_keys): a pretrained model's name and tag, or a custom CLIP's
    sizes with open_clip's own vision and text config fields."""
    from dataclasses import fields

    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    return {"pretrained_name": None, "pretrained": None, "embed_dim": None, "image_size": None,
            "vision": {f.name: None for f in fields(CLIPVisionCfg)}, "text": {f.name: None for f in fields(CLIPTextCfg)}}


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


# ----------------------------------------------------------------------------------------------- image tokens
# What the stages that read the image tower token by token (ReT, the CIR retriever, the modification-text generator)
# get from either kind of tower. A ViT gives its [CLS] + patch tokens. A ResNet (open_clip's ModifiedResNet, as in
# CLIP RN50: `vision.layers` given as a list) gives a residual stage's feature map, flattened row by row into tokens,
# each normalised and marked with its grid position, after one global token (the map's mean, the query CLIP's
# attention pool starts from), so both kinds read as [global] + a g×g grid.


def is_vit_tower(encoder: DualEncoder) -> bool:
    return hasattr(encoder.clip.visual, "transformer")


def is_resnet_tower(encoder: DualEncoder) -> bool:
    return isinstance(encoder.clip.visual, open_clip.modified_resnet.ModifiedResNet)


def _check_token_tower(encoder: DualEncoder) -> None:
    if not (is_vit_tower(encoder) or is_resnet_tower(encoder)):
        raise InputError("model spec", "vision", "image tokens are read from a ViT or a ModifiedResNet tower; this "
                         f"encoder's image tower is {type(encoder.clip.visual).__name__}")


RESNET_STAGES = 4  # ModifiedResNet's residual stages layer1..layer4 (the stem before them is not read)


def _resnet_stage(stage: int | None) -> int:
    """A 0-based residual-stage index (negative counts from the last; None = the last stage)."""
    index = RESNET_STAGES - 1 if stage is None else int(stage)
    if not -RESNET_STAGES <= index < RESNET_STAGES:
        raise InputError("image tokens", "stage", f"a ResNet tower has residual stages 0..{RESNET_STAGES - 1}, "
                         f"got {stage}")
    return index % RESNET_STAGES


def _resnet_stage_width(encoder: DualEncoder, stage: int) -> int:
    return int(getattr(encoder.clip.visual, f"layer{stage + 1}")[-1].bn3.num_features)


def grid_position_embedding(rows: int, cols: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine positions [rows * cols, dim], row-major: the first half of the channels encode the row,
    the second the column, each as the 1-D sinusoids of "Attention Is All You Need" (§3.5) with base 10000 (the
    2-D form of MAE / MoCo v3)."""
    if dim % 4:
        raise InputError("image tokens", "width", f"2-D sine-cosine positions need a width divisible by 4, got {dim}")
    quarter = dim // 4
    freq = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)

    def along(n: int) -> torch.Tensor:
        angle = torch.arange(n, dtype=torch.float64)[:, None] * freq[None]
        return torch.cat([angle.sin(), angle.cos()], dim=1)  # [n, dim / 2]

    row, col = along(rows), along(cols)
    return torch.cat([row[:, None].expand(rows, cols, -1), col[None].expand(rows, cols, -1)], dim=2).reshape(
        rows * cols, dim).float()


def grid_tokens(feature_map: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """[B, C, H, W] → [B, 1 + g*g, C]: the map's mean, then the map (average-pooled to `grid` if given) row by row.

    Each token is layer-normalised over its channels without a learned scale (a ViT's tokens come out of its final
    LayerNorm too), so every token has the same scale and the position added to it, of fixed amplitude, is neither
    drowned nor dominant. Positions are fixed, not learned: the tower is frozen and shared by several readers and
    by token caches, so its tokens must be a function of the image alone (a learned position table would be a
    trained part of each reader, saved with it, and could not be cached); a ViT's patch tokens already carry its
    learned positions, a ResNet's only what zero padding at the borders leaves in its features."""
    x = feature_map.float()
    mean = x.mean(dim=(2, 3))[:, None]  # the whole stage, before any pooling
    if grid is not None and tuple(x.shape[2:]) != tuple(grid):
        x = torch.nn.functional.adaptive_avg_pool2d(x, grid)
    b, c, h, w = x.shape
    cells = torch.nn.functional.layer_norm(x.flatten(2).transpose(1, 2), (c,))
    cells = cells + grid_position_embedding(h, w, c).to(cells.device)
    return torch.cat([torch.nn.functional.layer_norm(mean, (c,)), cells], dim=1)


def image_token_width(encoder: DualEncoder, stage: int | None = None) -> int:
    """The width D of `image_tokens(encoder, pixels, stage)`."""
    _check_token_tower(encoder)
    if is_vit_tower(encoder):
        return int(encoder.clip.visual.ln_post.normalized_shape[0])
    return _resnet_stage_width(encoder, _resnet_stage(stage))


def image_tokens(encoder: DualEncoder, pixels: torch.Tensor, stage: int | None = None) -> torch.Tensor:
    """One token set [B, 1 + N, D] per image: a ViT's [CLS] + patch tokens after `ln_post` (`stage` must be None);
    a ResNet's residual stage `stage` (0-based, default the last) as `grid_tokens`."""
    _check_token_tower(encoder)
    visual = encoder.clip.visual
    if is_vit_tower(encoder):
        if stage is not None:
            raise InputError("image tokens", "stage", "a ViT tower gives its last layer's tokens; a stage is chosen "
                             "only for a ResNet tower")
        return visual.ln_post(visual.transformer(visual._embeds(pixels)))
    index = _resnet_stage(stage)
    maps = visual.forward_intermediates(pixels, indices=[index + 1], stop_early=True, intermediates_only=True)
    return grid_tokens(maps["image_intermediates"][0])


def image_token_layers(encoder: DualEncoder) -> int:
    """How many token sets `layer_image_tokens` can read: a ViT's blocks, a ResNet's residual stages."""
    _check_token_tower(encoder)
    return len(encoder.clip.visual.transformer.resblocks) if is_vit_tower(encoder) else RESNET_STAGES


def spec_image_token_layers(spec: dict[str, Any]) -> int | None:
    """`image_token_layers` read from an encoder spec before the tower is built (None for a named architecture)."""
    layers = spec.get("vision", {}).get("layers")
    return RESNET_STAGES if isinstance(layers, (list, tuple)) else layers


def layer_token_width(encoder: DualEncoder) -> int:
    """The width D of `layer_image_tokens`: a ViT's residual stream; a ResNet's widest (last) stage, to which the
    narrower stages are zero-padded."""
    _check_token_tower(encoder)
    visual = encoder.clip.visual
    if is_vit_tower(encoder):
        return int(getattr(visual, "width", None) or visual.transformer.width)
    return max(_resnet_stage_width(encoder, s) for s in range(RESNET_STAGES))


def layer_image_tokens(encoder: DualEncoder, pixels: torch.Tensor, layers: Sequence[int]) -> torch.Tensor:
    """Per-layer token sets [B, n_layers, 1 + P, D] (ReT's reading of every layer).

    ViT: block `l`'s [CLS] + patch tokens (residual stream, no final LN), as Hugging Face's CLIP hidden_states give
    them. ResNet: residual stage `l` (0-based) as `grid_tokens`, every stage average-pooled to the last stage's
    grid, so that the sets stack into one tensor (and one cache array) whichever layers are read, and zero-padded to
    the last stage's width. Zero padding is the lossless, parameter-free way to a common width: the reader's trained
    per-layer adapter is the projection (a fixed random one would lose part of the wider stages, a trained one here
    would make the tokens depend on a reader)."""
    _check_token_tower(encoder)
    visual = encoder.clip.visual
    if is_vit_tower(encoder):
        out = visual.forward_intermediates(pixels, indices=list(layers), intermediates_only=True, output_fmt="NLC",
                                           output_extra_tokens=True)
        patches = torch.stack(out["image_intermediates"], 1)
        prefix = out.get("image_intermediates_prefix")
        if prefix:
            patches = torch.cat([torch.stack(prefix, 1), patches], 2)
        return patches
    stages = [_resnet_stage(layer) for layer in layers]
    grid = (int(visual.image_size) // 32,) * 2  # the last stage's: a 4× stem, then strides 1, 2, 2, 2
    maps = visual.forward_intermediates(pixels, indices=[s + 1 for s in stages], stop_early=True,
                                        intermediates_only=True)["image_intermediates"]
    by_stage = dict(zip(sorted(set(stages)), maps))  # open_clip returns each stage once, in depth order
    width = layer_token_width(encoder)
    sets = [grid_tokens(by_stage[s], grid) for s in stages]
    return torch.stack([torch.nn.functional.pad(t, (0, width - t.shape[-1])) for t in sets], 1)


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

