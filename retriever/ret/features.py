"""Per-layer tokens of the frozen towers: cached on disk once (small worlds), or computed live for each batch.

`cache/{split}/` (`build_cache`): `images.npy` [N, layers, 1+P, Dv] and `texts.npy` [N, layers, L, Dt] in float16
and `text_attention.npy` [N, L] (bool), each a memory-mapped file filled batch by batch as the towers make it, in
a temporary folder renamed when complete; `images.json` / `texts.json` (the keys, in row order) and `meta.json`
(`made_by`: the towers' spec and weights hash, the preprocessing, the tokenizer, the layers). `CachedSource`
reads it back by memory map, a batch's rows at a time, and refuses a cache other towers made.

The cache is an option for small worlds only: every layer of ViT-L/14 is 12.6 MB per image (1.6 TB for a 110K
passage corpus). `LiveSource` runs the towers on each batch instead (bf16 under autocast on CUDA), the images
decoded by a DataLoader's workers; `resolve_features` makes it the default for pretrained towers.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from core.data import LoaderOptions, image_batches, make_loader, open_image
from core.device import autocast
from core.errors import InputError
from core.io import atomic_dir, atomic_write_json, read_json
from core.logging import progress
from retriever.ret.model import FrozenTowers, RetConfig, SideInputs, is_pretrained_spec

Item = tuple[str, "str | None"]  # (text, image path or None)
FEATURE_MODES = ("auto", "cache", "live")
CACHE_FORMAT = 2  # 1: np.save of arrays built in memory; 2: memory-mapped files written as made, made_by in meta


def resolve_features(mode: str, encoder_spec: dict, source: str = "config") -> str:
    """'cache' or 'live'. 'auto' caches the towers built from a spec (the Shapes world's: megabytes) and runs
    pretrained towers live, whose every-layer cache would not fit on disk."""
    if mode not in FEATURE_MODES:
        raise InputError(source, "features", f"must be one of {', '.join(FEATURE_MODES)}, got {mode!r}")
    if mode == "auto":
        return "live" if is_pretrained_spec(encoder_spec) else "cache"
    return mode


# ----------------------------------------------------------------------------------------------------------------
# Building the cache


def cache_made_by(towers: FrozenTowers) -> dict[str, Any]:
    """What a cache depends on besides its keys: the towers' weights, the preprocessing, the tokenizer, the layers."""
    tokenizer = towers.encoder.tokenizer
    return {"format": CACHE_FORMAT, "dtype": "float16",
            "towers": {"spec": towers.encoder.spec, "sha256": towers.fingerprint},
            "preprocess": _describe(towers.encoder.preprocess),
            "tokenizer": f"{type(tokenizer).__qualname__}(context_length={getattr(tokenizer, 'context_length', None)})",
            "text_layers": list(range(towers.n_text_layers)), "vision_layers": list(range(towers.n_vision_layers))}


def _describe(transform: Any) -> str:
    return re.sub(r" at 0x[0-9a-f]+", "", repr(transform))  # a function's address changes from run to run


def cache_is_current(folder: str | Path, made_by: dict, texts: Sequence[str], images: Sequence[str]) -> bool:
    """The cache in `folder` was made by the same towers and preprocessing, for exactly these texts and images."""
    folder = Path(folder)
    try:
        return (read_json(folder / "meta.json").get("made_by") == made_by
                and read_json(folder / "texts.json") == list(texts) and read_json(folder / "images.json") == list(images))
    except InputError:
        return False


@dataclass(frozen=True)
class CacheShape:
    """The arrays a cache of n texts and m images holds, known before any tower runs (to refuse a too large one)."""

    n_texts: int
    text_length: int
    text_layers: int
    text_width: int
    n_images: int
    image_tokens: int
    vision_layers: int
    vision_width: int

    @property
    def image_bytes(self) -> int:
        return self.vision_layers * self.image_tokens * self.vision_width * 2  # float16

    @property
    def text_bytes(self) -> int:
        return self.text_layers * self.text_length * self.text_width * 2 + self.text_length

    @property
    def nbytes(self) -> int:
        return self.n_images * self.image_bytes + self.n_texts * self.text_bytes


@torch.no_grad()
def cache_shape(towers: FrozenTowers, texts: Sequence[str], images: Sequence[str], batch_size: int = 1024) -> CacheShape:
    """Shapes of the cache of `texts` and `images`: the longest tokenized text, and the tokens per image (one blank
    image through the vision tower's first layer)."""
    length = 1
    for i in range(0, len(texts), batch_size):
        length = max(length, int((towers.encoder.tokenize(texts[i:i + batch_size]) != 0).sum(1).max()))
    size = towers.encoder.image_size
    blank = towers.encoder.preprocess(Image.new("RGB", (size, size)))[None].to(next(towers.parameters()).device)
    image_tokens = towers.vision_tokens(blank, [0]).shape[2]
    return CacheShape(len(texts), length, towers.n_text_layers, towers.text_width, len(images), image_tokens,
                      towers.n_vision_layers, towers.vision_width)


def check_cache_size(shapes: dict[str, CacheShape], max_gb: float, source: str = "config") -> None:
    """Refuse, before any work, caches that would take more than `max_gb` on disk together."""
    total = sum(s.nbytes for s in shapes.values())
    if total > max_gb * 1e9:
        parts = "; ".join(f"{name}: {s.n_images} images × {s.image_bytes / 1e6:.2f} MB + {s.n_texts} texts × "
                          f"{s.text_bytes / 1e6:.2f} MB" for name, s in shapes.items())
        raise InputError(source, "max_cache_gb", f"the tower-token cache would take {total / 1e9:.2f} GB ({parts}), "
                         f"over the limit of {max_gb:g} GB; run the towers live instead (--features live) or raise "
                         "max_cache_gb")


@torch.no_grad()
def build_cache(towers: FrozenTowers, texts: Sequence[str], images: Sequence[str], folder: str | Path,
                made_by: dict, device: torch.device, batch_size: int = 256, options: LoaderOptions | None = None,
                listed_in: str | Path | None = None, shape: CacheShape | None = None,
                encoder_dir: str | Path | None = None) -> Path:
    """Every layer's tokens of `texts` and `images` (unique keys) into `folder`: float16 memory maps filled batch by
    batch (memory does not grow with the corpus), in a temporary folder that replaces `folder` when complete."""
    folder, texts, images = Path(folder), list(texts), list(images)
    shape = shape or cache_shape(towers, texts, images)
    options = options or LoaderOptions()
    with atomic_dir(folder) as tmp:
        image_feats = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.float16, shape=(
            shape.n_images, shape.vision_layers, shape.image_tokens, shape.vision_width))
        row = 0
        for pixels in image_batches(images, towers.encoder.preprocess, options, batch_size, device, listed_in,
                                    desc=f"tower tokens ({folder.name} images)"):
            with autocast(device):
                block = towers.vision_tokens(pixels.to(device, non_blocking=True), made_by["vision_layers"])
            image_feats[row:row + len(block)] = block.half().cpu().numpy()
            row += len(block)
        image_feats.flush()
        del image_feats
        _text_tokens(towers, texts, made_by["text_layers"], shape, device, 2 * batch_size, tmp,
                     f"tower tokens ({folder.name} texts)")
        atomic_write_json(tmp / "texts.json", texts, indent=None)
        atomic_write_json(tmp / "images.json", images, indent=None)
        atomic_write_json(tmp / "meta.json", {"made_by": made_by,
                                              "encoder": str(Path(encoder_dir).resolve()) if encoder_dir else None,
                                              "n_texts": len(texts), "n_images": len(images)})
    return folder


