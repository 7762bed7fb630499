"""A faiss vector index with ids kept beside the vectors. Kinds: exact inner product (`flat`), IVF-flat (`ivf`),
IVF-PQ (`ivfpq`), HNSW (`hnsw`), or `auto`, which picks flat / ivf / ivfpq from the corpus size. Built from an
in-memory array or block by block from a memory-mapped matrix (float16 included), trained on a random sample;
searched on every GPU (sharded) when faiss was built with GPU support and GPUs are present.
A saved index is a folder: `index.faiss` (the faiss index) + `ids.json` (the ids and the settings it was built with).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Protocol, Sequence

import faiss
import numpy as np

from core.errors import InputError
from core.io import atomic_write_json, read_json

KINDS = ("flat", "ivf", "ivfpq", "hnsw")
FLAT_BELOW = 50_000  # auto: exact search under this many vectors (26M multiply-adds a query at 512-d)
IVFPQ_FROM = 2_000_000  # auto: compressed codes from here (float32 IVF lists would pass 4 GB at 512-d)
MIN_POINTS_PER_LIST = 39  # faiss warns below 39 training points per k-means centroid
TRAIN_POINTS_PER_LIST = 64  # training rows per IVF list, within faiss's advice of 30-256; k-means time grows with it
MIN_TRAIN_POINTS = 65_536  # 256 PQ centroids x 256 points each, faiss's own cap for a PQ codebook
BLOCK_ROWS = 65_536  # rows converted to float32 at a time when adding (256 MB at 1024-d)


class RowMatrix(Protocol):
    """What `add_blocks` reads: an [n, d] matrix with `len`, `.shape` and row slicing (np.memmap, ShardedRows)."""

    shape: tuple[int, ...]

    def __len__(self) -> int: ...

    def __getitem__(self, rows: slice) -> np.ndarray: ...


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def choose_kind(n: int, flat_below: int = FLAT_BELOW, ivfpq_from: int = IVFPQ_FROM) -> str:
    """The `auto` kind for `n` vectors: exact while exhaustive search is cheap, IVF-flat above, IVF-PQ once the
    float32 vectors themselves become the memory problem."""
    if n < flat_below:
        return "flat"
    return "ivf" if n < ivfpq_from else "ivfpq"


def default_nlist(n: int) -> int:
    """About 4·sqrt(n) lists: the low end of faiss's guideline (4 to 16·sqrt(n)), which keeps k-means cheap."""
    return max(1, round(4 * math.sqrt(n)))


def default_nprobe(nlist: int) -> int:
    """Lists visited per query: about sqrt(nlist), at least 8, never more than there are lists (36 of 1265 lists
    gave Recall@10 0.99 at 100K vectors in bench/index_scale.py)."""
    return min(nlist, max(8, round(math.sqrt(nlist))))


