"""Dense search at corpus scale, for each index kind in core.index (flat, ivf, ivfpq, hnsw): build time, peak
resident memory (VmHWM), ms per query and Recall@10 against exact (flat) search. The corpus is synthetic: `n` unit
vectors of `dim` dims around `clusters` gaussian centres, written as a float16 memory map (`corpus.npy`) with queries
near the data (`queries.npy`) in a temporary folder, and added to each index block by block from the memory map.
Each kind is built in its own subprocess so that peak memory does not carry from one kind to the next; searches run
on the GPUs where core.index puts them (faiss-gpu and a GPU present; `gpu` in each row says so).
Writes `{output_dir}/index_scale.{json,csv,png}` (the plot: ms/query against Recall@10). Figures only, no assertion.

    python -m bench.index_scale --n 1000000 --dim 512 --queries 1000
"""
from __future__ import annotations

import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from core.config import config_to_dict, parse_config
from core.io import atomic_write_json, read_json, save_figure


@dataclass
class BenchConfig:
    n: int = 1_000_000  # corpus vectors
    dim: int = 512
    queries: int = 1000  # searched as one batch
    clusters: int = 4096  # gaussian centres of the corpus
    k: int = 10
    kinds: list[str] = field(default_factory=lambda: ["flat", "ivf", "ivfpq", "hnsw"])  # flat first: the exact answer
    ef_search: int = 64  # HNSW search depth (core.index's default)
    kind_timeout_s: int = 0  # give up on a kind after this long (0 = never) and record that it did not finish
    output_dir: str = "bench/results"
    work_dir: str = ""  # where the corpus memory map goes ("" = a temporary folder, deleted at the end)
    seed: int = 0
    worker: str = ""  # internal: build and search this kind over `work_dir`, in this process


# -- the corpus ------------------------------------------------------------------------------------------------------

def write_corpus(folder: Path, cfg: BenchConfig, block: int = 65_536) -> None:
    """Clustered unit vectors as float16 `corpus.npy`, written a block at a time (the corpus is never whole in
    memory), and `queries.npy`: noisy copies of random corpus rows, so each query has close neighbours."""
    rng = np.random.default_rng(cfg.seed)
    centres = rng.normal(size=(cfg.clusters, cfg.dim)).astype(np.float32)
    # Spread per cluster between 0.6 and 1.2 of a centre's norm: tight and loose clusters, as real embeddings have.
    spread = rng.uniform(0.6, 1.2, size=cfg.clusters).astype(np.float32)
    corpus = np.lib.format.open_memmap(folder / "corpus.npy", mode="w+", dtype=np.float16, shape=(cfg.n, cfg.dim))
    for start in range(0, cfg.n, block):
        rows = min(block, cfg.n - start)
        c = rng.integers(cfg.clusters, size=rows)
        x = centres[c] + spread[c, None] * rng.normal(size=(rows, cfg.dim)).astype(np.float32)
        corpus[start:start + rows] = x / np.linalg.norm(x, axis=1, keepdims=True)
    corpus.flush()
    picked = np.sort(rng.choice(cfg.n, size=cfg.queries, replace=False))
    q = corpus[picked].astype(np.float32) + rng.normal(scale=0.5 / np.sqrt(cfg.dim), size=(cfg.queries, cfg.dim))
    np.save(folder / "queries.npy", (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32))


# -- one kind, in its own process ------------------------------------------------------------------------------------

def _status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status, in MB. VmHWM (peak resident) rather than
    getrusage's ru_maxrss: Linux carries ru_maxrss over from the parent through fork and exec, so a worker would
    report the parent's peak from writing the corpus. Resident figures count the memory map's file pages read."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure_kind(folder: Path, cfg: BenchConfig) -> dict:
    """Build `cfg.worker` from the memory map, search the queries, save the index; the figures and the hits."""
    from core.index import VectorIndex

    kind = cfg.worker
    corpus = np.load(folder / "corpus.npy", mmap_mode="r")
    queries = np.load(folder / "queries.npy")
    ids = list(range(len(corpus)))
    before_mb = _status_mb("VmHWM")
    start = time.perf_counter()
    index = VectorIndex(cfg.dim, kind, ef_search=cfg.ef_search, seed=cfg.seed).add_blocks(corpus, ids)
    build_s = time.perf_counter() - start
    index.search(queries[:10], cfg.k)  # warm-up: thread pool, first touches of the lists, the GPU copy if any
    warm_up_s, start = time.perf_counter() - start - build_s, time.perf_counter()
    _, hits = index.search(queries, cfg.k)
    search_s = time.perf_counter() - start
    # RssAnon: the index and Python now, without the memory map's file pages (which the kernel can drop)
    anon_mb, peak_mb = _status_mb("RssAnon"), _status_mb("VmHWM")
    index.save(folder / kind)
    np.save(folder / f"{kind}_hits.npy", np.asarray(hits, dtype=np.int64))
    return {"kind": kind, "settings": index.settings(), "gpu": index.use_gpu and kind != "hnsw", "build_s": build_s,
            "warm_up_s": warm_up_s,
            "ms_per_query": 1000 * search_s / len(queries), "peak_rss_mb": peak_mb, "rss_anon_mb": anon_mb,
            "rss_before_build_mb": before_mb, "index_file_mb": (folder / kind / "index.faiss").stat().st_size / 2**20}


