"""Patch tokens of the frozen image encoder for every CIR step (generator, synthesis, retriever, evaluation).

Two sources with one interface: `get(names, device)` gives float32 tokens [B, T, D] of the named images, and
`batches(name_lists)` walks a run's batches, yielding for each list a source that holds at least its images.

- "cache" (`token_bank`, the default; right for the Shapes world): the tokens as float16 on disk, written batch by
  batch as the encoder makes them, one `{prefix}.{tag}.npy` per run (`{prefix}.{tag}.r{rank}of{world}.npy` per rank
  under torchrun, each rank encoding its contiguous share), under a temporary name then renamed; `{prefix}.json`
  says what made them (encoder fingerprint, preprocessing, image list) and which files hold them. They are read
  back by memory map, only the rows a batch asks for; a cache made by another encoder, preprocessing or image list
  is rebuilt. float16 rounding (about 3 significant digits) is the only difference from running the tower.
- "live" (`LiveTokens`; for real towers, e.g. BLIP-2's ViT-g, whose CIRR-train cache would be 12 GB): the
  tower runs per batch, in core.device.autocast (bf16 on CUDA), on images a DataLoader decodes in its workers.

Embedding functions still run from tokens (`encode_*_from_tokens`), the same code `encode_*` (pixels) runs.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from core.data import LoaderOptions, image_batches, make_loader, open_image
from core.distributed import DistInfo, barrier, broadcast_object, shard_range
from core.errors import InputError
from core.io import atomic_write_json, read_json
from core.modtext import ImageTokens

MODES = ("cache", "live")
CACHE_DTYPE = np.float16


class BatchTokens:
    """Tokens of a few images held on the device, by name (what a live source yields for one batch)."""

    def __init__(self, names: Sequence[str], tokens: torch.Tensor):
        self.tokens = tokens
        self.index = {n: i for i, n in enumerate(names)}

    def get(self, names: Sequence[str], device: torch.device | str) -> torch.Tensor:
        rows = torch.tensor([self.index[n] for n in names], device=self.tokens.device)
        return self.tokens[rows].to(device=device, dtype=torch.float32)


class TokenBank:
    """Cached tokens [N, T, D] (float16, memory-mapped shards in row order) with a name → row index; `get` reads only
    the asked rows and returns them as float32 on the device."""

    def __init__(self, names: Sequence[str], shards: Sequence[np.ndarray]):
        self.names, self.shards = list(names), list(shards)
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])
        if self.starts[-1] != len(self.names):
            raise ValueError(f"{self.starts[-1]} cached rows for {len(self.names)} images")
        self.index = {n: i for i, n in enumerate(self.names)}

    def __len__(self) -> int:
        return len(self.names)

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """Rows by position, read from whichever shards hold them (float16, in the asked order)."""
        shard = np.searchsorted(self.starts, rows, side="right") - 1
        first = self.shards[int(shard[0])]
        out = np.empty((len(rows), *first.shape[1:]), dtype=first.dtype)
        for s in np.unique(shard):
            mask = shard == s
            out[mask] = self.shards[s][rows[mask] - self.starts[s]]
        return out

    def get(self, names: Sequence[str], device: torch.device | str) -> torch.Tensor:
        rows = np.fromiter((self.index[n] for n in names), dtype=np.int64, count=len(names))
        # float16 crosses to the device (half the bytes), float32 is made there
        return torch.from_numpy(self.rows(rows)).to(device).float()

    def batches(self, name_lists: Iterable[Sequence[str]]) -> Iterator["TokenBank"]:
        for _ in name_lists:
            yield self


class NamedImages(torch.utils.data.Dataset):
    """Item `name` → the preprocessed image, opened from disk when asked for (a live source's DataLoader reads it)."""

    def __init__(self, images: Mapping[str, Path], preprocess, listed_in: str | Path | None = None):
        self.images, self.preprocess, self.listed_in = dict(images), preprocess, listed_in

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.preprocess(open_image(self.images[name], self.listed_in))


class LiveTokens:
    """The frozen tower run per batch, nothing cached: `batches` decodes each batch's images in DataLoader workers
    (prefetching while the previous batch trains) and encodes them in core.device.autocast."""

    def __init__(self, encoder: ImageTokens, images: Mapping[str, Path], options: LoaderOptions | None = None,
                 device: torch.device | None = None, listed_in: str | Path | None = None):
        self.encoder, self.options = encoder, options or LoaderOptions()
        self.dataset = NamedImages(images, encoder.preprocess, listed_in)
        self.device = device or next(encoder.model.parameters()).device

    def __len__(self) -> int:
        return len(self.dataset)

    def get(self, names: Sequence[str], device: torch.device | str) -> torch.Tensor:
        """Tokens of a few images decoded here (no workers): for one-off calls; loops use `batches`."""
        pixels = torch.stack([self.dataset[n] for n in names]).to(self.device)
        return self.encoder(pixels).to(device)

    def batches(self, name_lists: Iterable[Sequence[str]]) -> Iterator[BatchTokens]:
        lists = [list(dict.fromkeys(names)) for names in name_lists]  # each image once per batch
        loader = make_loader(self.dataset, self.options, batch_sampler=lists, device=self.device)
        for names, pixels in zip(lists, loader):
            yield BatchTokens(names, self.encoder(pixels.to(self.device, non_blocking=True)))


def encoder_fingerprint(encoder: ImageTokens) -> str:
    return encoder.fingerprint()


def made_by(encoder: ImageTokens, images: Mapping[str, Path]) -> dict:
    """What a cache of `images` depends on: the tower's weights, its preprocessing and the image list (names and files,
    in order)."""
    listing = json.dumps([[n, str(p)] for n, p in images.items()]).encode()
    return {"encoder": encoder.fingerprint(), "kind": encoder.kind,
            "preprocess": hashlib.sha256(encoder.preprocess_id().encode()).hexdigest()[:16],
            "images": hashlib.sha256(listing).hexdigest()[:16], "rows": len(images),
            "dtype": np.dtype(CACHE_DTYPE).name}


def check_mode(mode: str) -> None:
    """An entry point's `image_tokens` setting, checked before any work."""
    if mode not in MODES:
        raise InputError("config", "image_tokens", f"must be one of {MODES}, got {mode!r}")


def token_source(mode: str, encoder: ImageTokens, images: Mapping[str, Path], cache_prefix: str | Path | None,
                 options: LoaderOptions | None = None, dist: DistInfo | None = None, batch_size: int = 256,
                 listed_in: str | Path | None = None) -> TokenBank | LiveTokens:
    """The tokens of `images` as `mode` says: "cache" (a memory-mapped float16 cache at `cache_prefix`) or "live"."""
    check_mode(mode)
    if mode == "live":
        return LiveTokens(encoder, images, options, dist.device if dist is not None else None, listed_in)
    return token_bank(encoder, images, cache_prefix, batch_size, options=options, dist=dist, listed_in=listed_in)


@torch.no_grad()
def token_bank(encoder: ImageTokens, images: Mapping[str, Path], cache_prefix: str | Path | None = None,
               batch_size: int = 256, device: torch.device | None = None, options: LoaderOptions | None = None,
               dist: DistInfo | None = None, listed_in: str | Path | None = None) -> TokenBank:
    """Tokens of `images` (name → file) from the cache at `cache_prefix` when it was made by this encoder and
    preprocessing from exactly these images, else encoded now and cached. Under torchrun every rank calls this: each
    encodes its share into its own shard, rank 0 writes the manifest. Without a prefix the tokens stay in memory
    (tiny fixtures only)."""
    dist = dist or DistInfo(device=device or next(encoder.model.parameters()).device)
    device = device or dist.device
    options = options or LoaderOptions()
    names, wanted = list(images), made_by(encoder, images)
    if not names:
        raise InputError(listed_in, "images", "no images to encode")
    if cache_prefix is None:
        if dist.enabled:
            raise ValueError("a token cache shared by ranks needs a cache_prefix")
        return TokenBank(names, [_encode(encoder, images, names, None, batch_size, device, options, listed_in)])
    prefix = Path(cache_prefix)
    bank = _open_cache(prefix, names, wanted)
    # rank 0 decides for all, before it may replace the manifest
    if broadcast_object(bank is not None, dist):
        if bank is None:
            raise InputError(_manifest(prefix), "shards", "rank 0 reads this token cache but this rank cannot")
        return bank
    tag = hashlib.sha256(json.dumps(wanted, sort_keys=True).encode()).hexdigest()[:10]
    rows = shard_range(len(names), dist)
    final = _shard_path(prefix, tag, dist.rank, dist.world_size)
    part = [names[i] for i in rows]
    if part:
        _encode(encoder, images, part, final, batch_size, device, options, listed_in)
    barrier(dist)
    if dist.is_main:
        shards = [_shard_path(prefix, tag, r, dist.world_size).name for r in range(dist.world_size)
                  if len(shard_range(len(names), DistInfo(rank=r, world_size=dist.world_size)))]
        atomic_write_json(_manifest(prefix), {"made_by": wanted, "shards": shards})
        _remove_stale(prefix, shards)
    barrier(dist)
    bank = _open_cache(prefix, names, wanted)
    if bank is None:
        raise InputError(_manifest(prefix), "made_by", "the token cache was replaced while this run was writing it")
    return bank


def _encode(encoder: ImageTokens, images: Mapping[str, Path], names: Sequence[str], final: Path | None,
            batch_size: int, device: torch.device, options: LoaderOptions,
            listed_in: str | Path | None) -> np.ndarray | None:
    """Encode `names` in order, each batch written as it is made: into `final` (a float16 .npy filled under a
    temporary name, renamed when complete) or, without a file, into memory."""
    paths = [images[n] for n in names]
    out, filled, tmp = None, 0, None
    try:
        for pixels in image_batches(paths, encoder.preprocess, options, batch_size, device, listed_in,
                                    desc="image tokens"):
            tokens = encoder(pixels.to(device)).to(torch.float16).cpu().numpy()
            if out is None:  # the token shape is known from the first batch
                shape = (len(names), *tokens.shape[1:])
                if final is None:
                    out = np.empty(shape, dtype=CACHE_DTYPE)
                else:
                    final.parent.mkdir(parents=True, exist_ok=True)
                    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
                    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=CACHE_DTYPE, shape=shape)
            out[filled:filled + len(tokens)] = tokens
            filled += len(tokens)
        if final is None:
            return out
        out.flush()
        del out
        os.replace(tmp, final)
        return None
    except BaseException:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise


