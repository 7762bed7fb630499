"""Atomic file writing and the on-disk formats shared by every stage (JSON, embeddings + ids)."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from core.errors import InputError


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


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


def save_embeddings(prefix: str | Path, matrix: np.ndarray, ids: Sequence) -> None:
    """Write `{prefix}.npy` and `{prefix}_ids.json` (same order), the embedding contract of DESIGN §4."""
    prefix = Path(prefix)
    if len(matrix) != len(ids):
        raise ValueError(f"{len(matrix)} vectors but {len(ids)} ids for {prefix}")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp = prefix.with_name(prefix.name + ".tmp.npy")
    np.save(tmp, np.ascontiguousarray(matrix, dtype=np.float32))
    os.replace(tmp, prefix.with_name(prefix.name + ".npy"))
    atomic_write_json(prefix.with_name(prefix.name + "_ids.json"), list(ids), indent=None)


def load_embeddings(prefix: str | Path) -> tuple[np.ndarray, list]:
    prefix = Path(prefix)
    npy = prefix.with_name(prefix.name + ".npy")
    ids_path = prefix.with_name(prefix.name + "_ids.json")
    if not npy.is_file():
        raise InputError(npy, None, "embedding file not found")
    matrix = np.load(npy)
    ids = read_json(ids_path)
    if len(ids) != len(matrix):
        raise InputError(ids_path, None, f"{len(ids)} ids for {len(matrix)} vectors in {npy.name}")
    return matrix, ids