def _text_tokens(towers: FrozenTowers, texts: list[str], layers: Sequence[int], shape: CacheShape,
                 device: torch.device, batch_size: int, tmp: Path, desc: str) -> None:
    # New memory-mapped files read as zeros: a text shorter than the longest keeps zero padding past its tokens.
    feats = np.lib.format.open_memmap(tmp / "texts.npy", mode="w+", dtype=np.float16,
                                      shape=(shape.n_texts, shape.text_layers, shape.text_length, shape.text_width))
    attention = np.lib.format.open_memmap(tmp / "text_attention.npy", mode="w+", dtype=bool,
                                          shape=(shape.n_texts, shape.text_length))
    for i in progress(range(0, len(texts), batch_size), desc=desc):
        tokens = towers.encoder.tokenize(texts[i:i + batch_size]).to(device)
        with autocast(device):
            t, a = towers.text_tokens(tokens, layers)
        feats[i:i + len(t), :, :t.shape[2]] = t.half().cpu().numpy()
        attention[i:i + len(t), :a.shape[1]] = a.cpu().numpy()
    feats.flush()
    attention.flush()


# ----------------------------------------------------------------------------------------------------------------
# Sources of SideInputs: what a DataLoader's workers load per item, and what the main process makes of a batch


class ItemDataset(torch.utils.data.Dataset):
    """(text, image) items as a source's `load` makes them, one per index (in a DataLoader worker)."""

    def __init__(self, items: Sequence[Item], load: Callable[[Item], Any]):
        self.items, self.load = list(items), load

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.load(self.items[index])


