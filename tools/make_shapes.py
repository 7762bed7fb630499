"""Make the Shapes world (images, scenes and every task's files) into --out_dir.

    python -m tools.make_shapes --out_dir data/shapes --seed 0
"""
from __future__ import annotations

import argparse
import time
from typing import Sequence

from core.shapes.make import WorldConfig, discover_tasks, make_world, world_is_built


def main(argv: Sequence[str] | None = None) -> None:
    d = WorldConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default=d.out_dir, help="folder to write the world into (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--n_train", type=int, default=d.n_train)
    p.add_argument("--n_val", type=int, default=d.n_val)
    p.add_argument("--n_test", type=int, default=d.n_test)
    p.add_argument("--image_size", type=int, default=d.image_size)
    p.add_argument("--captions_per_image", type=int, default=d.captions_per_image)
    p.add_argument("--overwrite", action="store_true", help="replace an existing out_dir that holds another world")
    args = p.parse_args(argv)
    overwrite = args.overwrite
    cfg = WorldConfig(**{k: v for k, v in vars(args).items() if k != "overwrite"})
    cfg.validate()

    reused = not overwrite and world_is_built(cfg)
    t0 = time.perf_counter()
    out = make_world(cfg, overwrite=overwrite)
    tasks = ", ".join(t.NAME for t in discover_tasks())
    print(
        f"shapes world seed={cfg.seed}: {cfg.n_train}/{cfg.n_val}/{cfg.n_test} train/val/test images "
        f"({cfg.image_size}px, {cfg.captions_per_image} captions each), tasks: {tasks} -> {out} "
        + ("(already there, unchanged)" if reused else f"({time.perf_counter() - t0:.1f} s)")
    )


if __name__ == "__main__":
    main()
