"""Triplets (the CIR stage's `CIRTriplet`) and image corpora of the iterative loop. Original triplets come from the
CIRR-layout files the CIR stage writes (read through its loader); augmented ones from `augmented_samples_iter_N.json`.

A corpus names the images of some splits. The embedding model prepares an `ImageSource` of them once per run:
a float16 token cache on disk (`{cache_dir}/{name}-tokens*.npy`, core.io's EmbeddingWriter format, with what made
it) when its image encoder is frozen, the image files themselves otherwise. Either is read one image per item by
DataLoader workers (`Corpus.batches`), so no split's pixels or tokens are held in memory.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
import weakref
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from cir.data import CIRTriplet as Triplet  # the one triplet type, re-exported for the loop's modules
from core.data import LoaderOptions, make_loader, open_image
from core.device import autocast
from core.distributed import DistInfo, barrier, broadcast_object, shard_range
from core.io import EmbeddingWriter, embeddings_made_by, open_embeddings
from core.logging import progress

if TYPE_CHECKING:
    from cir.iterative.backbones import EmbeddingBackbone

SINGLE = DistInfo()  # one process, no torchrun



class ImageSource(torch.utils.data.Dataset):
    """What an embedding model reads of each corpus image: one item per image, in the corpus' order."""

    def batch(self, indices: Sequence[int]) -> Any:
        raise NotImplementedError


class ImageFiles(ImageSource):
    """The images themselves, decoded when asked for (core.data.open_image): for a model whose vision tower trains,
    so nothing can be computed ahead. A batch is a list of RGB PIL images."""

    def __init__(self, paths: Sequence[Path], listed_in: Sequence[Path | None]):
        self.paths, self.listed_in = list(paths), list(listed_in)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Image.Image:
        return open_image(self.paths[index], self.listed_in[index])

    def batch(self, indices: Sequence[int]) -> list[Image.Image]:
        return [self[i] for i in indices]


class ImagePixels(ImageSource):
    """The images decoded and preprocessed when asked for: for a frozen encoder that runs live on each batch.
    A batch is a tensor [B, 3, H, W]."""

    def __init__(self, paths: Sequence[Path], listed_in: Sequence[Path | None], preprocess: Callable):
        self.paths, self.listed_in, self.preprocess = list(paths), list(listed_in), preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.preprocess(open_image(self.paths[index], self.listed_in[index]))

    def batch(self, indices: Sequence[int]) -> torch.Tensor:
        return torch.stack([self[i] for i in indices])


class TokenCache(ImageSource):
    """A frozen image encoder's tokens [N, T, D], stored float16 as rows of T·D (core.io.EmbeddingWriter: one shard
    per rank that wrote it) and opened by memory map in each process that reads it (a DataLoader worker opens its
    own). A batch is a float32 tensor [B, T, D] of the rows asked for."""

    def __init__(self, prefix: Path, n: int, token_shape: Sequence[int]):
        self.prefix, self.n, self.token_shape = Path(prefix), n, tuple(int(s) for s in token_shape)
        self._rows: Any = None

    def __getstate__(self) -> dict[str, Any]:
        # A memory map is not sent to a worker process: the worker maps the file itself.
        return {**self.__dict__, "_rows": None}

    @property
    def rows(self) -> Any:
        if self._rows is None:
            self._rows = open_embeddings(self.prefix)[0]
        return self._rows

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.batch([index])[0]

    def batch(self, indices: Sequence[int]) -> torch.Tensor:
        block = np.asarray(self.rows[np.asarray(indices, dtype=np.int64)], dtype=np.float32)
        return torch.from_numpy(block).view(len(indices), *self.token_shape)


