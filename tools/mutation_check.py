"""Mutation check: break each method's key mechanism on purpose and require the tests that guard it to fail.

Each mutation below is a search-and-replace of a source snippet (the core of the mechanism). For each, the tree is
copied to a temporary folder (without .venv, runs, .git and caches), the snippet replaced there, and the guarding
tests run in a fresh process with PYTHONPATH set to the copy. A mutant that the tests let pass ("survived") fails
the check; so does a snippet found other than exactly once (the list cannot rot silently when the code changes) and
guarding tests that fail on the unmutated copy. Prints a table (mutation → file → the test that caught it →
seconds) and, with `--write_docs`, writes it to docs/mutation_check.md.

    .venv/bin/python tools/mutation_check.py                    # every mutation, 2 at a time
    .venv/bin/python tools/mutation_check.py --only '[constraint off]' --jobs 1
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import signal
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the project's packages come from this tree
    sys.path.insert(0, str(ROOT))

from core.config import parse_config  # noqa: E402
from core.errors import InputError  # noqa: E402
from core.io import atomic_write_text  # noqa: E402


@dataclass(frozen=True)
class Edit:
    file: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str


@dataclass(frozen=True)
class Mutation:
    name: str
    edits: tuple[Edit, ...]
    tests: tuple[str, ...]  # pytest node ids that must fail on the mutant


M = "tests/mechanisms/"
# The mutations: one row each (name, what is replaced where, the tests that guard it). Keep the snippets to the core
# of each mechanism, so that unrelated edits of the same file leave them intact.
MUTATIONS: tuple[Mutation, ...] = (
    Mutation("constraint off", (Edit("retriever/generative/decoding.py",
                                     'cand = cand.masked_fill(~allowed[:, :n].to(cand.device), float("-inf"))',
                                     "cand = cand"),),
             (M + "test_comgtir.py::test_every_raw_beam_is_a_corpus_identifier",)),
    Mutation("guidance off", (Edit("retriever/generative/decoding.py", "cand = cand + self.weight * self.prior",
                                   "cand = cand + 0.0 * self.prior"),),
             (M + "test_comgtir.py::test_set_guidance_steers_the_ranking_to_the_set_identifier",)),
    Mutation("prefix prior off", (Edit("retriever/generative/decoding.py", "cand = cand + self.weight * bonus",
                                       "cand = cand + 0.0 * bonus"),),
             ("tests/comgtir/test_comgtir_prefix_prior.py::test_prior_mode_changes_the_ranking",)),
    Mutation("set-head pooling over padding", (Edit("retriever/generative/model.py",
                                                    "pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)",
                                                    "pooled = hidden.mean(1)"),),
             (M + "test_comgtir.py::test_set_scores_of_a_query_do_not_depend_on_the_padding_of_its_batch",)),
    Mutation("set-head max pooling over padding", (Edit("retriever/generative/model.py",
                                                        "return hidden.masked_fill(~keep, torch.finfo(hidden.dtype).min).amax(1)",
                                                        "return hidden.amax(1)"),),
             (M + "test_comgtir.py::test_set_scores_of_a_query_do_not_depend_on_the_padding_of_its_batch",)),
    Mutation("PTHA reverse branch not detached", (Edit("cir/losses.py", "reverse_tokens.float().mean(dim=1).detach()",
                                                       "reverse_tokens.float().mean(dim=1)"),),
             (M + "test_cir.py::test_no_gradient_reaches_the_reverse_branch_through_the_prototype_loss",
              "tests/cir/test_ptha_official.py::test_the_reverse_branch_gets_no_gradient_through_p2p")),
    Mutation("PTHA reverse branch not detached (project)", (
        Edit("cir/losses.py", "proto_reverse.detach()", "proto_reverse"),
        Edit("cir/train.py", "gather_with_grad(rev_proto.detach(), dist)", "gather_with_grad(rev_proto, dist)")),
             (M + "test_cir.py::test_no_gradient_reaches_the_project_variants_reverse_prototype",
              "tests/cir/test_cir_metrics.py::test_ptha_total_and_detached_reverse")),
    Mutation("PTHA targets averaged over tokens", (Edit("cir/losses.py",
                                                        '.einsum("bd,mtd->bmt", query, target_tokens).amax(dim=-1)',
                                                        '.einsum("bd,mtd->bmt", query, target_tokens).mean(dim=-1)'),),
             ("tests/cir/test_ptha_official.py::test_max_over_tokens_equals_brute_force_in_training_and_evaluation",)),
    Mutation("CIRR reference kept in the gallery", (Edit("cir/metrics.py", "order = order[order != col[t.reference]]",
                                                         "order = order"),),
             (M + "test_cir.py::test_the_reference_is_never_ranked",
              "tests/cir/test_cir_metrics.py::test_cirr_metrics_by_hand")),
    Mutation("CIRR subset not restricted", (Edit("cir/metrics.py", "cands = [m for m in t.members if m != t.reference]",
                                                 "cands = [m for m in gallery if m != t.reference]"),),
             (M + "test_cir.py::test_subset_recall_ranks_only_the_subset_members",)),
    Mutation("duplicate targets as negatives", (Edit("cir/losses.py",
                                                     'logits = logits.masked_fill(same & ~own, float("-inf"))',
                                                     "logits = logits"),),
             ("tests/cir/test_cir_metrics.py::test_duplicate_targets_are_not_negatives",)),
    Mutation("ties counted for the target (recall)", (Edit(
        "core/metrics.py", "above, tied = (similarity > target).sum(axis=1), (similarity == target).sum(axis=1) - 1",
        "above, tied = (similarity > target).sum(axis=1), 0 * (similarity == target).sum(axis=1)"),),
             ("tests/test_metrics.py::test_a_constant_score_model_scores_chance_not_a_hit",
              "tests/test_metrics.py::test_a_tie_is_shared_with_the_tied_images_by_a_random_order")),
    Mutation("ties counted for the target (rank)", (Edit("core/metrics.py",
                                                         "(scores >= target[..., None]).sum(axis=-1) - 1",
                                                         "(scores > target[..., None]).sum(axis=-1)"),),
             ("tests/test_metrics.py::test_an_integer_rank_counts_every_tie_above_the_target",
              M + "test_iterative_cir.py::test_mining_keeps_missed_queries_and_only_wrong_candidates")),
    Mutation("in-batch labels shifted", (Edit("retriever/dense/loss.py",
                                              "labels = torch.arange(len(image), device=image.device)",
                                              "labels = torch.arange(len(image), device=image.device).roll(1)"),),
             ("tests/test_hard_negatives.py::test_loss_without_valid_negatives_is_clip_loss",)),
    Mutation("ReT recurrence cut to the last layer", (Edit("retriever/ret/model.py", "state = self.cell(state, text,",
                                                           "state = self.cell(None, text,"),),
             (M + "test_ret.py::test_the_output_depends_on_earlier_layers_through_the_recurrence",)),
    Mutation("MIR hits reset each round", (Edit("mir/metrics.py", "np.mean(first <= r)",
                                                "np.mean(ranks[:, r] < k)"),),
             (M + "test_mir.py::test_a_target_found_once_stays_found",
              "tests/mir/test_mir_metrics.py::test_cumulative_hits_as_chatir_computes_them")),
    Mutation("mining allows the target", (Edit("cir/iterative/retrieval.py",
                                               "if gallery[j] not in (t.reference, t.target)",
                                               "if gallery[j] != t.reference"),),
             (M + "test_iterative_cir.py::test_mining_keeps_missed_queries_and_only_wrong_candidates",)),
    Mutation("iterative round trains on the original texts", (Edit(
        "cir/iterative/train_iterative.py", 'Triplet(s["pairid"], s["reference"], s["caption"], s["hard_negative"]',
        'Triplet(s["pairid"], s["reference"], s["original_caption"], s["hard_negative"]'),),
             (M + "test_iterative_cir.py::test_a_round_trains_on_the_texts_written_in_this_and_the_previous_rounds",)),
    Mutation("iterative round drops the previous rounds' texts", (Edit(
        "cir/iterative/train_iterative.py",
        "rounds = range(1, n + 1) if self.cfg.accumulate_augmented else [n]\n        augmented = []",
        "rounds = [n]\n        augmented = []"),),
             (M + "test_iterative_cir.py::test_a_round_trains_on_the_texts_written_in_this_and_the_previous_rounds",)),
)

# Not copied: environments, outputs and caches (a copy of the source is a few MB).
SKIP = {".venv", ".git", "runs", "data", "experiments", "outputs", "wandb", "__pycache__", ".pytest_cache",
        ".ruff_cache", "bench_results"}
PYTEST = ["-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
DOCS = "docs/mutation_check.md"


@dataclass
class MutationCheckConfig:
    jobs: int = 2  # mutants tested at the same time (each in its own process)
    only: list[str] = field(default_factory=list)  # names of the mutations to run (empty: all)
    timeout: int = 600  # seconds allowed for one mutant's tests
    write_docs: bool = False  # also write the table to docs/mutation_check.md
    keep: bool = False  # keep the temporary copies (to inspect a mutant)


@dataclass
class Outcome:
    mutation: Mutation
    status: str  # "killed", "survived" or "error"
    caught_by: str
    seconds: float  # wall time
    cpu_seconds: float  # CPU time: about the wall time on an idle core, whatever the load now
    message: str = ""
    output: str = ""


def check_snippets(root: Path, mutations: Sequence[Mutation]) -> list[str]:
    """Every problem with the list: a snippet not found exactly once, a replacement equal to its snippet."""
    problems = []
    for m in mutations:
        for e in m.edits:
            path = root / e.file
            if not path.is_file():
                problems.append(f"{m.name}: {e.file} does not exist")
                continue
            count = path.read_text().count(e.old)
            if count != 1:
                problems.append(f"{m.name}: {e.file} holds the snippet {count} times (expected once): {e.old!r}")
            if e.old == e.new:
                problems.append(f"{m.name}: the replacement equals the snippet")
        if not m.tests:
            problems.append(f"{m.name}: no guarding test")
    return problems


def copy_tree(root: Path, dest: Path) -> Path:
    shutil.copytree(root, dest, ignore=lambda _, names: [n for n in names if n in SKIP or n.endswith(".egg-info")],
                    symlinks=True)
    # `rqvae` is the folder RQ-VAE/ (setup.py's package_dir): a link makes it import from the copy, not from the
    # editable install's tree.
    link = dest / "rqvae"
    if (dest / "RQ-VAE").is_dir() and not link.exists():
        link.symlink_to("RQ-VAE", target_is_directory=True)
    return dest


def apply(tree: Path, edits: Sequence[Edit]) -> None:
    for e in edits:
        path = tree / e.file
        text = path.read_text()
        if text.count(e.old) != 1:
            raise RuntimeError(f"{e.file}: the snippet is not there exactly once: {e.old!r}")
        path.write_text(text.replace(e.old, e.new))


def child_env(tree: Path, jobs: int) -> dict[str, str]:
    # COLUMNS: pytest cuts the short summary to the terminal's width, which would drop the failure's message
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1", "WANDB_MODE": "disabled",
           "COLUMNS": "240"}
    threads = str(max(1, (os.cpu_count() or 1) // max(1, jobs)))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, threads)  # the mutants share the cores: no oversubscription
    return env


def run_tests(tree: Path, tests: Sequence[str], jobs: int, timeout: int) -> tuple[int, str, float, float]:
    """(pytest's exit code, its output, wall seconds, CPU seconds of the process and its children)."""
    start = time.perf_counter()
    basetemp = tree.parent / f"{tree.name}.pytest"  # its own: runs side by side never share (or clean) one
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([sys.executable, *PYTEST, f"--basetemp={basetemp}", *tests], cwd=tree,
                                env=child_env(tree, jobs), stdout=log, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        timer = threading.Timer(timeout, os.killpg, (proc.pid, signal.SIGKILL))
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # wait4, not wait: it also reports the CPU time used
        finally:
            timer.cancel()
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        log.seek(0)
        out = log.read()
    if code == -signal.SIGKILL:
        out += f"\nkilled after the {timeout} s timeout"
    return code, out, time.perf_counter() - start, usage.ru_utime + usage.ru_stime


def first_failure(output: str) -> tuple[str, str]:
    """(node id, message) of the first failed (or erroring) test in pytest's short summary."""
    match = re.search(r"^(?:FAILED|ERROR) (\S+)(?: - (.*))?$", output, flags=re.MULTILINE)
    return (match.group(1), match.group(2) or "") if match else ("", "")


def test_mutant(root: Path, scratch: Path, m: Mutation, cfg: MutationCheckConfig) -> Outcome:
    tree = copy_tree(root, scratch / re.sub(r"\W+", "-", m.name).strip("-"))
    apply(tree, m.edits)
    code, out, seconds, cpu = run_tests(tree, m.tests, cfg.jobs, cfg.timeout)
    if not cfg.keep:
        shutil.rmtree(tree, ignore_errors=True)
        shutil.rmtree(tree.parent / f"{tree.name}.pytest", ignore_errors=True)
    caught, message = first_failure(out)
    if code == 0:
        return Outcome(m, "survived", "", seconds, cpu, output=out)
    if code == 1 and caught:  # a test failed: the mutant is dead
        return Outcome(m, "killed", caught, seconds, cpu, message, out)
    # collection errors, usage errors, timeouts: the mutation or the test list is broken, not caught by a test
    return Outcome(m, "error", caught or f"pytest exit {code}", seconds, cpu, message, out)


def table(outcomes: Sequence[Outcome]) -> str:
    lines = ["| mutation | file | caught by | seconds (wall) | seconds (CPU) |", "|---|---|---|---|---|"]
    for o in outcomes:
        files = ", ".join(dict.fromkeys(f"`{e.file}`" for e in o.mutation.edits))
        caught = f"`{o.caught_by}`" if o.status == "killed" else f"**{o.status.upper()}** {o.caught_by}".strip()
        lines.append(f"| {o.mutation.name} | {files} | {caught} | {o.seconds:.1f} | {o.cpu_seconds:.1f} |")
    return "\n".join(lines)


def changes(outcomes: Sequence[Outcome]) -> list[str]:
    """One line per mutation: what it replaces, where."""
    one_line = lambda text: " ".join(text.split())  # noqa: E731
    return [f"- **{o.mutation.name}**: " + "; ".join(f"`{e.file}`: `{one_line(e.old)}` → `{one_line(e.new)}`"
                                                     for e in o.mutation.edits) for o in outcomes]


def docs_page(outcomes: Sequence[Outcome], baseline: Outcome, wall: float, load: float) -> str:
    cpu = baseline.cpu_seconds + sum(o.cpu_seconds for o in outcomes)
    return "\n".join([
        "# Mutation check",
        "",
        "`tools/mutation_check.py` breaks each method's key mechanism on purpose (a search-and-replace of one",
        "source snippet, listed in `MUTATIONS` at the top of the tool) in a copy of the tree and runs the tests that",
        "guard it; the check fails if any mutant survives, if a snippet is not found exactly once, or if the guarding",
        "tests fail on the unmutated copy. `.ci/run` runs it after the test suite.",
        "",
        "    .venv/bin/python tools/mutation_check.py [--write_docs] [--only '[name, ...]'] [--jobs 2]",
        "",
        "The tests are in `tests/mechanisms/` (one file per method) and in the stages' own test files. \"Caught by\"",
        "is the first test that failed on the mutant. Wall seconds depend on the machine's load; CPU seconds (the",
        "test process and its children) are about what each takes on an idle core.",
        "",
        table(outcomes),
        "",
        f"Last run: {sum(o.status == 'killed' for o in outcomes)} of {len(outcomes)} mutants killed; the unmutated "
        f"guarding tests took {baseline.seconds:.0f} s ({baseline.cpu_seconds:.0f} s CPU); the whole check "
        f"{wall:.0f} s of wall time and {cpu:.0f} s of CPU time in all (load average {load:.1f} when it started).",
        "",
        "## The mutations",
        "",
        *changes(outcomes),
        "",
    ])


def unmutated(root: Path, scratch: Path, guards: Sequence[str], cfg: MutationCheckConfig) -> Outcome:
    """The guarding tests on an unmutated copy: they must pass, or a \"killed\" mutant proves nothing."""
    code, out, seconds, cpu = run_tests(copy_tree(root, scratch / "unmutated"), guards, cfg.jobs, 2 * cfg.timeout)
    caught, message = first_failure(out)
    return Outcome(Mutation("unmutated", (), tuple(guards)), "passed" if code == 0 else "error",
                   caught or f"pytest exit {code}", seconds, cpu, message, out)


def main(argv: Sequence[str] | None = None) -> list[Outcome]:
    cfg = parse_config(MutationCheckConfig, argv)
    started, load = time.perf_counter(), os.getloadavg()[0]
    unknown = sorted(set(cfg.only) - {m.name for m in MUTATIONS})
    if unknown:
        raise InputError("command line", "only", f"unknown mutations {unknown}; known: {[m.name for m in MUTATIONS]}")
    chosen = [m for m in MUTATIONS if not cfg.only or m.name in cfg.only]
    problems = check_snippets(ROOT, chosen)
    if problems:
        raise SystemExit("mutation list out of date:\n  " + "\n  ".join(problems))

    scratch = Path(tempfile.mkdtemp(prefix="mutation-check-"))
    try:
        guards = list(dict.fromkeys(t for m in chosen for t in m.tests))
        # the unmutated run is one more job beside the mutants: nothing waits for it
        with ThreadPoolExecutor(max_workers=max(1, cfg.jobs)) as pool:
            base = pool.submit(unmutated, ROOT, scratch, guards, cfg)
            outcomes = list(pool.map(lambda m: test_mutant(ROOT, scratch, m, cfg), chosen))
            baseline = base.result()
    finally:
        if cfg.keep:
            print(f"copies kept in {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    wall = time.perf_counter() - started

    if baseline.status != "passed":
        print(baseline.output[-6000:])
        raise SystemExit(f"the guarding tests fail on the unmutated tree ({baseline.caught_by}): fix them first")
    print(f"unmutated: {len(guards)} guarding tests pass ({baseline.seconds:.1f} s)")
    for o in outcomes:
        if o.status == "killed":
            print(f"{o.mutation.name}: {o.caught_by} - {o.message[:160]}")
        else:
            print(f"--- {o.mutation.name}: {o.status}; pytest said:\n{o.output[-3000:]}")
    print(table(outcomes))
    cpu = baseline.cpu_seconds + sum(o.cpu_seconds for o in outcomes)
    print(f"{sum(o.status == 'killed' for o in outcomes)} of {len(outcomes)} mutants killed in {wall:.0f} s "
          f"({cpu:.0f} s of CPU time)")
    if cfg.write_docs:
        atomic_write_text(ROOT / DOCS, docs_page(outcomes, baseline, wall, load))
        print(f"table written to {DOCS}")
    bad = [o.mutation.name for o in outcomes if o.status != "killed"]
    if bad:
        raise SystemExit(f"mutation check failed: {', '.join(bad)}")
    return outcomes


if __name__ == "__main__":
    main()
