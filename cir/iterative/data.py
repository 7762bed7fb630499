"""Triplets and image corpora of the iterative loop. Original triplets come from the CIRR-layout files the CIR
stage writes (read through its loader); augmented ones from `augmented_samples_iter_N.json`. A corpus holds the
images of some splits, prepared once per run for the embedding model."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from cir.iterative.backbones import EmbeddingBackbone
from core.logging import progress


@dataclass(frozen=True)
class Triplet:
    """(reference, modification text) → target. `negatives`: images the loss appends as extra negatives."""
    pairid: str
    reference: str
    caption: str
    target: str
    members: tuple[str, ...] = ()
    negatives: tuple[str, ...] = ()
    source: str = "original"   # "original" or "round N" for generated ones


def load_image(path: Path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


class Corpus:
    """Image names in a fixed order, their paths, and what the backbone prepared of each."""

    def __init__(self, paths: dict[str, Path]):
        self.names = sorted(paths)
        self.paths = dict(paths)
        self.index = {n: i for i, n in enumerate(self.names)}
        self.prepared: Any = None
        self.prepared_key: str | None = None

    def prepare(self, backbone: EmbeddingBackbone) -> None:
        """Prepare every image for `backbone`, unless it was prepared for an identical frozen part already."""
        key = backbone.prepared_key()
        if key != self.prepared_key:
            images = [load_image(self.paths[n]) for n in progress(self.names, desc="loading images")]
            self.prepared, self.prepared_key = backbone.prepare_images(images), key

    def batch(self, backbone: EmbeddingBackbone, names: Sequence[str]) -> Any:
        return backbone.take(self.prepared, [self.index[n] for n in names])

    def image(self, name: str) -> Image.Image:
        return load_image(self.paths[name])


def load_split(data_dir: str | Path, image_root: str | Path | None, split: str) -> tuple[list[Triplet], dict[str, Path]]:
    """The triplets and the images of one CIRR-layout split, through the CIR stage's validating loader.
    `image_root` empty = `{data_dir}/img_raw`, as CIRR ships."""
    from cir.data import load_cirr

    loaded = load_cirr(data_dir, split, image_root or None)
    triplets = [Triplet(str(t.pairid), t.reference, t.caption, t.target, tuple(t.members)) for t in loaded.triplets]
    return triplets, dict(loaded.images)
