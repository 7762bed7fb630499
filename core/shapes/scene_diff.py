"""What differs between two Shapes images, read from their pixels and said in the world's grammar.

A person looking at two pictures, or a vision-language model asked to write a modification text, sees what
changed; it never reads a scene file. `PixelComparer` does the same for the Shapes world: the scene reader
(`core.shapes.scene_reader`, trained on training images only) reads each image into its 3×3 grid of (shape, colour),
`grid_edits` turns the two grids into the edits that change the first into the second (add, remove, move, reshape,
recolour), and `say_edits` writes them as one instruction the world's own parsers read ("add a red circle in the
top left and make the blue square in the middle green"). The GenIR stage's user says it about the shown image and
the target it has in mind; the iterative CIR stage's foundation stand-in says it about a reference and a mined hard
negative.

The reader does not read sizes, so a comparer never states a size change; `edit_agreement` scores stated edits
against the true difference of two scenes (sizes included), so that blind spot shows in its recall.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from PIL import Image

from core.data import to_pixels
from core.shapes.captions import position_name, with_article
from core.shapes.scene_reader import READER_RESOLUTION, SceneReader, read_cells
from core.shapes.world import COLOUR_CLASSES, GRID, SHAPE_CLASSES, SIZE_CLASSES, Scene, cell_classes

CELLS = GRID * GRID


@dataclass(frozen=True)
class Thing:
    """What one grid cell holds: a shape and a colour, and a size when the reading knows it."""

    shape: str
    colour: str
    size: str | None = None


Grid = tuple["Thing | None", ...]  # one entry per cell, in reading order; None = empty


@dataclass(frozen=True)
class CellEdit:
    """One change from the first grid to the second. `cell` is where the object is before the edit (for `add`,
    where it appears); `value` is the new shape, colour, size or destination cell; `thing` is the object as the
    first grid has it (for `add`, the new object)."""

    kind: str  # add | remove | move | shape | colour | size
    cell: int
    thing: Thing
    value: Any = None

    def key(self) -> tuple:
        """What two statements of the same edit share (an added object's size is not part of it: the reader
        cannot see sizes, and 'add a red circle' is right whatever size the target draws it)."""
        thing = self.thing if self.kind != "add" else Thing(self.thing.shape, self.thing.colour)
        return self.kind, self.cell, (thing.shape, thing.colour), self.value


def grid_of_classes(shape: Sequence[int], colour: Sequence[int], size: Sequence[int] | None = None) -> Grid:
    """Per-cell class indices (SHAPE_CLASSES, COLOUR_CLASSES, SIZE_CLASSES; 0 = empty) → a Grid."""
    cells = []
    for i in range(CELLS):
        if shape[i] == 0:
            cells.append(None)
            continue
        known_size = SIZE_CLASSES[size[i]] if size is not None and size[i] else None
        # A cell the reader calls occupied but colourless still holds something; its colour is unknown.
        cells.append(Thing(SHAPE_CLASSES[shape[i]], COLOUR_CLASSES[colour[i]] if colour[i] else "", known_size))
    return tuple(cells)


def scene_grid(scene: Scene) -> Grid:
    """The true grid of a scene, sizes included (for scoring a comparer, never at loop time)."""
    return grid_of_classes(*cell_classes(scene))


def grid_edits(before: Grid, after: Grid) -> list[CellEdit]:
    """The edits that turn `before` into `after`, cell by cell; an object that leaves one cell while the same
    (shape, colour) appears in an empty one is a move, not a removal and an addition."""
    removed = [i for i in range(CELLS) if before[i] is not None and after[i] is None]
    added = [i for i in range(CELLS) if before[i] is None and after[i] is not None]
    edits: list[CellEdit] = []
    for i in list(removed):
        twin = next((j for j in added if _same_object(before[i], after[j])), None)
        if twin is not None:
            edits.append(CellEdit("move", i, before[i], twin))
            removed.remove(i)
            added.remove(twin)
    edits += [CellEdit("remove", i, before[i]) for i in removed]
    edits += [CellEdit("add", j, after[j]) for j in added]
    for i in range(CELLS):
        a, b = before[i], after[i]
        if a is None or b is None:
            continue
        if a.shape != b.shape:
            edits.append(CellEdit("shape", i, a, b.shape))
        if a.colour != b.colour and b.colour:
            edits.append(CellEdit("colour", i, a, b.colour))
        if a.size and b.size and a.size != b.size:
            edits.append(CellEdit("size", i, a, b.size))
    return sorted(edits, key=lambda e: (_KIND_ORDER[e.kind], e.cell))


# Removals and moves first, additions last: a scene holds at most three objects, so an instruction that added before
# it removed would pass through a fourth.
_KIND_ORDER = {"remove": 0, "move": 1, "shape": 2, "colour": 3, "size": 4, "add": 5}


def _same_object(a: Thing, b: Thing) -> bool:
    return (a.shape, a.colour) == (b.shape, b.colour) and (a.size is None or b.size is None or a.size == b.size)


def _where(cell: int) -> str:
    return f"the {position_name(cell // GRID, cell % GRID)}"


def _named(thing: Thing, cell: int) -> str:
    """A definite description that the cell makes unique: "the red circle in the top left"."""
    words = " ".join(w for w in (thing.colour, thing.shape) if w)
    return f"the {words} in {_where(cell)}"


def say_edits(edits: Sequence[CellEdit]) -> str:
    """The edits as one instruction in the world's grammar, clauses joined by "and"; "" when nothing differs.
    A later clause about a cell names its object as the earlier clauses left it ("turn the red circle in the top
    left into a square and make the red square in the top left blue")."""
    clauses, now = [], {}
    for e in edits:
        thing = now.get(e.cell, e.thing)
        if e.kind == "add":
            what = " ".join(w for w in (e.thing.size, e.thing.colour, e.thing.shape) if w)
            clauses.append(f"add {with_article(what)} in {_where(e.cell)}")
        elif e.kind == "remove":
            clauses.append(f"remove {_named(thing, e.cell)}")
        elif e.kind == "move":
            clauses.append(f"move {_named(thing, e.cell)} to {_where(e.value)}")
        elif e.kind == "shape":
            clauses.append(f"turn {_named(thing, e.cell)} into {with_article(e.value)}")
            now[e.cell] = Thing(e.value, thing.colour, thing.size)
        else:  # a new colour or size: "make the red circle in the top left blue"
            clauses.append(f"make {_named(thing, e.cell)} {e.value}")
            if e.kind == "colour":
                now[e.cell] = Thing(thing.shape, e.value, thing.size)
    return " and ".join(clauses)


def edit_agreement(stated: Sequence[Sequence[CellEdit]], true: Sequence[Sequence[CellEdit]]) -> dict[str, float]:
    """Precision and recall (%) of stated edits against the true ones, pooled over pairs; recall is also given
    without the true size edits (which a reader of shapes and colours cannot see), and the share of pairs whose
    stated edits are exactly the true ones."""
    if len(stated) != len(true):
        raise ValueError(f"{len(stated)} stated edit lists but {len(true)} true ones")
    said = right = truth = visible = exact = 0
    for s, t in zip(stated, true):
        s_keys, t_keys = {e.key() for e in s}, {e.key() for e in t}
        said, right, truth = said + len(s_keys), right + len(s_keys & t_keys), truth + len(t_keys)
        visible += sum(1 for e in t if e.kind != "size")
        exact += s_keys == t_keys
    return {"precision": 100 * right / said if said else float("nan"),
            "recall": 100 * right / truth if truth else float("nan"),
            "recall (no size edits)": 100 * right / visible if visible else float("nan"),
            "exact pairs": 100 * exact / len(stated) if stated else float("nan"),
            "stated edits": said, "true edits": truth, "pairs": len(stated)}


class PixelComparer:
    """Reads two lists of images with a scene reader and says, per pair, how to change the first into the second."""

    def __init__(self, reader: SceneReader, device: torch.device | None = None):
        self.device = device or torch.device("cpu")
        self.reader = reader.to(self.device).eval()

    def grids(self, images: Sequence[Image.Image]) -> list[Grid]:
        pixels = torch.stack([to_pixels(img, READER_RESOLUTION) for img in images]).to(self.device)
        shapes, colours = read_cells(self.reader, pixels)
        return [grid_of_classes(s.tolist(), c.tolist()) for s, c in zip(shapes.cpu(), colours.cpu())]

    def edits(self, before: Sequence[Image.Image], after: Sequence[Image.Image]) -> list[list[CellEdit]]:
        if len(before) != len(after):
            raise ValueError(f"{len(before)} first images but {len(after)} second ones")
        if not before:
            return []
        return [grid_edits(a, b) for a, b in zip(self.grids(before), self.grids(after))]

    def describe(self, before: Sequence[Image.Image], after: Sequence[Image.Image]) -> list[str]:
        return [say_edits(e) for e in self.edits(before, after)]
