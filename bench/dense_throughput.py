"""Dense retriever throughput: image and caption encoding rate, and index search rate (exact and IVF) over
corpus sizes. Reads a dense checkpoint and a Karpathy-split world; writes `bench/results/dense_throughput.json`
and a plot of search rate against corpus size. Figures only, no assertion.

    python -m bench.dense_throughput --checkpoint runs/shapes/dense/checkpoint-best --data_dir runs/shapes/data
"""
from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from core.data import LoaderOptions, caption_queries, load_karpathy
from core.device import get_device
from core.encoders import load_dual_encoder
from core.index import VectorIndex
from core.io import atomic_write_json
from retriever.dense.common import encode_image_files, encode_texts


def rate(n: int, fn) -> float:
    start = time.perf_counter()
    fn()
    return n / (time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="runs/shapes/dense/checkpoint-best")
    p.add_argument("--data_dir", default="runs/shapes/data")
    p.add_argument("--split", default="test")
    p.add_argument("--corpus_sizes", default="1000,10000,100000")
    p.add_argument("--n_queries", type=int, default=1000)
    p.add_argument("--out", default="bench/results/dense_throughput.json")
    args = p.parse_args(argv)

    device = get_device()
    model = load_dual_encoder(args.checkpoint).to(device)
    data = Path(args.data_dir)
    records = load_karpathy(data / "dataset_shapes.json", data / "images", args.split)
    paths, options = [r.path for r in records], LoaderOptions()
    texts = [q.text for q in caption_queries(records)]
    encode_image_files(model, paths[:64], device, options)  # warm-up
    results = {
        "device": str(device), "torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        # images decoded from disk by the loader's workers, as the encode step reads them
        "images_per_s": rate(len(paths), lambda: encode_image_files(model, paths, device, options)),
        "captions_per_s": rate(len(texts), lambda: encode_texts(model, texts, device)),
        "search": [],
    }
    dim = model.embed_dim
    rng = np.random.default_rng(0)
    queries = encode_texts(model, texts[:args.n_queries], device)
    for size in map(int, args.corpus_sizes.split(",")):
        # Beyond the real gallery, random unit vectors stand in for images: search cost depends only on size.
        corpus = rng.normal(size=(size, dim)).astype(np.float32)
        corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
        for kind in ("flat", "ivf"):
            start = time.perf_counter()
            index = VectorIndex(dim, kind, nlist=max(16, int(4 * np.sqrt(size))), nprobe=16).add(corpus, list(range(size)))
            build_s = time.perf_counter() - start
            qps = rate(len(queries), lambda: index.search(queries, 10))
            results["search"].append({"corpus": size, "index": kind, "build_s": build_s, "queries_per_s": qps})
            print(f"{kind:>4} index, {size:>7} vectors: build {build_s:.2f}s, {qps:,.0f} queries/s")
    print(f"encoding: {results['images_per_s']:.0f} images/s, {results['captions_per_s']:.0f} captions/s on {device}")
    out = Path(args.out)
    atomic_write_json(out, results)
    _plot(results, out.with_suffix(".png"))
    return results


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for kind in ("flat", "ivf"):
        rows = [r for r in results["search"] if r["index"] == kind]
        ax.plot([r["corpus"] for r in rows], [r["queries_per_s"] for r in rows], marker="o", label=kind)
    ax.set(xscale="log", yscale="log", xlabel="corpus size (vectors)", ylabel="queries / s",
           title="dense search rate (top-10)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
