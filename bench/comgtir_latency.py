"""Query latency and throughput of generative retrieval (set-guided constrained beam search) against exact dense
search (faiss flat) and IVF, at corpus sizes from 1K to 100K+ identifiers (synthetic identifiers and vectors).

Generative retrieval's claim is that its cost does not grow with the corpus; this measures whether that holds for
our vectorised decoder. Writes bench/results/comgtir_latency.{json,csv,png}. Never asserts a time.
Usage: python -m bench.comgtir_latency [--sizes 1000,10000,100000] [--queries 64] [--beams 20]
"""
from __future__ import annotations

import csv
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from core.config import parse_config
from core.index import VectorIndex
from core.io import atomic_write_json
from retriever.generative.decoding import CorpusTrie, generate_rankings
from retriever.generative.model import SHAPES_T5, GenerativeRetriever, RetrieverSpec, build_t5
from retriever.generative.vocab import CodeVocab, build_tokenizer
from rqvae.codes import disambiguate


@dataclass
class BenchConfig:
    sizes: list[int] = field(default_factory=lambda: [1000, 10000, 100000])
    queries: int = 64
    beams: int = 20
    levels: int = 3
    codebook_size: int = 64
    dim: int = 128
    guidance: float = 1.0
    repeats: int = 2
    output_dir: str = "bench/results"
    seed: int = 0


def synthetic_identifiers(n: int, levels: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Skewed codes (like a trained tokenizer's) made unique with a suffix level."""
    p = rng.dirichlet(np.full(k, 0.5), size=levels)
    codes = np.stack([rng.choice(k, size=n, p=p[level]) for level in range(levels)], axis=1)
    return disambiguate(codes)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main(argv: Sequence[str] | None = None) -> list[dict]:
    cfg = parse_config(BenchConfig, argv)
    torch.set_grad_enabled(False)
    rng = np.random.default_rng(cfg.seed)
    words = "a small medium large red green blue yellow circle square star cross in the top left middle".split()
    queries = [" ".join(rng.choice(words, 8)) for _ in range(cfg.queries)]
    rows = []
    for n in cfg.sizes:
        ids = synthetic_identifiers(n, cfg.levels, cfg.codebook_size, rng)
        suffix = int(ids[:, -1].max()) + 1
        tok = build_tokenizer("word", words, cfg.levels, cfg.codebook_size, suffix)
        vocab = CodeVocab(tok, cfg.levels, cfg.codebook_size, suffix)
        torch.manual_seed(cfg.seed)
        model = GenerativeRetriever(build_t5(SHAPES_T5, len(tok), vocab.pad_id, vocab.eos_id),
                                    RetrieverSpec(cfg.levels, cfg.codebook_size, suffix,
                                                  cfg.levels * cfg.codebook_size, False)).eval()
        t0 = time.perf_counter()
        trie = CorpusTrie(torch.from_numpy(ids), list(range(n)), vocab.token_ids.shape[1])
        build_s = time.perf_counter() - t0
        gen = timed(lambda: generate_rankings(model, tok, vocab, trie, queries, cfg.beams, cfg.guidance,
                                              batch_size=cfg.queries), cfg.repeats)
        vectors = rng.standard_normal((n, cfg.dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        q = rng.standard_normal((cfg.queries, cfg.dim)).astype(np.float32)
        flat = VectorIndex(cfg.dim, "flat").add(vectors, list(range(n)))
        ivf = VectorIndex(cfg.dim, "ivf", nlist=max(16, int(4 * np.sqrt(n))), nprobe=8).add(vectors, list(range(n)))
        for method, seconds in [("generative", gen), ("dense-flat", timed(lambda: flat.search(q, cfg.beams), cfg.repeats)),
                                ("dense-ivf", timed(lambda: ivf.search(q, cfg.beams), cfg.repeats))]:
            rows.append({"corpus": n, "method": method, "ms_per_query": 1000 * seconds / cfg.queries,
                         "queries_per_s": cfg.queries / seconds,
                         "index_build_s": build_s if method == "generative" else None})
            print(f"{n:>8} {method:<11} {rows[-1]['ms_per_query']:8.3f} ms/query  {rows[-1]['queries_per_s']:9.1f} q/s")
    write(cfg, rows)
    return rows


def write(cfg: BenchConfig, rows: list[dict]) -> None:
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    meta = {"config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}, "load_average_1min": load,
            "torch_threads": torch.get_num_threads(), "note": "T5 is the Shapes config with random weights: "
            "latency depends on the model's size and the beam, not on its training"}
    atomic_write_json(out / "comgtir_latency.json", {"meta": meta, "rows": rows})
    with open(out / "comgtir_latency.csv.tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(out / "comgtir_latency.csv.tmp", out / "comgtir_latency.csv")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = [r for r in rows if r["method"] == method]
        ax.plot([r["corpus"] for r in pts], [r["ms_per_query"] for r in pts], marker="o", label=method)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("corpus size (identifiers / vectors)")
    ax.set_ylabel("ms per query")
    ax.set_title(f"ComGTIR-D vs dense search (beam {cfg.beams}, load {load:.1f})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "comgtir_latency.png.tmp.png", dpi=120)
    os.replace(out / "comgtir_latency.png.tmp.png", out / "comgtir_latency.png")


if __name__ == "__main__":
    main()
