"""Foundation-model augmentation: each mined (reference, hard negative) pair gets a new modification text written
by the foundation model; texts that pass the filter make new positive triplets (reference, new text, hard negative).
The image pairs are decoded by DataLoader workers (cir.iterative.data.Corpus.batches); nothing here writes files."""
from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np

from cir.iterative.data import SINGLE, Corpus
from cir.iterative.foundation import FoundationModel
from cir.iterative.sharding import gather_objects
from cir.iterative.text_filter import TextFilter
from core.device import derive_seed
from core.distributed import DistInfo, shard_range
from core.logging import progress


def select_pairs(hard_negatives: Sequence[dict[str, Any]], per_query: int, cap: int, seed: int,
                 round_index: int) -> list[dict[str, str]]:
    """(reference, hard negative, original text) pairs, each pair once; a random `cap` of them if capped."""
    pairs, seen = [], set()
    for rec in hard_negatives:
        for hn in rec["hard_negatives"][:per_query]:
            key = (rec["reference"], hn["image"])
            if key in seen:
                continue
            seen.add(key)
            pairs.append({"source_pairid": rec["pairid"], "reference": rec["reference"], "hard_negative": hn["image"],
                          "original_caption": rec["caption"], "original_target": rec["target"]})
    if cap and len(pairs) > cap:
        keep = np.random.default_rng(derive_seed(seed, round_index, "augment-cap")).choice(len(pairs), cap, replace=False)
        pairs = [pairs[i] for i in sorted(keep)]
    return pairs


def _pair_images(chunk: Sequence[dict[str, str]], lo: int) -> tuple[list[list[str]], int]:
    """A Corpus.batches spec: the chunk's reference and hard-negative images, and where the chunk starts."""
    return [[p["reference"] for p in chunk], [p["hard_negative"] for p in chunk]], lo


def generate_augmented(foundation: FoundationModel, corpus: Corpus, pairs: Sequence[dict[str, str]], text_filter: TextFilter,
                       batch_size: int, seed: int, round_index: int,
                       info: DistInfo = SINGLE) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Returns (samples, statistics); every pair is kept in `samples` with `kept` and the filter's `reason`.

    The pairs go to the model `batch_size` at a time, each chunk seeded by its place in the list; under torchrun
    each rank generates a contiguous share of the chunks and every rank gets all samples, in order."""
    samples: list[dict[str, Any]] = []
    start = time.perf_counter()
    starts = list(range(0, len(pairs), batch_size))
    specs = [_pair_images(pairs[starts[k]:starts[k] + batch_size], starts[k]) for k in shard_range(len(starts), info)]
    bar = progress(total=len(pairs), desc=f"generating texts (round {round_index})", unit="pair", enabled=info.is_main)
    for (references, negatives), lo in corpus.batches(specs, source=corpus.files()):
        chunk = pairs[lo:lo + batch_size]
        texts = foundation.generate(references, negatives, [p["original_caption"] for p in chunk],
                                    seed=derive_seed(seed, round_index, lo, "generate"))
        if len(texts) != len(chunk):
            raise RuntimeError(f"the foundation model returned {len(texts)} texts for {len(chunk)} image pairs")
        samples += [{**p, "pairid": f"r{round_index}-{p['source_pairid']}-{p['hard_negative']}", "caption": text}
                    for p, text in zip(chunk, texts)]
        bar.update(len(chunk) * info.world_size)  # the other ranks go at about the same pace
    bar.close()
    samples = [s for part in gather_objects(samples, info) for s in part]
    for s in samples:  # filtered in one place, so the counts are the whole round's
        reason = text_filter.check(s["caption"], s["original_caption"])
        s.update(kept=reason is None, reason=reason)
    seconds = time.perf_counter() - start
    stats = {**text_filter.summary(), "pairs": len(pairs), "generation_s": round(seconds, 2),
             "pairs_per_s": round(len(pairs) / seconds, 2) if seconds > 0 else None}
    return samples, stats