class _BatchItems(torch.utils.data.Dataset):
    """Item k: (each index list of specs[k][0] made into a batch of the source, specs[k][1] as it is); a whole batch
    is made inside a worker."""

    def __init__(self, source: ImageSource, specs: Sequence[tuple[Sequence[Sequence[int]], Any]]):
        self.source, self.specs = source, list(specs)

    def __len__(self) -> int:
        return len(self.specs)

    def __getitem__(self, k: int) -> tuple[list[Any], Any]:
        indices, payload = self.specs[k]
        return [self.source.batch(ix) for ix in indices], payload


def _as_is(item: Any) -> Any:
    return item


class Corpus:
    """Image names in a fixed order, their files (and the split file listing each, for error messages), and what
    the backbone prepared of each. `cache_dir` holds the token cache; without one a private temporary folder is
    used (one process only: under torchrun the ranks must share the folder)."""

    def __init__(self, paths: dict[str, Path], listed_in: dict[str, Path] | None = None,
                 cache_dir: str | Path | None = None, name: str = "corpus", options: LoaderOptions | None = None):
        self.names = sorted(paths)
        self.paths = dict(paths)
        self.listed_in = dict(listed_in or {})
        self.index = {n: i for i, n in enumerate(self.names)}
        self.options = options or LoaderOptions()
        self.name = name
        if cache_dir is None:
            cache_dir = tempfile.mkdtemp(prefix="cir-iterative-cache-")
            weakref.finalize(self, shutil.rmtree, cache_dir, True)
        self.cache_dir = Path(cache_dir)
        self.prepared: ImageSource | None = None
        self.prepared_key: str | None = None

    def prepare(self, backbone: "EmbeddingBackbone", info: DistInfo = SINGLE) -> None:
        """Prepare every image for `backbone`, unless it was prepared for an identical frozen part already.
        Under torchrun every rank calls it (a token cache is written in shards, one per rank)."""
        key = backbone.prepared_key()
        if key != self.prepared_key:
            self.prepared, self.prepared_key = backbone.prepare_images(self, info), key

    def batch(self, names: Sequence[str]) -> Any:
        """The prepared batch of these images, read in this process (small batches; passes use `batches`)."""
        return self.prepared.batch([self.index[n] for n in names])

    def batches(self, specs: Sequence[tuple[Sequence[Sequence[str]], Any]], device: torch.device | None = None,
                desc: str = "", source: ImageSource | None = None) -> Iterator[tuple[list[Any], Any]]:
        """For each (name lists, payload) of `specs`, in order: (the batch of each name list, payload), made by the
        DataLoader's workers (core.data.make_loader with this corpus' options) from `source` (default: what the
        backbone prepared; `files()` for the images themselves)."""
        indexed = [([[self.index[n] for n in names] for names in lists], payload) for lists, payload in specs]
        loader = make_loader(_BatchItems(source or self.prepared, indexed), self.options, batch_size=None,
                             device=device, collate_fn=_as_is)
        return iter(progress(loader, desc=desc, unit="batch", enabled=bool(desc)))

    def image(self, name: str) -> Image.Image:
        return open_image(self.paths[name], self.listed_in.get(name))

    def files(self) -> ImageFiles:
        return ImageFiles([self.paths[n] for n in self.names], [self.listed_in.get(n) for n in self.names])

    def pixels(self, preprocess: Callable) -> ImagePixels:
        return ImagePixels([self.paths[n] for n in self.names], [self.listed_in.get(n) for n in self.names], preprocess)

    def fingerprint(self) -> str:
        """The image list a cache was made from: names, files and their sizes, in order."""
        listing = [(n, str(self.paths[n]), self.paths[n].stat().st_size) for n in self.names]
        return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]


def describe_transform(transform: Any) -> str:
    """A process-independent description of a preprocessing function (its repr without memory addresses, plus the
    image processor's settings when it wraps one), for a cache's record of what made it."""
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", repr(transform))
    processor = getattr(transform, "processor", None)
    return text + (f" {processor!r}" if processor is not None else "")


