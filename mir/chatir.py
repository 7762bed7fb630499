"""ChatIR's data layout and protocol.

- search space: a JSON list of image paths relative to an image root (`Search_Space_val_50k.json`);
- dialogues: a JSON list of `{"img": path, "dialog": [caption, "question? answer", ...]}`
  (`VisDial_v1.0_queries_val.json`); every `img` must be in the search space;
- protocol: the query at round L is `", ".join(dialog[: L + 1])`; a target is found by round r if its rank
  was below k at any round ≤ r (cumulative Hits@k, `mir.metrics`).

The Shapes world writes the same files (`core/shapes/tasks/chatir.py`), with only round 0 in each dialogue.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from core.errors import InputError
from core.io import read_json


@dataclass(frozen=True)
class Dialogue:
    img: str  # path relative to the image root, as listed in the search space
    dialog: tuple[str, ...]


@dataclass(frozen=True)
class ChatIRData:
    image_root: Path
    search_space: tuple[str, ...]
    dialogues: tuple[Dialogue, ...]

    def path(self, img: str) -> Path:
        return self.image_root / img


def load_search_space(path: str | Path) -> list[str]:
    items = read_json(path)
    if not isinstance(items, list) or not items:
        raise InputError(path, None, "a search space must be a non-empty JSON list of image paths")
    for i, p in enumerate(items):
        if not isinstance(p, str) or not p:
            raise InputError(path, f"[{i}]", f"expected an image path (string), got {p!r}")
    if len(set(items)) != len(items):
        raise InputError(path, None, "the search space lists an image twice")
    return items


def load_dialogues(path: str | Path) -> list[Dialogue]:
    items = read_json(path)
    if not isinstance(items, list) or not items:
        raise InputError(path, None, "a dialogue file must be a non-empty JSON list of {\"img\", \"dialog\"}")
    out = []
    for i, d in enumerate(items):
        if not isinstance(d, dict):
            raise InputError(path, f"[{i}]", "expected an object with img and dialog")
        if not isinstance(d.get("img"), str):
            raise InputError(path, f"[{i}].img", "required image path is missing")
        dialog = d.get("dialog")
        if not isinstance(dialog, list) or not dialog or not all(isinstance(u, str) for u in dialog):
            raise InputError(path, f"[{i}].dialog", "must be a non-empty list of strings (caption first)")
        out.append(Dialogue(d["img"], tuple(dialog)))
    return out


def load_chatir(dialogues_json: str | Path, search_space_json: str | Path, image_root: str | Path,
                check_files: bool = True, first: int | None = None) -> ChatIRData:
    """Both files, checked against each other (every target is in the search space) and against the disk; with
    `first`, only the first dialogues are kept (and checked)."""
    space = load_search_space(search_space_json)
    dialogues = load_dialogues(dialogues_json)
    if first is not None:
        if not 1 <= first <= len(dialogues):
            raise InputError(dialogues_json, "n_targets", f"asked for {first} dialogues, the file has {len(dialogues)}")
        dialogues = dialogues[:first]
    check_targets_listed(dialogues, space, dialogues_json, search_space_json)
    root = Path(image_root)
    if check_files:
        for i, p in enumerate(space):
            if not (root / p).is_file():
                raise InputError(root / p, f"[{i}]", f"image file not found (listed in {search_space_json})")
    return ChatIRData(root, tuple(space), tuple(dialogues))


def check_targets_listed(dialogues: Sequence[Dialogue], space: Sequence[str], dialogues_json: str | Path,
                         search_space_json: str | Path) -> None:
    """Every dialogue's image must be in the search space (a target outside it can never be found): one error
    naming the dialogue file, the first missing image and how many are missing."""
    members = set(space)
    missing = [i for i, d in enumerate(dialogues) if d.img not in members]
    if missing:
        i = missing[0]
        raise InputError(dialogues_json, f"[{i}].img", f"{dialogues[i].img} is not in the search space "
                         f"{search_space_json} ({len(missing)} of {len(dialogues)} dialogue images are not)")


def chatir_query(dialog: Sequence[str], round_: int) -> str:
    """ChatIR's protocol: the query at round L joins the caption and the first L question–answer turns."""
    if round_ < 0 or round_ >= len(dialog):
        raise InputError(None, "round", f"round {round_} is outside a dialogue of {len(dialog)} utterances")
    return ", ".join(dialog[: round_ + 1])


def dialogue_rounds(dialogues: Sequence[Dialogue], n_rounds: int | None = None) -> int:
    """Rounds 0..R every dialogue has (R = the shortest dialogue's length − 1, or n_rounds if smaller)."""
    shortest = min(len(d.dialog) for d in dialogues) - 1
    if n_rounds is not None and n_rounds > shortest:
        raise InputError(None, "rounds", f"asked for {n_rounds} rounds but the shortest dialogue has {shortest}")
    return shortest if n_rounds is None else n_rounds
