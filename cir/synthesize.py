"""Synthesize triplets with the trained MTST generator (MTST paper §3.2): mine image pairs from the source groups,
write a modification text for each, filter, and write them in the source's layout. Also writes the reverse texts
(target → reference) of the annotated triplets that PTHA fine-tuning needs, so the source split must give its targets.

Groups: CIRR (`dataset: cirr`) takes them from `cir.data.cirr_groups`: the caption file's `img_set` subsets and the
NLVR2 groups of the remaining images (the Shapes world: its `image_sets/` file); FashionIQ pairs images of one
category, each category's image split being one group (the paper's same-category pairing).

Writes under `output_dir`, in the layout `cir.train` reads as `train_root` / `reverse_root`:
- CIRR: `captions/cap.rc2.{split}.json` (synthetic triplets), `captions/cap.rc2.{split}_reverse.json` (annotated
  triplets reversed, same pairid, generated text) and the matching `image_splits/`;
- FashionIQ: per category, `captions/cap.{category}.{split}.json` (`{"candidate", "target", "captions": [text]}`),
  `captions/cap.{category}.{split}_reverse.json` (row i reverses row i of the annotated file) and the category's
  image split under both names;
and `synthetic.json` (generator id, counts, the image root the paths are relative to). A finished synthesis by the
same generator is not redone.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from cir.data import (FASHIONIQ_CATEGORIES, CIRSplit, cache_key, cirr_files, cirr_groups, default_image_root,
                      load_cir_split, merge_splits)
from cir.features import TokenBank, check_mode, token_source
from core.config import parse_config, save_config
from core.data import LoaderOptions, verify_images
from core.device import seed_everything, set_threads
from core.io import atomic_dir, atomic_write_json, read_json
from core.logging import progress
from core.modtext import ModificationTextGenerator, load_modification_generator

Pair = tuple[str, str, tuple[str, ...], object]  # reference, target, the group's members, the group's id
# Up to this many candidate pairs are listed and sampled exactly; beyond it (a FashionIQ category is one group of
# thousands of images) pairs are drawn without listing them all.
LIST_PAIRS_UP_TO = 2_000_000


@dataclass
class SynthConfig(LoaderOptions):
    dataset: str = "cirr"  # source layout: "cirr" (CIRR layout, Shapes included) or "fashioniq"
    categories: list[str] = field(default_factory=lambda: list(FASHIONIQ_CATEGORIES))  # FashionIQ only
    cirr_root: str = "data/shapes/cirr"  # the source folder (CIRR or FashionIQ layout) whose groups are mined
    image_root: str = ""  # default {cirr_root}/img_raw (FashionIQ: {cirr_root}/images)
    image_ext: str = ".png"  # FashionIQ image files are {name}{image_ext} (copies come as .png or .jpg)
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
    # the source is validated (targets included: the reverse texts need them) before the generator loads
    units = load_cir_split(cfg.dataset, cfg.cirr_root, cfg.split, cfg.categories, cfg.image_root or None,
                           image_ext=cfg.image_ext)
    source = merge_splits(units)
    groups = source_groups(cfg, units)
    gen = load_modification_generator(cfg.generator)
    manifest_path = out / "synthetic.json"
    if manifest_path.is_file() and not cfg.overwrite:
        manifest = read_json(manifest_path)
        if manifest.get("generator") == gen.model_id and manifest.get("max_pairs") == cfg.max_pairs:
            print(f"[synthesize] {out} already holds {manifest['n_synthetic']} triplets from {gen.model_id}; reusing")
            return manifest
    seed_everything(cfg.seed)
    if cfg.verify_images:
        verify_images(list(source.images.values()), cfg.cirr_root, cfg)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else out.parent / "features"
    bank = token_source(cfg.image_tokens, gen.image_encoder, source.images,
                        cache / cache_key(cfg.dataset, cfg.cirr_root, cfg.split, cfg.categories), cfg)
    annotated = {(t.reference, t.target) for t in source.triplets} if cfg.exclude_annotated else set()
    pairs = mine_pairs(groups, annotated, cfg.max_pairs, cfg.seed)
    texts = generate_texts(gen, bank, pairs, cfg)
    kept = [(pairs[i], texts[i]) for i in range(len(pairs)) if keep_text(texts[i], cfg.min_words)]
    rev_pairs = [(t.target, t.reference, t.members, t.set_id) for t in source.triplets]
    rev_texts = generate_texts(gen, bank, rev_pairs, cfg)
    image_root = Path(cfg.image_root) if cfg.image_root else default_image_root(cfg.dataset, cfg.cirr_root)
    manifest = {
        "generator": gen.model_id, "dataset": cfg.dataset, "source": str(Path(cfg.cirr_root).resolve()),
        "image_root": str(image_root.resolve()), "max_pairs": cfg.max_pairs, "n_groups": len(groups),
        "n_mined": len(pairs), "n_synthetic": len(kept), "n_filtered": len(pairs) - len(kept),
        "n_reverse": len(rev_texts), "examples": [{"reference": p[0], "target": p[1], "caption": text}
                                                  for p, text in kept[:10]],
    }
    with atomic_dir(out) as tmp:
        if cfg.dataset == "fashioniq":
            _write_fashioniq(tmp, cfg.split, units, kept, rev_texts)
        else:
            _write_cirr(tmp, cfg, source, kept, rev_texts)
        save_config(cfg, tmp / "config.yaml")
        atomic_write_json(tmp / "synthetic.json", manifest)
    print(f"[synthesize] {len(kept)} synthetic triplets ({len(pairs) - len(kept)} filtered out of {len(pairs)} mined "
          f"from {len(groups)} groups), {len(rev_texts)} reverse texts -> {out}")
    return manifest


def source_groups(cfg: SynthConfig, units: Sequence[CIRSplit]) -> list[tuple[object, tuple[str, ...]]]:
    """The groups pairs are mined within: CIRR's (`cirr_groups`), or one per FashionIQ category, keyed by its name."""
    if cfg.dataset == "fashioniq":
        return [(unit.meta["category"], tuple(unit.gallery)) for unit in units]
    return cirr_groups(cfg.cirr_root, cfg.split)


