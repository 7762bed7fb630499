"""Query refinement: the system's next query from its previous query and the user's feedback.

GenIR asks an LLM to rewrite the description given the feedback. For the Shapes world the rewriter is
`ShapesRefiner`: it parses its own query and the user's words with the world's vocabulary into a
partial scene (objects whose shape, colour, size or cell may be unknown), applies each feedback clause
("make the circle blue", "add a small red star in the top left", "move the square to the middle", ...)
and writes the partial scene back as a caption. It reads only text: its query and the user's words,
never the target's scene. Feedback it cannot parse is kept verbatim after the caption (ChatIR style),
so nothing the user says is dropped silently. `LLMRefiner` does the same job with any causal LM
from transformers (Gemma, Qwen, ...) for real runs.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from core.shapes.captions import (COLOUR_WORDS, NUMBER_WORDS, SHAPE_WORDS, SIZE_WORDS, _position_nouns, join_list,
                                  position_name, with_article)
from core.shapes.world import GRID, MAX_OBJECTS, SIZES

_SHAPE = {w: s for s, ws in SHAPE_WORDS.items() for w in ws}
_COLOUR = {w: c for c, ws in COLOUR_WORDS.items() for w in ws}
_SIZE = {w: s for s, ws in SIZE_WORDS.items() for w in ws}
_NUMBER = {w: n for n, w in NUMBER_WORDS.items()}
# Every noun phrase the world uses for a cell ("the top left corner", "the centre of the left column", ...).
_POSITION = {noun: (r, c) for r in range(GRID) for c in range(GRID) for noun, _ in _position_nouns(r, c)}
_POSITION.update({f"the {position_name(r, c)}": (r, c) for r in range(GRID) for c in range(GRID)})
_POS_RE = "|".join(sorted((re.escape(p) for p in _POSITION), key=len, reverse=True))
_SHAPE_RE = "|".join(sorted((re.escape(w) for w in _SHAPE), key=len, reverse=True))
_PREP_RE = r"(?:in|at|near|on|to)"
_VERBS = r"(?:the|make|change|turn|colou?r|add|insert|put|there|also|remove|delete|take|get|without|move|shift|replace)\b"
_CLAUSE_SPLIT = re.compile(rf";\s*|,\s*then\s+|\s+and also\s+|,\s*and\s+|\s+and then\s+|\s+and\s+(?={_VERBS})")


@dataclass
class PartialObject:
    """What the system believes about one object of the target; None = unknown."""

    shape: str | None = None
    colour: str | None = None
    size: str | None = None
    cell: tuple[int, int] | None = None

    def conflicts(self, other: "PartialObject") -> bool:
        return any(a is not None and b is not None and a != b for a, b in
                   ((self.shape, other.shape), (self.colour, other.colour), (self.size, other.size), (self.cell, other.cell)))

    def merge(self, other: "PartialObject") -> "PartialObject":
        """`other`'s known attributes win (it is the newer information)."""
        return PartialObject(*(b if b is not None else a for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

    def known(self) -> int:
        return sum(v is not None for v in dataclasses.astuple(self))

    def phrase(self) -> str:
        words = [w for w in (self.size, self.colour) if w]
        noun = " ".join(words + [self.shape or "shape"])
        text = with_article(noun)
        if self.cell is not None:
            text += f" in the {position_name(*self.cell)}"
        return text


@dataclass
class QueryState:
    """The system's belief: a partial scene, the number of objects if known, and feedback it could not parse."""

    objects: list[PartialObject] = field(default_factory=list)
    n_objects: int | None = None
    more: bool = False  # the user said there are other shapes, without saying how many
    empty_cells: list[tuple[int, int]] = field(default_factory=list)
    unparsed: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["objects"] = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in o.items()} for o in d["objects"]]
        d["empty_cells"] = [list(c) for c in self.empty_cells]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QueryState":
        objs = [PartialObject(o["shape"], o["colour"], o["size"], tuple(o["cell"]) if o["cell"] is not None else None)
                for o in d["objects"]]
        return cls(objs, d["n_objects"], d["more"], [tuple(c) for c in d["empty_cells"]], list(d["unparsed"]))

    def text(self) -> str:
        """The belief as a caption in the world's own phrasing (what the dense text tower was trained on)."""
        objs = sorted(self.objects, key=lambda o: (o.cell is None, o.cell or (0, 0)))
        body = join_list([o.phrase() for o in objs]) if objs else "some shapes"
        n = self.n_objects
        if n is not None and n > len(objs):
            caption = f"an image with {NUMBER_WORDS[n]} shapes including {body}"
        elif n is not None and n > 1:
            caption = f"{NUMBER_WORDS[n]} shapes: {body}"
        elif n == 1:
            caption = f"an image with one shape: {body}"
        elif self.more:
            caption = f"{body} among other shapes"
        else:
            caption = body
        return ", ".join([caption, *self.unparsed])