def token_cache(corpus: Corpus, encode: Callable[[torch.Tensor], torch.Tensor], preprocess: Callable,
                made_by: dict[str, Any], batch_size: int, device: torch.device, info: DistInfo = SINGLE) -> TokenCache:
    """The corpus' tokens under `encode` (a frozen image encoder, pixels [B, 3, H, W] → tokens [B, T, D]), from the
    cache on disk when it records the same `made_by` (encoder, preprocessing) and image list, else computed now
    inside autocast, each rank its shard of the images, and written float16 as they are made."""
    prefix = corpus.cache_dir / f"{corpus.name}-tokens"
    made_by = {**made_by, "images": corpus.fingerprint()}
    found = _cached_shape(prefix, made_by, len(corpus.names)) if info.is_main else None
    shape = broadcast_object(found, info)
    if shape is None:
        shape = _write_tokens(prefix, corpus, encode, preprocess, made_by, batch_size, device, info)
    return TokenCache(prefix, len(corpus.names), shape)


def _cached_shape(prefix: Path, made_by: dict[str, Any], n: int) -> list[int] | None:
    """The token shape of a complete cache made by `made_by`, else None (absent, other maker, torn)."""
    stored = embeddings_made_by(prefix)
    if {k: stored.get(k) for k in made_by} != made_by or "token_shape" not in stored:
        return None
    try:
        rows, _ = open_embeddings(prefix)
    except (OSError, ValueError):  # a shard of a killed run is missing or torn: rebuild
        return None
    return stored["token_shape"] if len(rows) == n else None


@torch.no_grad()
def _write_tokens(prefix: Path, corpus: Corpus, encode: Callable, preprocess: Callable, made_by: dict[str, Any],
                  batch_size: int, device: torch.device, info: DistInfo) -> list[int]:
    names = corpus.names
    first = preprocess(corpus.image(names[0]))[None].to(device)
    with autocast(device):
        shape = list(encode(first).shape[1:])  # every rank knows it, also one whose shard is empty
    rows = shard_range(len(names), info)
    mine = [names[i] for i in rows]
    writer = EmbeddingWriter(prefix, len(mine), int(np.prod(shape)), info.rank, info.world_size)
    dataset = ImagePixels([corpus.paths[n] for n in mine], [corpus.listed_in.get(n) for n in mine], preprocess)
    try:
        loader = make_loader(dataset, corpus.options, batch_size=batch_size, device=device)
        for pixels in progress(loader, desc="image tokens", unit="batch", enabled=info.is_main):
            with autocast(device):
                tokens = encode(pixels.to(device, non_blocking=True))
            writer.write(tokens.float().cpu().numpy().reshape(len(tokens), -1))
    except BaseException:
        writer.abort()
        raise
    # Rank 0 writes the manifest (with what made the cache) last, once every shard is complete.
    if not info.is_main:
        writer.close(mine, made_by)
    barrier(info)
    if info.is_main:
        writer.close(mine, {**made_by, "token_shape": shape})
    barrier(info)
    return shape


def load_split(data_dir: str | Path, image_root: str | Path | None, split: str,
               require_targets: bool = True) -> tuple[list[Triplet], dict[str, Path]]:
    """The triplets and the images of one CIRR-layout split, through the CIR stage's validating loader.
    `image_root` empty = `{data_dir}/img_raw`, as CIRR ships; `require_targets=False` admits a split whose targets
    are hidden (CIRR test1: evaluation writes its server files only)."""
    from cir.data import load_cirr

    loaded = load_cirr(data_dir, split, image_root or None, require_targets=require_targets)
    triplets = [replace(t, pairid=str(t.pairid)) for t in loaded.triplets]
    return triplets, dict(loaded.images)


def split_listing(data_dir: str | Path, split: str) -> Path:
    """The image_splits file that lists a split's images (named in the error about a bad image)."""
    from cir.data import cirr_files

    return cirr_files(data_dir, split)[1]
