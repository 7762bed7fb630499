"""The multi-round mental-image-retrieval loop, one feedback mode per run.

Every round r = 0..R, for every target: the system's current query → (a) text → image retrieval over the
search space (the target's full rank is recorded; in the generative modes the generated image is also
used as a query, image → image); (b) feedback is shown to the simulated user; (c) the user says what
differs from their target; (d) the query is rewritten. Two loops (`--loop`):

- `split` (the Shapes default): round 0 is the dataset's first utterance; the user says what differs in a short
  sentence; a refiner that reads text only (the Shapes grammar, or a causal LM) merges it into the query.
- `genir` (GenIR's own loop, the COCO default): one chat VLM (`user: vlm:<name>`, loaded once) plays the user
  with the target in view: it captions the target at round 0, writes the feedback (mir.vlm_roles) and then
  rewrites its caption from the feedback, looking at the target again. The caption is the query.

Modes (`--mode`):

- `genir`: the generator renders the query; the user compares that image with the target.
- `prediction`: split loop: the user compares the top-ranked image other than the target with the target (a
  target ranked first has been found; its query stays as it is). genir loop: the top-1 retrieved image, whatever
  it is, every round, as GenIR's baseline does.
- `text-only`: `text_feedback: questions`: the system asks about one cell of the image, the user answers from
  the target's pixels and the refiner reads question and answer; `text_feedback: critic` (genir loop only):
  GenIR's baseline, the VLM critiques the caption against the target and rewrites it.
- `image-query`: ablation, the generated image of the *first* query is the query every round (a new seed
  each round) and the user gives no feedback: an image as the query without the image as feedback.

Reads the ChatIR-layout dialogues and search space, the dense checkpoint, the generator and the user's
modification-text generator; the search space is encoded through the DataLoader once and cached as float16
embeddings (mir.retrieval), and target images are opened per batch when the user looks at them. Writes
`output_dir/<mode>/records.jsonl` (one line per (target, round)), `dialogues.json` (the finished dialogues in
ChatIR's layout; the genir loop writes `captions.json`, each round's caption, instead: its query is the latest
caption, not the joined dialogue), `run.json` (what the run depends on) and generated images under `output_dir/cache/images/`
(named by the hash of what made them).
A killed run resumes at the first unfinished (target, round).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from core.config import config_to_dict, parse_config, save_config
from core.data import LoaderOptions, open_image, verify_images
from core.device import derive_seed, get_device, seed_everything, set_threads
from core.errors import InputError
from core.io import atomic_write_json, read_json
from core.logging import progress
from mir.chatir import load_chatir
from mir.generator import ImageCache, load_generator, pixels_hash
from mir.records import RecordStore
from core.vlm import ChatVLM
from mir.refiner import LLMRefiner, QueryState, ShapesRefiner, state_text
from mir.retrieval import DenseSearcher
from mir.user import VLMUser, load_user, next_question, question_text
from mir.vlm_roles import GenIRRoles

MODES = ("genir", "prediction", "text-only", "image-query")
GENERATIVE = ("genir", "image-query")
LOOPS = ("split", "genir")
TEXT_FEEDBACK = ("questions", "critic")
# What a run.json written before these settings existed ran with, so such runs still resume.
BEFORE_LOOPS = {"loop": "split", "text_feedback": "questions"}


@dataclass
class MIRConfig(LoaderOptions):
    mode: str = "genir"  # genir | prediction | text-only | image-query
    loop: str = "split"  # split (first utterance, short feedback, text-only refiner) | genir (one chat VLM captions and rewrites seeing the target)
    text_feedback: str = "questions"  # text-only mode: questions (cell questions, answered) | critic (GenIR's critic; genir loop)
    dialogues_json: str = "data/shapes/chatir/dialogues_test.json"
    search_space_json: str = "data/shapes/chatir/search_space_test.json"
    image_root: str = "data/shapes"  # the paths in both JSON files are relative to this folder
    dense_checkpoint: str = "runs/shapes/dense/checkpoint-best"
    generator: str = "runs/shapes/mir/generator/checkpoint-best"  # Shapes generator folder or a diffusers pipeline name/path
    user: str = "runs/shapes/cir/mtst/checkpoint-best"  # modification-text generator folder, instructblip:<name> or vlm:<name_or_path> (a chat VLM through transformers)
    refiner: str = "shapes"  # "shapes" (the world's grammar), a transformers causal LM name/path, or the user's VLM name (shared, not loaded twice); the genir loop rewrites with the user's VLM ("user" or its name)
    output_dir: str = "runs/shapes/mir"
    n_targets: int = 300  # the first n dialogues; every mode runs on the same ones
    rounds: int = 10  # R: rounds 0..R are evaluated, feedback is given after rounds 0..R-1
    gen_steps: int = 20
    guidance: float = 2.0
    gen_size: int = 64
    gen_cpu_offload: bool = False  # diffusers pipelines: keep each model on the CPU until its turn (SD3.5 beside a 4B VLM on 24 GB)
    user_max_new_tokens: int = 32  # feedback: the split loop's sentence; the genir loop's comparison, critique or answer
    caption_max_new_tokens: int = 200  # genir loop: the VLM's captions and rewrites
    batch_size: int = 64
    seed: int = 0
    threads: int = 0  # torch CPU threads; 0 = one per core, 1 when the CPU is shared with other busy jobs


@dataclass
class Episode:
    """One target's search: its id (the image path) and the system's state. The target's pixels are opened when
    the user looks at them, so memory does not grow with the number of targets."""

    target: str
    first_query: str
    state: Any
    asked: list[tuple[int, int]]
    dialog: list[str]


class MIRRun:
    def __init__(self, cfg: MIRConfig):
        if cfg.mode not in MODES:
            raise InputError("config", "mode", f"unknown mode {cfg.mode!r}; expected one of {MODES}")
        if cfg.rounds < 0 or cfg.n_targets < 1:
            raise InputError("config", "rounds/n_targets", "rounds must be >= 0 and n_targets >= 1")
        check_loop(cfg)
        self.cfg = cfg
        self.data = load_chatir(cfg.dialogues_json, cfg.search_space_json, cfg.image_root)
        if cfg.n_targets > len(self.data.dialogues):
            raise InputError(cfg.dialogues_json, "n_targets", f"asked for {cfg.n_targets} targets, the file has {len(self.data.dialogues)}")
        self.out = Path(cfg.output_dir) / cfg.mode
        self.device = get_device()
        paths = [self.data.path(p) for p in self.data.search_space]
        if cfg.verify_images:
            verify_images(paths, cfg.search_space_json, cfg)
        self.searcher = DenseSearcher(cfg.dense_checkpoint, paths, self.data.search_space,
                                      Path(cfg.output_dir) / "cache", self.device, loader=cfg,
                                      listed_in=cfg.search_space_json)
        self.generator = None
        self.cache = None
        if cfg.mode in GENERATIVE:
            self.generator = load_generator(cfg.generator, cfg.gen_steps, cfg.guidance, cfg.gen_size, self.device,
                                            cfg.batch_size, cpu_offload=cfg.gen_cpu_offload)
            self.cache = ImageCache(Path(cfg.output_dir) / "cache" / "images", self.generator)
        self.faithful = cfg.loop == "genir"
        wants_user = cfg.mode in ("genir", "prediction", "text-only")
        vlm_name = cfg.user.removeprefix("vlm:") if cfg.user.startswith("vlm:") else None
        shares_vlm = vlm_name is not None and cfg.refiner == vlm_name
        # One VLM in memory for every role it plays (user, critic, rewriter): loaded once here, passed around.
        self.vlm = None
        if vlm_name is not None and (self.faithful or wants_user or shares_vlm):
            self.vlm = ChatVLM.from_pretrained(vlm_name, device=self.device, max_new_tokens=cfg.user_max_new_tokens)
        self.user, self.refiner, self.roles = None, None, None
        if self.faithful:
            self.roles = GenIRRoles(self.vlm, cfg.user, cfg.caption_max_new_tokens, cfg.user_max_new_tokens)
        else:
            if wants_user:
                self.user = (VLMUser(self.vlm, cfg.user, cfg.user_max_new_tokens) if self.vlm is not None
                             else load_user(cfg.user, self.device, cfg.user_max_new_tokens))
            if cfg.refiner == "shapes":
                self.refiner = ShapesRefiner()
            elif shares_vlm:
                self.refiner = LLMRefiner.from_chat_vlm(self.vlm, cfg.refiner)
            else:
                self.refiner = LLMRefiner(cfg.refiner)
        self.store = RecordStore(self.out / "records.jsonl")

    @property
    def refiner_id(self) -> str:
        return self.cfg.user if self.faithful else self.refiner.model_id

    # ------------------------------------------------------------------ bookkeeping
    def identity(self) -> dict[str, Any]:
        """What the records depend on: a resumed run must match it exactly."""
        c = self.cfg
        return {
            "mode": c.mode, "loop": c.loop, "text_feedback": c.text_feedback, "seed": c.seed, "targets": [d.img for d in self.data.dialogues[: c.n_targets]],
            "retriever": self.searcher.model_id, "corpus": self.searcher.corpus_key(),
            "generator": getattr(self.generator, "model_id", None), "gen_steps": c.gen_steps, "guidance": c.guidance,
            "gen_size": c.gen_size, "user": c.user if self.faithful else getattr(self.user, "model_id", None),
            "refiner": self.refiner_id,
        }

    def check_identity(self) -> None:
        path = self.out / "run.json"
        ident = self.identity()
        if path.is_file():
            old = read_json(path)
            for key, value in ident.items():
                if key != "targets" and old.get(key, BEFORE_LOOPS.get(key)) != value:
                    raise InputError(path, key, f"the records in {self.out} were made with {old.get(key)!r}, this run "
                                                f"uses {value!r}; use another output_dir or delete {self.out}")
            if old["targets"][: len(ident["targets"])] != ident["targets"][: len(old["targets"])]:
                raise InputError(path, "targets", "the stored records are for other targets")
        atomic_write_json(path, {**ident, "rounds": self.cfg.rounds, "config": config_to_dict(self.cfg)})

    def episodes(self) -> list[Episode]:
        """Fresh episodes, or the state after each target's last recorded round."""
        last = self.store.last()
        out = []
        for d in self.data.dialogues[: self.cfg.n_targets]:
            row = last.get(d.img)
            if row is None and self.faithful:  # round 0: the VLM captions the target
                out.append(Episode(d.img, "", None, [], []))
            elif row is None:
                out.append(Episode(d.img, d.dialog[0], self.refiner.start(d.dialog[0]), [], [d.dialog[0]]))
            else:
                state = QueryState.from_dict(row["next_state"]) if isinstance(self.refiner, ShapesRefiner) else row["next_state"]
                asked = [tuple(c) for c in row.get("asked", [])]
                out.append(Episode(d.img, row["dialog"][0], state, asked, list(row["dialog"])))
        return out

    # ------------------------------------------------------------------ the loop
    def run(self) -> Path:
        self.check_identity()
        save_config(self.cfg, self.out / "config.yaml")
        episodes = self.episodes()
        last = self.store.last()
        next_round = {e.target: last[e.target]["round"] + 1 if e.target in last else 0 for e in episodes}
        start = min(next_round.values())
        for r in progress(range(start, self.cfg.rounds + 1), desc=f"mir {self.cfg.mode} rounds",
                          initial=start, total=self.cfg.rounds + 1):
            todo = [e for e in episodes if next_round[e.target] == r]
            for e in todo:
                next_round[e.target] = r + 1
            for i in range(0, len(todo), self.cfg.batch_size):
                self.store.append(self.round(todo[i:i + self.cfg.batch_size], r))
        self.write_dialogues(episodes)
        return self.out

    def round(self, eps: list[Episode], r: int) -> list[dict]:
        cfg = self.cfg
        if self.faithful and r == 0:
            t_caption = time.time()
            captions = self.roles.caption([self.open(e.target) for e in eps], derive_seed(cfg.seed, "caption"))
            for e, caption in zip(eps, captions):
                e.first_query, e.state, e.dialog = caption, caption, [caption]
            t_caption = (time.time() - t_caption) / len(eps)
        t0 = time.time()
        # Round 0 searches with the first query as the user gave it, as ChatIR's round 0 does (the refiner's
        # rewording of it ranks differently); later rounds with the refined query.
        queries = [e.first_query if r == 0 or cfg.mode == "image-query" else state_text(e.state) for e in eps]
        targets = [e.target for e in eps]
        ranks, tops = self.searcher.rank_texts(queries, targets, topk=2)
        t_retrieve = time.time() - t0
        rows = [self._base_row(e, r, q, rank) for e, q, rank in zip(eps, queries, ranks)]

        shown: list[Image.Image] = []
        if cfg.mode in GENERATIVE:
            t1 = time.time()
            seeds = [derive_seed(cfg.seed, e.target, r, "generator") for e in eps]
            shown, keys, n_new = self.cache.get(queries, seeds)
            img_ranks, _ = self.searcher.rank_images(shown, targets)
            t_gen = (time.time() - t1) / len(eps)
            for row, seed, key, img, rank in zip(rows, seeds, keys, shown, img_ranks):
                row.update(gen_seed=seed, gen_key=key, image=f"cache/images/{key}.png", image_hash=pixels_hash(img),
                           rank_image=rank, seconds_generate=round(t_gen, 4), generated_now=n_new > 0)
        if self.faithful and r == 0:
            for row in rows:
                row["seconds_caption"] = round(t_caption, 4)
        feedback = [""] * len(eps)
        if r < cfg.rounds and cfg.mode != "image-query" and self.faithful:
            feedback = self._genir_turn(eps, rows, shown, tops, derive_seed(cfg.seed, "user", r))
        elif r < cfg.rounds and cfg.mode != "image-query":
            t2 = time.time()
            user_seed = derive_seed(cfg.seed, "user", r)
            feedback = self._feedback(eps, rows, shown, tops, user_seed)
            for row, e in zip(rows, eps):
                row["user_seed"] = derive_seed(cfg.seed, e.target, r, "user")
                row["user_batch_seed"] = user_seed
            t_user = (time.time() - t2) / len(eps)
            t3 = time.time()
            states, missed = self.refiner.refine_batch([e.state for e in eps], feedback,
                                                       [row.get("question", "") for row in rows])
            for e, row, fb, state, n in zip(eps, rows, feedback, states, missed):
                e.state = state
                row["feedback_unparsed"] = n
                if fb:
                    e.dialog.append(row.get("question", "") + (" " if row.get("question") else "") + fb)
            t_refine = (time.time() - t3) / len(eps)
            for row in rows:
                row.update(seconds_user=round(t_user, 4), seconds_refine=round(t_refine, 4))
        for row, e, fb in zip(rows, eps, feedback):
            row.update(feedback=fb, seconds_retrieve=round(t_retrieve / len(eps), 4),
                       next_state=e.state.to_dict() if isinstance(e.state, QueryState) else e.state,
                       asked=[list(c) for c in e.asked], dialog=list(e.dialog))
        return rows

    def _base_row(self, e: Episode, r: int, query: str, rank: int) -> dict:
        return {"mode": self.cfg.mode, "target": e.target, "round": r, "query": query, "rank": rank,
                "query_tokens_truncated": self.searcher.truncated(query), "seed": self.cfg.seed,
                "retriever": self.searcher.model_id, "generator": getattr(self.generator, "model_id", None),
                "user": self.cfg.user if self.faithful else getattr(self.user, "model_id", None),
                "refiner": self.refiner_id, "loop": self.cfg.loop}

    def _genir_turn(self, eps: list[Episode], rows: list[dict], shown: list[Image.Image], tops: list[list[str]],
                    seed: int) -> list[str]:
        """GenIR's turn: the VLM writes the feedback with the target in view, then rewrites its caption from it,
        looking at the target again. Returns the feedback; each episode's state is its new caption."""
        t0 = time.time()
        mode = self.cfg.mode
        targets = [self.open(e.target) for e in eps]
        captions = [e.state for e in eps]
        questions = None
        if mode == "genir":
            source = "generated"
            feedback = self.roles.compare(targets, shown, captions, source, seed)
        elif mode == "prediction":  # the top-1 result every round, the target included once it ranks first
            source = "retrieved"
            for row, top in zip(rows, tops):
                row["shown"] = top[0]
            feedback = self.roles.compare(targets, [self.open(top[0]) for top in tops], captions, source, seed)
        elif self.cfg.text_feedback == "critic":
            source = "critique"
            feedback = self.roles.critique(targets, captions, seed)
        else:
            source, questions = "answer", []
            for e, row in zip(eps, rows):
                cell = next_question([], e.asked)  # a caption is free text: no cell counts as described
                e.asked.append(cell)
                row["question"] = question_text(cell)
                questions.append(row["question"])
            feedback = self.roles.answer(targets, questions, seed)
        t1 = time.time()
        new = self.roles.rewrite(targets, captions, feedback, source, questions, seed)
        t2 = time.time()
        for e, row, caption in zip(eps, rows, new):
            e.state = caption
            e.dialog.append(caption)
            row.update(feedback_unparsed=0, seconds_user=round((t1 - t0) / len(eps), 4),
                       seconds_refine=round((t2 - t1) / len(eps), 4), user_batch_seed=seed)
        return feedback

    def _feedback(self, eps: list[Episode], rows: list[dict], shown: list[Image.Image], tops: list[list[str]],
                  seed: int) -> list[str]:
        mode = self.cfg.mode
        targets = [self.open(e.target) for e in eps]
        if mode == "genir":
            return self.user.compare(shown, targets, seed)
        if mode == "prediction":
            out = [""] * len(eps)
            todo = []
            for i, (e, row, top) in enumerate(zip(eps, rows, tops)):
                if row["rank"] == 0:
                    row["shown"] = None  # found: the episode has succeeded, nothing to compare
                    continue
                wrong = next(t for t in top if t != e.target)
                row["shown"] = wrong
                todo.append((i, wrong))
            images = [self.open(wrong) for _, wrong in todo]
            said = self.user.compare(images, [targets[i] for i, _ in todo], seed)
            for (i, _), text in zip(todo, said):
                out[i] = text
            return out
        cells = []
        for e, row in zip(eps, rows):
            known = [o.cell for o in e.state.objects if o.cell is not None] if isinstance(e.state, QueryState) else []
            known += list(getattr(e.state, "empty_cells", []))
            cell = next_question(known, e.asked)
            e.asked.append(cell)
            row["question"] = question_text(cell)
            cells.append(cell)
        return self.user.answer(cells, targets, seed)

    def open(self, img: str) -> Image.Image:
        """A search-space image (a target or a retrieved one), decoded; a bad file is an InputError naming it."""
        return open_image(self.data.path(img), self.cfg.search_space_json)

    def write_dialogues(self, episodes: Sequence[Episode]) -> None:
        """The dialogues as ChatIR stores them, so `mir.evaluate_dialogues` can replay them; the genir loop's
        captions apart (round r searches with caption r alone, which ChatIR's joined replay would not)."""
        if self.faithful:
            atomic_write_json(self.out / "captions.json", [{"img": e.target, "captions": e.dialog} for e in episodes], indent=1)
            return
        atomic_write_json(self.out / "dialogues.json", [{"img": e.target, "dialog": e.dialog} for e in episodes], indent=1)


