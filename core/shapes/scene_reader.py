"""A reader of Shapes pixels: a small CNN, trained on the real training images and their scenes from
`scenes.json`, that reads any 32 px image back into the 3×3 grid of (shape or empty, colour or none).

Two stages use it. The GenIR stage's object check (in the spirit of GenEval, Ghosh et al., 2023) reads generated
images: per object of a test scene, the right shape in the right cell, the right colour there, both; and the number
of objects drawn in cells the scene leaves empty. The pixel-reading stand-ins for a person or a foundation model
(`core.shapes.scene_diff`) read two images and say what differs. Neither reads `scenes.json` once the reader is
trained: scenes are its training labels only.

The training images are read through a DataLoader (one opened per item, `PixelImages`), never held for the whole
split; `load_or_train_reader` caches the trained reader as one file.
"""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from core.config import parse_config
from core.data import LoaderOptions, epoch_batches, make_loader, to_pixels
from core.errors import InputError
from core.fit import fit
from core.logging import progress
from core.shapes.world import COLOUR_CLASSES, GRID, SHAPE_CLASSES, Scene, cell_classes

CELLS = GRID * GRID
READER_RESOLUTION = 32  # the reader reads every image at this size (box filter), whatever the generator's
READER_FILE = "scene_reader.pt"


class SceneReader(torch.nn.Module):
    """32 px RGB in [-1, 1] → per cell logits over SHAPE_CLASSES and COLOUR_CLASSES."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = width

        def block(cin: int, cout: int) -> list[torch.nn.Module]:
            return [torch.nn.Conv2d(cin, cout, 3, padding=1), torch.nn.BatchNorm2d(cout), torch.nn.ReLU()]

        self.body = torch.nn.Sequential(*block(3, w), *block(w, w), torch.nn.MaxPool2d(2),
                                        *block(w, 2 * w), *block(2 * w, 2 * w), torch.nn.MaxPool2d(2),
                                        *block(2 * w, 4 * w))
        self.shape_head = torch.nn.Conv2d(4 * w, len(SHAPE_CLASSES), 1)
        self.colour_head = torch.nn.Conv2d(4 * w, len(COLOUR_CLASSES), 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.adaptive_avg_pool2d(self.body(x), GRID)  # one feature vector per grid cell
        return _per_cell(self.shape_head(h)), _per_cell(self.colour_head(h))


def _per_cell(logits: torch.Tensor) -> torch.Tensor:
    """[B, C, 3, 3] → [B, 9, C], cells in reading order."""
    return logits.flatten(2).transpose(1, 2)


def scene_labels(scene: Scene) -> tuple[torch.Tensor, torch.Tensor]:
    """Per cell (row-major) class indices: shape (0 = empty) and colour (0 = none)."""
    shape, colour, _ = cell_classes(scene)
    return torch.tensor(shape), torch.tensor(colour)


def _soften(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Half of a batch blurred by up to about a pixel: the reader must not call a slightly soft star 'empty'."""
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None]) / 16
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel.expand(3, 1, 3, 3).to(x), groups=3)
    amount = torch.rand(len(x), 1, 1, 1, generator=gen).to(x) * (torch.rand(len(x), 1, 1, 1, generator=gen) < 0.5).to(x)
    return x + amount * (blurred - x)


class _Indexed(torch.utils.data.Dataset):
    """Items of `images` with their index, so the trainer can check that the loader delivers the batch it asked for."""

    def __init__(self, images: torch.utils.data.Dataset):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], index