# --------------------------------------------------------------------------------------------------- parsing
def parse_object(text: str) -> PartialObject | None:
    """ "a small red circle in the top left" → PartialObject; None if no shape word is found."""
    text = text.strip().lower()
    m = re.search(rf"\b({_SHAPE_RE})\b", text)
    if m is None:
        # "the shape in the middle" style: a position alone still says where something is
        cell = parse_cell(text)
        return PartialObject(cell=cell) if cell is not None and "shape" in text else None
    before, after = text[: m.start()].split(), text[m.end():]
    obj = PartialObject(shape=_SHAPE[m.group(1)])
    for w in before:
        obj.colour = _COLOUR.get(w, obj.colour)
        obj.size = _SIZE.get(w, obj.size)
    obj.cell = parse_cell(after)
    return obj


def parse_cell(text: str) -> tuple[int, int] | None:
    m = re.search(rf"\b{_PREP_RE}\s+({_POS_RE})\b", text) or re.search(rf"({_POS_RE})\b", text)
    return _POSITION[m.group(1)] if m else None


def parse_caption(text: str) -> QueryState:
    """Read a caption (the first query) into a partial scene."""
    t = text.strip().lower().rstrip(".")
    state = QueryState()
    for pattern, more in ((r" among other shapes$", True), (r" and something else$", True), (r" on a light background$", False)):
        if re.search(pattern, t):
            t, state.more = re.sub(pattern, "", t), state.more or more
    m = re.match(r"^(?:an image with|a picture with)?\s*(one|two|three) shapes?(?: including|:)\s*(.*)$", t)
    if m:
        state.n_objects, t = _NUMBER[m.group(1)], m.group(2)
        state.more = False
    t = re.sub(r"^(?:a picture of|there is|there are)\s+", "", t)
    for part in re.split(r",\s*|\s+and\s+", t):
        obj = parse_object(part)
        if obj is not None:
            _add(state, obj)
        elif part.strip():
            state.unparsed.append(part.strip())
    return state


def _find(state: QueryState, ref: PartialObject) -> int | None:
    """The query object the user's referring expression most plausibly means (no conflicting attribute)."""
    best, best_score = None, 0
    for i, o in enumerate(state.objects):
        if o.conflicts(ref):
            continue
        score = sum(a is not None and a == b for a, b in zip(dataclasses.astuple(o), dataclasses.astuple(ref)))
        if score > best_score:
            best, best_score = i, score
    return best


def _add(state: QueryState, obj: PartialObject) -> None:
    """Add what the user says the target holds: merge with a compatible belief, replace one in the same cell."""
    if obj.cell is not None:
        same = [i for i, o in enumerate(state.objects) if o.cell == obj.cell]
        if same:
            state.objects[same[0]] = obj if state.objects[same[0]].conflicts(obj) else state.objects[same[0]].merge(obj)
            return
        state.empty_cells = [c for c in state.empty_cells if c != obj.cell]
    i = _find(state, obj)
    if i is not None and state.objects[i].cell is None:
        state.objects[i] = state.objects[i].merge(obj)
        return
    state.objects.append(obj)
    limit = state.n_objects or MAX_OBJECTS
    while len(state.objects) > limit:  # the oldest, least specific belief goes first
        state.objects.pop(min(range(len(state.objects) - 1), key=lambda j: state.objects[j].known()))


def _set(state: QueryState, ref: PartialObject, **change: Any) -> None:
    """The target holds `ref` with `change` applied: update the matching belief, or add one."""
    i = _find(state, ref)
    new = dataclasses.replace(ref, **change)
    if i is None:
        _add(state, new)
    else:
        state.objects[i] = state.objects[i].merge(new)


def _size_step(base: str | None, word: str) -> str | None:
    if word in _SIZE:
        return _SIZE[word]
    if base is None:
        return None
    step = (2 if "much" in word else 1) * (1 if "bigger" in word else -1)
    return SIZES[max(0, min(len(SIZES) - 1, SIZES.index(base) + step))]


_VALUE_RE = re.compile(rf"^(?:to\s+)?(?:(?P<art>a|an)\s+(?P<shape>{_SHAPE_RE})(?: of the same colou?r)?"
                       rf"|(?P<rel>(?:a bit |much )?(?:bigger|smaller))|(?P<word>[\w-]+))$")


