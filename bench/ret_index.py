"""Benchmark of ReT's token index against exhaustive MaxSim, at corpus sizes up to 100K passages.

For each size: index build time (train + chunked add), index size on disk, query latency through the
index (faiss candidates + exact MaxSim re-scoring) and by exhaustive MaxSim, how well the index finds what
exhaustive MaxSim finds (overlap@10: the mean share of the exact top-10 in the index's top-10), Recall@10 of
each query's source passage by both, and the share of the corpus that reached exact scoring (the candidates).
Exhaustive MaxSim streams the stored passages (`passages.npy`, read by memory map) in blocks with a running
top-k; it runs in a subprocess of its own that reports its peak working memory above what it held before the
search (anonymous memory, sampled every few ms: the memory map's pages are the page cache's, reclaimable, and
would otherwise be counted as the file is read) and the GPU's peak allocation when it runs on one: flat from 10K
to 100K passages when the streaming holds. Passages are synthetic late-interaction embeddings (32 L2-normalised
128-d tokens near random "topics", as a trained model's tokens cluster), so any size can be built
without encoding a corpus; queries are noisy views of random passages (their source). Writes
bench/results/ret_index.{json,csv,png}; never asserts a time. The machine's load is recorded beside
the figures, since timings on a shared machine are inflated.

    python -m bench.ret_index                       # 1K, 10K, 100K passages
    python -m bench.ret_index --sizes 1000,10000    # quicker
    python -m bench.ret_index --sizes 10000,100000 --index false   # the exhaustive MaxSim row alone
"""
from __future__ import annotations

import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
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
    index: bool = True  # false: only exhaustive MaxSim (its latency and memory), no index built
    query_block: int = 1  # exhaustive MaxSim: queries scored together ...
    passage_block: int = 4096  # ... against this many passages at a time
    output_dir: str = "bench/results"
    seed: int = 0


