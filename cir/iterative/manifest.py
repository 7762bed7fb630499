"""Manifests: what a cached round file was computed from (checkpoint hash, config hash, generator settings).

A cached file stores its manifest inside it and is reused only when the manifest recomputed for this run is
equal — never because a file of the right name exists.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

from core.config import config_to_dict
from core.io import file_digest, json_digest

# Folder hashes are expensive for multi-GB checkpoints; a folder is hashed once per process and key (size, mtime).
_FOLDER_CACHE: dict[tuple, str] = {}


def hash_folder(folder: str | Path, skip: Iterable[str] = ("meta.json", "manifest.json", "provenance.json")) -> str:
    """Content hash of every file under `folder` (names and bytes, sorted); bookkeeping files are skipped
    so that writing a checkpoint's own manifest does not change its hash."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in set(skip))
    key = (str(folder.resolve()), tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    if key not in _FOLDER_CACHE:
        digest = hashlib.sha256()
        for p in files:
            digest.update(str(p.relative_to(folder)).encode())
            digest.update(file_digest(p).encode())
        _FOLDER_CACHE[key] = digest.hexdigest()[:16]
    return _FOLDER_CACHE[key]


def hash_model_source(path: str) -> str:
    """A folder or file on disk is hashed by content; a hub name (real runs) is identified by the name itself."""
    if Path(path).is_file():
        return file_digest(path)
    return hash_folder(path) if Path(path).is_dir() else f"name:{path}"


def config_hash(cfg: Any, fields: Iterable[str]) -> str:
    values = config_to_dict(cfg)
    return json_digest({k: values[k] for k in fields})


def read_cached(path: str | Path, manifest: dict[str, Any]) -> Any | None:
    """The `data` of a cached JSON file whose stored manifest equals `manifest`, else None."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # a torn or foreign file is recomputed, not trusted
    if not isinstance(stored, dict) or stored.get("manifest") != manifest:
        return None
    return stored.get("data")
