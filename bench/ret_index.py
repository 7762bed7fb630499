"""Benchmark of ReT's token index against exhaustive MaxSim, at corpus sizes up to 100K passages.

For each size: index build time (train + chunked add), index size on disk, query latency through the
index (faiss candidates + exact MaxSim re-scoring) and by exhaustive MaxSim, and the share of queries
whose top-10 the two agree on. Passages are synthetic late-interaction embeddings (32 L2-normalised
128-d tokens near random "topics", as a trained model's tokens cluster), so any size can be built
without encoding a corpus; queries are noisy views of random passages. Writes
bench/results/ret_index.{json,csv,png}; never asserts a time. The machine's load is recorded beside
the figures, since timings on a shared machine are inflated.

    python -m bench.ret_index                       # 1K, 10K, 100K passages
    python -m bench.ret_index --sizes 1000,10000    # quicker
"""
from __future__ import annotations

import csv
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from core.config import parse_config
from core.io import atomic_write_json
from retriever.ret.retrieval import exact_topk
from retriever.ret.token_index import TokenIndex


@dataclass
class BenchConfig:
    sizes: list[int] = field(default_factory=lambda: [1000, 10000, 100000])
    n_queries: int = 20
    topics_per_passage: float = 4.0  # distinct token "topics" per passage: ~8 tokens share a topic at any size
    tokens: int = 32
    dim: int = 128
    nlist: int = 1024
    nprobe: int = 32
    pq_m: int = 16
    per_token: int = 64
    output_dir: str = "bench/results"
    seed: int = 0


def synthetic(n: int, cfg: BenchConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    n_topics = max(64, int(cfg.topics_per_passage * n))
    topics = rng.standard_normal((n_topics, cfg.dim), dtype=np.float32)
    passages = np.empty((n, cfg.tokens, cfg.dim), dtype=np.float16)
    for i in range(0, n, 5000):  # in blocks: 100K float32 passages would need 1.6 GB at once
        m = min(5000, n - i)
        block = topics[rng.integers(n_topics, size=(m, cfg.tokens))]
        block += rng.standard_normal(block.shape, dtype=np.float32)
        passages[i:i + m] = block / np.linalg.norm(block, axis=-1, keepdims=True)
    queries = passages[rng.integers(n, size=cfg.n_queries)].astype(np.float32)
    queries += 0.3 * rng.standard_normal(queries.shape, dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=-1, keepdims=True)
    return passages, queries


def bench_size(n: int, cfg: BenchConfig) -> dict:
    rng = np.random.default_rng([cfg.seed, n])
    passages, queries = synthetic(n, cfg, rng)
    ids = list(range(n))
    started = time.time()
    index = TokenIndex(cfg.dim, "ivfpq", cfg.nlist, cfg.nprobe, cfg.pq_m).build(passages, ids, chunk_size=5000)
    build_s = time.time() - started
    with tempfile.TemporaryDirectory() as tmp:
        index.save(Path(tmp) / "index")
        sizes = index.size_bytes(Path(tmp) / "index")
        index = TokenIndex.load(Path(tmp) / "index")
    started = time.time()
    _, found = index.search(queries, 10, per_token=cfg.per_token, desc=f"index search ({n})")
    index_ms = 1000 * (time.time() - started) / len(queries)
    started = time.time()
    _, exact = exact_topk(queries, index.passages, 10, block=1, desc=f"exact MaxSim ({n})")
    exact_ms = 1000 * (time.time() - started) / len(queries)
    agree = float(np.mean([set(f) == set(e.tolist()) for f, e in zip(found, exact)]))
    candidates = float(np.mean([len(c) for c in index.candidates(queries, cfg.per_token)]))
    return {"n_passages": n, "n_tokens": n * cfg.tokens, "build_s": build_s, "index_mb": sizes["index.faiss"] / 2**20,
            "rescoring_embeddings_mb": sizes["passages.npy"] / 2**20, "nlist": index.nlist, "pq_bits": index.pq_bits,
            "index_ms_per_query": index_ms, "exact_ms_per_query": exact_ms, "top10_agreement": 100 * agree,
            "mean_candidates": candidates}


def main(argv: Sequence[str] | None = None) -> list[dict]:
    cfg = parse_config(BenchConfig, argv)
    rows = []
    for n in cfg.sizes:
        row = bench_size(int(n), cfg)
        print(row)
        rows.append(row)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    machine = {"cpus": os.cpu_count(), "load_average": os.getloadavg(), "platform": platform.platform(),
               "note": "synthetic embeddings; timings on a shared machine are inflated by its load"}
    atomic_write_json(out / "ret_index.json", {"config": cfg.__dict__, "machine": machine, "rows": rows})
    with open(out / "ret_index.csv.tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(out / "ret_index.csv.tmp", out / "ret_index.csv")
    _plot(rows, out / "ret_index.png")
    return rows


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["n_passages"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    ax[0].loglog(n, [r["exact_ms_per_query"] for r in rows], "o-", label="exact MaxSim")
    ax[0].loglog(n, [r["index_ms_per_query"] for r in rows], "s-", label="IVF-PQ candidates + MaxSim")
    ax[0].set(xlabel="passages", ylabel="ms / query", title="query latency")
    ax[0].legend()
    ax[1].semilogx(n, [r["build_s"] for r in rows], "o-")
    ax[1].set(xlabel="passages", ylabel="seconds", title="index build")
    fig.tight_layout()
    fig.savefig(path.with_suffix(".tmp.png"))
    os.replace(path.with_suffix(".tmp.png"), path)


if __name__ == "__main__":
    main()
