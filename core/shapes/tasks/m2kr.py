"""Multimodal documents in the M2KR layout (the ReT task): writes `m2kr/` under the world folder.

A document is one object of one scene: its passage names the object ("Vorik is the large red circle
in the top left of the picture.") and its image is the scene's image (`images/{filename}`). A query
asks for that name with a question that picks the object out by a few attributes ("What is the name
of the red circle?") and shows the same scene re-rendered with new jitter and background
(`m2kr/images/{filename}`). So:
  - the image alone cannot tell which document: only scenes of 2-3 objects get queries, and every
    object of a scene is a document with the same image;
  - the text alone cannot tell which document: a question is kept only if its attributes also fit an
    object of another scene of the same split (`n_text_matches` >= 2 counts them).

Files (M2KR / PreFLMR field names, one JSON object a line; `img_path` is relative to the world folder):
  m2kr/shapes_{split}.jsonl            queries: question_id, question, instruction, img_path, img_id,
                                       pos_item_ids, pos_item_contents, answers, gold_answer,
                                       n_image_matches, n_text_matches
  m2kr/shapes_passages_{split}.jsonl   passages: passage_id, passage_content, img_path, img_id
Train queries: one per object of every multi-object scene; val/test: one per multi-object scene.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np

from core.io import atomic_write_jsonl
from core.shapes.captions import COLOUR_WORDS, SHAPE_WORDS, SIZE_WORDS, describe_object, pick, position_phrase
from core.shapes.make import SPLITS, load_world_config
from core.shapes.render import render
from core.shapes.world import JITTER, Obj, Scene, SceneRecord, sample_background

NAME = "m2kr"
VERSION = 1  # bump when queries, passages or query images change
FOLDER = "m2kr"
INSTRUCTION = "Using the provided image, obtain documents that address the subsequent question: "
# Attribute subsets a question may use to pick an object out; the cell alone always works (cells are distinct).
REFERENCES: dict[str, tuple[str, ...]] = {
    "colour+shape": ("colour", "shape"),
    "size+shape": ("size", "shape"),
    "shape+cell": ("shape", "row", "col"),
    "colour+cell": ("colour", "row", "col"),
    "cell": ("row", "col"),
}
QUESTIONS = ("What is the name of {r}?", "What is {r} called?", "Which name does {r} have?", "How is {r} named?")
_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


def queries_file(split: str) -> str:
    return f"{FOLDER}/shapes_{split}.jsonl"


def passages_file(split: str) -> str:
    return f"{FOLDER}/shapes_passages_{split}.jsonl"


def write(scenes: list[SceneRecord], out_dir: Path, rng: np.random.Generator) -> None:
    out_dir = Path(out_dir)
    image_size = load_world_config(out_dir).image_size
    (out_dir / FOLDER / "images").mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        records = [r for r in scenes if r.split == split]
        if not records:
            continue
        passages, queries = _split_files(records, split, rng, out_dir, image_size)
        atomic_write_jsonl(out_dir / passages_file(split), passages)
        atomic_write_jsonl(out_dir / queries_file(split), queries)


def _split_files(records: list[SceneRecord], split: str, rng: np.random.Generator, out_dir: Path,
                 image_size: int) -> tuple[list[dict], list[dict]]:
    names = _unique_names(sum(len(r.scene.objects) for r in records), rng)
    # How many documents of the split each attribute subset fits: a question is kept only if its
    # subset fits another scene too, so that its text alone is ambiguous.
    text_matches = Counter(_key(o, ref) for r in records for o in r.scene.objects for ref in REFERENCES)
    passages, queries, name_iter = [], [], iter(names)
    for rec in records:
        docs = []
        for k, obj in enumerate(rec.scene.objects):
            name = next(name_iter)
            pid = f"shapes-{split}-{rec.imgid}-{k}"
            content = f"{name} is {describe_object(obj, rng)} of the picture."
            passages.append({"passage_id": pid, "passage_content": content,
                             "img_path": f"images/{rec.filename}", "img_id": str(rec.imgid)})
            docs.append((pid, content, name))
        if len(rec.scene.objects) < 2:
            continue  # the image alone would identify the document
        query_image = f"{FOLDER}/images/{rec.filename}"
        render(_rerender(rec.scene, rng), image_size).save(out_dir / query_image, format="PNG")
        chosen = range(len(docs)) if split == "train" else [int(rng.integers(len(docs)))]
        for k in chosen:
            question = _question(rec.scene, k, rng, text_matches)
            if question is None:
                continue
            text, ref = question
            pid, content, name = docs[k]
            queries.append({
                "question_id": f"shapes-{split}-q{rec.imgid}-{k}", "question": text, "instruction": INSTRUCTION,
                "img_path": query_image, "img_id": str(rec.imgid), "pos_item_ids": [pid],
                "pos_item_contents": [content], "answers": [name], "gold_answer": name,
                "n_image_matches": len(docs), "n_text_matches": text_matches[_key(rec.scene.objects[k], ref)],
            })
    return passages, queries


def _key(obj: Obj, ref: str) -> tuple:
    return (ref, *(getattr(obj, a) for a in REFERENCES[ref]))


def _question(scene: Scene, index: int, rng: np.random.Generator, text_matches: Counter) -> tuple[str, str] | None:
    """A question naming object `index` by an attribute subset that is unique in its scene but not in the split."""
    obj = scene.objects[index]
    others = [o for j, o in enumerate(scene.objects) if j != index]
    refs = [ref for ref in REFERENCES
            if all(_key(o, ref) != _key(obj, ref) for o in others) and text_matches[_key(obj, ref)] >= 2]
    if not refs:
        return None
    ref = refs[int(rng.integers(len(refs)))]
    return pick(rng, QUESTIONS).format(r=_reference_words(obj, ref, rng)), ref


def _reference_words(obj: Obj, ref: str, rng: np.random.Generator) -> str:
    words: dict[str, Callable[[], str]] = {
        "colour+shape": lambda: f"the {pick(rng, COLOUR_WORDS[obj.colour])} {pick(rng, SHAPE_WORDS[obj.shape])}",
        "size+shape": lambda: f"the {pick(rng, SIZE_WORDS[obj.size])} {pick(rng, SHAPE_WORDS[obj.shape])}",
        "shape+cell": lambda: f"the {pick(rng, SHAPE_WORDS[obj.shape])} {position_phrase(obj.row, obj.col, rng)}",
        "colour+cell": lambda: f"the {pick(rng, COLOUR_WORDS[obj.colour])} shape {position_phrase(obj.row, obj.col, rng)}",
        "cell": lambda: f"the {pick(rng, ('shape', 'object', 'thing'))} {position_phrase(obj.row, obj.col, rng)}",
    }
    return words[ref]()


def _unique_names(n: int, rng: np.random.Generator) -> list[str]:
    """`n` distinct made-up names ("Vorik", "Talemu"): the answers, which only the right passage holds."""
    names: set[str] = set()
    out = []
    while len(out) < n:
        name = "".join(_SYLLABLES[i] for i in rng.integers(len(_SYLLABLES), size=int(rng.integers(2, 4)))).capitalize()
        if name not in names:
            names.add(name)
            out.append(name)
    return out


def _rerender(scene: Scene, rng: np.random.Generator) -> Scene:
    """The same scene (same words) with new jitter and background: the query's own photo of it."""
    objects = tuple(dataclasses.replace(o, dx=round(float(rng.uniform(-JITTER, JITTER)), 3),
                                        dy=round(float(rng.uniform(-JITTER, JITTER)), 3)) for o in scene.objects)
    return Scene(objects, sample_background(rng))
