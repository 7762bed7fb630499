"""The simulated user: it holds the target image (pixels only, never its scene) and speaks through a
modification-text generator (`core.modtext`: (reference, target) → "what changes from the first image to
the second") — `SimulatedUser` — or, for real runs, a chat VLM (`core.vlm`: Qwen2-VL, Gemma-3, LLaVA, ...) asked
the same questions in words — `VLMUser`. On Shapes, `scene_reader:<file>` makes the generator a pixel comparer
(`core.shapes.scene_diff`): the scene reader reads both images and the user says in the world's grammar what differs,
as a person looking at the two pictures would (it never reads `scenes.json`).

- `compare(shown, targets)`: the feedback modes. The user looks at what the system shows (a generated
  image, or the top-ranked wrong image) and says how to change it into the target.
- `answer(cells, targets)`: the text-only mode. The system asks "what is in the top left?"; the MTST user
  paints that cell of their own image with its background colour and asks the generator how to go from
  the painted image back to the target, which describes what was in the cell ("add a big red circle in
  the top left"). A cell whose painting changes (almost) no pixel is answered "nothing in the top left".
  Both steps read pixels only. The VLM user is shown the target and the question and answers in words.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

import numpy as np
from PIL import Image

from core.shapes.captions import position_name
from core.shapes.world import GRID
from core.vlm import ChatVLM, side_by_side

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


# The chat VLM user's prompts (GenIR: the user compares the feedback image with the image in mind).
COMPARE_PROMPT = ("{layout} Say what must change in the {first} to make it match the {second}. "
                  "Answer in one short sentence.")
MULTI_LAYOUT = ("The first image is what the search system shows me; the second image is the image I am looking for.",
                "first image", "second image")
SIDE_LAYOUT = ("The left half of the picture is what the search system shows me; the right half is the image I am "
               "looking for.", "left half", "right half")
ANSWER_PROMPT = "Look at this image and answer the question in one short sentence. Question: {question}"


class VLMUser:
    """A chat VLM as the simulated user (real runs), with `SimulatedUser`'s interface; it sees only pixels."""

    def __init__(self, vlm: ChatVLM, model_id: str, max_new_tokens: int = 32):
        self.vlm, self.model_id, self.max_new_tokens = vlm, model_id, max_new_tokens

    def compare_prompt(self) -> str:
        layout, first, second = MULTI_LAYOUT if self.vlm.multi_image else SIDE_LAYOUT
        return COMPARE_PROMPT.format(layout=layout, first=first, second=second)

    def compare(self, shown: Sequence[Image.Image], targets: Sequence[Image.Image], seed: int | None = None) -> list[str]:
        """What must change in each shown image (generated or retrieved) to match its target."""
        if len(shown) != len(targets):
            raise ValueError(f"{len(shown)} shown images but {len(targets)} targets")
        if self.vlm.multi_image:
            images = [[s, t] for s, t in zip(shown, targets)]
        else:  # a one-image model sees the pair pasted side by side
            images = [[side_by_side(s, t)] for s, t in zip(shown, targets)]
        return self.vlm.chat(images, [self.compare_prompt()] * len(images), self.max_new_tokens, seed or 0)

    def answer(self, questions: Sequence[tuple[int, int] | str], targets: Sequence[Image.Image],
               seed: int | None = None) -> list[str]:
        """Text-only mode: the target image and the system's question (a question text, or a Shapes cell) → answer."""
        if len(questions) != len(targets):
            raise ValueError(f"{len(questions)} questions but {len(targets)} targets")
        texts = [q if isinstance(q, str) else question_text(tuple(q)) for q in questions]
        prompts = [ANSWER_PROMPT.format(question=q) for q in texts]
        return self.vlm.chat([[t] for t in targets], prompts, self.max_new_tokens, seed or 0)


class ComparerSpeaker:
    """A `core.shapes.scene_diff.PixelComparer` behind the generator interface `SimulatedUser` speaks through."""

    def __init__(self, comparer: Any, source: str):
        from core.io import file_digest

        # by content: a retrained reader is another user, and a resumed MIR run must not mix the two
        self.comparer, self.model_id = comparer, f"scene_reader:{file_digest(source)}"

    def generate(self, before: Sequence[Image.Image], after: Sequence[Image.Image], **_: Any) -> list[str]:
        return self.comparer.describe(before, after)  # deterministic: decoding settings and seed do not apply


def load_user(spec: str, device: Any = None, max_new_tokens: int = 32, num_beams: int = 1) -> SimulatedUser | VLMUser:
    """`spec` is a trained modification-text generator folder (core.modtext), `instructblip:<name>` for a
    pretrained InstructBLIP through the same interface, `scene_reader:<file>` for the Shapes pixel comparer, or
    `vlm:<name_or_path>` for a chat VLM (Qwen2-VL, Gemma-3, LLaVA, ... through core.vlm; real runs)."""
    from core import modtext

    if spec.startswith("scene_reader:"):
        from core.shapes.scene_diff import PixelComparer
        from core.shapes.scene_reader import load_reader

        path = spec.split(":", 1)[1]
        return SimulatedUser(ComparerSpeaker(PixelComparer(load_reader(path), device), path), max_new_tokens, num_beams)
    if spec.startswith("vlm:"):
        vlm = ChatVLM.from_pretrained(spec.split(":", 1)[1], device=device, max_new_tokens=max_new_tokens,
                                      num_beams=num_beams)
        return VLMUser(vlm, spec, max_new_tokens)
    if spec.startswith("instructblip:"):
        gen = modtext.load_pretrained_instructblip(spec.split(":", 1)[1])
        gen.model_id = spec
        if device is not None:
            gen = gen.to(device)
        return SimulatedUser(gen.eval(), max_new_tokens, num_beams)
    return SimulatedUser(modtext.load_modification_generator(spec, device), max_new_tokens, num_beams)
