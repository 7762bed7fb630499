"""Query latency and throughput of generative retrieval (set-guided constrained beam search) against the original's
way of constraining (a Python trie walked per beam through `prefix_allowed_tokens_fn`) and against exact dense
search (faiss flat) and IVF, at corpus sizes from 1K to 1M identifiers (synthetic identifiers and vectors).

Generative retrieval's claim is that its cost does not grow with the corpus; this measures whether that holds for
our vectorised decoder, and what it saves over the trie walk: both decode with the same model, identifiers, beams
and queries, without guidance (the trie path can only mask), and the bench records whether their rankings agree.
The IVF rows carry their Recall@1/10 against the flat index on the same queries, so its latency is read beside
its accuracy. Writes bench/results/comgtir_latency.{json,csv,md,png}. Never asserts a time.
Usage: python -m bench.comgtir_latency [--sizes "[1000,10000,100000,1000000]"] [--queries 64] [--beams 20]
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
from core.errors import InputError
from core.index import VectorIndex
from core.io import atomic_write_json, atomic_write_text
from retriever.generative.decoding import CorpusTrie, PythonTrie, generate_rankings, python_trie_rankings
from retriever.generative.model import SHAPES_T5, GenerativeRetriever, RetrieverSpec, build_t5
from retriever.generative.vocab import CodeVocab, build_tokenizer
from rqvae.codes import disambiguate


@dataclass
class BenchConfig:
    sizes: list[int] = field(default_factory=lambda: [1000, 10000, 100000, 1000000])
    queries: int = 64
    beams: int = 20
    levels: int = 4  # the paper's identifiers: a shared 1024-code book applied residually 4 times
    codebook_size: int = 1024
    dim: int = 128
    guidance: float = 1.0
    repeats: int = 3  # timed calls per method after a warm-up, interleaved; the best is kept
    # dense vectors: "clustered" (points around 1024 centres, queries near corpus points, as real embeddings
    # cluster) or "uniform" on the sphere (no structure: the worst case for IVF's recall)
    vectors: str = "clustered"
    ivf_nprobe: int = 8  # lists searched per query: the IVF rows' speed/recall trade
    recall_at: list[int] = field(default_factory=lambda: [1, 10])
    t5: dict = field(default_factory=lambda: dict(SHAPES_T5))
    output_dir: str = "bench/results"
    machine_note: str = ""  # written into the report as is, e.g. what else the machine was running
    seed: int = 0


def synthetic_identifiers(n: int, levels: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Skewed codes (like a trained tokenizer's) made unique with a suffix level."""
    p = rng.dirichlet(np.full(k, 0.5), size=levels)
    codes = np.stack([rng.choice(k, size=n, p=p[level]) for level in range(levels)], axis=1)
    return disambiguate(codes)


