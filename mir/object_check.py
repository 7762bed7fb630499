"""Which test captions the GenIR stage's object check can use: those naming every object of their scene, read with
the refiner's parser of the world's grammar (the scene reader itself is `core.shapes.scene_reader`)."""
from __future__ import annotations

from typing import Sequence

from core.shapes.world import Scene
from mir.refiner import parse_caption


def names_every_object(caption: str, scene: Scene) -> bool:
    """Whether the caption names each of the scene's objects with shape, colour, size and cell (and no other)."""
    state = parse_caption(caption)
    said = {(o.shape, o.colour, o.size, o.cell) for o in state.objects}
    truth = {(o.shape, o.colour, o.size, o.cell) for o in scene.objects}
    return len(state.objects) == len(scene.objects) and said == truth


def complete_caption(captions: Sequence[str], scene: Scene) -> str | None:
    """The first of an image's captions that names every object of its scene, if any."""
    return next((c for c in captions if names_every_object(c, scene)), None)

