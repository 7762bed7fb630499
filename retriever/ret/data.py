"""M2KR-style multimodal retrieval data: queries (question + image) and passages (text + image), JSONL.

Reads the M2KR / PreFLMR field names (queries: `question_id`, `question`, `instruction`, `img_path`,
`pos_item_ids`, ...; passages: `passage_id`, `passage_content`, `img_path`) and the ReT-M2KR spelling of
the same fields (queries: `data_id`, `image_path`, `passage_id` (the positives); passages: `passage_text`,
`passage_image_path`). Image paths are relative to `image_root`. Everything is checked when the files
are opened: a query image that does not exist, or a passage id that repeats, is an InputError naming the file,
the line and the field. A positive id the corpus lacks counts as a miss, as in the reference evaluation (real
files hold such rows; their number is reported), or is an InputError with `strict`. Queries keep their answers
(`answers`, ReT-M2KR `answer`: strings, or dicts whose `wikidata` value is the answer) for Pseudo Recall@K.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import InputError
from core.io import read_jsonl

# ReT-M2KR spelling → M2KR spelling.
QUERY_ALIASES = {"data_id": "question_id", "image_path": "img_path", "passage_id": "pos_item_ids", "answer": "answers"}
PASSAGE_ALIASES = {"passage_text": "passage_content", "passage_image_path": "img_path"}


@dataclass(frozen=True)
class Passage:
    passage_id: str
    text: str  # '' when the passage has no text
    image: str | None  # absolute path, None when the passage has no image


@dataclass(frozen=True)
class Query:
    question_id: str
    question: str
    instruction: str
    image: str | None
    positives: tuple[str, ...]
    answers: tuple[str, ...] = ()  # answer strings, for Pseudo Recall@K

    def text(self, use_instruction: bool = True) -> str:
        """The query text the model reads: "{instruction} {question}" as in ReT's inference script."""
        if use_instruction and self.instruction:
            return f"{self.instruction.strip()} {self.question}".strip()
        return self.question


@dataclass
class M2KRSplit:
    queries: list[Query]
    passages: list[Passage]
    missing_positives: int = 0  # queries none of whose positives is in the corpus (always misses)

    def passage_index(self) -> dict[str, int]:
        return {p.passage_id: i for i, p in enumerate(self.passages)}


def _present(value: Any) -> bool:
    return value is not None and value == value and value != ""  # NaN != NaN (pandas-written files)


def _rename(row: dict, aliases: dict[str, str]) -> dict:
    out = dict(row)
    for old, new in aliases.items():
        if old in out and new not in out:
            out[new] = out.pop(old)
    return out


def _image(root: Path, value: Any, path: Path, where: str, check: bool) -> str | None:
    if not _present(value):
        return None
    full = root / str(value)
    if check and not full.is_file():
        raise InputError(path, f"{where}: img_path", f"image {full} does not exist")
    return str(full)


def load_passages(path: str | Path, image_root: str | Path, check_images: bool = True) -> list[Passage]:
    path, root = Path(path), Path(image_root)
    rows = read_jsonl(path)
    if not rows:
        raise InputError(path, None, "no passages")
    passages, seen = [], set()
    for lineno, row in enumerate(rows, 1):
        row = _rename(row, PASSAGE_ALIASES)
        where = f"line {lineno}"
        if not _present(row.get("passage_id")):
            raise InputError(path, f"{where}: passage_id", "required field is missing")
        pid = str(row["passage_id"])
        if pid in seen:
            raise InputError(path, f"{where}: passage_id", f"duplicate passage id {pid!r}")
        seen.add(pid)
        text = str(row["passage_content"]) if _present(row.get("passage_content")) else ""
        image = _image(root, row.get("img_path"), path, where, check_images)
        if not text and image is None:
            raise InputError(path, f"{where}: passage_content", "a passage needs a text or an image")
        passages.append(Passage(pid, text, image))
    return passages