def synthetic(n: int, cfg: BenchConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(passages, queries, the passage row each query is a noisy view of)."""
    n_topics = max(64, int(cfg.topics_per_passage * n))
    topics = rng.standard_normal((n_topics, cfg.dim), dtype=np.float32)
    passages = np.empty((n, cfg.tokens, cfg.dim), dtype=np.float16)
    for i in range(0, n, 5000):  # in blocks: 100K float32 passages would need 1.6 GB at once
        m = min(5000, n - i)
        block = topics[rng.integers(n_topics, size=(m, cfg.tokens))]
        block += rng.standard_normal(block.shape, dtype=np.float32)
        passages[i:i + m] = block / np.linalg.norm(block, axis=-1, keepdims=True)
    sources = rng.integers(n, size=cfg.n_queries)
    queries = passages[sources].astype(np.float32)
    queries += 0.3 * rng.standard_normal(queries.shape, dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=-1, keepdims=True)
    return passages, queries, sources


def overlap_at(found: Sequence[Sequence[int]], exact: np.ndarray, k: int = 10) -> float:
    """Mean share (%) of each query's exact top-k that the index's top-k holds."""
    return 100 * float(np.mean([len(set(list(f)[:k]) & set(e[:k].tolist())) / min(k, len(e))
                                for f, e in zip(found, exact)]))


def recall_of_sources(ranked: Sequence[Sequence[int]], sources: np.ndarray, k: int = 10) -> float:
    return 100 * float(np.mean([int(s) in set(list(r)[:k]) for r, s in zip(ranked, sources)]))


class AnonPeak:
    """Peak anonymous resident memory of this process (resident − file-backed, /proc/self/statm), sampled by a
    thread: the working memory of a computation, without the page cache a memory-mapped file's reads bring in."""

    def __init__(self, every_s: float = 0.002):
        self.every_s, self.peak, self._stop = every_s, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def current() -> int:
        with open("/proc/self/statm") as f:
            _, resident, shared = (int(v) for v in f.read().split()[:3])
        return (resident - shared) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            time.sleep(self.every_s)

    def __enter__(self) -> "AnonPeak":
        self.peak = self.current()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


def exact_probe(passages_file: str, queries_file: str, rows_file: str, block: int, passage_block: int) -> dict:
    """Exhaustive streamed MaxSim over a stored corpus (memory map), in this process: ms per query, the peak
    working memory above what the process held before the search, and the GPU's peak where it runs on one."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    passages = np.load(passages_file, mmap_mode="r")
    queries = np.load(queries_file)
    exact_topk(queries[:1], passages[:passage_block], 10, block=block, device=device)  # warm up the kernels
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = AnonPeak.current()
    with AnonPeak() as peak:
        started = time.time()
        _, rows = exact_topk(queries, passages, 10, block=block, passage_block=passage_block, device=device,
                             desc="exact MaxSim")
        ms = 1000 * (time.time() - started) / len(queries)
    np.save(rows_file, rows)
    gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return {"exact_ms_per_query": ms, "exact_peak_mb": (peak.peak - before) / 2**20, "exact_gpu_peak_mb": gpu_mb,
            "exact_device": device.type}


def run_exact_probe(folder: Path, cfg: BenchConfig) -> tuple[dict, np.ndarray]:
    """`exact_probe` in a fresh interpreter, so that no earlier size's allocations blur its peak."""
    files = [str(folder / name) for name in ("passages.npy", "queries.npy", "exact_rows.npy")]
    code = (f"import json; from bench.ret_index import exact_probe; "
            f"print(json.dumps(exact_probe(*{files!r}, {cfg.query_block}, {cfg.passage_block})))")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"exhaustive MaxSim probe failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), np.load(files[2])


def bench_size(n: int, cfg: BenchConfig) -> dict:
    rng = np.random.default_rng([cfg.seed, n])
    passages, queries, sources = synthetic(n, cfg, rng)
    row = {"n_passages": n, "n_tokens": n * cfg.tokens}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        np.save(tmp / "passages.npy", passages)
        np.save(tmp / "queries.npy", queries)
        del passages  # the probe and the index read the stored corpus
        exact_row, exact = run_exact_probe(tmp, cfg)
        row.update(exact_row, exact_source_recall_at_10=recall_of_sources(exact, sources))
        if not cfg.index:
            return row
        started = time.time()
        stored = np.load(tmp / "passages.npy", mmap_mode="r")
        index = TokenIndex(cfg.dim, "ivfpq", cfg.nlist, cfg.nprobe, cfg.pq_m).build(stored, list(range(n)),
                                                                                     chunk_size=5000)
        build_s = time.time() - started
        index.save(tmp / "index")
        sizes = index.size_bytes(tmp / "index")
        index = TokenIndex.load(tmp / "index")
        started = time.time()
        _, found = index.search(queries, 10, per_token=cfg.per_token, desc=f"index search ({n})")
        index_ms = 1000 * (time.time() - started) / len(queries)
        candidates = float(np.mean([len(c) for c in index.candidates(queries, cfg.per_token)]))
    row.update({"build_s": build_s, "index_mb": sizes["index.faiss"] / 2**20,
                "rescoring_embeddings_mb": sizes["passages.npy"] / 2**20, "nlist": index.nlist,
                "pq_bits": index.pq_bits, "index_ms_per_query": index_ms,
                "overlap_at_10": overlap_at(found, exact), "index_source_recall_at_10": recall_of_sources(found, sources),
                "mean_candidates": candidates, "exact_scored_fraction": 100 * candidates / n})
    return row


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
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
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
    indexed = [r for r in rows if "index_ms_per_query" in r]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    ax[0].loglog(n, [r["exact_ms_per_query"] for r in rows], "o-", label="exhaustive MaxSim (streamed)")
    if indexed:
        ax[0].loglog([r["n_passages"] for r in indexed], [r["index_ms_per_query"] for r in indexed], "s-",
                     label="IVF-PQ candidates + MaxSim")
    ax[0].set(xlabel="passages", ylabel="ms / query", title="query latency")
    ax[0].legend()
    ax[1].semilogx(n, [r["exact_peak_mb"] for r in rows], "o-")
    ax[1].set(xlabel="passages", ylabel="MB above the process before the search",
              title="exhaustive MaxSim peak working memory", ylim=(0, None))
    fig.tight_layout()
    fig.savefig(path.with_suffix(".tmp.png"))
    os.replace(path.with_suffix(".tmp.png"), path)


if __name__ == "__main__":
    main()