def apply_clause(state: QueryState, clause: str) -> bool:
    """Apply one feedback clause; False if it does not parse (the caller keeps it verbatim)."""
    c = clause.strip().lower().rstrip(".")
    if not c:
        return True
    m = re.match(r"^nothing (?:is )?(?:in|at) (.+)$", c)
    if m and parse_cell(m.group(1)) is not None:
        cell = parse_cell(m.group(1))
        state.empty_cells.append(cell)
        state.objects = [o for o in state.objects if o.cell != cell]
        return True
    m = re.match(r"^(?:add|insert|there should also be|also draw|put)\s+(?:a|an)\s+(.+)$", c)
    if m and not re.search(r"\bto\s+the\b", m.group(1)):
        obj = parse_object(m.group(1))
        if obj is not None:
            _add(state, obj)
            return True
    m = re.match(r"^(?:remove|delete|take away|get rid of|without)\s+(.+)$", c)
    if m:
        ref = parse_object(m.group(1))
        if ref is not None:
            i = _find(state, ref)
            # The feedback image showed the query's object; the target lacks it, so that belief goes.
            if i is not None:
                state.objects.pop(i)
            return True
    m = re.match(rf"^(?:move|put|shift)\s+(.+?)\s+to\s+({_POS_RE})$", c) or re.match(rf"^(.+?)\s+should move\s+to\s+({_POS_RE})$", c)
    if m:
        ref = parse_object(m.group(1))
        if ref is not None:
            _move(state, ref, _POSITION[m.group(2)])
            return True
    m = re.match(rf"^replace\s+(.+?)\s+with\s+(?:a|an)\s+({_SHAPE_RE})(?: of the same colou?r)?$", c) or \
        re.match(rf"^turn\s+(.+?)\s+into\s+(?:a|an)\s+({_SHAPE_RE})$", c)
    if m:
        ref = parse_object(m.group(1))
        if ref is not None:
            _set(state, ref, shape=_SHAPE[m.group(2)])
            return True
    m = re.match(r"^(?:make|change|turn|colou?r)\s+(.+)$", c)
    ref_value = _split_ref_value(m.group(1)) if m else None
    if ref_value is None:
        m = re.match(r"^(.+?)\s+should be\s+(.+)$", c)
        ref_value = (m.group(1), m.group(2)) if m else None
    if ref_value is not None:
        ref = parse_object(ref_value[0])
        v = _VALUE_RE.match(ref_value[1].strip())
        if ref is not None and v is not None:
            return _apply_value(state, ref, v)
    return False


def _split_ref_value(rest: str) -> tuple[str, str] | None:
    """ "the red circle blue" → ("the red circle", "blue"); the value is the tail after the referent."""
    words = rest.split()
    for k in range(1, min(4, len(words))):
        ref, value = " ".join(words[:-k]), " ".join(words[-k:])
        v = _VALUE_RE.match(value.removeprefix("to ").strip())
        if v is not None and _valid_value(v) and parse_object(ref) is not None:
            return ref, value
    return None


def _valid_value(v: re.Match) -> bool:
    return bool(v.group("shape") or v.group("rel") or v.group("word") in _COLOUR or v.group("word") in _SIZE)


def _apply_value(state: QueryState, ref: PartialObject, v: re.Match) -> bool:
    if v.group("shape"):
        _set(state, ref, shape=_SHAPE[v.group("shape")])
        return True
    word = v.group("word") or v.group("rel")
    if word in _COLOUR:
        _set(state, ref, colour=_COLOUR[word])
        return True
    if word in _SIZE or v.group("rel"):
        i = _find(state, ref)
        base = ref.size or (state.objects[i].size if i is not None else None)
        size = _size_step(base, word)
        if size is not None:
            _set(state, dataclasses.replace(ref, size=None), size=size)
        return True
    return False


def _move(state: QueryState, ref: PartialObject, cell: tuple[int, int]) -> None:
    state.objects = [o for o in state.objects if o.cell != cell or not o.conflicts(ref)]
    _set(state, dataclasses.replace(ref, cell=None), cell=cell)


def split_clauses(feedback: str) -> list[str]:
    return [c for c in _CLAUSE_SPLIT.split(feedback.strip()) if c.strip()]


class ShapesRefiner:
    """Rewrites the query from (state, feedback) with the Shapes grammar; see the module docstring."""

    model_id = "shapes-grammar-refiner"

    def start(self, first_query: str) -> QueryState:
        return parse_caption(first_query)

    def refine(self, state: QueryState, feedback: str) -> tuple[QueryState, int]:
        """The new state and how many clauses of `feedback` could not be parsed (kept verbatim)."""
        new = QueryState.from_dict(state.to_dict())
        missed = 0
        for clause in split_clauses(feedback):
            if not apply_clause(new, clause):
                new.unparsed.append(clause.strip())
                missed += 1
        return new, missed

    def refine_batch(self, states: Sequence[QueryState], feedback: Sequence[str],
                     questions: Sequence[str] | None = None) -> tuple[list[QueryState], list[int]]:
        """`refine` per target. The question is not read: the Shapes user's answer to "what is in the top left?"
        describes the edit from the painted-over cell back to the target, which says where ("add a big red circle
        in the top left", "nothing in the top left"), so the main job's text-only figures stay as measured; an
        answer whose words leave the cell out is not given the asked cell."""
        out = [self.refine(s, f) for s, f in zip(states, feedback)]
        return [o[0] for o in out], [o[1] for o in out]