def answer_strings(value: Any, path: Path, where: str) -> tuple[str, ...]:
    """The answers a passage is matched against: strings as given; a dict answer by its `wikidata` value (the
    reference's reading of InfoSeek's numeric answers); a lone string or number as a one-answer list."""
    if not _present(value):
        return ()
    out = []
    for answer in value if isinstance(value, list) else [value]:
        if isinstance(answer, dict):
            if "wikidata" not in answer:
                raise InputError(path, f"{where}: answers", f"a dict answer needs a 'wikidata' value, got {answer!r}")
            answer = answer["wikidata"]
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise InputError(path, f"{where}: answers", f"an answer must be a string, a number or a dict, got {answer!r}")
        out.append(str(answer))
    return tuple(out)


def missing_positive_count(queries: list[Query], passage_ids: set[str]) -> int:
    return sum(not any(p in passage_ids for p in q.positives) for q in queries)


def load_queries(path: str | Path, image_root: str | Path, passage_ids: set[str] | None = None,
                 check_images: bool = True, strict: bool = False) -> list[Query]:
    """`strict`: a positive id missing from `passage_ids` is an InputError (else a miss, counted by the caller)."""
    path, root = Path(path), Path(image_root)
    rows = read_jsonl(path)
    if not rows:
        raise InputError(path, None, "no queries")
    queries = []
    for lineno, row in enumerate(rows, 1):
        row = _rename(row, QUERY_ALIASES)
        where = f"line {lineno}"
        for key in ("question_id", "pos_item_ids"):
            if not _present(row.get(key)):
                raise InputError(path, f"{where}: {key}", "required field is missing")
        positives = row["pos_item_ids"]
        positives = tuple(str(p) for p in (positives if isinstance(positives, list) else [positives]))
        if not positives:
            raise InputError(path, f"{where}: pos_item_ids", "a query needs at least one positive passage id")
        if strict and passage_ids is not None:
            missing = [p for p in positives if p not in passage_ids]
            if missing:
                raise InputError(path, f"{where}: pos_item_ids", f"passage id {missing[0]!r} is not in the corpus")
        question = str(row["question"]) if _present(row.get("question")) else ""
        instruction = str(row["instruction"]) if _present(row.get("instruction")) else ""
        image = _image(root, row.get("img_path"), path, where, check_images)
        if not question and not instruction and image is None:
            raise InputError(path, f"{where}: question", "a query needs a question or an image")
        queries.append(Query(str(row["question_id"]), question, instruction, image, positives,
                             answer_strings(row.get("answers"), path, where)))
    return queries


def load_m2kr(queries_path: str | Path, passages_path: str | Path, image_root: str | Path,
              max_queries: int = 0, check_images: bool = True, strict: bool = False) -> M2KRSplit:
    """Passages first (the corpus), then queries checked against it; `max_queries` keeps the first N. Queries
    whose positives are all absent from the corpus stay (misses) and are counted and reported, unless `strict`."""
    passages = load_passages(passages_path, image_root, check_images)
    ids = {p.passage_id for p in passages}
    queries = load_queries(queries_path, image_root, ids, check_images, strict)
    queries = queries[:max_queries] if max_queries else queries
    missing = report_missing_positives(queries, ids, queries_path)
    return M2KRSplit(queries, passages, missing)


def report_missing_positives(queries: list[Query], passage_ids: set[str], source: str | Path) -> int:
    missing = missing_positive_count(queries, passage_ids)
    if missing:
        print(f"{source}: {missing} of {len(queries)} queries have no positive passage in the corpus; they count "
              "as misses (--strict true makes this an error)")
    return missing


def shapes_paths(data_dir: str | Path, split: str) -> tuple[Path, Path]:
    """Queries and passages files of the Shapes world's M2KR task (core/shapes/tasks/m2kr.py)."""
    from core.shapes.tasks import m2kr

    data_dir = Path(data_dir)
    return data_dir / m2kr.queries_file(split), data_dir / m2kr.passages_file(split)
