"""Image identifiers (`codes.json`, DESIGN §4): the sequential identifier of every image, made unique by a
disambiguation suffix, and its order-invariant identifier (the set of its codes); plus the collision and
codebook-usage statistics of the tokenizer report.

codes.json: {"levels": L, "codebook_size": K, "shared_codebook": bool, "suffix_size": M, "id_length": L + 1,
             "set_size": K or L·K, "images": {imgid: {"seq": [c_1..c_L, s], "set": [..], "split": str}},
             "rqvae_weights": digest of the RQ-VAE checkpoint's model.pt (absent in files written before)}
The suffix s numbers the images that share the same L codes (0 for an image alone in its group). Set elements
are codes for a shared codebook (order and level are forgotten) and l·K + c for per-level codebooks.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Hashable, Sequence

import numpy as np

from core.errors import InputError
from core.io import atomic_write_json, read_json


def collision_rate(codes: np.ndarray) -> float:
    """Share (in %) of rows whose code tuple is also another row's."""
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    return float(100.0 * np.mean(counts[inverse.reshape(-1)] > 1))


def reassign_collisions(codes: np.ndarray, last_dist: np.ndarray, order_key: Sequence[float]) -> np.ndarray:
    """Move colliding images to their next-nearest free code at the last level (a greedy form of the
    Sinkhorn-style reassignment of colliding groups): the image closest to the group's code keeps it, each other
    image takes the nearest last-level code whose identifier is still free. Codes stay semantic; the suffix
    (disambiguate) is then only needed where a prefix has run out of free codes.

    last_dist [n, K]: distance of each image's last-level residual to each last-level code.
    """
    codes = codes.copy()
    groups: dict[tuple, list[int]] = defaultdict(list)
    for row, c in enumerate(map(tuple, codes.tolist())):
        groups[c].append(row)
    used = set(groups)
    for rows in groups.values():
        for r in sorted(rows, key=lambda r: (order_key[r], r))[1:]:
            prefix = tuple(codes[r, :-1].tolist())
            for c in np.argsort(last_dist[r], kind="stable"):
                if prefix + (int(c),) not in used:
                    codes[r, -1] = int(c)
                    used.add(prefix + (int(c),))
                    break
    return codes


def disambiguate(codes: np.ndarray, order_key: Sequence[float] | None = None) -> np.ndarray:
    """Append a suffix column that numbers rows sharing the same codes, so every identifier is unique.

    Within a group, rows are numbered by `order_key` (e.g. distance to the code's reconstruction, so the most
    typical image gets 0), else by row order; deterministic either way.
    """
    groups: dict[tuple, list[int]] = defaultdict(list)
    for row, c in enumerate(map(tuple, codes.tolist())):
        groups[c].append(row)
    suffix = np.zeros(len(codes), dtype=np.int64)
    for rows in groups.values():
        if order_key is not None:
            rows = sorted(rows, key=lambda r: (order_key[r], r))
        for i, r in enumerate(rows):
            suffix[r] = i
    return np.concatenate([codes, suffix[:, None]], axis=1)


def set_identifier(seq_codes: Sequence[int], codebook_size: int, shared: bool) -> list[int]:
    """The order-invariant identifier: the set of an image's codes (suffix excluded: it carries no content)."""
    if shared:
        return sorted(set(int(c) for c in seq_codes))
    return sorted(level * codebook_size + int(c) for level, c in enumerate(seq_codes))


def usage_stats(codes: np.ndarray, codebook_size: int) -> dict[str, list[float]]:
    """Per level: share of the codebook used (%) and normalised entropy of the code distribution (%)."""
    usage, entropy = [], []
    for level in range(codes.shape[1]):
        counts = np.bincount(codes[:, level], minlength=codebook_size).astype(float)
        p = counts[counts > 0] / counts.sum()
        usage.append(float(100.0 * np.mean(counts > 0)))
        entropy.append(float(100.0 * -(p * np.log(p)).sum() / np.log(codebook_size)))
    return {"usage": usage, "entropy": entropy}


