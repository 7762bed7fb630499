"""The Shapes world's scene model: 1–3 coloured shapes on a 3×3 grid, as frozen dataclasses.

Scenes are plain values: they round-trip through JSON (`to_dict` / `from_dict`) and are
sampled only from the `np.random.Generator` passed in, so a seed fixes the whole world.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import InputError

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
# Well separated on a light background, and each has one obvious English name.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 155, 55),
    "blue": (35, 75, 215),
    "yellow": (235, 195, 15),
    "purple": (135, 55, 185),
    "orange": (245, 130, 20),
    "black": (25, 25, 25),
    "cyan": (25, 185, 205),
}
SIZES = ("small", "medium", "large")
# Object "radius" as a fraction of a grid cell; the steps are large enough to see at 64 px.
SIZE_RADIUS = {"small": 0.24, "medium": 0.34, "large": 0.46}
GRID = 3
MAX_OBJECTS = 3
JITTER = 0.12  # largest |dx|, |dy| sampled, as a fraction of a cell
# Probability of 1, 2, 3 objects: most scenes hold several objects, so captions must name
# more than one thing and partial captions are ambiguous.
N_OBJECTS_P = (0.25, 0.40, 0.35)


@dataclass(frozen=True)
class Obj:
    """One shape in one grid cell; (dx, dy) is the offset from the cell centre, in cells."""

    shape: str
    colour: str
    size: str
    row: int
    col: int
    dx: float = 0.0
    dy: float = 0.0

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise InputError(None, "shape", f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.colour not in COLOURS:
            raise InputError(None, "colour", f"unknown colour {self.colour!r}; expected one of {tuple(COLOURS)}")
        if self.size not in SIZES:
            raise InputError(None, "size", f"unknown size {self.size!r}; expected one of {SIZES}")
        for name in ("row", "col"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v < GRID:
                raise InputError(None, name, f"must be an integer in 0..{GRID - 1}, got {v!r}")
        for name in ("dx", "dy"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.floating)) or not abs(v) <= 0.5:
                raise InputError(None, name, f"must be a number in [-0.5, 0.5] (fraction of a cell), got {v!r}")

    @property
    def cell(self) -> tuple[int, int]:
        return (self.row, self.col)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Obj":
        if not isinstance(d, dict):
            raise InputError(None, "object", f"expected a mapping, got {type(d).__name__}")
        missing = [k for k in ("shape", "colour", "size", "row", "col") if k not in d]
        if missing:
            raise InputError(None, missing[0], "required field is missing")
        unknown = set(d) - {"shape", "colour", "size", "row", "col", "dx", "dy"}
        if unknown:
            raise InputError(None, sorted(unknown)[0], "unknown field")
        return cls(**d)


@dataclass(frozen=True)
class Scene:
    """1–3 objects in distinct cells over a light background (RGB)."""

    objects: tuple[Obj, ...]
    background: tuple[int, int, int] = (240, 240, 240)

    def __post_init__(self) -> None:
        # Accept lists (e.g. from JSON) but store tuples, so scenes stay hashable.
        object.__setattr__(self, "objects", tuple(self.objects))
        object.__setattr__(self, "background", tuple(int(c) for c in self.background))
        if not 1 <= len(self.objects) <= MAX_OBJECTS:
            raise InputError(None, "objects", f"a scene holds 1..{MAX_OBJECTS} objects, got {len(self.objects)}")
        if not all(isinstance(o, Obj) for o in self.objects):
            raise InputError(None, "objects", "every object must be an Obj")
        cells = [o.cell for o in self.objects]
        if len(set(cells)) != len(cells):
            raise InputError(None, "objects", f"two objects share a grid cell: {cells}")
        if len(self.background) != 3 or not all(0 <= c <= 255 for c in self.background):
            raise InputError(None, "background", f"expected 3 integers in 0..255, got {self.background}")

    def occupied(self) -> set[tuple[int, int]]:
        return {o.cell for o in self.objects}

    def free_cells(self) -> list[tuple[int, int]]:
        """Empty cells in reading order (row-major)."""
        taken = self.occupied()
        return [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in taken]

    def to_dict(self) -> dict[str, Any]:
        return {"objects": [o.to_dict() for o in self.objects], "background": list(self.background)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], path: str | Path | None = None) -> "Scene":
        """Build a scene from its JSON form; errors name `path` and the offending field."""
        if not isinstance(d, dict) or "objects" not in d:
            raise InputError(path, "objects", "required field is missing")
        if not isinstance(d["objects"], list):
            raise InputError(path, "objects", "must be a list")
        objs = []
        for i, od in enumerate(d["objects"]):
            try:
                objs.append(Obj.from_dict(od))
            except InputError as e:
                raise InputError(path, f"objects[{i}].{e.field}", e.message) from None
        try:
            return cls(tuple(objs), tuple(d.get("background", (240, 240, 240))))
        except InputError as e:
            raise InputError(path, e.field, e.message) from None
        except TypeError as e:
            raise InputError(path, "background", str(e)) from None


@dataclass(frozen=True)
class SceneRecord:
    """One image of a world: its global id, file name (under `images/`), split and scene."""

    imgid: int
    filename: str
    split: str
    scene: Scene

    def to_dict(self) -> dict[str, Any]:
        return {"imgid": self.imgid, "filename": self.filename, "split": self.split, "scene": self.scene.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any], path: str | Path | None = None) -> "SceneRecord":
        for key in ("imgid", "filename", "split", "scene"):
            if key not in d:
                raise InputError(path, key, "required field is missing")
        return cls(int(d["imgid"]), str(d["filename"]), str(d["split"]), Scene.from_dict(d["scene"], path))


# Per-cell class indices of a scene, for models that read a grid back from pixels (0 = an empty cell).
SHAPE_CLASSES = ("empty", *SHAPES)
COLOUR_CLASSES = ("none", *COLOURS)
SIZE_CLASSES = ("none", *SIZES)


def cell_classes(scene: Scene) -> tuple[list[int], list[int], list[int]]:
    """Per cell, in reading order: the index of its shape in SHAPE_CLASSES, of its colour in COLOUR_CLASSES and of
    its size in SIZE_CLASSES (0 everywhere for an empty cell)."""
    shape, colour, size = [0] * (GRID * GRID), [0] * (GRID * GRID), [0] * (GRID * GRID)
    for o in scene.objects:
        cell = o.row * GRID + o.col
        shape[cell], colour[cell] = SHAPE_CLASSES.index(o.shape), COLOUR_CLASSES.index(o.colour)
        size[cell] = SIZE_CLASSES.index(o.size)
    return shape, colour, size


def sample_object(rng: np.random.Generator, row: int, col: int) -> Obj:
    """A random object in cell (row, col), jitter rounded so the JSON stays readable."""
    return Obj(
        shape=SHAPES[rng.integers(len(SHAPES))],
        colour=tuple(COLOURS)[rng.integers(len(COLOURS))],
        size=SIZES[rng.integers(len(SIZES))],
        row=row,
        col=col,
        dx=round(float(rng.uniform(-JITTER, JITTER)), 3),
        dy=round(float(rng.uniform(-JITTER, JITTER)), 3),
    )


def sample_background(rng: np.random.Generator) -> tuple[int, int, int]:
    """A light, low-saturation tint: it varies between images but never competes with a colour."""
    grey = int(rng.integers(226, 246))
    return tuple(int(np.clip(grey + rng.integers(-9, 10), 0, 255)) for _ in range(3))


def sample_scene(rng: np.random.Generator) -> Scene:
    """1–3 random objects in distinct cells, listed in reading order, on a random light tint."""
    n = int(rng.choice(len(N_OBJECTS_P), p=N_OBJECTS_P)) + 1
    cells = sorted(rng.choice(GRID * GRID, size=n, replace=False).tolist())
    objects = tuple(sample_object(rng, c // GRID, c % GRID) for c in cells)
    return Scene(objects, sample_background(rng))


def scene_key(scene: Scene) -> str:
    """Canonical semantic key: what a caption can say (shape, colour, size, cell), in cell order.

    Jitter and background are left out on purpose: two scenes with the same key are
    indistinguishable in words, so the key is what dedup (world sampling, near-duplicates,
    CIR targets) must compare.
    """
    objs = sorted(scene.objects, key=lambda o: o.cell)
    return "|".join(f"{o.row}{o.col}:{o.size}:{o.colour}:{o.shape}" for o in objs)
