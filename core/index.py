"""A faiss vector index with ids kept beside the vectors: exact inner product (`flat`) or IVF (`ivf`);
on the GPU when faiss was built with it and a GPU is present. Saved as `index.faiss` + `ids.json`."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import faiss
import numpy as np

from core.errors import InputError
from core.io import atomic_write_json, read_json


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class VectorIndex:
    """Inner-product search over `vectors`, returning the caller's ids (not row numbers)."""

    def __init__(self, dim: int, kind: str = "flat", nlist: int = 256, nprobe: int = 16, use_gpu: bool | None = None):
        if kind not in ("flat", "ivf"):
            raise InputError(None, "index kind", f"must be 'flat' or 'ivf', got {kind!r}")
        self.dim, self.kind, self.nlist, self.nprobe = dim, kind, nlist, nprobe
        self.use_gpu = gpu_available() if use_gpu is None else use_gpu
        self.ids: list[Any] = []
        self._index = None

    def _new_index(self, n_train: int) -> faiss.Index:
        if self.kind == "flat":
            return faiss.IndexFlatIP(self.dim)
        nlist = max(1, min(self.nlist, n_train // 39))  # faiss wants ~39 training points per list
        quantizer = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.nprobe = min(self.nprobe, nlist)
        return index

    def add(self, vectors: np.ndarray, ids: Sequence[Any]) -> "VectorIndex":
        vectors = _as_f32(vectors, self.dim)
        if len(vectors) != len(ids):
            raise ValueError(f"{len(vectors)} vectors but {len(ids)} ids")
        if self._index is None:
            cpu_index = self._new_index(len(vectors))
            if not cpu_index.is_trained:
                cpu_index.train(vectors)
            self._index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, cpu_index) if self.use_gpu else cpu_index
        self._index.add(vectors)
        self.ids.extend(ids)
        return self

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[list[Any]]]:
        """Top-k scores [n, k] and the ids of the hits, best first."""
        if self._index is None or not self.ids:
            raise ValueError("search on an empty index")
        k = min(k, len(self.ids))
        scores, rows = self._index.search(_as_f32(queries, self.dim), k)
        return scores, [[self.ids[r] for r in row if r >= 0] for row in rows]

    def __len__(self) -> int:
        return len(self.ids)

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        index = faiss.index_gpu_to_cpu(self._index) if self.use_gpu else self._index
        faiss.write_index(index, str(folder / "index.faiss.tmp"))
        (folder / "index.faiss.tmp").replace(folder / "index.faiss")
        atomic_write_json(folder / "ids.json", {"kind": self.kind, "dim": self.dim, "nlist": self.nlist,
                                                "nprobe": self.nprobe, "ids": self.ids}, indent=None)

    @classmethod
    def load(cls, folder: str | Path, use_gpu: bool | None = None) -> "VectorIndex":
        folder = Path(folder)
        meta = read_json(folder / "ids.json", required=["kind", "dim", "ids"])
        if not (folder / "index.faiss").is_file():
            raise InputError(folder / "index.faiss", None, "index file not found")
        self = cls(meta["dim"], meta["kind"], meta.get("nlist", 256), meta.get("nprobe", 16), use_gpu)
        index = faiss.read_index(str(folder / "index.faiss"))
        if index.ntotal != len(meta["ids"]):
            raise InputError(folder / "ids.json", "ids", f"{len(meta['ids'])} ids for {index.ntotal} vectors")
        self._index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index) if self.use_gpu else index
        self.ids = list(meta["ids"])
        return self


def _as_f32(x: np.ndarray, dim: int) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"expected vectors of shape [n, {dim}], got {x.shape}")
    return x