def run_kind(folder: Path, cfg: BenchConfig) -> dict:
    """`measure_kind` in a fresh Python, so each kind's peak memory is its own."""
    args = [f"--{k}={v}" for k, v in config_to_dict(cfg).items() if k not in ("kinds", "worker", "work_dir")]
    cmd = [sys.executable, "-m", "bench.index_scale", *args, f"--work_dir={folder}", f"--worker={cfg.worker}"]
    try:
        subprocess.run(cmd, check=True, timeout=cfg.kind_timeout_s or None)
    except subprocess.TimeoutExpired:
        return {"kind": cfg.worker, "error": f"did not finish in {cfg.kind_timeout_s} s"}
    return read_json(folder / f"{cfg.worker}.json")


def recall_at_k(hits: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of the exact top-k that a kind's top-k holds."""
    return float(np.mean([len(set(h) & set(e)) / len(e) for h, e in zip(hits, exact)]))


# -- the whole bench -------------------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> dict:
    cfg = parse_config(BenchConfig, argv)
    if cfg.worker:
        result = measure_kind(Path(cfg.work_dir), cfg)
        atomic_write_json(Path(cfg.work_dir) / f"{cfg.worker}.json", result)
        return result
    if cfg.kinds[0] != "flat":
        raise SystemExit("--kinds must start with flat: its hits are the exact answer the others are scored against")
    folder = Path(cfg.work_dir or tempfile.mkdtemp(prefix="index_scale."))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        results = _run(folder, cfg)
    finally:
        if not cfg.work_dir:
            shutil.rmtree(folder, ignore_errors=True)
    out = Path(cfg.output_dir)
    atomic_write_json(out / "index_scale.json", results)
    _write_csv(results["kinds"], out / "index_scale.csv")
    _plot(results, out / "index_scale.png")
    return results


def _run(folder: Path, cfg: BenchConfig) -> dict:
    start = time.perf_counter()
    write_corpus(folder, cfg)
    results = {"config": config_to_dict(cfg), "corpus_write_s": time.perf_counter() - start,
               "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
               "load_average_at_start": os.getloadavg(), "kinds": []}
    print(f"corpus: {cfg.n:,} x {cfg.dim} float16 in {results['corpus_write_s']:.0f} s", flush=True)
    exact = None
    for kind in cfg.kinds:
        row = run_kind(folder, BenchConfig(**{**config_to_dict(cfg), "worker": kind}))
        if "error" not in row:
            hits = np.load(folder / f"{kind}_hits.npy")
            exact = hits if kind == "flat" else exact
            row[f"recall@{cfg.k}"] = recall_at_k(hits, exact)
            print(f"{kind:>6}: build {row['build_s']:7.1f} s, {row['ms_per_query']:7.3f} ms/query, "
                  f"R@{cfg.k} {row[f'recall@{cfg.k}']:.3f}, peak RSS {row['peak_rss_mb']:,.0f} MB", flush=True)
        else:
            print(f"{kind:>6}: {row['error']}", flush=True)
        results["kinds"].append(row)
    results["load_average_at_end"] = os.getloadavg()
    results["total_s"] = time.perf_counter() - start
    return results


def _write_csv(rows: list[dict], path: Path) -> None:
    columns = ["kind", "build_s", "ms_per_query", "recall@10", "peak_rss_mb", "rss_anon_mb", "index_file_mb"]
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*columns, "settings", "error"])
        for r in rows:
            writer.writerow([r.get(c, "") for c in columns] + [json.dumps(r.get("settings", {})), r.get("error", "")])
    tmp.replace(path)


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["kinds"] if "error" not in r]
    cfg = results["config"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    for i, r in enumerate(sorted(rows, key=lambda r: r["ms_per_query"])):
        left.scatter(r["ms_per_query"], r[f"recall@{cfg['k']}"], s=40)
        # labels alternate above and below the points left to right: kinds of equal recall sit side by side
        left.annotate(r["kind"], (r["ms_per_query"], r[f"recall@{cfg['k']}"]), textcoords="offset points",
                      xytext=(5, 5 if i % 2 == 0 else -13))
    left.set(xscale="log", xlabel="ms / query (batch of %d)" % cfg["queries"], ylabel=f"Recall@{cfg['k']} vs exact",
             title=f"{cfg['n']:,} x {cfg['dim']}-d vectors")
    kinds = [r["kind"] for r in rows]
    right.bar(kinds, [r["peak_rss_mb"] / 1024 for r in rows], label="peak RSS")
    right.bar(kinds, [r["index_file_mb"] / 1024 for r in rows], label="index file", alpha=0.8)
    right.set(ylabel="GB", title="memory")
    right.legend()
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
