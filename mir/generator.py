"""Text-to-image generators behind one interface: `generate(prompts, seeds) -> list[PIL.Image]`.

- `ShapesGenerator`: a small diffusers `UNet2DConditionModel` trained in the project (mir.train_generator)
  on the Shapes training split, conditioned on the caption through the project's dense text tower (pooled
  embedding) and a caption → layout encoder (mir.layout), sampled with DDIM and classifier-free guidance.
  Its folder holds `model.pt` (UNet weights), `generator.json` (UNet and scheduler settings), `text_encoder/`
  (a copy of the dense checkpoint) and `layout_encoder.pt`, so it loads alone.
- `DiffusersGenerator`: any diffusers text-to-image pipeline by hub name or local path (SD3.5, FLUX, ...).

Every image is drawn from a `torch.Generator` seeded per item, so a (prompt, seed) pair always gives
the same image whatever else is in the batch. `ImageCache` keeps generated PNGs under a hash of
(generator, prompt, seed, steps, guidance, size).
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, NamedTuple, Protocol, Sequence

import numpy as np
import torch
from PIL import Image

from core.data import open_image, to_pixels
from core.device import autocast, get_device, pretrained_dtype_kwargs
from core.encoders import DualEncoder, load_dual_encoder
from core.errors import InputError
from core.io import file_digest, json_digest
from core.shapes.world import GRID
from mir.layout import LAYOUT_CHANNELS, LAYOUT_FILE, LayoutEncoder, layout_tokens, load_layout_encoder

GENERATOR_FILE = "generator.json"
STAGE = "mir-generator"

# The UNet denoises 32 px images folded into 8×8 patches of 4×4 pixels (pixel-unshuffle: 48 channels), with two
# coordinate channels added (plain convolutions cannot tell the top-left cell from the bottom-right one) and the
# caption's layout (mir.layout: per grid cell, which shape, colour and size) spread over the patches each cell
# covers. The pooled caption embedding of the dense tower is added to the time embedding ("projection" class
# embedding), so every ResNet block also sees the whole sentence. With the layout in the input, cross-attention
# to the caption's tokens adds cost and no quality (docs/mir.md), so the blocks have none; on 2 CPU cores this
# UNet takes a training step in 2/5 of the time of the cross-attention one (bench/mir_generator_step.py).
SHAPES_UNET: dict[str, Any] = {
    "resolution": 32,
    "patch": 4,
    "layers_per_block": 1,
    "block_out_channels": [96, 192],
    "down_block_types": ["DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "attention_head_dim": 8,
    "norm_num_groups": 16,
    "class_embed_type": "projection",
}
SHAPES_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    # x0-prediction: this early in training an epsilon- or v-model leaves visible noise in every sample, while an
    # x0-model's samples are clean (if soft) images of the right colours in the right cells.
    "prediction_type": "sample",
    "clip_sample": True,
}


class TextToImage(Protocol):
    model_id: str
    steps: int
    guidance: float
    size: int

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image]: ...


class Conditioning(NamedTuple):
    """What the UNet reads of a caption: the dense tower's projected per-token states, its pooled embedding and a
    padding mask; and, when the generator has a layout encoder, per-cell layout probabilities [B, C, 3, 3]."""

    states: torch.Tensor
    pooled: torch.Tensor
    mask: torch.Tensor
    layout: torch.Tensor | None = None


class TextConditioner(torch.nn.Module):
    """The caption as the UNet reads it: the dense text tower, and the caption → layout encoder when there is one."""

    def __init__(self, encoder: DualEncoder, layout: LayoutEncoder | None = None):
        super().__init__()
        self.encoder = encoder
        self.layout = layout

    @property
    def dim(self) -> int:
        return self.encoder.embed_dim

    @property
    def layout_channels(self) -> int:
        return 0 if self.layout is None else LAYOUT_CHANNELS

    @torch.no_grad()
    def forward(self, texts: Sequence[str]) -> Conditioning:
        clip = self.encoder.clip
        tokens = self.encoder.tokenize(texts).to(clip.positional_embedding.device)
        x = clip.token_embedding(tokens) + clip.positional_embedding
        x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask))
        proj = clip.text_projection
        states = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
        pooled = self.encoder.encode_text(tokens, normalize=True)
        mask = tokens != 0  # padding id of the CLIP tokenizer
        layout = None
        if self.layout is not None:  # its own, longer context: a fifth of the Shapes captions exceed the tower's 32
            layout = self.layout.probabilities(layout_tokens(self.encoder.tokenizer, texts).to(tokens.device))
        return Conditioning(states, pooled, mask, layout)


def token_count(encoder: DualEncoder, text: str) -> int:
    """Tokens the text needs, start and end tokens included (before truncation to the context length)."""
    tok = encoder.tokenizer
    inner = getattr(tok, "tokenizer", None)  # open_clip's HFTokenizer wraps a transformers tokenizer
    if hasattr(tok, "encode"):
        return len(tok.encode(text)) + 2
    if inner is not None:
        return len(inner(text)["input_ids"])
    raise InputError(None, "tokenizer", f"cannot count tokens with {type(tok).__name__}")


def context_length(encoder: DualEncoder) -> int:
    return int(getattr(encoder.tokenizer, "context_length", encoder.clip.positional_embedding.shape[0]))


class PatchUNet(torch.nn.Module):
    """A diffusers UNet2DConditionModel over pixel-unshuffled images plus coordinate channels (see SHAPES_UNET) and,
    with `layout_channels`, the caption's per-cell layout spread over the patches each grid cell covers."""

    def __init__(self, resolution: int, patch: int, unet_kwargs: dict[str, Any], layout_channels: int = 0):
        from diffusers import UNet2DConditionModel

        super().__init__()
        if resolution % patch:
            raise InputError(None, "unet.patch", f"{patch} must divide the resolution {resolution}")
        self.resolution, self.patch, self.layout_channels = resolution, patch, layout_channels
        side = resolution // patch
        channels = 3 * patch * patch
        self.unet = UNet2DConditionModel(sample_size=side, in_channels=channels + 2 + layout_channels,
                                         out_channels=channels, **unet_kwargs)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, side), torch.linspace(-1, 1, side), indexing="ij")
        self.register_buffer("coords", torch.stack([ys, xs])[None], persistent=False)
        self.register_buffer("cover", cell_cover(side, GRID), persistent=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        z = torch.nn.functional.pixel_unshuffle(x, self.patch)
        parts = [z, self.coords.expand(len(z), -1, -1, -1).to(z.dtype)]
        if self.layout_channels:
            if cond.layout is None:
                raise ValueError("this UNet reads a layout, but the conditioning has none")
            # Each patch gets the layout of the cells it overlaps, weighted by the overlap.
            parts.append(torch.einsum("yi,bcij,xj->bcyx", self.cover, cond.layout, self.cover).to(z.dtype))
        out = self.unet(torch.cat(parts, dim=1), t, encoder_hidden_states=cond.states, class_labels=cond.pooled,
                        encoder_attention_mask=cond.mask).sample
        return torch.nn.functional.pixel_shuffle(out, self.patch)


def cell_cover(side: int, grid: int) -> torch.Tensor:
    """[side, grid]: the share of each of `side` equal strips that falls in each of `grid` equal strips."""
    edges = torch.linspace(0, 1, side + 1)
    cells = torch.linspace(0, 1, grid + 1)
    lo = torch.maximum(edges[:-1, None], cells[None, :-1])
    hi = torch.minimum(edges[1:, None], cells[None, 1:])
    return (hi - lo).clamp(min=0) * side


def build_unet(spec: dict[str, Any] | None, cond_dim: int, layout_channels: int = 0) -> PatchUNet:
    spec = copy.deepcopy(spec if spec is not None else SHAPES_UNET)
    resolution, patch = int(spec.pop("resolution")), int(spec.pop("patch"))
    spec.update(cross_attention_dim=cond_dim, projection_class_embeddings_input_dim=cond_dim)
    return PatchUNet(resolution, patch, spec, layout_channels)


def noise_for(seeds: Sequence[int], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """One initial latent per seed from its own torch.Generator: an item's image never depends on its batch."""
    out = []
    for s in seeds:
        g = torch.Generator(device="cpu").manual_seed(int(s))
        out.append(torch.randn(shape, generator=g))
    return torch.stack(out).to(device)


class ShapesGenerator:
    """The project's small text-conditioned diffusion model (see mir.train_generator)."""

    def __init__(self, unet: torch.nn.Module, scheduler_config: dict[str, Any], conditioner: TextConditioner,
                 model_id: str, steps: int = 20, guidance: float = 3.0, size: int = 64,
                 device: torch.device | None = None, batch_size: int = 64):
        from diffusers import DDIMScheduler

        self.device = device or get_device()
        self.unet = unet.to(self.device).eval()
        self.conditioner = conditioner.to(self.device).eval()
        self.scheduler = DDIMScheduler.from_config(scheduler_config)
        self.model_id, self.steps, self.guidance, self.size = model_id, steps, guidance, size
        self.batch_size = batch_size

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image]:
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        images: list[Image.Image] = []
        for i in range(0, len(prompts), self.batch_size):
            images += self._generate_batch(list(prompts[i:i + self.batch_size]), list(seeds[i:i + self.batch_size]))
        return images

    def _generate_batch(self, prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        n = len(prompts)
        with autocast(self.device):
            cond = self.conditioner(prompts + [""] * n)
        res = self.unet.resolution
        x = noise_for(seeds, (3, res, res), self.device)
        self.scheduler.set_timesteps(self.steps)
        for t in self.scheduler.timesteps:
            out = self.predict(torch.cat([x, x]), t, cond)
            guided = out[n:] + self.guidance * (out[:n] - out[n:])  # classifier-free guidance
            x = self.scheduler.step(guided, t, x, eta=0.0).prev_sample
        return to_pil(x, self.size)

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The UNet's output (x0 for the Shapes scheduler) at one timestep `t` for every row of `x`."""
        with autocast(self.device):
            return self.unet(x, t.expand(len(x)), cond).float()


def images_to_pixels(images: Sequence[Image.Image], resolution: int) -> torch.Tensor:
    return torch.stack([to_pixels(img, resolution) for img in images])


class PixelImages(torch.utils.data.Dataset):
    """Image files as `to_pixels` tensors, one opened per item (a DataLoader's workers decode them): memory does not
    grow with the split. Items are indices, or the `(epoch, index)` pairs of core.data.EpochBatchSampler."""

    def __init__(self, paths: Sequence[str | Path], resolution: int, listed_in: str | Path | None = None):
        self.paths, self.resolution, self.listed_in = [Path(p) for p in paths], resolution, listed_in

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: int | tuple[int, int]) -> torch.Tensor:
        index = item[1] if isinstance(item, tuple) else item
        return to_pixels(open_image(self.paths[index], self.listed_in), self.resolution)


def to_pil(x: torch.Tensor, size: int) -> list[Image.Image]:
    """[-1, 1] tensors → RGB images of `size` px (bicubic up-sampling from the model's resolution)."""
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for a in arr:
        img = Image.fromarray(a, "RGB")
        out.append(img if img.size[0] == size else img.resize((size, size), Image.BICUBIC))
    return out


class DiffusersGenerator:
    """Any diffusers text-to-image pipeline (by hub name or local path), seeded per image.

    `cpu_offload` keeps each of the pipeline's models on the CPU until its turn (diffusers'
    `enable_model_cpu_offload`): SD3.5's three text encoders, transformer and VAE then never sit on the card
    together, so the pipeline fits beside a 4B chat VLM on a 24 GB card, at the cost of a transfer per model and call.
    """

    def __init__(self, name_or_path: str, steps: int = 28, guidance: float = 3.5, size: int = 512,
                 device: torch.device | None = None, batch_size: int = 4, pipeline: Any = None,
                 cpu_offload: bool = False):
        from diffusers import AutoPipelineForText2Image

        self.device = device or get_device()
        if cpu_offload and self.device.type != "cuda":
            raise InputError(name_or_path, "gen_cpu_offload", f"offloading to the CPU needs a CUDA device, the run has {self.device}")
        # bf16 on CUDA, fp32 on CPU (core.device)
        self.pipe = pipeline if pipeline is not None else AutoPipelineForText2Image.from_pretrained(
            name_or_path, **pretrained_dtype_kwargs(self.device))
        if cpu_offload:
            self.pipe.enable_model_cpu_offload(device=self.device)
        else:
            self.pipe = self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.model_id, self.steps, self.guidance, self.size, self.batch_size = name_or_path, steps, guidance, size, batch_size

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image]:
        images: list[Image.Image] = []
        for i in range(0, len(prompts), self.batch_size):
            batch, batch_seeds = list(prompts[i:i + self.batch_size]), seeds[i:i + self.batch_size]
            gens = [torch.Generator(device=self.device).manual_seed(int(s)) for s in batch_seeds]
            with autocast(self.device):
                out = self.pipe(prompt=batch, generator=gens, num_inference_steps=self.steps,
                                guidance_scale=self.guidance, height=self.size, width=self.size)
            check_sizes(out.images, self.size, self.model_id)
            images += [img.convert("RGB") for img in out.images]
        return images


