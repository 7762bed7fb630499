"""Words for the Shapes world: object descriptions, position phrases and paraphrased captions.

About one caption in three is partial (an object, the size, the position or the colour is
left out), so several images can fit one caption, as with real captions. Every choice is
drawn from the `rng` passed in.
"""
from __future__ import annotations

import re

import numpy as np

from core.shapes.world import Obj, Scene

SHAPE_WORDS = {
    "circle": ("circle", "circle", "disc"),
    "square": ("square",),
    "triangle": ("triangle",),
    "star": ("star",),
    "diamond": ("diamond", "diamond", "rhombus"),
    "cross": ("cross", "cross", "plus sign"),
}
COLOUR_WORDS = {
    "red": ("red",),
    "green": ("green",),
    "blue": ("blue",),
    "yellow": ("yellow",),
    "purple": ("purple", "purple", "violet"),
    "orange": ("orange",),
    "black": ("black",),
    "cyan": ("cyan", "cyan", "turquoise"),
}
SIZE_WORDS = {
    "small": ("small", "small", "little", "tiny"),
    "medium": ("medium", "medium-sized", "mid-sized"),
    "large": ("large", "large", "big", "huge"),
}
POSITION_NAMES = {
    (0, 0): "top left", (0, 1): "top middle", (0, 2): "top right",
    (1, 0): "middle left", (1, 1): "middle", (1, 2): "middle right",
    (2, 0): "bottom left", (2, 1): "bottom middle", (2, 2): "bottom right",
}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}

PARTIAL_P = 1 / 3  # share of captions that leave something out
# How a partial caption is partial, with weights; "drop_object" needs two or more objects.
PARTIAL_MODES = {"drop_object": 0.35, "no_size": 0.2, "no_position": 0.2, "no_colour": 0.15, "shapes_only": 0.1}


def pick(rng: np.random.Generator, options):
    """One of `options`, uniformly; repeated entries weight a word up."""
    return options[int(rng.integers(len(options)))]


def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _position_nouns(row: int, col: int) -> list[tuple[str, tuple[str, ...]]]:
    """Noun phrases naming cell (row, col), each with the prepositions that read naturally."""
    v = {0: ("top", "upper"), 2: ("bottom", "lower")}
    h = {0: "left", 2: "right"}
    if row != 1 and col != 1:  # corner
        return [
            (f"the {v[row][0]} {h[col]}", ("in", "at")),
            (f"the {v[row][0]} {h[col]} corner", ("in", "near")),
            (f"the {v[row][1]} {h[col]}", ("in", "at")),
        ]
    if row != 1:  # middle of the top or bottom row
        t = v[row][0]
        return [
            (f"the {t} middle", ("in", "at")),
            (f"the {t} centre", ("in", "at")),
            (f"the centre of the {t} row", ("in",)),
            (f"the {t} edge", ("at", "near")),
        ]
    if col != 1:  # middle of the left or right column
        s = h[col]
        return [
            (f"the middle {s}", ("in", "at")),
            (f"the {s} side", ("on",)),
            (f"the centre of the {s} column", ("in",)),
            (f"the {s} edge", ("at", "near")),
        ]
    return [("the middle", ("in",)), ("the centre", ("in", "at")), ("the center", ("in",)), ("the middle of the image", ("in",))]


def position_name(row: int, col: int) -> str:
    """Canonical name of a cell: "top left", "middle", "bottom middle", ..."""
    return POSITION_NAMES[(row, col)]


def position_phrase(row: int, col: int, rng: np.random.Generator, prep: str | None = None) -> str:
    """A prepositional phrase for a cell: "in the top left", "at the centre of the top row", ...

    `prep` forces the preposition (e.g. "to" for a move destination); otherwise a natural one
    for the chosen noun phrase is drawn.
    """
    noun, preps = pick(rng, _position_nouns(row, col))
    return f"{prep or pick(rng, preps)} {noun}"


