"""A faiss index over passage TOKENS (IVF-PQ), used the ColBERT way: each query token gathers candidate
passages, then exact MaxSim re-scores the candidates. Built in chunks with a progress bar, saved, reopened.

Folder: `index.faiss` (token vectors; the token's faiss id // tokens-per-passage is its passage row),
`passages.npy` (float16 [N, 32, 128], the re-scoring embeddings), `ids.json`, `meta.json`.
Uses the GPU when faiss was built with it and one is present (core.index.gpu_available).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import faiss
import numpy as np

from core.errors import InputError
from core.index import gpu_available
from core.io import atomic_dir, atomic_write_json, read_json
from core.logging import progress
from retriever.ret.retrieval import maxsim_scores


class TokenIndex:
    def __init__(self, dim: int = 128, kind: str = "ivfpq", nlist: int = 256, nprobe: int = 32, pq_m: int = 16,
                 pq_bits: int = 8, use_gpu: bool | None = None):
        if kind not in ("ivfpq", "ivf", "flat"):
            raise InputError(None, "index_kind", f"must be 'ivfpq', 'ivf' or 'flat', got {kind!r}")
        if dim % pq_m:
            raise InputError(None, "pq_m", f"must divide the dimension {dim}")
        self.dim, self.kind, self.nlist, self.nprobe, self.pq_m, self.pq_bits = dim, kind, nlist, nprobe, pq_m, pq_bits
        self.use_gpu = gpu_available() if use_gpu is None else use_gpu
        self.ids: list[Any] = []
        self.passages: np.ndarray | None = None
        self.tokens_per_passage = 0
        self._index: faiss.Index | None = None

    # -- building ------------------------------------------------------------------------------------------------

    @staticmethod
    def nlist_for_tokens(n_tokens: int) -> int:
        """Coarse lists for a corpus of `n_tokens` vectors: 4·√N, the low end of faiss's guideline (4-16·√N), so
        that a query token's `nprobe` lists stay a small, fixed share of the corpus as it grows (3.5M tokens for
        110K passages → 7,504 lists; the 39-points-per-centroid cap still applies when the index is trained)."""
        return max(1, int(4 * math.sqrt(max(1, n_tokens))))

    def _new_index(self, n_train: int) -> faiss.Index:
        quantizer = faiss.IndexFlatIP(self.dim)
        if self.kind == "flat":
            return quantizer
        # faiss wants ~39 training points per centroid, for the coarse lists and for each PQ codebook
        self.nlist = max(1, min(self.nlist, n_train // 39))
        if self.kind == "ivf":
            return faiss.IndexIVFFlat(quantizer, self.dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
        self.pq_bits = max(4, min(self.pq_bits, int(math.log2(max(16, n_train // 39)))))
        index = faiss.IndexIVFPQ(quantizer, self.dim, self.nlist, self.pq_m, self.pq_bits, faiss.METRIC_INNER_PRODUCT)
        # Fewer k-means iterations and points than faiss's defaults (25, 256 per centroid): the codes only pick
        # candidates, which exact MaxSim re-scores, and PQ training dominated the build time on CPU.
        index.cp.niter = index.pq.cp.niter = 10
        index.pq.cp.max_points_per_centroid = 64
        return index

    def build(self, passages: np.ndarray, ids: Sequence[Any], chunk_size: int = 4096, train_tokens: int = 200_000,
              seed: int = 0) -> "TokenIndex":
        """Train on a sample of tokens, then add every passage's tokens chunk by chunk."""
        if passages.ndim != 3 or passages.shape[2] != self.dim:
            raise ValueError(f"expected passages [N, L, {self.dim}], got {passages.shape}")
        if len(passages) != len(ids):
            raise ValueError(f"{len(passages)} passages but {len(ids)} ids")
        n, length, _ = passages.shape
        self.tokens_per_passage = length
        self.passages = np.ascontiguousarray(passages, dtype=np.float16)
        self.ids = list(ids)
        rng = np.random.default_rng(seed)
        sample_rows = rng.choice(n * length, size=min(train_tokens, n * length), replace=False)
        sample = self.passages.reshape(n * length, self.dim)[np.sort(sample_rows)].astype(np.float32)
        index = self._new_index(len(sample))
        if not index.is_trained:
            index.train(sample)
        if hasattr(index, "nprobe"):
            index.nprobe = min(self.nprobe, self.nlist)
        self._index = self._to_device(index)
        for i in progress(range(0, n, chunk_size), desc="indexing passage tokens", unit="chunk"):
            block = self.passages[i:i + chunk_size].reshape(-1, self.dim).astype(np.float32)
            self._index.add(block)
        return self

    def _to_device(self, index: faiss.Index) -> faiss.Index:
        return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index) if self.use_gpu else index

    # -- searching -----------------------------------------------------------------------------------------------

    def candidates(self, queries: np.ndarray, per_token: int) -> list[np.ndarray]:
        """Passage rows hit by any query token's `per_token` nearest passage tokens, per query."""
        if self._index is None:
            raise ValueError("search on an empty index")
        nq, lq, _ = queries.shape
        _, hits = self._index.search(np.ascontiguousarray(queries.reshape(nq * lq, self.dim), dtype=np.float32),
                                     per_token)
        hits = hits.reshape(nq, lq * per_token)
        return [np.unique(h[h >= 0] // self.tokens_per_passage) for h in hits]

    def search(self, queries: np.ndarray, k: int, per_token: int = 64, block: int = 256,
               desc: str = "index search") -> tuple[np.ndarray, list[list[Any]]]:
        """Top-k (exact MaxSim scores, passage ids) per query: faiss candidates, then exact re-scoring."""
        k = min(k, len(self.ids))
        all_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        all_ids: list[list[Any]] = []
        for i in progress(range(0, len(queries), block), desc=desc):
            q = queries[i:i + block]
            for j, rows in enumerate(self.candidates(q, per_token)):
                s = maxsim_scores(q[j:j + 1], self.passages[rows]).numpy()[0]
                order = np.argsort(-s, kind="stable")[:k]
                all_scores[i + j, :len(order)] = s[order]
                all_ids.append([self.ids[r] for r in rows[order]])
        return all_scores, all_ids

    def __len__(self) -> int:
        return len(self.ids)

    # -- saving --------------------------------------------------------------------------------------------------

    def save(self, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write the folder atomically; `extra` (e.g. what the index was built from) goes into meta.json."""
        folder = Path(folder)
        index = faiss.index_gpu_to_cpu(self._index) if self.use_gpu else self._index
        with atomic_dir(folder) as tmp:
            faiss.write_index(index, str(tmp / "index.faiss"))
            np.save(tmp / "passages.npy", self.passages)
            atomic_write_json(tmp / "ids.json", self.ids, indent=None)
            atomic_write_json(tmp / "meta.json", {
                "kind": self.kind, "dim": self.dim, "nlist": self.nlist, "nprobe": self.nprobe, "pq_m": self.pq_m,
                "pq_bits": self.pq_bits, "tokens_per_passage": self.tokens_per_passage, "n_passages": len(self.ids),
                **(extra or {})})
        return folder

    @classmethod
    def load(cls, folder: str | Path, use_gpu: bool | None = None) -> "TokenIndex":
        folder = Path(folder)
        meta = read_json(folder / "meta.json", required=["kind", "dim", "tokens_per_passage"])
        for name in ("index.faiss", "passages.npy"):
            if not (folder / name).is_file():
                raise InputError(folder / name, None, "index file not found (run python -m retriever.ret.index)")
        self = cls(meta["dim"], meta["kind"], meta["nlist"], meta["nprobe"], meta["pq_m"], meta["pq_bits"], use_gpu)
        self.tokens_per_passage = meta["tokens_per_passage"]
        self.ids = read_json(folder / "ids.json")
        self.passages = np.load(folder / "passages.npy", mmap_mode="r")  # re-scoring reads the candidates' rows only
        index = faiss.read_index(str(folder / "index.faiss"))
        if index.ntotal != len(self.ids) * self.tokens_per_passage or len(self.passages) != len(self.ids):
            raise InputError(folder / "ids.json", None, "index, passages and ids disagree in size")
        if hasattr(index, "nprobe"):
            index.nprobe = min(self.nprobe, self.nlist)
        self._index = self._to_device(index)
        return self

    def size_bytes(self, folder: str | Path) -> dict[str, int]:
        folder = Path(folder)
        return {name: (folder / name).stat().st_size for name in ("index.faiss", "passages.npy", "ids.json")}