class LLMRefiner:
    """Any instruction-following causal LM from transformers rewrites the description (GenIR's refiner role).

    The prompt goes through the chat template when there is one (instruction-tuned models such as Gemma-3-it
    expect it), else as plain text. Greedy decoding, batched over targets (left padding); the first line of the
    answer is the new query. `from_chat_vlm` rewrites with the simulated user's VLM instead of a second copy of
    the same weights (the VLM's language model reads a text-only turn).
    """

    PROMPT = ("You help a user find an image. Current description: \"{query}\"\n"
              "The user says how the image they want differs: \"{feedback}\"\n"
              "Write one new description of the wanted image, as a single caption:\n")
    # In the text-only mode the answer alone loses what was asked ("a tree" without "in the top left?").
    ANSWER_PROMPT = ("You help a user find an image. Current description: \"{query}\"\n"
                     "You asked the user: \"{question}\" The user answered: \"{feedback}\"\n"
                     "Write one new description of the wanted image, as a single caption:\n")

    def __init__(self, name_or_path: str, max_new_tokens: int = 60, model: Any = None, tokenizer: Any = None,
                 device: Any = None, chat_templater: Any = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from core.device import get_device, pretrained_dtype_kwargs

        self.device = device or get_device()
        self.model = model if model is not None else AutoModelForCausalLM.from_pretrained(
            name_or_path, **pretrained_dtype_kwargs(self.device))
        self.model = self.model.to(self.device).eval()
        self.tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(name_or_path)
        # A VLM's processor holds the chat template (its tokenizer may not); it reads content as a list of parts.
        self.chat_templater = chat_templater
        self.model_id, self.max_new_tokens = name_or_path, max_new_tokens

    @classmethod
    def from_chat_vlm(cls, vlm: Any, name: str, max_new_tokens: int = 60) -> "LLMRefiner":
        """The refiner on a loaded `core.vlm.ChatVLM`: the same weights in memory, no second load."""
        return cls(name, max_new_tokens, model=vlm.model, tokenizer=vlm.processor.tokenizer, device=vlm.device,
                   chat_templater=vlm.processor)

    def start(self, first_query: str) -> str:
        return first_query

    def prompt(self, state: str, feedback: str, question: str = "") -> str:
        if question:
            text = self.ANSWER_PROMPT.format(query=state, question=question, feedback=feedback)
        else:
            text = self.PROMPT.format(query=state, feedback=feedback)
        if self.chat_templater is not None:
            return self.chat_templater.apply_chat_template(
                [{"role": "user", "content": [{"type": "text", "text": text}]}], tokenize=False, add_generation_prompt=True)
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)
        return text

    def refine(self, state: str, feedback: str, question: str = "") -> tuple[str, int]:
        """The new query and 0 unparsed clauses (the LM reads all of the feedback); empty feedback keeps the query."""
        states, missed = self.refine_batch([state], [feedback], [question])
        return states[0], missed[0]

    def refine_batch(self, states: Sequence[str], feedback: Sequence[str],
                     questions: Sequence[str] | None = None) -> tuple[list[str], list[int]]:
        """`refine` for many targets in one `generate` call; a target without feedback keeps its query."""
        import torch

        from core.device import autocast
        from core.vlm import needs_special_tokens

        questions = list(questions) if questions is not None else [""] * len(states)
        out = list(states)
        todo = [i for i, f in enumerate(feedback) if f.strip()]
        if todo:
            prompts = [self.prompt(states[i], feedback[i], questions[i]) for i in todo]
            tok = self.tokenizer
            tok.padding_side = "left"  # generation appends after the prompt
            ids = tok(prompts, return_tensors="pt", padding=True,
                      add_special_tokens=needs_special_tokens(tok, prompts[0])).to(self.device)
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            with torch.no_grad(), autocast(self.device):
                gen = self.model.generate(**ids, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=pad)
            for i, text in zip(todo, tok.batch_decode(gen[:, ids["input_ids"].shape[1]:], skip_special_tokens=True)):
                text = text.strip().split("\n")[0].strip().strip('"').strip()
                out[i] = text or states[i]
        return out, [0] * len(states)


def state_text(state: Any) -> str:
    return state.text() if isinstance(state, QueryState) else str(state)