def check_loop(cfg: MIRConfig) -> None:
    """The loop's settings fit together, before anything loads."""
    if cfg.loop not in LOOPS:
        raise InputError("config", "loop", f"unknown loop {cfg.loop!r}; expected one of {LOOPS}")
    if cfg.text_feedback not in TEXT_FEEDBACK:
        raise InputError("config", "text_feedback", f"unknown {cfg.text_feedback!r}; expected one of {TEXT_FEEDBACK}")
    if cfg.loop == "split" and cfg.text_feedback == "critic":
        raise InputError("config", "text_feedback", "the critic sees the target: it needs loop: genir")
    if cfg.loop == "genir":
        if not cfg.user.startswith("vlm:"):
            raise InputError("config", "user", f"loop: genir needs a chat VLM user (vlm:<name_or_path>), got {cfg.user!r}")
        if cfg.refiner not in ("user", cfg.user.removeprefix("vlm:")):
            raise InputError("config", "refiner", f"loop: genir rewrites with the user's VLM; set refiner to 'user' or "
                                                  f"{cfg.user.removeprefix('vlm:')!r}, not {cfg.refiner!r}")


def main(argv: Sequence[str] | None = None, mode: str | None = None) -> Path:
    cfg = parse_config(MIRConfig, argv)
    if mode is not None:
        cfg.mode = mode
    seed_everything(cfg.seed)
    set_threads(cfg.threads)
    with torch.no_grad():  # inference only; a context, so callers (and tests) keep their grad mode
        out = MIRRun(cfg).run()
    print(f"mir {cfg.mode}: records in {out / 'records.jsonl'}")
    return out


if __name__ == "__main__":
    main()
