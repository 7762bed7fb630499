"""What a run was made with, written beside its config: the code version (git commit, and whether the checkout had
uncommitted changes), the installed versions of the libraries that decide its numbers, and the command line."""
from __future__ import annotations

import functools
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from core.io import atomic_write_json

PROVENANCE_FILE = "provenance.json"
LIBRARIES = ("torch", "torchvision", "transformers", "diffusers", "open_clip_torch", "faiss-cpu", "faiss-gpu-cu12",
             "peft", "tokenizers", "numpy")
_SOURCE_ROOT = Path(__file__).resolve().parent.parent


def provenance() -> dict[str, Any]:
    """The code version, library versions, command line and time of this process."""
    return {**_code_and_libraries(), "command": [sys.executable, *sys.argv],
            "written": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def write_provenance(folder: str | Path) -> Path:
    path = Path(folder) / PROVENANCE_FILE
    atomic_write_json(path, provenance())
    return path


@functools.lru_cache(maxsize=1)
def _code_and_libraries() -> dict[str, Any]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {"git": _git_state(), "python": platform.python_version(), "libraries": versions}


def _git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(_SOURCE_ROOT), *args], capture_output=True, text=True, check=True,
                              timeout=30).stdout
    try:
        if Path(git("rev-parse", "--show-toplevel").strip()).resolve() != _SOURCE_ROOT:
            raise OSError("the package is not the root of a git checkout")
        commit = git("rev-parse", "HEAD").strip()
        changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "note": "not a git checkout (an installed copy): the code version is unknown"}
    return {"commit": commit, "dirty": bool(changed), "changed_files": changed[:50]}
