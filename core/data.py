"""Image–caption data in the Karpathy split layout shared by Flickr30K, COCO and the Shapes world:
`{"images": [{"filename", "imgid", "split", "sentences": [{"raw"}], "filepath"?}]}`.
Images live at `image_root/[filepath/]filename`. Everything is validated when the file is opened.

Pixels are never held for a whole split: `ImageDataset` / `ImageCaptionPairs` open one image per item and a
`DataLoader` (`make_loader`, `LoaderOptions`) decodes them in worker processes.
"""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from core.errors import InputError
from core.io import read_json_array
from core.logging import progress

# COCO's Karpathy split keeps 30K validation images as extra training data under the name "restval".
SPLIT_ALIASES = {"train": ("train", "restval")}


def canonical_split(name: str) -> str:
    """The split an image counts in: COCO's `restval` is training data everywhere (as Karpathy and the methods use
    it), so rows written for it say `train`."""
    return next((split for split, names in SPLIT_ALIASES.items() if name in names), name)


@dataclass(frozen=True)
class ImageRecord:
    imgid: int | str
    filename: str
    path: Path
    split: str
    captions: tuple[str, ...]
    sentids: tuple[int, ...]


def load_karpathy(json_path: str | Path, image_root: str | Path, split: str,
                  check_files: bool = True) -> list[ImageRecord]:
    """The images of one split with their captions; every referenced image file must exist."""
    return load_karpathy_splits(json_path, image_root, [split], check_files)[split]


def load_karpathy_splits(json_path: str | Path, image_root: str | Path, splits: Sequence[str],
                         check_files: bool = True) -> dict[str, list[ImageRecord]]:
    """The images of several splits from one pass over the file, which is parsed one entry at a time (without the
    tokenized captions no stage reads): memory holds the records, not COCO's 150 MB of text and its parse."""
    json_path, image_root = Path(json_path), Path(image_root)
    records: dict[str, list[ImageRecord]] = {split: [] for split in splits}
    wanted = {split: SPLIT_ALIASES.get(split, (split,)) for split in splits}
    seen_splits = set()
    for i, entry in enumerate(read_json_array(json_path, "images", object_hook=_without_tokens)):
        _check_entry(json_path, i, entry)
        seen_splits.add(entry["split"])
        into = [split for split in splits if entry["split"] in wanted[split]]
        if not into:
            continue
        record = _record(json_path, image_root, i, entry)
        if check_files and not record.path.is_file():
            raise InputError(record.path, f"images[{i}].filename", f"image file not found (listed in {json_path})")
        for split in into:
            records[split].append(record)
    for split, recs in records.items():
        if not recs:
            raise InputError(json_path, "images[].split", f"split '{split}' is empty; splits present: "
                             f"{', '.join(sorted(seen_splits)) or 'none'}")
        ids = [r.imgid for r in recs]
        if len(set(ids)) != len(ids):
            raise InputError(json_path, "images[].imgid", "image ids are not unique")
    return records


def _without_tokens(obj: dict) -> dict:
    obj.pop("tokens", None)
    return obj


def _check_entry(json_path: Path, i: int, entry: object) -> None:
    if not isinstance(entry, dict):
        raise InputError(json_path, f"images[{i}]", "must be an image entry (an object)")
    for key in ("filename", "imgid", "split", "sentences"):
        if key not in entry:
            raise InputError(json_path, f"images[{i}].{key}", "required field is missing")


def _record(json_path: Path, image_root: Path, i: int, entry: dict) -> ImageRecord:
    captions = tuple(_caption(json_path, i, j, s) for j, s in enumerate(entry["sentences"]))
    if not captions:
        raise InputError(json_path, f"images[{i}].sentences", "image has no caption")
    path = image_root / entry.get("filepath", "") / entry["filename"]
    sentids = tuple(entry.get("sentids") or [s.get("sentid", j) for j, s in enumerate(entry["sentences"])])
    return ImageRecord(entry["imgid"], entry["filename"], path, entry["split"], captions, sentids)


def _caption(json_path: Path, i: int, j: int, sentence: object) -> str:
    if not isinstance(sentence, dict) or not isinstance(sentence.get("raw"), str):
        raise InputError(json_path, f"images[{i}].sentences[{j}].raw", "caption text is missing")
    return sentence["raw"]