def check_sizes(images: Sequence[Image.Image], size: int, model_id: str) -> None:
    """Every image at the size asked for: the image cache and the user's comparisons assume it, and a pipeline may
    round a size it cannot make to one it can."""
    wrong = sorted({im.size for im in images if im.size != (size, size)})
    if wrong:
        raise InputError(model_id, "gen_size", f"asked for {size}x{size} px images, the pipeline returned "
                                               f"{', '.join(f'{w}x{h}' for w, h in wrong)}; use a size it supports")


def is_shapes_generator(path: str | Path) -> bool:
    return (Path(path) / GENERATOR_FILE).is_file()


def load_generator(name_or_path: str | Path, steps: int, guidance: float, size: int,
                   device: torch.device | None = None, batch_size: int = 64, cpu_offload: bool = False) -> TextToImage:
    """A trained Shapes generator folder, or else a diffusers pipeline name/path (`cpu_offload`: see DiffusersGenerator)."""
    if is_shapes_generator(name_or_path):
        if cpu_offload:
            raise InputError(name_or_path, "gen_cpu_offload", "the Shapes generator is small and has no offload option")
        return load_shapes_generator(name_or_path, steps, guidance, size, device, batch_size)
    if Path(name_or_path).exists() and not (Path(name_or_path) / "model_index.json").is_file():
        raise InputError(name_or_path, "generator", f"neither a Shapes generator ({GENERATOR_FILE}) nor a diffusers pipeline (model_index.json)")
    return DiffusersGenerator(str(name_or_path), steps, guidance, size, device, batch_size, cpu_offload=cpu_offload)


