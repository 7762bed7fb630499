"""How right the pixel-reading comparer is (`core.shapes.scene_diff.PixelComparer`): on a Shapes world's test
images, the edits it states against the true difference of the two scenes (precision, recall, exact pairs), on
two kinds of pair:

- `cir test pairs`: each annotated CIR test triplet's (reference, target), one edit apart, where the comparer's
  text is also scored against the annotated modification text (ROUGE-L, beside the MTST generator's figure) and
  against another pair's text (the chance level);
- `random test pairs`: two unrelated test images, as the GenIR user sees a shown image and its target early on.

Scenes are read only here, to score; the comparer reads pixels. Writes a JSON and prints a table.

    python -m tools.measure_comparer --world_dir runs/shapes/data --reader runs/shapes/scene_reader.pt \
        --out runs/shapes/comparer.json
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from cir.metrics import generation_scores
from core.config import parse_config
from core.data import load_karpathy, open_image
from core.errors import InputError
from core.io import atomic_write_json
from core.logging import progress
from core.shapes.make import load_scenes
from core.shapes.scene_diff import PixelComparer, edit_agreement, grid_edits, say_edits, scene_grid
from core.shapes.scene_reader import load_reader
from core.shapes.world import Scene


@dataclass
class MeasureComparerConfig:
    world_dir: str = "runs/shapes/data"  # a Shapes world (tools/make_shapes.py)
    reader: str = ""  # the scene reader file (core.shapes.scene_reader)
    out: str = ""  # the JSON to write (default: comparer.json beside the reader)
    random_pairs: int = 500  # pairs of unrelated test images
    batch_size: int = 128
    seed: int = 0


def cir_test_pairs(world: Path) -> tuple[list[Path], list[Path], list[Scene], list[Scene], list[str]]:
    """The world's annotated CIR test triplets as (reference path, target path, their scenes, the text)."""
    root = world / "cirr"
    captions = root / "captions" / "cap.rc2.test.json"
    if not captions.is_file():
        raise InputError(captions, "captions", "no CIR test captions in this world")
    triplets = json.loads(captions.read_text())
    images = json.loads((root / "image_splits" / "split.rc2.test.json").read_text())
    scenes = {k: Scene.from_dict(v) for k, v in json.loads((root / "scenes.rc2.test.json").read_text()).items()}
    path = lambda name: root / "img_raw" / images[name]  # noqa: E731
    refs, tgts = [t["reference"] for t in triplets], [t["target_hard"] for t in triplets]
    return ([path(n) for n in refs], [path(n) for n in tgts], [scenes[n] for n in refs], [scenes[n] for n in tgts],
            [t["caption"] for t in triplets])


def random_test_pairs(world: Path, n: int, seed: int) -> tuple[list[Path], list[Path], list[Scene], list[Scene]]:
    test = load_karpathy(world / "dataset_shapes.json", world / "images", "test")
    scenes = {r.imgid: r.scene for r in load_scenes(world)}
    rng = np.random.default_rng(seed)
    first = rng.integers(len(test), size=n)
    second = (first + 1 + rng.integers(len(test) - 1, size=n)) % len(test)  # never the image itself
    a, b = [test[i] for i in first], [test[i] for i in second]
    return [r.path for r in a], [r.path for r in b], [scenes[r.imgid] for r in a], [scenes[r.imgid] for r in b]


def stated_edits(comparer: PixelComparer, before: Sequence[Path], after: Sequence[Path], batch_size: int,
                 desc: str) -> list:
    edits = []
    for i in progress(range(0, len(before), batch_size), desc=desc):
        edits += comparer.edits([open_image(p) for p in before[i:i + batch_size]],
                                [open_image(p) for p in after[i:i + batch_size]])
    return edits


def measure(cfg: MeasureComparerConfig) -> dict[str, dict[str, float]]:
    world = Path(cfg.world_dir)
    comparer = PixelComparer(load_reader(cfg.reader))
    refs, tgts, ref_scenes, tgt_scenes, texts = cir_test_pairs(world)
    stated = stated_edits(comparer, refs, tgts, cfg.batch_size, "comparing CIR test pairs")
    truth = [grid_edits(scene_grid(a), scene_grid(b)) for a, b in zip(ref_scenes, tgt_scenes)]
    said = [say_edits(e) for e in stated]
    cir = edit_agreement(stated, truth)
    cir.update({"ROUGE-L": generation_scores(said, texts)["ROUGE-L"],
                "chance ROUGE-L": generation_scores(said, texts[1:] + texts[:1])["ROUGE-L"]})
    a, b, a_scenes, b_scenes = random_test_pairs(world, cfg.random_pairs, cfg.seed)
    stated = stated_edits(comparer, a, b, cfg.batch_size, "comparing random test pairs")
    rand = edit_agreement(stated, [grid_edits(scene_grid(x), scene_grid(y)) for x, y in zip(a_scenes, b_scenes)])
    return {"cir test pairs": cir, "random test pairs": rand}


def table(results: dict[str, dict[str, float]]) -> str:
    cols = ["precision", "recall", "recall (no size edits)", "exact pairs", "pairs"]
    lines = ["| pair kind | " + " | ".join(cols) + " | ROUGE-L (chance) |", "|---" * (len(cols) + 2) + "|"]
    for name, m in results.items():
        rouge = f"{m['ROUGE-L']:.1f} ({m['chance ROUGE-L']:.1f})" if "ROUGE-L" in m else "–"
        lines.append(f"| {name} | " + " | ".join(f"{m[c]:.1f}" if c != "pairs" else str(m[c]) for c in cols)
                     + f" | {rouge} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    cfg = parse_config(MeasureComparerConfig, argv)
    if not cfg.reader:
        raise InputError("command line", "reader", "required: the scene reader file to measure")
    results = measure(cfg)
    out = Path(cfg.out) if cfg.out else Path(cfg.reader).with_name("comparer.json")
    atomic_write_json(out, results)
    print(table(results))
    print(f"→ {out}")
    return results


if __name__ == "__main__":
    main()