@dataclass(frozen=True)
class CaptionQuery:
    """One caption as a query: its text, its sentence id and the image it describes."""
    text: str
    sentid: int
    imgid: int | str


def caption_queries(records: Sequence[ImageRecord]) -> list[CaptionQuery]:
    return [CaptionQuery(c, s, r.imgid) for r in records for c, s in zip(r.captions, r.sentids)]


@dataclass
class LoaderOptions:
    """The DataLoader settings every image-reading entry point takes (its config dataclass inherits these)."""
    num_workers: int = -1  # image-decoding worker processes; -1 = one per core beyond the first, at most 8
    pin_memory: bool = True  # page-locked batches for faster host-to-GPU copies (used on CUDA only)
    persistent_workers: bool = True  # keep the workers alive from one epoch to the next
    verify_images: bool = False  # decode every listed image once before work starts and report all bad files


def default_workers() -> int:
    """One decoding worker per core beyond the one the main process trains on, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cores - 1))


def open_image(path: str | Path, listed_in: str | Path | None = None) -> Image.Image:
    """An image file decoded in full as RGB; an unreadable, corrupt or truncated file is an InputError naming it
    (and the split file that lists it)."""
    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated file fails here, not later inside a transform
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
        where = f" (listed in {listed_in})" if listed_in else ""
        raise InputError(path, "image", f"cannot decode the image: {e}{where}") from None


def to_pixels(image: Image.Image, resolution: int) -> torch.Tensor:
    """An image as the project's small pixel models read it (the Shapes UNet, the scene reader):
    [3, resolution, resolution] in [-1, 1], box-filtered (clean down-sampling)."""
    small = image.convert("RGB").resize((resolution, resolution), Image.BOX)
    return torch.from_numpy(np.asarray(small).copy()).permute(2, 0, 1).float() / 127.5 - 1.0


class ImageDataset(torch.utils.data.Dataset):
    """One preprocessed image per item, opened from disk when asked for: memory does not grow with the corpus."""

    def __init__(self, paths: Sequence[str | Path], preprocess: Callable[[Image.Image], torch.Tensor],
                 listed_in: str | Path | None = None):
        self.paths, self.preprocess, self.listed_in = [Path(p) for p in paths], preprocess, listed_in

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.preprocess(open_image(self.paths[index], self.listed_in))


def make_loader(dataset: torch.utils.data.Dataset, options: LoaderOptions, *, batch_size: int | None = None,
                batch_sampler: torch.utils.data.Sampler | None = None, device: torch.device | None = None,
                collate_fn: Callable | None = None) -> torch.utils.data.DataLoader:
    """A DataLoader with the project's settings: in order (batches come from `batch_sampler` when training),
    `num_workers` decoding processes, pinned memory on CUDA."""
    workers = options.num_workers if options.num_workers >= 0 else default_workers()
    kwargs: dict = dict(num_workers=workers, collate_fn=collate_fn,
                        pin_memory=options.pin_memory and device is not None and device.type == "cuda",
                        persistent_workers=options.persistent_workers and workers > 0)
    if batch_sampler is not None:
        return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, **kwargs)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, **kwargs)


# glibc serves blocks above this size by mmap and gives them back on free. Left to itself it raises the threshold
# after the first large free (up to 32 MB), and the per-batch buffers of a long loop then fragment the heap: the
# process that receives the batches grew by 0.6 GB over a 20K-image encode. Fixed at 4 MB it stays flat. Only the
# entry points that stream a whole corpus and train nothing (dense encode, the ReT cache) fix it: in a training loop
# every activation above 4 MB would be mapped and unmapped each step (dense training: 6x the system time, +16 % wall).
HEAP_MMAP_THRESHOLD = 4 << 20
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h


def fix_heap_threshold() -> None:
    """Fix glibc's mmap threshold (once per process) so a stage's memory does not grow with the batches it has
    seen; a no-op where the C library is not glibc. `MALLOC_MMAP_THRESHOLD_` in the environment takes precedence."""
    global _heap_threshold_fixed
    if _heap_threshold_fixed or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    _heap_threshold_fixed = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD)
    except (OSError, AttributeError):
        pass


_heap_threshold_fixed = False


def image_batches(paths: Sequence[str | Path], preprocess: Callable[[Image.Image], torch.Tensor],
                  options: LoaderOptions, batch_size: int, device: torch.device | None = None,
                  listed_in: str | Path | None = None, desc: str = "images") -> Iterator[torch.Tensor]:
    """Preprocessed images in the order of `paths`, `batch_size` at a time, decoded by the loader's workers."""
    if not len(paths):
        return
    loader = make_loader(ImageDataset(paths, preprocess, listed_in), options, batch_size=batch_size, device=device)
    yield from progress(loader, desc=desc, unit="batch")