def describe_object(
    obj: Obj,
    rng: np.random.Generator,
    with_size: bool = True,
    with_position: bool = True,
    with_colour: bool = True,
    article: bool = True,
) -> str:
    """E.g. "a small red circle in the top left"; the `with_*` flags leave attributes out."""
    words = []
    if with_size:
        words.append(pick(rng, SIZE_WORDS[obj.size]))
    if with_colour:
        words.append(pick(rng, COLOUR_WORDS[obj.colour]))
    words.append(pick(rng, SHAPE_WORDS[obj.shape]))
    phrase = " ".join(words)
    if article:
        phrase = with_article(phrase)
    if with_position:
        phrase += " " + position_phrase(obj.row, obj.col, rng)
    return phrase


def join_list(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _one_caption(scene: Scene, rng: np.random.Generator) -> str:
    objects = list(scene.objects)
    n_total = len(objects)
    mode = None
    if rng.random() < PARTIAL_P:
        modes = [m for m in PARTIAL_MODES if m != "drop_object" or n_total > 1]
        p = np.array([PARTIAL_MODES[m] for m in modes])
        mode = modes[int(rng.choice(len(modes), p=p / p.sum()))]
    if mode == "drop_object":
        keep = int(rng.integers(1, n_total))  # at least one object left out
        idx = sorted(rng.choice(n_total, size=keep, replace=False).tolist())
        objects = [objects[i] for i in idx]
    if rng.random() < 0.5:  # reading order or any order
        objects = [objects[i] for i in rng.permutation(len(objects))]
    flags = dict(
        with_size=mode not in ("no_size", "shapes_only"),
        with_position=mode not in ("no_position", "shapes_only"),
        with_colour=mode not in ("no_colour", "shapes_only"),
    )
    body = join_list([describe_object(o, rng, **flags) for o in objects])

    if mode == "drop_object":
        templates = ["{b}", "there is {b}", "a picture of {b}", "an image with {n} shapes including {b}", "{b} among other shapes"]
    else:
        templates = ["{b}", "there is {b}", "a picture of {b}", "{b} on a light background"]
        templates.append("an image with one shape: {b}" if n_total == 1 else "an image with {n} shapes: {b}")
        if n_total > 1:
            templates.append("{n} shapes: {b}")
    return pick(rng, templates).format(b=body, n=NUMBER_WORDS[n_total])


def caption_scene(scene: Scene, rng: np.random.Generator, n: int = 5) -> list[str]:
    """`n` paraphrased captions of `scene`, about a third of them partial; no exact repeats
    unless the scene is too simple to say `n` different things about."""
    captions: list[str] = []
    for _ in range(n):
        for _attempt in range(10):
            cap = _one_caption(scene, rng)
            if cap not in captions:
                break
        captions.append(cap)
    return captions


def tokenize(sentence: str) -> list[str]:
    """Lower-case word tokens without punctuation, as in the Karpathy split files."""
    return re.findall(r"[a-z0-9]+(?:-[a-z0-9]+)*", sentence.lower())


# --- hard-negative captions -------------------------------------------------------------------------------------
# A caption with one attribute changed describes a different scene, so in contrastive training it is a negative that
# only the changed word separates from the truth (as in NegCLIP). In-batch negatives alone almost always differ in
# colour, so a dual encoder learns colour and size and ignores shape and position unless made to tell them apart.
CONTRAST_KINDS = ("shape", "position", "colour", "size", "swap")


def _word_pattern(phrases) -> re.Pattern:
    alternatives = sorted(set(phrases), key=len, reverse=True)  # longest first: "the top middle" before "the top"
    return re.compile(r"(?<![\w-])(" + "|".join(re.escape(p) for p in alternatives) + r")(?![\w-])")


def _value_of(words: dict[str, tuple[str, ...]]) -> dict[str, str]:
    return {w: value for value, synonyms in words.items() for w in synonyms}


_SHAPE_OF, _COLOUR_OF, _SIZE_OF = _value_of(SHAPE_WORDS), _value_of(COLOUR_WORDS), _value_of(SIZE_WORDS)
_CELL_OF = {f"{prep} {noun}": cell for cell in POSITION_NAMES
            for noun, preps in _position_nouns(*cell) for prep in preps}
_WORD_VALUES = {"shape": (_SHAPE_OF, SHAPE_WORDS), "colour": (_COLOUR_OF, COLOUR_WORDS), "size": (_SIZE_OF, SIZE_WORDS)}
_PATTERNS = {"shape": _word_pattern(_SHAPE_OF), "colour": _word_pattern(_COLOUR_OF), "size": _word_pattern(_SIZE_OF),
             "position": _word_pattern(_CELL_OF)}


def contrast_caption(caption: str, rng: np.random.Generator, kinds=CONTRAST_KINDS) -> str | None:
    """`caption` with one attribute changed: a shape, colour or size word for another value's word, a position
    phrase for a cell the caption leaves free, or ("swap") the shapes of two differently shaped objects exchanged. The kind is drawn
    from those of `kinds` that the caption offers; None when it offers none."""
    unknown = set(kinds) - set(CONTRAST_KINDS)
    if unknown:
        raise ValueError(f"unknown contrast kinds {sorted(unknown)}; expected some of {CONTRAST_KINDS}")
    matches = {k: _swappable_pairs(caption) if k == "swap" else list(_PATTERNS[k].finditer(caption)) for k in kinds}
    offered = [k for k, found in matches.items() if found]
    if not offered:
        return None
    kind = pick(rng, offered)
    found = matches[kind]
    if kind == "swap":
        return _swap_shapes(caption, pick(rng, found))
    m = pick(rng, found)
    if kind == "position":
        named = {_CELL_OF[f.group(1)] for f in found}  # one object per cell: move to a cell no object is said to be in
        new_cell = pick(rng, [c for c in POSITION_NAMES if c not in named])
        replacement = position_phrase(*new_cell, rng)
    else:
        value_of, words = _WORD_VALUES[kind]
        new_value = pick(rng, [v for v in words if v != value_of[m.group(1)]])
        replacement = pick(rng, words[new_value])
    return caption[:m.start(1)] + replacement + caption[m.end(1):]


def _descriptions(caption: str, shapes: list[re.Match]) -> list[tuple]:
    """What each shape word's object is said to be: colours and sizes come before the shape word and the position
    after it, so the text between two shape words holds the first one's position and the second one's attributes."""
    bounds = [0] + [m.start() for m in shapes[1:]] + [len(caption)]
    gaps = [caption[(shapes[i - 1].end() if i else 0):m.start()] for i, m in enumerate(shapes)]
    after = [caption[m.end():bounds[i + 1]] for i, m in enumerate(shapes)]

    def values(kind: str, text: str) -> tuple[str, ...]:
        table = _CELL_OF if kind == "position" else _WORD_VALUES[kind][0]
        return tuple(str(table[m.group(1)]) for m in _PATTERNS[kind].finditer(text))

    return [(values("colour", g), values("size", g), values("position", a)) for g, a in zip(gaps, after)]


def _swappable_pairs(caption: str) -> list[tuple[re.Match, re.Match]]:
    """Pairs of shape words whose exchange changes the scene: different shapes on differently described objects."""
    shapes = list(_PATTERNS["shape"].finditer(caption))
    described = _descriptions(caption, shapes)
    return [(shapes[i], shapes[j]) for i in range(len(shapes)) for j in range(i + 1, len(shapes))
            if _SHAPE_OF[shapes[i].group(1)] != _SHAPE_OF[shapes[j].group(1)] and described[i] != described[j]]


def _swap_shapes(caption: str, pair: tuple[re.Match, re.Match]) -> str:
    a, b = pair
    return caption[:a.start(1)] + b.group(1) + caption[a.end(1):b.start(1)] + a.group(1) + caption[b.end(1):]
