"""Make a Shapes world on disk: sample scenes, render PNGs, then run every task writer.

Writes, under `out_dir`: `images/{split}_{index:05d}.png`, `scenes.json`, `world_config.json`,
and whatever each module in `core/shapes/tasks/` writes (e.g. `dataset_shapes.json`).
A task module defines `NAME: str`, optionally `VERSION: int`, and
`write(scenes: list[SceneRecord], out_dir: Path, rng: np.random.Generator) -> None`;
it can read the world's settings with `load_world_config(out_dir)`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from core.errors import InputError
from core.io import atomic_dir, atomic_write_json, read_json
from core.logging import progress
from core.shapes.render import render
from core.shapes.world import Scene, SceneRecord, sample_scene, scene_key

__all__ = ["WorldConfig", "SceneRecord", "make_world", "world_is_built", "load_world_config", "load_scenes",
           "discover_tasks", "task_rng", "sample_world", "WORLD_VERSION", "SPLITS"]

# Bump when scene sampling or rendering changes: an existing world of another version is then
# a different world and is only replaced with overwrite=True. (Tasks carry their own VERSION.)
WORLD_VERSION = 1
SPLITS = ("train", "val", "test")
CONFIG_FILE = "world_config.json"
SCENES_FILE = "scenes.json"


@dataclass
class WorldConfig:
    seed: int = 0  # fixes the whole world; another seed gives another world
    n_train: int = 5000
    n_val: int = 500
    n_test: int = 1000
    image_size: int = 64  # pixels per side
    captions_per_image: int = 5
    out_dir: str = "data/shapes"

    def validate(self) -> None:
        lows = {"seed": 0, "n_train": 1, "n_val": 0, "n_test": 1, "image_size": 16, "captions_per_image": 1}
        for name, low in lows.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
                raise InputError(None, name, f"must be an integer >= {low}, got {v!r}")

    def world_dict(self) -> dict[str, Any]:
        """Everything that determines the world's content (not where it lives)."""
        d = dataclasses.asdict(self)
        d.pop("out_dir")
        return {**d, "version": WORLD_VERSION}


def task_rng(seed: int, name: str) -> np.random.Generator:
    """An rng that depends only on (seed, name): adding a task never changes another's files.

    Python's hash() is salted per process, so the name goes through sha256.
    """
    digest = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, digest])


def discover_tasks() -> list[ModuleType]:
    """Every task module in core/shapes/tasks/, sorted by module name."""
    import core.shapes.tasks as pkg

    tasks, names = [], {}
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        if not isinstance(getattr(mod, "NAME", None), str) or not callable(getattr(mod, "write", None)):
            raise InputError(mod.__file__, "NAME/write", "a Shapes task module must define NAME: str and write(scenes, out_dir, rng)")
        if mod.NAME in names:
            raise InputError(mod.__file__, "NAME", f"task name {mod.NAME!r} is also used by {names[mod.NAME]}")
        names[mod.NAME] = mod.__name__
        tasks.append(mod)
    return tasks


def sample_world(cfg: WorldConfig) -> list[SceneRecord]:
    """All scenes of the world, train then val then test, imgid 0..N-1.

    Scenes are pairwise distinct by `scene_key` across the whole world, so no test caption
    describes a training image exactly. They are drawn first and shuffled before being dealt
    into splits, so rejecting duplicates (mostly of the few one-object scenes) does not make
    one split's mix differ from another's.
    """
    rng = task_rng(cfg.seed, "scenes")
    n = cfg.n_train + cfg.n_val + cfg.n_test
    scenes: list[Scene] = []
    seen: set[str] = set()
    for _ in range(50 * n):
        if len(scenes) == n:
            break
        s = sample_scene(rng)
        k = scene_key(s)
        if k not in seen:
            seen.add(k)
            scenes.append(s)
    if len(scenes) < n:  # cannot happen for any sane size: there are ~10^9 distinct scenes
        raise InputError(None, "n_train", f"could not sample {n} distinct scenes")
    scenes = [scenes[i] for i in rng.permutation(n)]
    records, imgid = [], 0
    for split, count in zip(SPLITS, (cfg.n_train, cfg.n_val, cfg.n_test)):
        for index in range(count):
            records.append(SceneRecord(imgid, f"{split}_{index:05d}.png", split, scenes[imgid]))
            imgid += 1
    return records


