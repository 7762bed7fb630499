"""Mental-image-retrieval episodes in ChatIR's layout: writes `chatir/search_space_{split}.json` and
`chatir/dialogues_{split}.json` for the val and test splits.

The search space is a JSON list of image paths (relative to the world folder, as ChatIR's
`Search_Space_val_50k.json` lists paths relative to the COCO root). The dialogue file is a list of
`{"img": path, "dialog": [first_query]}`, ChatIR's `VisDial_v1.0_queries_val.json` layout with only
round 0 filled in: a *vague* first query, the start of a search from a mental image. The query names
one object of the scene and leaves attributes out, so many images fit it and later rounds must add
what is missing.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from core.io import atomic_write_json
from core.shapes.captions import NUMBER_WORDS, describe_object, pick
from core.shapes.world import SceneRecord

NAME = "chatir"
VERSION = 1  # bump when the first queries change
FOLDER = "chatir"
SPLITS = ("val", "test")
# Which attributes a vague first query keeps, with weights: never all three, so the query is never
# a full description of the object, and a multi-object scene has objects the query does not mention.
KEEP = {("colour",): 0.3, ("colour", "size"): 0.2, ("colour", "position"): 0.25, ("size", "position"): 0.1,
        ("position",): 0.15}


def search_space_path(out_dir: Path, split: str) -> Path:
    return Path(out_dir) / FOLDER / f"search_space_{split}.json"


def dialogues_path(out_dir: Path, split: str) -> Path:
    return Path(out_dir) / FOLDER / f"dialogues_{split}.json"


def vague_query(record: SceneRecord, rng: np.random.Generator) -> str:
    """One object of the scene, partly described: "a red circle among other shapes", "a star in the top left"."""
    objects = record.scene.objects
    obj = objects[int(rng.integers(len(objects)))]
    options = list(KEEP)
    p = np.array(list(KEEP.values()))
    keep = options[int(rng.choice(len(options), p=p / p.sum()))]
    body = describe_object(obj, rng, with_size="size" in keep, with_position="position" in keep,
                           with_colour="colour" in keep)
    if len(objects) == 1:
        return pick(rng, ("{b}", "a picture of {b}", "there is {b}")).format(b=body)
    return pick(rng, ("{b} among other shapes", "an image with {n} shapes including {b}", "{b} and something else")).format(
        b=body, n=NUMBER_WORDS[len(objects)])


def write(scenes: list[SceneRecord], out_dir: Path, rng: np.random.Generator) -> None:
    for split in SPLITS:
        records = [r for r in scenes if r.split == split]
        paths = [f"images/{r.filename}" for r in records]
        atomic_write_json(search_space_path(out_dir, split), paths, indent=None)
        dialogues = [{"img": p, "dialog": [vague_query(r, rng)]} for p, r in zip(paths, records)]
        atomic_write_json(dialogues_path(out_dir, split), dialogues, indent=1)