class _Decodes(torch.utils.data.Dataset):
    """Decodes one file and reports what went wrong, without raising, so one pass finds every bad file."""

    def __init__(self, paths: Sequence[Path]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> str:
        try:
            open_image(self.paths[index])
            return ""
        except InputError as e:
            return e.message


def verify_images(paths: Sequence[str | Path], listed_in: str | Path | None = None,
                  options: LoaderOptions | None = None) -> None:
    """Decode every image once (with the loader's workers) and raise one InputError that lists every bad file."""
    options = options or LoaderOptions()
    paths = [Path(p) for p in paths]
    loader = make_loader(_Decodes(paths), options, batch_size=64, collate_fn=list)
    bad, row = [], 0
    for problems in progress(loader, desc="verifying images", unit="batch"):
        bad += [(paths[row + i], p) for i, p in enumerate(problems) if p]
        row += len(problems)
    if bad:
        listing = "; ".join(f"{path}: {problem}" for path, problem in bad[:10])
        more = f" (and {len(bad) - 10} more)" if len(bad) > 10 else ""
        raise InputError(listed_in or bad[0][0], "images",
                         f"{len(bad)} of {len(paths)} images cannot be decoded: {listing}{more}")


def load_images_small(paths: Sequence[Path], preprocess: Callable[[Image.Image], torch.Tensor],
                      desc: str = "loading images") -> torch.Tensor:
    """Every image preprocessed into one tensor [n, 3, H, W]. For the tiny fixtures and a probe's few hundred
    images only: a split's pixels are otherwise never held in memory (see ImageDataset)."""
    return torch.stack([preprocess(open_image(p)) for p in progress(paths, desc=desc)])


class ImageCaptionPairs(torch.utils.data.Dataset):
    """Item `(epoch, index)`: the image opened from disk with one of its captions, chosen from (seed, epoch, index),
    so an epoch never shows an image twice (no false in-batch negatives) and a resumed run replays it exactly.
    The epoch travels with the index because persistent workers hold their own copy of the dataset."""

    def __init__(self, records: Sequence[ImageRecord], preprocess: Callable[[Image.Image], torch.Tensor],
                 seed: int = 0, listed_in: str | Path | None = None):
        self.records, self.preprocess, self.seed, self.listed_in = list(records), preprocess, seed, listed_in

    def __len__(self) -> int:
        return len(self.records)

    def caption(self, epoch: int, index: int) -> str:
        rng = np.random.default_rng((self.seed, epoch, index))
        captions = self.records[index].captions
        return captions[int(rng.integers(len(captions)))]

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, str, int]:
        epoch, index = item
        pixels = self.preprocess(open_image(self.records[index].path, self.listed_in))
        return pixels, self.caption(epoch, index), index


class EpochBatchSampler(torch.utils.data.Sampler):
    """This rank's share of each global batch of `epoch_batches(n, batch_size, seed, epoch)`, as `(epoch, index)`
    items; `set_epoch(epoch, skip)` starts an epoch `skip` batches in, so a resumed run replays the rest exactly."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not a multiple of the world size {world_size}")
        self.n, self.batch_size, self.seed, self.rank, self.world_size = n, batch_size, seed, rank, world_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def global_batches(self) -> list[np.ndarray]:
        return epoch_batches(self.n, self.batch_size, self.seed, self.epoch)[self.skip:]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        share = self.batch_size // self.world_size
        for batch in self.global_batches():
            yield [(self.epoch, int(i)) for i in batch[self.rank * share:(self.rank + 1) * share]]

    def __len__(self) -> int:
        return len(self.global_batches())


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, drop_last: bool = True) -> list[np.ndarray]:
    """The batches of one epoch, a permutation fixed by (seed, epoch): resuming mid-epoch replays the rest."""
    order = np.random.default_rng((seed, epoch, 7919)).permutation(n)
    stop = (n // batch_size) * batch_size if drop_last else n
    return [order[i:i + batch_size] for i in range(0, stop, batch_size)]
