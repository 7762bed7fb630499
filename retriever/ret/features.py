"""Per-layer tokens of the frozen towers, computed once and cached, or computed live for each batch.

The towers never change, so for the Shapes world (and any corpus that fits on disk) every layer's tokens
of every image and text are computed once (`build_cache`) and every variant (ReT and its ablations)
trains and evaluates from `cache/{split}/`: `images.npy` [N, layers, 1+P, Dv] and `texts.npy`
[N, layers, L, Dt] in float16, `text_attention.npy` [N, L], `images.json` / `texts.json` (the keys, in
row order) and `meta.json`. `LiveSource` runs the towers instead (large real corpora), with the same output.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from core.device import autocast
from core.errors import InputError
from core.io import atomic_dir, atomic_write_json, read_json
from core.logging import progress
from retriever.ret.model import FrozenTowers, RetConfig, SideInputs

Item = tuple[str, "str | None"]  # (text, image path or None)


@torch.no_grad()
def _image_tokens(towers: FrozenTowers, paths: Sequence[str], layers: Sequence[int], device: torch.device,
                  batch_size: int, desc: str) -> np.ndarray:
    out = []
    for i in progress(range(0, len(paths), batch_size), desc=desc):
        pixels = []
        for path in paths[i:i + batch_size]:
            with Image.open(path) as img:
                pixels.append(towers.encoder.preprocess(img.convert("RGB")))
        with autocast(device):
            out.append(towers.vision_tokens(torch.stack(pixels).to(device), layers).half().cpu().numpy())
    return np.concatenate(out)


@torch.no_grad()
def _text_tokens(towers: FrozenTowers, texts: Sequence[str], layers: Sequence[int], device: torch.device,
                 batch_size: int, desc: str) -> tuple[np.ndarray, np.ndarray]:
    tokens = towers.encoder.tokenize(texts)
    length = int((tokens != 0).sum(1).max())
    feats = np.zeros((len(texts), len(layers), length, towers.text_width), dtype=np.float16)
    attention = np.zeros((len(texts), length), dtype=bool)
    for i in progress(range(0, len(texts), batch_size), desc=desc):
        with autocast(device):
            t, a = towers.text_tokens(tokens[i:i + batch_size].to(device), layers)
        feats[i:i + len(t), :, :t.shape[2]] = t.half().cpu().numpy()
        attention[i:i + len(t), :a.shape[1]] = a.cpu().numpy()
    return feats, attention


def cache_meta(encoder_dir: str | Path, towers: FrozenTowers) -> dict:
    """What a cache depends on: the encoder's weights file (path, size, mtime) and the layers stored."""
    weights = Path(encoder_dir) / "model.pt"
    stat = weights.stat() if weights.is_file() else None
    return {"encoder": str(Path(encoder_dir).resolve()), "weights_size": stat.st_size if stat else None,
            "weights_mtime": stat.st_mtime if stat else None,
            "text_layers": list(range(towers.n_text_layers)), "vision_layers": list(range(towers.n_vision_layers))}


def cache_is_current(folder: str | Path, meta: dict, texts: Sequence[str], images: Sequence[str]) -> bool:
    folder = Path(folder)
    try:
        old = read_json(folder / "meta.json")
        return (old == meta and read_json(folder / "texts.json") == list(texts)
                and read_json(folder / "images.json") == list(images))
    except InputError:
        return False


def build_cache(towers: FrozenTowers, texts: Sequence[str], images: Sequence[str], folder: str | Path, meta: dict,
                device: torch.device, batch_size: int = 256) -> Path:
    """Every layer's tokens of `texts` and `images` (unique keys) into `folder`, atomically."""
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        image_feats = _image_tokens(towers, list(images), meta["vision_layers"], device, batch_size,
                                    f"tower tokens ({folder.name} images)")
        np.save(tmp / "images.npy", image_feats)
        del image_feats
        text_feats, attention = _text_tokens(towers, list(texts), meta["text_layers"], device, 2 * batch_size,
                                             f"tower tokens ({folder.name} texts)")
        np.save(tmp / "texts.npy", text_feats)
        np.save(tmp / "text_attention.npy", attention)
        atomic_write_json(tmp / "texts.json", list(texts), indent=None)
        atomic_write_json(tmp / "images.json", list(images), indent=None)
        atomic_write_json(tmp / "meta.json", meta)
    return folder


class CachedSource:
    """SideInputs for (text, image) items from a cache folder (memory-mapped, float16 on disk)."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        if not (folder / "meta.json").is_file():
            raise InputError(folder, "cache_dir", "no tower-token cache here (run python -m retriever.ret.cache)")
        self.folder = folder
        self.images = np.load(folder / "images.npy", mmap_mode="r")
        self.texts = np.load(folder / "texts.npy", mmap_mode="r")
        self.attention = np.load(folder / "text_attention.npy")
        self.text_row = {t: i for i, t in enumerate(json.loads((folder / "texts.json").read_text()))}
        self.image_row = {p: i for i, p in enumerate(json.loads((folder / "images.json").read_text()))}

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

    def side(self, items: Sequence[Item], cfg: RetConfig) -> SideInputs:
        t_rows, i_rows = self.rows(items)
        text_mask = torch.from_numpy((t_rows >= 0).astype(np.float32))
        image_mask = torch.from_numpy((i_rows >= 0).astype(np.float32))
        text = attention = vision = None
        if cfg.use_text:
            rows = np.maximum(t_rows, 0)
            attention = self.attention[rows]
            attention[t_rows < 0] = False
            attention[:, 0] = True  # one valid key even for an absent text (its gates are masked anyway)
            length = int(attention.sum(1).max())
            text = torch.from_numpy(self.texts[rows][:, cfg.text_layers, :length].astype(np.float32))
            attention = torch.from_numpy(attention[:, :length].copy())
        if cfg.use_image:
            rows = np.maximum(i_rows, 0)
            vision = torch.from_numpy(self.images[rows][:, cfg.vision_layers].astype(np.float32))
            vision[i_rows < 0] = 0.0
        return SideInputs(text, attention, vision, text_mask, image_mask)


class LiveSource:
    """SideInputs computed by the towers for each batch (corpora too large to cache)."""

    def __init__(self, towers: FrozenTowers, device: torch.device):
        self.towers, self.device = towers, device

    def side(self, items: Sequence[Item], cfg: RetConfig) -> SideInputs:
        size = self.towers.encoder.image_size
        pixels = []
        for text, image in items:
            if image and not Path(image).is_file():
                raise InputError(image, "image", "image file not found")
            if image:
                with Image.open(image) as img:
                    pixels.append(self.towers.encoder.preprocess(img.convert("RGB")))
            else:
                pixels.append(self.towers.encoder.preprocess(Image.new("RGB", (size, size))))
        tokens = self.towers.encoder.tokenize([t or "" for t, _ in items]).to(self.device)
        text, attention = self.towers.text_tokens(tokens, cfg.text_layers) if cfg.use_text else (None, None)
        vision = self.towers.vision_tokens(torch.stack(pixels).to(self.device), cfg.vision_layers) if cfg.use_image else None
        return SideInputs(text, attention, vision,
                          torch.tensor([1.0 if t else 0.0 for t, _ in items]),
                          torch.tensor([1.0 if i else 0.0 for _, i in items]))
