"""Atomic file writing and the on-disk formats shared by every stage (JSON, embeddings + ids)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from core.errors import InputError


def atomic_write_text(path: str | Path, text: str | Iterable[str]) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file. `text` may be pieces,
    written as they come, so a large file never sits in memory whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.writelines([text] if isinstance(text, str) else text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def atomic_write_json_items(path: str | Path, items: Iterable[Any]) -> int:
    """A JSON array written item by item (one per line) from any iterable; returns how many were written."""
    count = 0

    def pieces() -> Iterator[str]:
        nonlocal count
        yield "["
        for item in items:
            yield ("\n" if count == 0 else ",\n") + json.dumps(item)
            count += 1
        yield "\n]\n"
    atomic_write_text(path, pieces())
    return count


def atomic_write_jsonl(path: str | Path, rows: Sequence[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def save_figure(fig: Any, path: str | Path, dpi: int = 140) -> None:
    """A matplotlib figure as a PNG, written atomically (a reader never sees half an image); closes the figure."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder that replaces `path` only if the block completes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json(path: str | Path, required: Sequence[str] = ()) -> Any:
    """Read a JSON file; a missing file, bad JSON or a missing top-level key is an InputError."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, None, "file not found")
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(path, None, f"not valid JSON ({e})") from None
    for key in required:
        if not isinstance(obj, dict) or key not in obj:
            raise InputError(path, key, "required field is missing")
    return obj


def read_json_array(path: str | Path, key: str, object_hook: Callable[[dict], Any] | None = None) -> Iterator[Any]:
    """The items of the array under top-level `key` of a JSON object file, parsed one at a time from a window that
    slides over the file: memory holds one item, not the file's text and every parsed item at once (COCO's Karpathy
    file is 150 MB of text and twice that parsed). A missing file, bad JSON or a missing key is an InputError."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, None, "file not found")
    with path.open() as f:
        window = _JSONWindow(f, object_hook)
        try:
            yield from window.array_under(key)
        except json.JSONDecodeError as e:  # its position is in the window that was current when it was raised
            raise InputError(path, None, f"not valid JSON near character {window.failed_at + e.pos}: {e.msg}") from None
        except _NotAnArray:
            raise InputError(path, key, "must be a list") from None
    if not window.found:
        raise InputError(path, key, "required field is missing")


class _NotAnArray(Exception):
    pass


class _JSONWindow:
    """JSON text read a chunk at a time; `value()` decodes the next complete value."""

    CHUNK = 1 << 20

    def __init__(self, f, object_hook: Callable[[dict], Any] | None):
        self.f, self.buf, self.pos, self.consumed, self.eof, self.found = f, "", 0, 0, False, False
        self.failed_at = 0
        self.decoder = json.JSONDecoder(object_hook=object_hook)

    def _more(self) -> bool:
        if self.eof:
            return False
        chunk = self.f.read(self.CHUNK)
        self.consumed += self.pos
        self.buf, self.pos, self.eof = self.buf[self.pos:] + chunk, 0, not chunk
        return bool(chunk)

    def peek(self) -> str:
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\n\r":
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._more():
                return ""

    def expect(self, char: str) -> None:
        if self.peek() != char:
            self.failed_at = self.consumed
            raise json.JSONDecodeError(f"expected '{char}'", self.buf, self.pos)
        self.pos += 1

    def skip_comma(self) -> None:
        if self.peek() == ",":
            self.pos += 1

    def value(self) -> Any:
        self.peek()
        while True:
            try:
                obj, end = self.decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError:
                window_start = self.consumed
                if self._more():
                    continue
                self.failed_at = window_start
                raise
            if end == len(self.buf) and self._more():  # a number at the window's end may go on in the next chunk
                continue
            self.pos = end
            return obj

    def array_under(self, key: str) -> Iterator[Any]:
        self.expect("{")
        while self.peek() != "}":
            name = self.value()
            self.expect(":")
            if name == key:
                if self.peek() != "[":
                    raise _NotAnArray()
                self.found, self.pos = True, self.pos + 1
                while self.peek() != "]":
                    yield self.value()
                    self.skip_comma()
                self.expect("]")
            else:
                self.value()
            self.skip_comma()
        self.expect("}")