def _as_is(item: Item) -> Item:
    return item


def item_loader(source: "CachedSource | LiveSource", dataset: torch.utils.data.Dataset, options: LoaderOptions,
                device: torch.device | None = None, batch_size: int | None = None,
                batch_sampler: torch.utils.data.Sampler | None = None) -> torch.utils.data.DataLoader:
    """A DataLoader of a source's items (batches as lists). A cache decodes nothing, so its rows are read in the
    main process: a worker would get its own copy of the memory maps for no gain."""
    if not source.decodes:
        options = LoaderOptions(num_workers=0, pin_memory=False, persistent_workers=False)
    return make_loader(dataset, options, batch_size=batch_size, batch_sampler=batch_sampler, device=device,
                       collate_fn=list)


class CachedSource:
    """SideInputs for (text, image) items from a cache folder (memory-mapped, float16 on disk)."""

    decodes = False
    load = staticmethod(_as_is)

    def __init__(self, folder: str | Path, made_by: dict | None = None):
        folder = Path(folder)
        if not (folder / "meta.json").is_file():
            raise InputError(folder, "cache_dir", "no tower-token cache here (run python -m retriever.ret.cache)")
        meta = read_json(folder / "meta.json")
        if made_by is not None and meta.get("made_by") != made_by:
            raise InputError(folder / "meta.json", "made_by", "this cache was made by other towers, preprocessing or "
                             "cache format than the model's; rebuild it (python -m retriever.ret.cache)")
        self.folder, self.meta = folder, meta.get("made_by") or meta
        self.images = np.load(folder / "images.npy", mmap_mode="r")
        self.texts = np.load(folder / "texts.npy", mmap_mode="r")
        self.attention = np.load(folder / "text_attention.npy", mmap_mode="r")
        self.text_row = {t: i for i, t in enumerate(read_json(folder / "texts.json"))}
        self.image_row = {p: i for i, p in enumerate(read_json(folder / "images.json"))}
        self.text_pos = {layer: i for i, layer in enumerate(self.meta["text_layers"])}
        self.vision_pos = {layer: i for i, layer in enumerate(self.meta["vision_layers"])}

    def rows(self, items: Sequence[Item]) -> tuple[np.ndarray, np.ndarray]:
        """Row numbers of each item's text and image (-1 = absent); an item not in the cache is an error."""
        t_rows, i_rows = np.full(len(items), -1), np.full(len(items), -1)
        for k, (text, image) in enumerate(items):
            if text:
                if text not in self.text_row:
                    raise InputError(self.folder / "texts.json", "texts", f"text not cached: {text[:60]!r}")
                t_rows[k] = self.text_row[text]
            if image:
                if image not in self.image_row:
                    raise InputError(self.folder / "images.json", "images", f"image not cached: {image}")
                i_rows[k] = self.image_row[image]
        return t_rows, i_rows

    def _layers(self, wanted: Sequence[int], pos: dict[int, int], kind: str) -> list[int]:
        missing = [layer for layer in wanted if layer not in pos]
        if missing:
            raise InputError(self.folder / "meta.json", f"made_by.{kind}_layers", f"layers {missing} are not cached")
        return [pos[layer] for layer in wanted]

    def side(self, batch: Sequence[Item], cfg: RetConfig) -> SideInputs:
        t_rows, i_rows = self.rows(batch)
        text_mask = torch.from_numpy((t_rows >= 0).astype(np.float32))
        image_mask = torch.from_numpy((i_rows >= 0).astype(np.float32))
        text = attention = vision = None
        if cfg.use_text:
            rows = np.maximum(t_rows, 0)
            attention = np.array(self.attention[rows])
            attention[t_rows < 0] = False
            attention[:, 0] = True  # one valid key even for an absent text (its gates are masked anyway)
            length = int(attention.sum(1).max())
            layers = self._layers(cfg.text_layers, self.text_pos, "text")
            text = torch.from_numpy(self.texts[rows][:, layers, :length].astype(np.float32))
            attention = torch.from_numpy(attention[:, :length].copy())
        if cfg.use_image:
            rows = np.maximum(i_rows, 0)
            layers = self._layers(cfg.vision_layers, self.vision_pos, "vision")
            vision = torch.from_numpy(self.images[rows][:, layers].astype(np.float32))
            vision[i_rows < 0] = 0.0
        return SideInputs(text, attention, vision, text_mask, image_mask)


