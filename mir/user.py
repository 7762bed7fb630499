"""The simulated user: it holds the target image (pixels only, never its scene) and speaks through a
modification-text generator (`core.modtext`: (reference, target) → "what changes from the first image to
the second").

- `compare(shown, targets)`: the feedback modes. The user looks at what the system shows (a generated
  image, or the top-ranked wrong image) and says how to change it into the target.
- `answer(cells, targets)`: the text-only mode. The system asks "what is in the top left?"; the user
  paints that cell of their own image with its background colour and asks the generator how to go from
  the painted image back to the target, which describes what was in the cell ("add a big red circle in
  the top left"). A cell whose painting changes (almost) no pixel is answered "nothing in the top left".
  Both steps read pixels only.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

import numpy as np
from PIL import Image

from core.shapes.captions import position_name
from core.shapes.world import GRID

# A cell counts as empty when painting it over changes fewer than this share of its pixels noticeably.
EMPTY_SHARE = 0.02
NOTICEABLE = 40  # summed |ΔRGB| that a person would notice


class SimulatedUser:
    def __init__(self, modtext: Any, max_new_tokens: int = 32, num_beams: int = 1):
        self.modtext = modtext
        self.model_id = getattr(modtext, "model_id", type(modtext).__name__)
        self.max_new_tokens, self.num_beams = max_new_tokens, num_beams

    def compare(self, shown: Sequence[Image.Image], targets: Sequence[Image.Image], seed: int | None = None) -> list[str]:
        if not shown:
            return []
        return self.modtext.generate(list(shown), list(targets), max_new_tokens=self.max_new_tokens,
                                     num_beams=self.num_beams, seed=seed)

    def answer(self, cells: Sequence[tuple[int, int]], targets: Sequence[Image.Image], seed: int | None = None) -> list[str]:
        painted = [paint_cell(t, c) for t, c in zip(targets, cells)]
        empty = [cell_is_empty(t, p) for t, p in zip(targets, painted)]
        todo = [i for i, e in enumerate(empty) if not e]
        said = self.compare([painted[i] for i in todo], [targets[i] for i in todo], seed)
        answers = [f"nothing in the {position_name(*c)}" for c in cells]
        for i, text in zip(todo, said):
            answers[i] = text
        return answers


def background_colour(img: Image.Image) -> tuple[int, int, int]:
    """The most common colour: the background covers most of every Shapes image."""
    arr = np.asarray(img.convert("RGB")).reshape(-1, 3)
    return Counter(map(tuple, arr.tolist())).most_common(1)[0][0]


def cell_box(img: Image.Image, cell: tuple[int, int]) -> tuple[int, int, int, int]:
    w, h = img.size
    r, c = cell
    return (round(c * w / GRID), round(r * h / GRID), round((c + 1) * w / GRID), round((r + 1) * h / GRID))


def paint_cell(img: Image.Image, cell: tuple[int, int]) -> Image.Image:
    out = img.convert("RGB").copy()
    box = cell_box(out, cell)
    out.paste(background_colour(img), box)
    return out


def cell_is_empty(original: Image.Image, painted: Image.Image) -> bool:
    a = np.asarray(original.convert("RGB"), dtype=int)
    b = np.asarray(painted, dtype=int)
    x0, y0, x1, y1 = cell_box(original, (0, 0))
    changed = (np.abs(a - b).sum(-1) > NOTICEABLE).sum()
    return changed < EMPTY_SHARE * (x1 - x0) * (y1 - y0)


# The system's question order for the text-only mode: the centre first, then corners, then edges.
QUESTION_ORDER = [(1, 1), (0, 0), (0, 2), (2, 0), (2, 2), (0, 1), (1, 0), (1, 2), (2, 1)]


def next_question(known_cells: Sequence[tuple[int, int]], asked: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The first cell the system neither described in its query nor asked about; cycles when all were asked."""
    for cell in QUESTION_ORDER:
        if cell not in known_cells and cell not in asked:
            return cell
    for cell in QUESTION_ORDER:  # everything asked once: ask again where the query still says nothing
        if cell not in known_cells and asked.count(cell) < 2:
            return cell
    return QUESTION_ORDER[len(asked) % len(QUESTION_ORDER)]


def question_text(cell: tuple[int, int]) -> str:
    return f"what is in the {position_name(*cell)}?"


def load_user(spec: str, device: Any = None, max_new_tokens: int = 32, num_beams: int = 1) -> SimulatedUser:
    """`spec` is a trained modification-text generator folder (core.modtext), or `instructblip:<name>` for a
    pretrained InstructBLIP through the same interface (real runs)."""
    from core import modtext

    if spec.startswith("instructblip:"):
        gen = modtext.load_pretrained_instructblip(spec.split(":", 1)[1])
        gen.model_id = spec
        if device is not None:
            gen = gen.to(device)
        return SimulatedUser(gen.eval(), max_new_tokens, num_beams)
    return SimulatedUser(modtext.load_modification_generator(spec, device), max_new_tokens, num_beams)
