"""Composed-retrieval triplets in the CIRR layout: writes `cirr/` under the world folder.

Like CIRR (built on NLVR2's groups of similar photos), every image belongs to a set of six near-duplicates: a base
scene and five one-edit variants of it (recolour, reshape, resize, move, add, remove). A triplet links two members
of one set, so reference and target differ by one edit (base ↔ variant) or two (variant ↔ variant, said as "undo one,
do the other": combinations), with varied phrasings. Files (CIRR rc2 formats):

- `cirr/captions/cap.rc2.{split}.json`: `[{"pairid", "reference", "target_hard", "target_soft", "caption",
  "img_set": {"id", "members", "reference_rank", "target_rank"}}]`. Only a small share of the training sets is
  annotated (the paper's setting: few triplets, many image pairs without text); val and test are fully annotated.
- `cirr/image_splits/split.rc2.{split}.json`: `{name: "./{split}/{name}.png"}`, paths relative to `cirr/img_raw/`.
- `cirr/image_sets/sets.rc2.{split}.json`: every set `{"id", "members"}`, annotated or not: the source groups that
  triplet synthesis mines unannotated pairs from (NLVR2's groups for real CIRR).
- `cirr/scenes.rc2.{split}.json`: `{name: scene}`, the ground truth behind each image (for analysis only).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from core.io import atomic_write_json
from core.shapes.captions import pick
from core.shapes.edits import Edit, apply_edit, describe_edit, near_duplicates
from core.shapes.make import SPLITS, load_world_config
from core.shapes.render import render
from core.shapes.world import Scene, SceneRecord, sample_scene, scene_key

NAME = "cirr"
VERSION = 2  # bump when the triplets or images change
FOLDER = "cirr"
SET_SIZE = 6  # CIRR's subsets: the reference and five near-duplicate candidates
ANNOTATED_SET_SHARE = 0.3  # training sets with human-style text; the rest are unannotated image groups
TRIPLETS_PER_SET = {"train": 4, "val": 3, "test": 3}
COMBINE = ("{a} and {b}", "{a}, then {b}", "{a} and also {b}", "{a}; {b}")


def write(scenes: list[SceneRecord], out_dir: Path, rng: np.random.Generator) -> None:
    cfg = load_world_config(out_dir)
    root = Path(out_dir) / FOLDER
    seen: set[str] = set()  # no two CIR images show the same scene (no false negatives in a gallery)
    pairid = 0
    for split, n_images in zip(SPLITS, (cfg.n_train, cfg.n_val, cfg.n_test)):
        n_sets = max(n_images // SET_SIZE, 2)
        sets = [_make_set(rng, seen) for _ in range(n_sets)]
        annotated = _annotated_sets(split, n_sets, rng)
        images, all_sets, scenes_out, triplets = {}, [], {}, []
        (root / "img_raw" / split).mkdir(parents=True, exist_ok=True)
        for set_id, (members, edits) in enumerate(sets):
            names = [f"{split}-{set_id:05d}-img{m}" for m in range(SET_SIZE)]
            for name, scene in zip(names, members):
                render(scene, cfg.image_size).save(root / "img_raw" / split / f"{name}.png", format="PNG")
                images[name] = f"./{split}/{name}.png"
                scenes_out[name] = scene.to_dict()
            all_sets.append({"id": set_id, "members": names})
            if set_id not in annotated:
                continue
            for ref, tgt in _pick_pairs(rng, TRIPLETS_PER_SET[split]):
                triplets.append({
                    "pairid": pairid, "reference": names[ref], "target_hard": names[tgt],
                    "target_soft": {names[tgt]: 1.0}, "caption": _pair_text(members, edits, ref, tgt, rng),
                    "img_set": {"id": set_id, "members": names, "reference_rank": ref, "target_rank": tgt},
                })
                pairid += 1
        atomic_write_json(root / "captions" / f"cap.rc2.{split}.json", triplets, indent=None)
        atomic_write_json(root / "image_splits" / f"split.rc2.{split}.json", images, indent=None)
        atomic_write_json(root / "image_sets" / f"sets.rc2.{split}.json", all_sets, indent=None)
        atomic_write_json(root / f"scenes.rc2.{split}.json", scenes_out, indent=None)


def _annotated_sets(split: str, n_sets: int, rng: np.random.Generator) -> set[int]:
    if split != "train":
        return set(range(n_sets))
    k = max(1, int(round(ANNOTATED_SET_SHARE * n_sets)))
    return set(rng.choice(n_sets, size=k, replace=False).tolist())


def _make_set(rng: np.random.Generator, seen: set[str]) -> tuple[list[Scene], list[Edit | None]]:
    """Six scenes in random order: a base (edit None) and five one-edit variants (edit from the base), all unseen."""
    for _ in range(1000):
        base = sample_scene(rng)
        variants = near_duplicates(base, rng, SET_SIZE - 1)
        keys = [scene_key(base)] + [scene_key(s) for _, s in variants]
        if seen.isdisjoint(keys):
            seen.update(keys)
            members: list[tuple[Scene, Edit | None]] = [(base, None)] + [(s, e) for e, s in variants]
            order = rng.permutation(SET_SIZE)
            return [members[i][0] for i in order], [members[i][1] for i in order]
    raise RuntimeError("could not sample a fresh near-duplicate set")  # unreachable for any sane world size


def _pick_pairs(rng: np.random.Generator, k: int) -> list[tuple[int, int]]:
    pairs = [(a, b) for a in range(SET_SIZE) for b in range(SET_SIZE) if a != b]
    return [pairs[i] for i in rng.choice(len(pairs), size=k, replace=False)]


def _pair_text(members: list[Scene], edits: list[Edit | None], ref: int, tgt: int, rng: np.random.Generator) -> str:
    """Words for reference → target: the target's edit, the inverse of the reference's, or both."""
    base = members[edits.index(None)]
    if edits[ref] is None:
        return describe_edit(edits[tgt], base, rng)
    undo = inverse_edit(edits[ref], members[ref])
    back = apply_edit(members[ref], undo)
    first = describe_edit(undo, members[ref], rng)
    if edits[tgt] is None:
        return first
    redo = retarget(edits[tgt], base, back)
    second = describe_edit(redo, back, rng)
    assert scene_key(apply_edit(back, redo)) == scene_key(members[tgt])
    return pick(rng, COMBINE).format(a=first, b=second)


def inverse_edit(edit: Edit, after: Scene) -> Edit:
    """The edit that turns `after` (= apply_edit(before, edit)) back into `before`."""
    if edit.kind == "add":
        i = _index_at(after, edit.new.cell)
        return Edit("remove", i, after.objects[i], None)
    if edit.kind == "remove":
        return Edit("add", len(after.objects), None, edit.old)
    if edit.kind == "move":
        return Edit("move", _index_at(after, edit.new), edit.new, edit.old)
    return Edit(edit.kind, edit.index, edit.new, edit.old)


def retarget(edit: Edit, scene: Scene, same: Scene) -> Edit:
    """`edit` (written for `scene`) for `same`, a scene with the same objects in another order."""
    if edit.kind == "add":
        return Edit("add", len(same.objects), None, edit.new)
    i = _index_at(same, scene.objects[edit.index].cell)
    return Edit(edit.kind, i, edit.old, edit.new)


def _index_at(scene: Scene, cell: tuple[int, int]) -> int:
    return next(i for i, o in enumerate(scene.objects) if o.cell == tuple(cell))