def pq_subquantizers(dim: int, asked: int | None = None) -> int:
    """PQ's `m` (bytes per code at 8 bits): `asked` if it divides `dim`, else the divisor giving sub-vectors
    closest to 8 dimensions (the usual size/accuracy trade: 32x smaller than float32), from 4 to 16 dims."""
    if asked is not None:
        if asked < 1 or dim % asked:
            raise InputError(None, "pq_m", f"{asked} does not divide the dimension {dim}")
        return asked
    fits = [m for m in range(1, dim + 1) if dim % m == 0 and 4 <= dim // m <= 16]
    if not fits:
        raise InputError(None, "pq_m", f"no divisor of the dimension {dim} gives PQ sub-vectors of 4 to 16 dims; "
                                       "pass pq_m explicitly or use kind 'ivf'")
    return min(fits, key=lambda m: (abs(dim // m - 8), m))


def pq_bits_for(n_train: int, asked: int = 8) -> int:
    """Bits per PQ sub-code: `asked`, fewer when the sample cannot train 2**bits centroids (39 points each)."""
    return max(1, min(asked, int(math.log2(max(2, n_train // MIN_POINTS_PER_LIST)))))


def sample_rows(matrix: RowMatrix, size: int, seed: int = 0) -> np.ndarray:
    """`size` rows of `matrix` picked at random, as float32. Rows are read as short contiguous runs at random
    offsets: slicing is all `matrix` has to offer, and runs keep a memory map's reads sequential. At least ~1024
    runs, so a corpus stored in cluster order is still sampled across its clusters."""
    n = len(matrix)
    if size >= n:
        return _as_f32(matrix[0:n], matrix.shape[1])
    run = max(1, min(256, size // 1024))
    n_runs = math.ceil(n / run)
    picked = np.sort(np.random.default_rng(seed).choice(n_runs, size=math.ceil(size / run), replace=False))
    sample = np.concatenate([_as_f32(matrix[r * run:min(n, (r + 1) * run)], matrix.shape[1]) for r in picked])
    return sample[:size]


def to_all_gpus(index: faiss.Index) -> faiss.Index:
    """A search copy of a CPU index on every GPU."""
    co = faiss.GpuMultipleClonerOptions()
    co.shard = True  # each GPU holds 1/ngpu of the vectors, so the corpus need only fit in all of them together
    # flat: vectors held in float16, half the memory; stored embeddings are float16 already (core.io), queries are
    # rounded to float16 for the matrix multiply (accumulated in float32);
    # IVF-PQ: float16 lookup tables, which faiss-gpu requires once m·2^bits > 16384 (96 sub-quantizers at 768-d)
    co.useFloat16 = True
    return faiss.index_cpu_to_all_gpus(index, co=co)


class VectorIndex:
    """Inner-product search over vectors, returning the caller's ids (not row numbers).

    `kind="auto"` picks flat / ivf / ivfpq from the size of the first `add`; `nlist`, `nprobe`, `pq_m`,
    `pq_bits` default from the corpus size and dimension when not given. The faiss index is built and kept on
    the CPU (the copy that is saved); with GPUs, searches go through a sharded GPU copy made at the first search
    after an add (HNSW stays on the CPU: faiss-gpu has no HNSW)."""

    def __init__(self, dim: int, kind: str = "auto", nlist: int | None = None, nprobe: int | None = None,
                 use_gpu: bool | None = None, *, pq_m: int | None = None, pq_bits: int = 8, hnsw_m: int = 32,
                 ef_construction: int = 40, ef_search: int = 64, flat_below: int = FLAT_BELOW,
                 ivfpq_from: int = IVFPQ_FROM, train_size: int | None = None, seed: int = 0):
        if kind not in (*KINDS, "auto"):
            raise InputError(None, "index kind", f"must be one of {', '.join(KINDS)} or auto, got {kind!r}")
        for name, value in (("nlist", nlist), ("nprobe", nprobe), ("train_size", train_size)):
            if value is not None and value < 1:
                raise InputError(None, name, f"must be at least 1, got {value}")
        self.dim, self.kind, self.nlist, self.nprobe = dim, kind, nlist, nprobe
        # An explicit ivfpq checks its code size now, before any work; auto checks once it has chosen ivfpq.
        self.pq_m = pq_subquantizers(dim, pq_m) if kind == "ivfpq" else pq_m
        self.pq_bits, self.hnsw_m, self.ef_construction, self.ef_search = pq_bits, hnsw_m, ef_construction, ef_search
        self.flat_below, self.ivfpq_from, self.train_size, self.seed = flat_below, ivfpq_from, train_size, seed
        self.use_gpu = gpu_available() if use_gpu is None else use_gpu
        self.ids: list[Any] = []
        self._index: faiss.Index | None = None  # the CPU index: built, searched without GPUs, saved
        self._gpu_index: faiss.Index | None = None  # search copy on the GPUs, dropped when vectors are added

    # -- building ------------------------------------------------------------------------------------------------

    def _new_index(self, matrix: RowMatrix) -> faiss.Index:
        """An empty CPU index of the chosen kind, trained (where it needs training) on a sample of `matrix`."""
        if self.kind == "auto":
            self.kind = choose_kind(len(matrix), self.flat_below, self.ivfpq_from)
        if self.kind == "flat":
            return faiss.IndexFlatIP(self.dim)
        if self.kind == "hnsw":
            index = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = self.ef_construction
            return index
        return self._new_ivf(matrix)

    def _new_ivf(self, matrix: RowMatrix) -> faiss.Index:
        """IVF-flat or IVF-PQ, its lists (and codebooks) trained on a random sample of rows, not the whole corpus."""
        nlist = self.nlist or default_nlist(len(matrix))
        sample = sample_rows(matrix, self.train_size or max(TRAIN_POINTS_PER_LIST * nlist, MIN_TRAIN_POINTS), self.seed)
        self.nlist = max(1, min(nlist, len(sample) // MIN_POINTS_PER_LIST))
        quantizer = faiss.IndexFlatIP(self.dim)
        if self.kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, self.dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            self.pq_m = pq_subquantizers(self.dim, self.pq_m)
            self.pq_bits = pq_bits_for(len(sample), self.pq_bits)
            index = faiss.IndexIVFPQ(quantizer, self.dim, self.nlist, self.pq_m, self.pq_bits,
                                     faiss.METRIC_INNER_PRODUCT)
        # k-means on the GPUs when there are some (the pattern of faiss's own GPU benchmarks). faiss does not own
        # `clustering_index`: the local name keeps it alive through train(), and it is unset before it goes.
        clustering = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(self.dim)) if self.use_gpu else None
        if clustering is not None:
            index.clustering_index = clustering
        index.train(sample)  # (faiss's Python wrapper keeps `quantizer` alive as long as `index`)
        index.clustering_index = None
        return index

    def _apply_search_params(self) -> None:
        if self.kind in ("ivf", "ivfpq"):
            self.nprobe = min(self.nprobe or default_nprobe(self.nlist), self.nlist)
            self._index.nprobe = self.nprobe
        elif self.kind == "hnsw":
            self._index.hnsw.efSearch = self.ef_search

    def add_blocks(self, matrix: RowMatrix, ids: Sequence[Any], block_size: int = BLOCK_ROWS) -> "VectorIndex":
        """Add the rows of `matrix` (anything with `len`, `.shape` and row slicing: an array, an np.memmap,
        `core.io.ShardedRows`), `block_size` rows at a time converted to float32, so a float16 memory map is
        never held whole in float32. The first call also chooses the kind (auto) and trains on a sample."""
        if len(matrix.shape) != 2 or matrix.shape[1] != self.dim:
            raise ValueError(f"expected vectors of shape [n, {self.dim}], got {tuple(matrix.shape)}")
        if len(matrix) != len(ids):
            raise ValueError(f"{len(matrix)} vectors but {len(ids)} ids")
        if len(matrix) == 0:
            return self
        if self._index is None:
            self._index = self._new_index(matrix)
            self._apply_search_params()
        for start in range(0, len(matrix), block_size):
            self._index.add(_as_f32(matrix[start:start + block_size], self.dim))
        self.ids.extend(ids)
        self._gpu_index = None
        return self

    def add(self, vectors: RowMatrix, ids: Sequence[Any]) -> "VectorIndex":
        """Add vectors with their ids (block by block, as `add_blocks`)."""
        return self.add_blocks(vectors, ids)

    # -- searching -----------------------------------------------------------------------------------------------

    def _searcher(self) -> faiss.Index:
        if not self.use_gpu or self.kind == "hnsw":
            return self._index
        if self._gpu_index is None:
            self._gpu_index = to_all_gpus(self._index)  # carries nprobe over from the CPU index
        return self._gpu_index

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[list[Any]]]:
        """Top-k scores [n, k] and the ids of the hits, best first."""
        if self._index is None or not self.ids:
            raise ValueError("search on an empty index")
        k = min(k, len(self.ids))
        scores, rows = self._searcher().search(_as_f32(queries, self.dim), k)
        return scores, [[self.ids[r] for r in row if r >= 0] for row in rows]

    def __len__(self) -> int:
        return len(self.ids)

    # -- saving --------------------------------------------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        """What the index was built with (the resolved kind, nlist, ...), as saved in ids.json."""
        return {"kind": self.kind, "dim": self.dim, "nlist": self.nlist, "nprobe": self.nprobe, "pq_m": self.pq_m,
                "pq_bits": self.pq_bits, "hnsw_m": self.hnsw_m, "ef_construction": self.ef_construction,
                "ef_search": self.ef_search}

    def save(self, folder: str | Path) -> None:
        if self._index is None:
            raise ValueError("save of an empty index")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self._index, str(folder / "index.faiss.tmp"))  # the CPU index: no GPU copy to undo
        (folder / "index.faiss.tmp").replace(folder / "index.faiss")
        atomic_write_json(folder / "ids.json", {**self.settings(), "ids": self.ids}, indent=None)

    @classmethod
    def load(cls, folder: str | Path, use_gpu: bool | None = None) -> "VectorIndex":
        folder = Path(folder)
        meta = read_json(folder / "ids.json", required=["kind", "dim", "ids"])
        if not (folder / "index.faiss").is_file():
            raise InputError(folder / "index.faiss", None, "index file not found")
        if meta["kind"] not in KINDS:
            raise InputError(folder / "ids.json", "kind", f"must be one of {', '.join(KINDS)}, got {meta['kind']!r}")
        self = cls(meta["dim"], meta["kind"], meta.get("nlist"), meta.get("nprobe"), use_gpu,
                   pq_m=meta.get("pq_m"), pq_bits=meta.get("pq_bits", 8), hnsw_m=meta.get("hnsw_m", 32),
                   ef_construction=meta.get("ef_construction", 40), ef_search=meta.get("ef_search", 64))
        index = faiss.read_index(str(folder / "index.faiss"))
        if index.ntotal != len(meta["ids"]):
            raise InputError(folder / "ids.json", "ids", f"{len(meta['ids'])} ids for {index.ntotal} vectors")
        if self.kind in ("ivf", "ivfpq"):
            self.nlist = faiss.extract_index_ivf(index).nlist  # the file's, also for folders saved before it was
        self._index = index
        self._apply_search_params()
        self.ids = list(meta["ids"])
        return self


def _as_f32(x: np.ndarray, dim: int) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"expected vectors of shape [n, {dim}], got {x.shape}")
    return x