def dense_data(n: int, queries: int, dim: int, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Unit corpus vectors [n, dim] and query vectors [queries, dim] of the `vectors` kind (see BenchConfig)."""
    if kind == "uniform":
        x, q = rng.standard_normal((n, dim)), rng.standard_normal((queries, dim))
    elif kind == "clustered":
        centres = rng.standard_normal((1024, dim)) / np.sqrt(dim)
        spread = 0.5 / np.sqrt(dim)  # per dimension, so a point lies about half a centre's norm from its centre
        x = centres[rng.integers(0, len(centres), n)] + spread * rng.standard_normal((n, dim))
        q = x[rng.integers(0, n, queries)] + spread * rng.standard_normal((queries, dim))
    else:
        raise InputError("config", "vectors", f"must be clustered or uniform, got {kind!r}")
    x, q = x.astype(np.float32), q.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), q / np.linalg.norm(q, axis=1, keepdims=True)


def timed(fns: Sequence, repeats: int) -> list[tuple[float, object]]:
    """(best seconds of `repeats` calls after a warm-up, the last call's result) for each of `fns`, called in turn
    round by round: on a shared, loaded machine the best of interleaved calls compares the functions under the
    same load, where back-to-back blocks would each see whatever load their own minute had."""
    results = [fn() for fn in fns]  # warm-up
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            results[i] = fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return list(zip(best, results))


def recall_against(exact: list[list], approximate: list[list], k: int) -> float:
    """Mean fraction of the exact top-k that the approximate top-k keeps."""
    return float(np.mean([len(set(e[:k]) & set(a[:k])) / len(e[:k]) for e, a in zip(exact, approximate)]))


def agreement(ours: list[list], reference: list[list]) -> dict:
    """How often the two decoders return the same top-1 and the same whole ranking."""
    return {"top1_agree": float(np.mean([a[:1] == b[:1] for a, b in zip(ours, reference)])),
            "ranking_agree": float(np.mean([a == b for a, b in zip(ours, reference)]))}


def main(argv: Sequence[str] | None = None) -> list[dict]:
    cfg = parse_config(BenchConfig, argv)
    dense_data(1, 1, cfg.dim, cfg.vectors, np.random.default_rng(0))  # a bad `vectors` fails before any work
    with torch.no_grad():  # scoped, so a caller in the same process (a test) keeps its autograd state
        return run_bench(cfg)


def run_bench(cfg: BenchConfig) -> list[dict]:
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
        model = GenerativeRetriever(build_t5(cfg.t5, len(tok), vocab.pad_id, vocab.eos_id),
                                    RetrieverSpec(cfg.levels, cfg.codebook_size, suffix,
                                                  cfg.levels * cfg.codebook_size, False)).eval()
        codes = torch.from_numpy(ids)
        t0 = time.perf_counter()
        trie = CorpusTrie(codes, list(range(n)), vocab.token_ids.shape[1])
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        reference = PythonTrie(vocab.encode(codes).tolist(), list(range(n)))
        reference_build_s = time.perf_counter() - t0
        decode = lambda guidance: generate_rankings(  # noqa: E731
            model, tok, vocab, trie, queries, cfg.beams, guidance, batch_size=cfg.queries)[0]
        (guided, _), (plain, ours), (walked, theirs) = timed([
            lambda: decode(cfg.guidance), lambda: decode(0.0),
            lambda: python_trie_rankings(model, tok, reference, queries, cfg.beams, vocab.pad_id, vocab.eos_id,
                                         batch_size=cfg.queries)[0]], cfg.repeats)
        vectors, q = dense_data(n, cfg.queries, cfg.dim, cfg.vectors, rng)
        depth = max(cfg.beams, *cfg.recall_at)
        flat = VectorIndex(cfg.dim, "flat").add(vectors, list(range(n)))
        ivf = VectorIndex(cfg.dim, "ivf", nlist=max(16, int(4 * np.sqrt(n))), nprobe=cfg.ivf_nprobe)
        ivf.add(vectors, list(range(n)))
        (flat_s, exact), (ivf_s, approx) = timed([lambda: flat.search(q, depth)[1], lambda: ivf.search(q, depth)[1]],
                                                 cfg.repeats)
        recall = {f"recall@{k}_vs_flat": recall_against(exact, approx, k) for k in cfg.recall_at}
        for method, seconds, extra in [
                (f"generative (guidance {cfg.guidance:g})", guided, {"index_build_s": build_s}),
                ("generative (no guidance)", plain, {"index_build_s": build_s}),
                ("python trie (no guidance)", walked, {"index_build_s": reference_build_s,
                                                       "slowdown_vs_generative": walked / plain,
                                                       **agreement(ours, theirs)}),
                ("dense-flat", flat_s, {}), ("dense-ivf", ivf_s, recall)]:
            rows.append({"corpus": n, "method": method, "ms_per_query": 1000 * seconds / cfg.queries,
                         "queries_per_s": cfg.queries / seconds, **extra})
            print(f"{n:>8} {method:<27} {rows[-1]['ms_per_query']:9.3f} ms/query  "
                  f"{rows[-1]['queries_per_s']:9.1f} q/s  {extra}", flush=True)
    write(cfg, rows)
    return rows


def cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def markdown(cfg: BenchConfig, meta: dict, rows: list[dict]) -> str:
    """The rows as a Markdown table, with the setting it was measured in."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    lines = [f"ComGTIR-D decoding latency: {cfg.queries} queries, beam {cfg.beams}, identifiers of {cfg.levels} levels "
             f"of a {cfg.codebook_size}-code book + suffix, {meta['torch_threads']} torch thread(s), "
             f"{meta['cpu_count']} CPUs, 1-min load {meta['load_average_1min']:.1f}. {cfg.machine_note}".rstrip(), "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n\n" + meta["note"] + ".\n"


def write(cfg: BenchConfig, rows: list[dict]) -> None:
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    meta = {"config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}, "load_average_1min": load,
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "note": "T5 is the Shapes config "
            "with random weights: latency depends on the model's size and the beam, not on its training. The Python "
            "trie cannot carry the set guidance, so it is compared with the decoder run without guidance"}
    atomic_write_json(out / "comgtir_latency.json", {"meta": meta, "rows": rows})
    with open(out / "comgtir_latency.csv.tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(out / "comgtir_latency.csv.tmp", out / "comgtir_latency.csv")
    atomic_write_text(out / "comgtir_latency.md", markdown(cfg, meta, rows))
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