def _manifest(prefix: Path) -> Path:
    return prefix.with_name(prefix.name + ".json")


def _shard_path(prefix: Path, tag: str, rank: int, world_size: int) -> Path:
    shard = f".r{rank}of{world_size}" if world_size > 1 else ""
    return prefix.with_name(f"{prefix.name}.{tag}{shard}.npy")


def _open_cache(prefix: Path, names: list[str], wanted: dict) -> TokenBank | None:
    """The cache at `prefix` by memory map if it was made exactly as `wanted`, else None (to be rebuilt)."""
    manifest = _manifest(prefix)
    if not manifest.is_file():
        return None
    info = read_json(manifest)
    if info.get("made_by") != wanted:
        return None
    files = [prefix.with_name(name) for name in info.get("shards", [])]
    if not all(f.is_file() for f in files):
        return None
    shards = [np.load(f, mmap_mode="r") for f in files]
    if sum(len(s) for s in shards) != len(names):
        return None
    return TokenBank(names, shards)


def _remove_stale(prefix: Path, keep: Sequence[str]) -> None:
    """Shards of earlier builds of this cache (another encoder, image list or world size)."""
    for old in prefix.parent.glob(f"{prefix.name}.*.npy"):
        if old.name not in keep:
            with contextlib.suppress(FileNotFoundError):
                old.unlink()