def _write_cirr(tmp: Path, cfg: SynthConfig, source: CIRSplit, kept: Sequence[tuple[Pair, str]],
                rev_texts: Sequence[str]) -> None:
    rows = [_row(k, ref, tgt, text, members, gid) for k, ((ref, tgt, members, gid), text) in enumerate(kept)]
    reverse = [_row(t.pairid, t.target, t.reference, text, t.members, t.set_id)
               for t, text in zip(source.triplets, rev_texts)]
    mapping = read_json(cirr_files(cfg.cirr_root, cfg.split)[1])
    atomic_write_json(tmp / "captions" / f"cap.rc2.{cfg.split}.json", rows, indent=None)
    atomic_write_json(tmp / "captions" / f"cap.rc2.{cfg.split}_reverse.json", reverse, indent=None)
    for name in (cfg.split, f"{cfg.split}_reverse"):
        atomic_write_json(tmp / "image_splits" / f"split.rc2.{name}.json", mapping, indent=None)


def _write_fashioniq(tmp: Path, split: str, units: Sequence[CIRSplit], kept: Sequence[tuple[Pair, str]],
                     rev_texts: Sequence[str]) -> None:
    # the reverse texts follow the merged triplets: unit by unit, row by row
    offset = 0
    for unit in units:
        category = unit.meta["category"]
        rows = [{"candidate": p[0], "target": p[1], "captions": [text]} for p, text in kept if p[3] == category]
        reverse = [{"candidate": t.target, "target": t.reference, "captions": [text]}
                   for t, text in zip(unit.triplets, rev_texts[offset:offset + len(unit.triplets)])]
        offset += len(unit.triplets)
        atomic_write_json(tmp / "captions" / f"cap.{category}.{split}.json", rows, indent=None)
        atomic_write_json(tmp / "captions" / f"cap.{category}.{split}_reverse.json", reverse, indent=None)
        for name in (split, f"{split}_reverse"):
            atomic_write_json(tmp / "image_splits" / f"split.{category}.{name}.json", unit.gallery, indent=None)


def mine_pairs(groups: Sequence[tuple[object, Sequence[str]]], exclude: set[tuple[str, str]], max_pairs: int,
               seed: int) -> list[Pair]:
    """Ordered pairs of distinct images within a group, none in `exclude` and each once (CIRR's subsets overlap):
    all of them when there are at most `max_pairs`, else a seeded uniform sample of `max_pairs`."""
    sizes = np.array([len(g) * (len(g) - 1) for _, g in groups], dtype=np.int64)
    rng = np.random.default_rng(seed)
    if sizes.sum() > LIST_PAIRS_UP_TO:
        return _draw_pairs(groups, sizes, exclude, max_pairs, rng)
    seen = set(exclude)
    pairs = []
    for gid, group in groups:
        for a in group:
            for b in group:
                if a != b and (a, b) not in seen:
                    seen.add((a, b))
                    pairs.append((a, b, tuple(group), gid))
    if len(pairs) > max_pairs:
        pairs = [pairs[i] for i in sorted(rng.choice(len(pairs), size=max_pairs, replace=False))]
    return pairs


def _draw_pairs(groups: Sequence[tuple[object, Sequence[str]]], sizes: np.ndarray, exclude: set[tuple[str, str]],
                max_pairs: int, rng: np.random.Generator, rounds: int = 20) -> list[Pair]:
    # Uniform over all ordered within-group pairs: a flat index picks the group (by its pair count) and the pair in
    # it; repeats and excluded pairs are drawn again (rare: the sample is a small share of the pairs).
    ends = np.cumsum(sizes)
    seen = set(exclude)
    pairs: list[Pair] = []
    for _ in range(rounds):
        if len(pairs) >= max_pairs:
            break
        flat = rng.integers(0, int(ends[-1]), size=2 * (max_pairs - len(pairs)) + 1000)
        g = np.searchsorted(ends, flat, side="right")
        local = flat - (ends[g] - sizes[g])
        for gi, k in zip(g.tolist(), local.tolist()):
            gid, group = groups[gi]
            i, j = divmod(k, len(group) - 1)
            pair = (group[i], group[j + (j >= i)])
            if pair not in seen and len(pairs) < max_pairs:
                seen.add(pair)
                pairs.append((*pair, tuple(group), gid))
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