def load_shapes_generator(folder: str | Path, steps: int = 20, guidance: float = 3.0, size: int = 64,
                          device: torch.device | None = None, batch_size: int = 64) -> ShapesGenerator:
    from core.checkpoint import read_meta

    folder = Path(folder)
    read_meta(folder, stage=STAGE)
    spec = json.loads((folder / GENERATOR_FILE).read_text())
    encoder = load_dual_encoder(folder / "text_encoder")
    layout = load_layout_encoder(folder / LAYOUT_FILE) if (folder / LAYOUT_FILE).is_file() else None
    conditioner = TextConditioner(encoder, layout)
    unet = build_unet(spec["unet"], encoder.embed_dim, conditioner.layout_channels)
    unet.load_state_dict(torch.load(folder / "model.pt", map_location="cpu", weights_only=True))
    model_id = f"shapes-unet:{file_digest(folder / 'model.pt')}"
    if layout is not None:
        model_id += f"+layout:{file_digest(folder / LAYOUT_FILE)}"
    return ShapesGenerator(unet, spec["scheduler"], conditioner, model_id, steps, guidance, size, device, batch_size)


def write_generator_files(folder: Path, unet_spec: dict[str, Any], scheduler_spec: dict[str, Any],
                          conditioner: TextConditioner) -> None:
    """What a checkpoint folder needs besides model.pt to load as a generator on its own."""
    json_text = json.dumps({"type": "shapes", "unet": unet_spec, "scheduler": scheduler_spec}, indent=2)
    (folder / GENERATOR_FILE).write_text(json_text + "\n")
    (folder / "text_encoder").mkdir(exist_ok=True)
    conditioner.encoder.save(folder / "text_encoder")
    if conditioner.layout is not None:
        conditioner.layout.save(folder / LAYOUT_FILE)


