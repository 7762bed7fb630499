"""Retriever training data (`prepare_retriever_dataset`): JSONL of (query, image id, identifier).

Reads the Karpathy JSON (captions), `codes.json` and optionally pseudo queries (tools/generate_pseudo_query.py);
writes `output_dir/train.jsonl` (training captions, plus pseudo queries of the images in `pseudo_splits`, which
is how gallery images get indexed) and `output_dir/val.jsonl` (validation captions, for model selection).
Each line: {"query", "imgid", "code": [c_1..c_L, suffix], "set": [...], "source": "caption"|"pseudo"}.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from core.config import parse_config
from core.data import canonical_split, caption_queries, load_karpathy
from core.errors import InputError
from core.io import atomic_write_jsonl, read_jsonl
from rqvae.codes import Identifiers


@dataclass
class PrepareDatasetConfig:
    data_json: str = "runs/shapes/data/dataset_shapes.json"
    image_root: str = "runs/shapes/data/images"
    codes: str = "runs/shapes/comgtir/codes.json"
    pseudo_queries: str = ""  # JSONL from tools/generate_pseudo_query.py ("" = none)
    pseudo_splits: list[str] = field(default_factory=lambda: ["train", "val", "test"])
    train_split: str = "train"
    val_split: str = "val"
    output_dir: str = "runs/shapes/comgtir/data"


def rows_for(queries: list[tuple[str, object]], ids: Identifiers, source: str) -> list[dict]:
    return [{"query": q, "imgid": i, "code": list(ids.seq[str(i)]), "set": ids.sets[str(i)], "source": source}
            for q, i in queries]


def main(argv: Sequence[str] | None = None) -> Path:
    cfg = parse_config(PrepareDatasetConfig, argv)
    ids = Identifiers(cfg.codes)
    out = Path(cfg.output_dir)
    train = load_karpathy(cfg.data_json, cfg.image_root, cfg.train_split, check_files=False)
    val = load_karpathy(cfg.data_json, cfg.image_root, cfg.val_split, check_files=False)
    ids.require([r.imgid for r in train + val])
    train_rows = rows_for([(q.text, q.imgid) for q in caption_queries(train)], ids, "caption")
    if cfg.pseudo_queries:
        pseudo = [p for p in read_jsonl(cfg.pseudo_queries, required=["imgid", "query", "split"])
                  if canonical_split(p["split"]) in cfg.pseudo_splits]  # files written before restval said train
        if not pseudo:
            raise InputError(cfg.pseudo_queries, "split", f"no pseudo query for splits {cfg.pseudo_splits}")
        ids.require([p["imgid"] for p in pseudo], what="pseudo-query image")
        train_rows += rows_for([(p["query"], p["imgid"]) for p in pseudo], ids, "pseudo")
    val_rows = rows_for([(q.text, q.imgid) for q in caption_queries(val)], ids, "caption")
    atomic_write_jsonl(out / "train.jsonl", train_rows)
    atomic_write_jsonl(out / "val.jsonl", val_rows)
    n_pseudo = sum(r["source"] == "pseudo" for r in train_rows)
    print(f"retriever data: {len(train_rows)} training rows ({n_pseudo} pseudo), {len(val_rows)} validation → {out}")
    return out


if __name__ == "__main__":
    main()