class _OpenForTowers:
    """Per item, in a DataLoader worker: the text, the preprocessed image (a black one when absent, masked out
    as the reference does), and whether there is an image. An unreadable image is an InputError naming it."""

    def __init__(self, preprocess: Callable[[Image.Image], torch.Tensor], image_size: int,
                 listed_in: str | Path | None = None):
        self.preprocess, self.image_size, self.listed_in = preprocess, image_size, listed_in

    def __call__(self, item: Item) -> tuple[str, torch.Tensor, bool]:
        text, image = item
        if image:
            return text, self.preprocess(open_image(image, self.listed_in)), True
        return text, self.preprocess(Image.new("RGB", (self.image_size, self.image_size))), False


class LiveSource:
    """SideInputs computed by the towers for each batch (corpora too large to cache), in bf16 under autocast on
    CUDA; the images are opened and preprocessed by the DataLoader's workers (`load`)."""

    decodes = True

    def __init__(self, towers: FrozenTowers, device: torch.device, listed_in: str | Path | None = None):
        self.towers, self.device = towers, device
        self.load = _OpenForTowers(towers.encoder.preprocess, towers.encoder.image_size, listed_in)

    @torch.no_grad()
    def side(self, batch: Sequence[tuple[str, torch.Tensor, bool]], cfg: RetConfig) -> SideInputs:
        tokens = self.towers.encoder.tokenize([t or "" for t, _, _ in batch]).to(self.device)
        pixels = torch.stack([p for _, p, _ in batch]).to(self.device, non_blocking=True)
        with autocast(self.device):
            text, attention = self.towers.text_tokens(tokens, cfg.text_layers) if cfg.use_text else (None, None)
            vision = self.towers.vision_tokens(pixels, cfg.vision_layers) if cfg.use_image else None
        return SideInputs(text, attention, vision,
                          torch.tensor([1.0 if t else 0.0 for t, _, _ in batch]),
                          torch.tensor([1.0 if has else 0.0 for _, _, has in batch]))


def open_source(mode: str, cache_dir: str | Path, split: str, towers: FrozenTowers, device: torch.device,
                listed_in: str | Path | None = None) -> CachedSource | LiveSource:
    """The source of one split's tower tokens: its cache (checked against `towers`) or the towers themselves."""
    if mode == "cache":
        if not str(cache_dir):
            raise InputError("config", "cache_dir", "features=cache needs a cache folder (or --features live)")
        return CachedSource(Path(cache_dir) / split, made_by=cache_made_by(towers))
    return LiveSource(towers, device, listed_in)