def image_key(model_id: str, prompt: str, seed: int, steps: int, guidance: float, size: int) -> str:
    return json_digest([model_id, prompt, int(seed), int(steps), float(guidance), int(size)], chars=20)


class ImageCache:
    """Generated images on disk under a hash of everything that determines them; a hit skips generation."""

    def __init__(self, folder: str | Path, generator: TextToImage):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.generator = generator

    def key(self, prompt: str, seed: int) -> str:
        g = self.generator
        return image_key(g.model_id, prompt, seed, g.steps, g.guidance, g.size)

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.png"

    def get(self, prompts: Sequence[str], seeds: Sequence[int]) -> tuple[list[Image.Image], list[str], int]:
        """Images for (prompt, seed) pairs, generating only the missing ones; returns (images, keys, n_generated)."""
        keys = [self.key(p, s) for p, s in zip(prompts, seeds)]
        todo = [i for i, k in enumerate(keys) if not self.path(k).is_file()]
        if todo:
            made = self.generator.generate([prompts[i] for i in todo], [seeds[i] for i in todo])
            for i, img in zip(todo, made):
                tmp = self.path(keys[i]).with_suffix(".tmp.png")
                img.save(tmp, format="PNG")
                tmp.replace(self.path(keys[i]))
        images = []
        for k in keys:
            with Image.open(self.path(k)) as img:
                images.append(img.convert("RGB"))
        return images, keys, len(todo)


def pixels_hash(img: Image.Image) -> str:
    return hashlib.sha256(np.asarray(img.convert("RGB")).tobytes()).hexdigest()[:16]
