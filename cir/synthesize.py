"""Synthesize triplets with the trained MTST generator (MTST paper §3.2): mine image pairs from the source groups
(CIRR: NLVR2-style sets; Shapes: the near-duplicate sets, so pairs differ by one or two edits), write a modification
text for each, filter, and write them in the CIRR layout. Also writes the reverse texts (target → reference) of the
annotated triplets that PTHA fine-tuning needs.

Writes under `output_dir`: `captions/cap.rc2.{split}.json` (synthetic triplets), `captions/cap.rc2.{split}_reverse.json`
(annotated triplets reversed, same pairid, generated text), matching `image_splits/`, and `synthetic.json` (generator
id, counts, the image root the paths are relative to). A finished synthesis by the same generator is not redone.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from cir.data import cirr_files, load_cirr, load_cirr_sets
from cir.features import TokenBank, check_mode, token_source
from core.config import parse_config, save_config
from core.data import LoaderOptions, verify_images
from core.device import seed_everything, set_threads
from core.io import atomic_dir, atomic_write_json, read_json
from core.logging import progress
from core.modtext import ModificationTextGenerator, load_modification_generator


@dataclass
class SynthConfig(LoaderOptions):
    cirr_root: str = "data/shapes/cirr"  # source: CIRR-layout folder with image_sets/ (the groups to mine)
    image_root: str = ""  # default {cirr_root}/img_raw
    split: str = "train"
    generator: str = "runs/shapes/cir/mtst/checkpoint-best"
    output_dir: str = "runs/shapes/cir/synthetic"
    cache_dir: str = ""  # image-token cache; default {output_dir}/../features
    image_tokens: str = "cache"  # "cache" (float16 memory-mapped, the Shapes default) or "live" (real ViT-g towers)
    max_pairs: int = 8000  # mined pairs to caption (a random sample when more are available)
    exclude_annotated: bool = True  # do not re-caption pairs a human annotated
    min_words: int = 3  # filter: shorter texts are dropped
    max_new_tokens: int = 32
    num_beams: int = 1
    batch_size: int = 256
    seed: int = 0
    threads: int = 0  # torch CPU threads; 0 = one per core, 1 when the CPU is shared with other busy jobs
    overwrite: bool = False


def main(argv: Sequence[str] | None = None) -> dict:
    cfg = parse_config(SynthConfig, argv)
    set_threads(cfg.threads)
    check_mode(cfg.image_tokens)
    out = Path(cfg.output_dir)
    gen = load_modification_generator(cfg.generator)
    manifest_path = out / "synthetic.json"
    if manifest_path.is_file() and not cfg.overwrite:
        manifest = read_json(manifest_path)
        if manifest.get("generator") == gen.model_id and manifest.get("max_pairs") == cfg.max_pairs:
            print(f"[synthesize] {out} already holds {manifest['n_synthetic']} triplets from {gen.model_id}; reusing")
            return manifest
    seed_everything(cfg.seed)
    source = load_cirr(cfg.cirr_root, cfg.split, cfg.image_root or None)
    if cfg.verify_images:
        verify_images(list(source.images.values()), cfg.cirr_root, cfg)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else out.parent / "features"
    bank = token_source(cfg.image_tokens, gen.image_encoder, source.images,
                        cache / f"{Path(cfg.cirr_root).name}_{cfg.split}", cfg)
    sets = load_cirr_sets(cfg.cirr_root, cfg.split)
    annotated = {(t.reference, t.target) for t in source.triplets} if cfg.exclude_annotated else set()
    pairs = mine_pairs(sets, annotated, cfg.max_pairs, cfg.seed)
    texts = generate_texts(gen, bank, pairs, cfg)
    keep = [i for i, t in enumerate(texts) if keep_text(t, cfg.min_words)]
    rows = [_row(k, pairs[i][0], pairs[i][1], texts[i], pairs[i][2], pairs[i][3]) for k, i in enumerate(keep)]
    rev_pairs = [(t.target, t.reference, t.members, t.set_id) for t in source.triplets]
    rev_texts = generate_texts(gen, bank, rev_pairs, cfg)
    reverse = [_row(t.pairid, t.target, t.reference, text, t.members, t.set_id)
               for t, text in zip(source.triplets, rev_texts)]
    _, split_path = cirr_files(cfg.cirr_root, cfg.split)
    mapping = read_json(split_path)
    manifest = {
        "generator": gen.model_id, "source": str(Path(cfg.cirr_root).resolve()),
        "image_root": str(Path(cfg.image_root or Path(cfg.cirr_root) / "img_raw").resolve()),
        "max_pairs": cfg.max_pairs, "n_mined": len(pairs), "n_synthetic": len(rows), "n_filtered": len(pairs) - len(rows),
        "n_reverse": len(reverse), "examples": [{"reference": r["reference"], "target": r["target_hard"],
                                                 "caption": r["caption"]} for r in rows[:10]],
    }
    with atomic_dir(out) as tmp:
        atomic_write_json(tmp / "captions" / f"cap.rc2.{cfg.split}.json", rows, indent=None)
        atomic_write_json(tmp / "captions" / f"cap.rc2.{cfg.split}_reverse.json", reverse, indent=None)
        for name in (cfg.split, f"{cfg.split}_reverse"):
            atomic_write_json(tmp / "image_splits" / f"split.rc2.{name}.json", mapping, indent=None)
        save_config(cfg, tmp / "config.yaml")
        atomic_write_json(tmp / "synthetic.json", manifest)
    print(f"[synthesize] {len(rows)} synthetic triplets ({len(pairs) - len(rows)} filtered out of {len(pairs)} mined), "
          f"{len(reverse)} reverse texts -> {out}")
    return manifest


def mine_pairs(sets: Sequence[Sequence[str]], exclude: set[tuple[str, str]], max_pairs: int,
               seed: int) -> list[tuple[str, str, tuple[str, ...], int]]:
    """Every ordered pair of distinct images within a group (not in `exclude`), a seeded sample of `max_pairs`."""
    pairs = [(a, b, tuple(group), gid) for gid, group in enumerate(sets) for a in group for b in group
             if a != b and (a, b) not in exclude]
    rng = np.random.default_rng(seed)
    if len(pairs) > max_pairs:
        pairs = [pairs[i] for i in sorted(rng.choice(len(pairs), size=max_pairs, replace=False))]
    return pairs


@torch.no_grad()
def generate_texts(gen: ModificationTextGenerator, bank: TokenBank, pairs: Sequence[tuple[str, str, object]],
                   cfg: SynthConfig) -> list[str]:
    texts: list[str] = []
    chunks = [pairs[i:i + cfg.batch_size] for i in range(0, len(pairs), cfg.batch_size)]
    tokens = bank.batches([[p[0] for p in c] + [p[1] for p in c] for c in chunks])
    for chunk, chunk_tokens in progress(zip(chunks, tokens), total=len(chunks), desc="synthesize", unit="batch"):
        texts += gen.generate_from_tokens(chunk_tokens.get([p[0] for p in chunk], gen.device),
                                          chunk_tokens.get([p[1] for p in chunk], gen.device), cfg.max_new_tokens,
                                          cfg.num_beams)
    return texts


def keep_text(text: str, min_words: int) -> bool:
    """Filter: long enough, no unknown token, no degenerate repetition ("the the the")."""
    words = text.split()
    if len(words) < min_words or "[UNK]" in text:
        return False
    return re.search(r"\b(\w+)( \1\b){2,}", text) is None


def _row(pairid: int, reference: str, target: str, caption: str, members: Sequence[str], set_id: object) -> dict:
    members = list(members)
    return {"pairid": pairid, "reference": reference, "target_hard": target, "target_soft": {target: 1.0},
            "caption": caption, "img_set": {"id": set_id, "members": members,
                                             "reference_rank": members.index(reference) if reference in members else -1,
                                             "target_rank": members.index(target) if target in members else -1}}


if __name__ == "__main__":
    main()