def _wanted_config(cfg: WorldConfig, tasks: list[ModuleType]) -> dict[str, Any]:
    return {**cfg.world_dict(), "tasks": {t.NAME: int(getattr(t, "VERSION", 1)) for t in tasks}}


def _existing_config(out: Path) -> dict[str, Any] | None:
    try:
        return read_json(out / CONFIG_FILE)
    except InputError:
        return None


def world_is_built(cfg: WorldConfig) -> bool:
    """True when `cfg.out_dir` already holds this exact world with every current task."""
    existing = _existing_config(Path(cfg.out_dir))
    return existing == _wanted_config(cfg, discover_tasks())


def make_world(cfg: WorldConfig, overwrite: bool = False) -> Path:
    """Build the world in a temporary folder and rename it to `cfg.out_dir`; returns the folder.

    An `out_dir` that already holds the same world is returned as is (the pipeline can be
    rerun). If it holds the same world but a task was added or changed, it is rebuilt: every
    file depends only on (seed, its task), so the files already there come back identical.
    Anything else in a non-empty `out_dir` is replaced only with `overwrite=True`.
    """
    cfg.validate()
    out = Path(cfg.out_dir)
    tasks = discover_tasks()
    wanted = _wanted_config(cfg, tasks)
    if out.exists() and not out.is_dir():
        raise InputError(out, "out_dir", "exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        existing = _existing_config(out)
        same_world = existing is not None and {k: v for k, v in existing.items() if k != "tasks"} == cfg.world_dict()
        if not same_world:
            raise InputError(out, "out_dir", "already holds other files or another world; pass overwrite=True (--overwrite) to replace it")
        if existing == wanted:
            return out

    records = sample_world(cfg)
    with atomic_dir(out) as tmp:
        (tmp / "images").mkdir()
        for rec in progress(records, desc="render shapes", unit="img"):
            render(rec.scene, cfg.image_size).save(tmp / "images" / rec.filename, format="PNG")
        # Written before the tasks run so that they can read the world's settings from it.
        atomic_write_json(tmp / CONFIG_FILE, wanted)
        atomic_write_json(
            tmp / SCENES_FILE,
            {"seed": cfg.seed, "image_size": cfg.image_size, "images": [r.to_dict() for r in records]},
            indent=None,
        )
        for task in tasks:
            task.write(records, tmp, task_rng(cfg.seed, f"task:{task.NAME}"))
    return out


def load_world_config(out_dir: str | Path) -> WorldConfig:
    """The settings a world was made with (its `world_config.json`), with `out_dir` set."""
    path = Path(out_dir) / CONFIG_FILE
    d = read_json(path, required=[f.name for f in dataclasses.fields(WorldConfig) if f.name != "out_dir"])
    fields = {f.name for f in dataclasses.fields(WorldConfig)} - {"out_dir"}
    return WorldConfig(**{k: d[k] for k in fields}, out_dir=str(out_dir))


def load_scenes(out_dir: str | Path) -> list[SceneRecord]:
    """The world's scenes from `scenes.json`, in imgid order."""
    path = Path(out_dir) / SCENES_FILE
    d = read_json(path, required=["images"])
    if not isinstance(d["images"], list) or not d["images"]:
        raise InputError(path, "images", "must be a non-empty list")
    records = []
    for i, row in enumerate(d["images"]):
        try:
            records.append(SceneRecord.from_dict(row, path))
        except InputError as e:
            raise InputError(path, f"images[{i}].{e.field}", e.message) from None
        except (TypeError, ValueError) as e:
            raise InputError(path, f"images[{i}]", str(e)) from None
    return records
