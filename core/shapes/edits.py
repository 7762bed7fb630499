"""One-step edits of a Shapes scene (recolour, reshape, resize, move, add, remove) and their wording.

Composed-retrieval triplets, near-duplicate sets and multimodal question/passage pairs are
all built from these: an edit is a value (`Edit`), `apply_edit` turns a scene into the
edited scene, and `describe_edit` says the edit in words.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image

from core.errors import InputError
from core.shapes.captions import (COLOUR_WORDS, SHAPE_WORDS, SIZE_WORDS, caption_scene, describe_object, pick,
                                  position_phrase, with_article)
from core.shapes.render import render
from core.shapes.world import COLOURS, MAX_OBJECTS, SHAPES, SIZES, Obj, Scene, sample_object, scene_key

EDIT_KINDS = ("colour", "shape", "size", "move", "add", "remove")
_ATTR = {"colour": "colour", "shape": "shape", "size": "size"}
_VALUES = {"colour": tuple(COLOURS), "shape": SHAPES, "size": SIZES}


@dataclass(frozen=True)
class Edit:
    """One change to object `index` of a scene.

    old/new hold: attribute names for colour/shape/size; (row, col) cells for move; the new
    `Obj` for add (index = its position, i.e. the old object count; old is None); the removed
    `Obj` for remove (new is None).
    """

    kind: str
    index: int
    old: Any = None
    new: Any = None

    def __post_init__(self) -> None:
        if self.kind not in EDIT_KINDS:
            raise InputError(None, "kind", f"unknown edit kind {self.kind!r}; expected one of {EDIT_KINDS}")
        if self.kind == "move":
            for name in ("old", "new"):
                cell = getattr(self, name)
                if not isinstance(cell, (tuple, list)) or len(cell) != 2:
                    raise InputError(None, name, f"a move needs a (row, col) cell, got {cell!r}")
                object.__setattr__(self, name, (int(cell[0]), int(cell[1])))

    def to_dict(self) -> dict[str, Any]:
        def enc(v):
            if isinstance(v, Obj):
                return v.to_dict()
            return list(v) if isinstance(v, tuple) else v

        return {"kind": self.kind, "index": self.index, "old": enc(self.old), "new": enc(self.new)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Edit":
        for key in ("kind", "index"):
            if key not in d:
                raise InputError(None, key, "required field is missing")
        old, new = d.get("old"), d.get("new")
        if d["kind"] == "add":
            new = Obj.from_dict(new)
        elif d["kind"] == "remove":
            old = Obj.from_dict(old)
        return cls(d["kind"], int(d["index"]), old, new)


def apply_edit(scene: Scene, edit: Edit) -> Scene:
    """The edited scene; an edit that does not fit `scene` (wrong index, wrong old value, a
    taken cell, too many or too few objects) raises InputError."""
    objs = list(scene.objects)
    n = len(objs)
    if edit.kind == "add":
        if edit.index != n or not isinstance(edit.new, Obj):
            raise InputError(None, "edit.index", f"add must append a new Obj at index {n}, got index {edit.index}")
        if n >= MAX_OBJECTS:
            raise InputError(None, "edit.kind", f"cannot add to a scene with {n} objects")
        if edit.new.cell in scene.occupied():
            raise InputError(None, "edit.new", f"cell {edit.new.cell} is already taken")
        return Scene(tuple(objs + [edit.new]), scene.background)
    if not 0 <= edit.index < n:
        raise InputError(None, "edit.index", f"no object {edit.index} in a scene with {n} objects")
    obj = objs[edit.index]
    if edit.kind == "remove":
        if n <= 1:
            raise InputError(None, "edit.kind", "cannot remove the only object of a scene")
        if edit.old is not None and edit.old != obj:
            raise InputError(None, "edit.old", f"object {edit.index} is {obj}, not {edit.old}")
        del objs[edit.index]
        return Scene(tuple(objs), scene.background)
    if edit.kind == "move":
        if edit.old != obj.cell:
            raise InputError(None, "edit.old", f"object {edit.index} is in cell {obj.cell}, not {edit.old}")
        if edit.new in scene.occupied():
            raise InputError(None, "edit.new", f"cell {edit.new} is already taken")
        objs[edit.index] = dataclasses.replace(obj, row=edit.new[0], col=edit.new[1])
        return Scene(tuple(objs), scene.background)
    attr = _ATTR[edit.kind]
    if getattr(obj, attr) != edit.old:
        raise InputError(None, "edit.old", f"object {edit.index} has {attr} {getattr(obj, attr)!r}, not {edit.old!r}")
    if edit.new == edit.old:
        raise InputError(None, "edit.new", f"new {attr} equals the old one ({edit.old!r})")
    objs[edit.index] = dataclasses.replace(obj, **{attr: edit.new})
    return Scene(tuple(objs), scene.background)


def possible_kinds(scene: Scene) -> list[str]:
    """Edit kinds that can apply to `scene` (add needs a free slot, remove a second object)."""
    n = len(scene.objects)
    return [k for k in EDIT_KINDS if not (k == "add" and n >= MAX_OBJECTS) and not (k == "remove" and n <= 1)]


def random_edit(scene: Scene, rng: np.random.Generator, kinds: Sequence[str] | None = None) -> tuple[Edit, Scene]:
    """A random valid edit among `kinds` (default: all that apply) and the edited scene."""
    if kinds is not None:
        unknown = [k for k in kinds if k not in EDIT_KINDS]
        if unknown:
            raise InputError(None, "kinds", f"unknown edit kind {unknown[0]!r}; expected some of {EDIT_KINDS}")
    allowed = [k for k in possible_kinds(scene) if kinds is None or k in kinds]
    if not allowed:
        raise InputError(None, "kinds", f"none of {list(kinds or [])} applies to a scene with {len(scene.objects)} objects")
    kind = pick(rng, allowed)
    n = len(scene.objects)
    if kind == "add":
        free = scene.free_cells()
        row, col = free[int(rng.integers(len(free)))]
        edit = Edit("add", n, None, sample_object(rng, row, col))
    else:
        i = int(rng.integers(n))
        obj = scene.objects[i]
        if kind == "remove":
            edit = Edit("remove", i, obj, None)
        elif kind == "move":
            free = scene.free_cells()
            edit = Edit("move", i, obj.cell, free[int(rng.integers(len(free)))])
        else:
            old = getattr(obj, _ATTR[kind])
            choices = [v for v in _VALUES[kind] if v != old]
            edit = Edit(kind, i, old, pick(rng, choices))
    return edit, apply_edit(scene, edit)


def referring_expression(scene: Scene, index: int, rng: np.random.Generator) -> str:
    """A definite description that picks out object `index` in `scene` and no other object:
    "the circle", "the red square", "the small star", "the star in the top left", ..."""
    obj = scene.objects[index]
    others = [o for j, o in enumerate(scene.objects) if j != index]
    shape = lambda: pick(rng, SHAPE_WORDS[obj.shape])  # noqa: E731
    options = []
    if all(o.shape != obj.shape for o in others):
        options.append(lambda: f"the {shape()}")
    if all((o.colour, o.shape) != (obj.colour, obj.shape) for o in others):
        options.append(lambda: f"the {pick(rng, COLOUR_WORDS[obj.colour])} {shape()}")
    if all((o.size, o.shape) != (obj.size, obj.shape) for o in others):
        options.append(lambda: f"the {pick(rng, SIZE_WORDS[obj.size])} {shape()}")
    # The cell always disambiguates: cells are distinct.
    options.append(lambda: f"the {shape()} {position_phrase(obj.row, obj.col, rng)}")
    return pick(rng, options)()


def _size_change(old: str, new: str, rng: np.random.Generator) -> str:
    step = SIZES.index(new) - SIZES.index(old)
    if rng.random() < 0.5:
        return pick(rng, SIZE_WORDS[new])
    word = "bigger" if step > 0 else "smaller"
    return f"much {word}" if abs(step) == 2 else pick(rng, (word, f"a bit {word}"))


def describe_edit(edit: Edit, scene_before: Scene, rng: np.random.Generator) -> str:
    """The edit as a modification text: "make the circle blue", "remove the star", ..."""
    if edit.kind == "add":
        what = describe_object(edit.new, rng)
        return pick(rng, ("add {w}", "put {w}", "insert {w}", "there should also be {w}", "also draw {w}")).format(w=what)
    ref = referring_expression(scene_before, edit.index, rng)
    if edit.kind == "remove":
        return pick(rng, ("remove {r}", "delete {r}", "take away {r}", "get rid of {r}", "without {r}")).format(r=ref)
    if edit.kind == "move":
        to = position_phrase(edit.new[0], edit.new[1], rng, prep="to")
        return pick(rng, ("move {r} {t}", "put {r} {t}", "shift {r} {t}", "{r} should move {t}")).format(r=ref, t=to)
    if edit.kind == "colour":
        c = pick(rng, COLOUR_WORDS[edit.new])
        return pick(rng, ("make {r} {c}", "change {r} to {c}", "turn {r} {c}", "colour {r} {c}", "{r} should be {c}")).format(r=ref, c=c)
    if edit.kind == "shape":
        s = with_article(pick(rng, SHAPE_WORDS[edit.new]))
        return pick(rng, ("turn {r} into {s}", "change {r} to {s}", "make {r} {s}", "replace {r} with {s} of the same colour")).format(r=ref, s=s)
    change = _size_change(edit.old, edit.new, rng)
    return pick(rng, ("make {r} {c}", "{r} should be {c}")).format(r=ref, c=change)


def near_duplicates(
    scene: Scene, rng: np.random.Generator, n: int, kinds: Sequence[str] | None = None
) -> list[tuple[Edit, Scene]]:
    """`n` one-edit variants of `scene`, pairwise distinct and distinct from `scene` by `scene_key`."""
    seen = {scene_key(scene)}
    out: list[tuple[Edit, Scene]] = []
    for _ in range(100 * max(n, 1)):
        if len(out) == n:
            return out
        edit, edited = random_edit(scene, rng, kinds)
        key = scene_key(edited)
        if key not in seen:
            seen.add(key)
            out.append((edit, edited))
    if len(out) == n:
        return out
    raise InputError(None, "n", f"could not find {n} distinct one-edit variants of {scene_key(scene)}")


def edited_twin(scene: Scene, rng: np.random.Generator, kinds: Sequence[str] | None = None,
                image_size: int = 64) -> tuple[Image.Image, str]:
    """A copy of `scene` with one random edit among `kinds`, rendered and captioned by the world's captioner: in a
    contrastive batch it is a negative for `scene` that differs in one object's one attribute."""
    _, twin = random_edit(scene, rng, kinds)
    return render(twin, image_size), caption_scene(twin, rng, n=1)[0]
