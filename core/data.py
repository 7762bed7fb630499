"""Image–caption data in the Karpathy split layout shared by Flickr30K, COCO and the Shapes world:
`{"images": [{"filename", "imgid", "split", "sentences": [{"raw"}], "filepath"?}]}`.
Images live at `image_root/[filepath/]filename`. Everything is validated when the file is opened.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from core.errors import InputError
from core.io import read_json
from core.logging import progress

# COCO's Karpathy split keeps 30K validation images as extra training data under the name "restval".
SPLIT_ALIASES = {"train": ("train", "restval")}


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
    json_path, image_root = Path(json_path), Path(image_root)
    data = read_json(json_path, required=["images"])
    if not isinstance(data["images"], list):
        raise InputError(json_path, "images", "must be a list of image entries")
    wanted = SPLIT_ALIASES.get(split, (split,))
    records, seen_splits = [], set()
    for i, entry in enumerate(data["images"]):
        for key in ("filename", "imgid", "split", "sentences"):
            if key not in entry:
                raise InputError(json_path, f"images[{i}].{key}", "required field is missing")
        seen_splits.add(entry["split"])
        if entry["split"] not in wanted:
            continue
        captions = tuple(_caption(json_path, i, j, s) for j, s in enumerate(entry["sentences"]))
        if not captions:
            raise InputError(json_path, f"images[{i}].sentences", "image has no caption")
        path = image_root / entry.get("filepath", "") / entry["filename"]
        if check_files and not path.is_file():
            raise InputError(path, f"images[{i}].filename", f"image file not found (listed in {json_path})")
        sentids = tuple(entry.get("sentids") or [s.get("sentid", j) for j, s in enumerate(entry["sentences"])])
        records.append(ImageRecord(entry["imgid"], entry["filename"], path, entry["split"], captions, sentids))
    if not records:
        raise InputError(json_path, "images[].split",
                         f"split '{split}' is empty; splits present: {', '.join(sorted(seen_splits)) or 'none'}")
    ids = [r.imgid for r in records]
    if len(set(ids)) != len(ids):
        raise InputError(json_path, "images[].imgid", "image ids are not unique")
    return records


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


def load_images(paths: Sequence[Path], preprocess: Callable[[Image.Image], torch.Tensor],
                desc: str = "loading images") -> torch.Tensor:
    """Preprocess every image into one tensor [n, 3, H, W] (small corpora: the Shapes world, fixtures)."""
    tensors = []
    for path in progress(paths, desc=desc):
        with Image.open(path) as img:
            tensors.append(preprocess(img.convert("RGB")))
    return torch.stack(tensors)


class ImageCaptionPairs(torch.utils.data.Dataset):
    """One item per image with one of its captions, chosen afresh each epoch from (seed, epoch, index),
    so an epoch never shows an image twice (no false in-batch negatives) and a resumed run replays it exactly."""

    def __init__(self, records: Sequence[ImageRecord], pixels: torch.Tensor, seed: int = 0):
        if len(records) != len(pixels):
            raise ValueError("one pixel tensor per record expected")
        self.records, self.pixels, self.seed, self.epoch = list(records), pixels, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        rng = np.random.default_rng((self.seed, self.epoch, index))
        captions = self.records[index].captions
        return self.pixels[index], captions[int(rng.integers(len(captions)))]


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, drop_last: bool = True) -> list[np.ndarray]:
    """The batches of one epoch, a permutation fixed by (seed, epoch): resuming mid-epoch replays the rest."""
    order = np.random.default_rng((seed, epoch, 7919)).permutation(n)
    stop = (n // batch_size) * batch_size if drop_last else n
    return [order[i:i + batch_size] for i in range(0, stop, batch_size)]
