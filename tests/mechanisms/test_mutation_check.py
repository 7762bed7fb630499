"""The mutation check's own bookkeeping: its list matches the code (each snippet found exactly once, each guarding
test file present), a stale snippet is reported, and a failure is read back from pytest's summary."""
from __future__ import annotations

import pytest

from tools.mutation_check import MUTATIONS, ROOT, Edit, Mutation, apply, check_snippets, copy_tree, first_failure


def test_every_snippet_is_in_the_code_once_and_every_guard_exists():
    assert check_snippets(ROOT, MUTATIONS) == []
    for m in MUTATIONS:
        for node in m.tests:
            assert (ROOT / node.split("::")[0]).is_file(), (m.name, node)
    assert len({m.name for m in MUTATIONS}) == len(MUTATIONS)


def test_a_stale_or_ambiguous_snippet_is_reported_and_never_applied(tmp_path):
    stale = Mutation("stale", (Edit("core/metrics.py", "no such line in the file", "x"),), ("tests/test_metrics.py",))
    twice = Mutation("twice", (Edit("core/metrics.py", "import", "x"),), ("tests/test_metrics.py",))
    problems = check_snippets(ROOT, [stale, twice])
    assert len(problems) == 2 and "0 times" in problems[0] and "twice" in problems[1]
    tree = copy_tree(ROOT / "core", tmp_path / "tree" / "core").parent
    with pytest.raises(RuntimeError, match="exactly once"):
        apply(tree, stale.edits)


def test_the_first_failure_is_read_from_the_short_summary():
    out = "....F\n=== short test summary info ===\nFAILED tests/a.py::test_b[1] - AssertionError: lost\nFAILED x::y\n"
    assert first_failure(out) == ("tests/a.py::test_b[1]", "AssertionError: lost")
    assert first_failure("5 passed") == ("", "")