def read_jsonl(path: str | Path, required: Sequence[str] = ()) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise InputError(path, None, "file not found")
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(path, f"line {lineno}", f"not valid JSON ({e})") from None
        for key in required:
            if key not in row:
                raise InputError(path, f"line {lineno}: {key}", "required field is missing")
        rows.append(row)
    return rows


# What made a file, a cache or a checkpoint is recorded as short content digests; these are the only ones.
DIGEST_CHARS = 16


def file_digest(path: str | Path, chars: int = DIGEST_CHARS) -> str:
    """sha256 of a file's bytes, read in blocks so a multi-GB checkpoint never sits in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:chars]


def json_digest(obj: Any, chars: int = DIGEST_CHARS) -> str:
    """sha256 of an object's canonical JSON (sorted keys; anything JSON lacks as its str)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:chars]


def state_dict_digest(module: torch.nn.Module, chars: int | None = None) -> str:
    """sha256 of a module's tensors (names, dtypes, shapes and raw bytes, bfloat16 included), independent of how
    or whether the weights were ever saved."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:chars]


EMBEDDING_DTYPE = np.float16  # half the disk and page cache of float32; recall is unchanged at 4 decimal places


def _npy(prefix: Path, shard: str = "") -> Path:
    return prefix.with_name(f"{prefix.name}{shard}.npy")


def _ids_path(prefix: Path, shard: str = "") -> Path:
    return prefix.with_name(f"{prefix.name}{shard}_ids.json")


def _manifest_path(prefix: Path) -> Path:
    return prefix.with_name(prefix.name + ".shards.json")


def _shard_tag(rank: int, world_size: int) -> str:
    return f".rank{rank}-of-{world_size}"


class EmbeddingWriter:
    """Rows written to disk as they are made: `{prefix}.npy` (float16, a memory-mapped .npy) + `{prefix}_ids.json`.
    Under torchrun each rank writes its own shard `{prefix}.rank{r}-of-{w}.npy` and rank 0 a manifest
    `{prefix}.shards.json`; `open_embeddings` reads either form back by memory map. Files appear under their
    final names only when `close()` completes, so a killed run leaves nothing half-written; the manifest is removed
    when writing starts and written only after every rank has closed its shard, so it never lists a shard from an
    earlier run."""

    def __init__(self, prefix: str | Path, rows: int, dim: int, rank: int = 0, world_size: int = 1,
                 dtype: np.dtype = EMBEDDING_DTYPE):
        self.prefix, self.rank, self.world_size = Path(prefix), rank, world_size
        self.shard = _shard_tag(rank, world_size) if world_size > 1 else ""
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self.final = _npy(self.prefix, self.shard)
        self.tmp = self.final.with_name(f".{self.final.name}.{os.getpid()}.tmp")
        self.matrix = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=dtype, shape=(rows, dim))
        self.filled = 0
        if rank == 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(_manifest_path(self.prefix))

    def write(self, block: np.ndarray) -> None:
        end = self.filled + len(block)
        if end > len(self.matrix):
            raise ValueError(f"{end} rows written to {self.final}, which was made for {len(self.matrix)}")
        self.matrix[self.filled:end] = block
        self.filled = end

    def close(self, ids: Iterable, made_by: dict | None = None) -> None:
        """Finish the shard with its ids (same order as the rows; any iterable, written as it is read) and what
        made it (see `embeddings_made_by`)."""
        if self.filled != len(self.matrix):
            raise ValueError(f"{self.final}: {self.filled} rows written, {len(self.matrix)} expected")
        ids_path = _ids_path(self.prefix, self.shard)
        written = atomic_write_json_items(ids_path, ids)
        if written != self.filled:
            ids_path.unlink()
            raise ValueError(f"{self.final}: {self.filled} rows written but {written} ids")
        self.matrix.flush()
        del self.matrix
        os.replace(self.tmp, self.final)
        _wait_for_every_rank(self.world_size)
        if self.rank == 0:
            manifest = {"shards": [_npy(self.prefix, _shard_tag(r, self.world_size) if self.world_size > 1 else "").name
                                   for r in range(self.world_size)], "made_by": made_by or {}}
            atomic_write_json(_manifest_path(self.prefix), manifest)

    def abort(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


def _wait_for_every_rank(world_size: int) -> None:
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def save_embeddings(prefix: str | Path, matrix: np.ndarray, ids: Sequence, made_by: dict | None = None) -> None:
    """Write a whole matrix at once in the format of `EmbeddingWriter` (one shard)."""
    if len(matrix) != len(ids):
        raise ValueError(f"{len(matrix)} vectors but {len(ids)} ids for {prefix}")
    writer = EmbeddingWriter(prefix, len(matrix), matrix.shape[1] if matrix.ndim == 2 else 0)
    writer.write(np.asarray(matrix))
    writer.close(ids, made_by)


class ShardedRows:
    """Several memory-mapped shards read as one [n, d] matrix without joining them in memory: `len`, `shape`,
    row slicing and index arrays read only the rows asked for; `blocks()` walks the rows in order."""

    def __init__(self, shards: Sequence[np.ndarray]):
        self.shards = list(shards)
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])
        self.shape = (int(self.starts[-1]), self.shards[0].shape[1])
        self.dtype = self.shards[0].dtype
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        if isinstance(rows, (int, np.integer)):
            return self[np.array([rows])][0]
        index = np.arange(len(self))[rows]
        shard = np.searchsorted(self.starts, index, side="right") - 1
        out = np.empty((len(index), self.shape[1]), dtype=self.dtype)
        for s in np.unique(shard):
            mask = shard == s
            out[mask] = self.shards[s][index[mask] - self.starts[s]]
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        # joins the shards in memory: for small matrices only; large consumers use blocks()
        joined = np.concatenate(self.shards)
        return joined.astype(dtype) if dtype is not None else joined

    def astype(self, dtype) -> np.ndarray:
        return np.asarray(self, dtype=dtype)

    def blocks(self, rows: int = 65536) -> Iterator[np.ndarray]:
        for shard in self.shards:
            for i in range(0, len(shard), rows):
                yield shard[i:i + rows]


def open_embeddings(prefix: str | Path) -> tuple[np.ndarray | ShardedRows, list]:
    """Stored embeddings by memory map, as stored (float16), and their ids: one shard as a read-only np.memmap,
    several as `ShardedRows`. Nothing is read into memory until rows are used."""
    prefix = Path(prefix)
    manifest_path = _manifest_path(prefix)
    if manifest_path.is_file():
        names = read_json(manifest_path, required=["shards"])["shards"]
    elif _npy(prefix).is_file():
        names = [_npy(prefix).name]
    else:
        raise InputError(_npy(prefix), None, "embedding file not found")
    shards, ids = [], []
    for name in names:
        npy = prefix.with_name(name)
        if not npy.is_file():
            raise InputError(npy, None, f"embedding shard listed in {manifest_path.name} not found")
        matrix = np.load(npy, mmap_mode="r")
        shard_ids = read_json(npy.with_name(npy.name[:-len(".npy")] + "_ids.json"))
        if len(shard_ids) != len(matrix):
            raise InputError(npy, None, f"{len(shard_ids)} ids for {len(matrix)} vectors")
        shards.append(matrix)
        ids += shard_ids
    return (shards[0] if len(shards) == 1 else ShardedRows(shards)), ids


def load_embeddings(prefix: str | Path, dtype: np.dtype = np.float32) -> tuple[np.ndarray, list]:
    """Stored embeddings as one in-memory matrix of `dtype` (float32 for arithmetic) and their ids. For matrices
    a stage holds anyway (a training split's vectors); walk `open_embeddings` for a corpus-sized one."""
    matrix, ids = open_embeddings(prefix)
    return np.asarray(matrix, dtype=dtype), ids


def embeddings_made_by(prefix: str | Path) -> dict:
    """What made stored embeddings (model, preprocessing, corpus), `{}` when unknown."""
    path = _manifest_path(Path(prefix))
    return read_json(path).get("made_by", {}) if path.is_file() else {}