def build_codes(imgids: Sequence[Hashable], splits: Sequence[str], codes: np.ndarray, codebook_size: int,
                shared: bool, order_key: Sequence[float] | None = None) -> dict[str, Any]:
    """The codes.json document for images `imgids` with raw codes [n, L]."""
    full = disambiguate(codes, order_key)
    images = {
        str(i): {"seq": [int(c) for c in row], "set": set_identifier(row[:-1], codebook_size, shared), "split": s}
        for i, s, row in zip(imgids, splits, full.tolist())
    }
    levels = codes.shape[1]
    return {
        "levels": levels, "codebook_size": codebook_size, "shared_codebook": shared,
        "suffix_size": int(full[:, -1].max()) + 1, "id_length": levels + 1,
        "set_size": codebook_size if shared else levels * codebook_size, "images": images,
    }


def write_codes(path: str | Path, doc: dict[str, Any]) -> None:
    atomic_write_json(path, doc, indent=None)


class Identifiers:
    """codes.json, validated: image id ↔ identifier, set identifiers, and the sizes of each vocabulary."""

    REQUIRED = ("levels", "codebook_size", "shared_codebook", "suffix_size", "id_length", "set_size", "images")

    def __init__(self, path: str | Path):
        self.path = Path(path)
        doc = read_json(self.path, required=self.REQUIRED)
        self.levels, self.codebook_size = int(doc["levels"]), int(doc["codebook_size"])
        self.shared, self.suffix_size = bool(doc["shared_codebook"]), int(doc["suffix_size"])
        self.id_length, self.set_size = int(doc["id_length"]), int(doc["set_size"])
        self.rqvae_weights = str(doc.get("rqvae_weights", ""))  # files written before it was recorded have none
        if self.id_length != self.levels + 1:
            raise InputError(self.path, "id_length", f"must be levels + 1 = {self.levels + 1}")
        self.seq: dict[str, tuple[int, ...]] = {}
        self.sets: dict[str, list[int]] = {}
        self.split: dict[str, str] = {}
        for key, entry in doc["images"].items():
            self._check(key, entry)
            self.seq[key] = tuple(entry["seq"])
            self.sets[key] = list(entry["set"])
            self.split[key] = entry.get("split", "")
        by_id: dict[tuple, str] = {}
        for key, seq in self.seq.items():
            if seq in by_id:
                raise InputError(self.path, f"images.{key}.seq", f"identifier {list(seq)} is also image {by_id[seq]}'s")
            by_id[seq] = key
        self.image_of = by_id

    def _check(self, key: str, entry: Any) -> None:
        field = f"images.{key}"
        if not isinstance(entry, dict) or "seq" not in entry or "set" not in entry:
            raise InputError(self.path, field, "needs 'seq' and 'set'")
        seq = entry["seq"]
        if len(seq) != self.id_length:
            raise InputError(self.path, f"{field}.seq", f"has {len(seq)} codes, expected {self.id_length}")
        if any(not 0 <= c < self.codebook_size for c in seq[:-1]) or not 0 <= seq[-1] < self.suffix_size:
            raise InputError(self.path, f"{field}.seq", f"code out of range (codebook {self.codebook_size}, "
                                                        f"suffix {self.suffix_size}): {seq}")
        if any(not 0 <= c < self.set_size for c in entry["set"]):
            raise InputError(self.path, f"{field}.set", f"element out of range (set size {self.set_size})")

    def require(self, imgids: Sequence[Hashable], what: str = "image") -> None:
        """Every image in `imgids` must have an identifier; else one error naming the first missing one."""
        missing = [i for i in imgids if str(i) not in self.seq]
        if missing:
            raise InputError(self.path, f"images.{missing[0]}",
                             f"{what} {missing[0]!r} has no identifier ({len(missing)} of {len(imgids)} missing)")

    def matrix(self, imgids: Sequence[Hashable]) -> np.ndarray:
        self.require(imgids)
        return np.array([self.seq[str(i)] for i in imgids], dtype=np.int64)