class _FitOrder(torch.utils.data.Sampler):
    """The batches core.fit asks for, in its order: epoch e's batches are `epoch_batches(n, batch_size, seed, e)`."""

    def __init__(self, n: int, epochs: int, batch_size: int, seed: int):
        self.n, self.epochs, self.batch_size, self.seed = n, epochs, batch_size, seed

    def __iter__(self) -> Iterator[list[int]]:
        for epoch in range(self.epochs):
            for batch in epoch_batches(self.n, self.batch_size, self.seed, epoch):
                yield batch.tolist()

    def __len__(self) -> int:
        return self.epochs * (self.n // self.batch_size)


def train_scene_reader(images: torch.utils.data.Dataset | torch.Tensor, scenes: Sequence[Scene], epochs: int = 4,
                       batch_size: int = 64, lr: float = 2e-3, seed: int = 0, progress: Callable | None = None,
                       loader: LoaderOptions | None = None) -> SceneReader:
    """Fit a SceneReader on real images ([-1, 1], 32 px; a map-style dataset such as mir.generator.PixelImages, or
    a tensor) and their scenes. A DataLoader decodes the batches ahead, in the order core.fit asks for them."""
    if len(images) != len(scenes):
        raise ValueError(f"{len(images)} images but {len(scenes)} scenes")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    reader = SceneReader()
    labels = [scene_labels(s) for s in scenes]
    shapes, colours = torch.stack([a for a, _ in labels]), torch.stack([b for _, b in labels])
    batches = iter(make_loader(_Indexed(images), loader or LoaderOptions(),
                               batch_sampler=_FitOrder(len(images), epochs, batch_size, seed)))

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        pixels, got = next(batches)
        if not torch.equal(got, idx):
            raise RuntimeError("the scene reader's loader is out of step with core.fit's batch order")
        shape_logits, colour_logits = reader(_soften(pixels, gen))
        return F.cross_entropy(shape_logits.flatten(0, 1), shapes[idx].flatten()) + \
            F.cross_entropy(colour_logits.flatten(0, 1), colours[idx].flatten())

    return fit(reader, len(images), batch_loss, epochs, batch_size, lr, seed, "training scene reader", progress)


@torch.no_grad()
def read_cells(reader: SceneReader, pixels: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted per-cell (shape, colour) class indices, each [N, 9]."""
    reader.eval()
    shapes, colours = [], []
    for i in range(0, len(pixels), batch_size):
        s, c = reader(pixels[i:i + batch_size])
        shapes.append(s.argmax(-1))
        colours.append(c.argmax(-1))
    return torch.cat(shapes), torch.cat(colours)


def object_metrics(pred_shape: torch.Tensor, pred_colour: torch.Tensor, scenes: Sequence[Scene]) -> dict[str, float]:
    """Per object of each scene: shape right in its cell, colour right there, both (all in %); and the mean
    number of objects read in cells the scene leaves empty."""
    shape_ok, colour_ok, both_ok, extra = [], [], [], []
    for ps, pc, scene in zip(pred_shape.tolist(), pred_colour.tolist(), scenes):
        true_shape, true_colour = (t.tolist() for t in scene_labels(scene))
        for cell in range(CELLS):
            if true_shape[cell] == 0:
                continue
            shape_ok.append(ps[cell] == true_shape[cell])
            colour_ok.append(pc[cell] == true_colour[cell])
            both_ok.append(shape_ok[-1] and colour_ok[-1])
        extra.append(sum(1 for cell in range(CELLS) if true_shape[cell] == 0 and ps[cell] != 0))
    return {"object acc": 100 * _mean(both_ok), "shape acc": 100 * _mean(shape_ok), "colour acc": 100 * _mean(colour_ok),
            "extra objects / image": _mean(extra), "objects": len(both_ok), "images": len(extra)}


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def load_or_train_reader(path: Path, train_images: Callable[[], torch.utils.data.Dataset | torch.Tensor],
                         train_scenes: Sequence[Scene], seed: int, epochs: int = 4, batch_size: int = 64,
                         progress: Callable | None = None, loader: LoaderOptions | None = None) -> SceneReader:
    """The reader cached at `path` when it was trained on the same scenes with the same settings, else a new one
    trained on `train_images()` (written atomically: a killed run never leaves half a file)."""
    settings = [[s.to_dict() for s in train_scenes], seed, epochs, batch_size]
    key = hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:16]
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("key") == key:
            reader = SceneReader()
            reader.load_state_dict(saved["state_dict"])
            return reader.eval()
    reader = train_scene_reader(train_images(), train_scenes, epochs=epochs, batch_size=batch_size, seed=seed,
                                progress=progress, loader=loader)
    tmp = path.with_suffix(".tmp")
    torch.save({"key": key, "state_dict": reader.state_dict()}, tmp)
    tmp.replace(path)
    return reader


def load_reader(path: str | Path) -> SceneReader:
    """A reader file written by `load_or_train_reader` (or this module's entry point)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "scene reader", "no scene reader file here; train one with "
                         "`python -m core.shapes.scene_reader --data_json <world>/dataset_shapes.json --out <file>`")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or "state_dict" not in saved:
        raise InputError(path, "state_dict", "not a scene reader file")
    reader = SceneReader()
    reader.load_state_dict(saved["state_dict"])
    return reader.eval()


@dataclass
class TrainReaderConfig(LoaderOptions):
    data_json: str = ""  # the world's Karpathy-format caption file; its train split (and scenes.json beside it) trains the reader
    image_root: str = ""  # folder the file's image paths are relative to (default: `images` beside data_json)
    out: str = ""  # the reader file to write (reused when it was trained with the same settings)
    seed: int = 0
    epochs: int = 4
    batch_size: int = 64


def train_world_reader(cfg: TrainReaderConfig) -> SceneReader:
    """The reader for a Shapes world, trained on its training images and their scenes only."""
    from core.data import ImageDataset, load_karpathy
    from core.shapes.make import SCENES_FILE, load_scenes

    if not cfg.data_json or not cfg.out:
        raise InputError("command line", "data_json" if not cfg.data_json else "out", "required")
    data_json = Path(cfg.data_json)
    scenes_file = data_json.parent / SCENES_FILE
    if not scenes_file.is_file():
        raise InputError(scenes_file, "scenes", "the scene reader learns from the Shapes world's scenes, which are "
                         "not beside the caption file")
    train = load_karpathy(data_json, cfg.image_root or data_json.parent / "images", "train")
    scenes = {r.imgid: r.scene for r in load_scenes(data_json.parent)}
    missing = [r.imgid for r in train if r.imgid not in scenes]
    if missing:
        raise InputError(scenes_file, "images", f"no scene for imgid {missing[0]} of {data_json}")
    pixels = functools.partial(to_pixels, resolution=READER_RESOLUTION)
    return load_or_train_reader(Path(cfg.out), lambda: ImageDataset([r.path for r in train], pixels, data_json),
                                [scenes[r.imgid] for r in train], cfg.seed, cfg.epochs, cfg.batch_size,
                                progress=progress, loader=cfg)


def main(argv: Sequence[str] | None = None) -> Path:
    cfg = parse_config(TrainReaderConfig, argv)
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    train_world_reader(cfg)
    print(f"scene reader → {cfg.out}")
    return Path(cfg.out)


if __name__ == "__main__":
    main()
