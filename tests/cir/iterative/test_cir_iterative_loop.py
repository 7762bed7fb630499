"""The iterative loop end to end on the tiny Shapes world: rounds 1-3 from a trained composed retriever, a run killed
in round 2 that resumes in round 2 with --auto_resume (round 1 not re-mined), manifests that invalidate a cache when
the config changes, and eval_iterative's rows. The foundation model is a tiny random Qwen2-VL (real class, no hub)."""
from __future__ import annotations

import json
import shutil

import pytest

from cir.iterative import augment, eval_iterative
from cir.iterative import train_iterative as ti
from core.errors import InputError


class Killed(Exception):
    """Stands in for the process being killed mid-round."""


def _args(world, model, foundation, exp, *extra):
    return ["--data_dir", str(world / "cirr"), "--model_path", str(model), "--foundation_model_backbone", "qwen2_vl",
            "--foundation_model_path", str(foundation), "--experiment_dir", str(exp), "--num_iterations", "3",
            "--epochs_per_round", "1", "--batch_size", "32", "--hard_negative_k", "3", "--max_augment_per_round", "24",
            "--generation_batch_size", "12", "--max_new_tokens", "5", "--learning_rate", "2e-4", "--warmup_steps", "2",
            "--wandb", "false", *extra]


@pytest.fixture
def spies(monkeypatch):
    """Which round mined, generated and trained (the inner work, not the cached reads)."""
    calls = {"mine": [], "generate": [], "train": [], "kill_round": None}
    current = {}
    real = {"mine": ti.RoundLoop.mine, "inner_mine": ti.mine_hard_negatives,
            "generate": augment.generate_augmented, "train": ti.train_round}

    def outer_mine(self, n, reuse):
        current["round"] = n
        return real["mine"](self, n, reuse)

    def inner_mine(*a, **k):
        calls["mine"].append(current["round"])
        return real["inner_mine"](*a, **k)

    def generate(*a, **k):
        calls["generate"].append(a[-1] if len(a) >= 7 else k["round_index"])
        return real["generate"](*a, **k)

    def train(*a, **k):
        if k["round_index"] == calls["kill_round"]:
            raise Killed(f"killed in round {k['round_index']}")
        calls["train"].append(k["round_index"])
        return real["train"](*a, **k)

    monkeypatch.setattr(ti.RoundLoop, "mine", outer_mine)
    monkeypatch.setattr(ti, "mine_hard_negatives", inner_mine)
    monkeypatch.setattr(augment, "generate_augmented", generate)
    monkeypatch.setattr(ti, "train_round", train)
    return calls


def test_killed_in_round_2_resumes_there_and_rounds_are_evaluated(shapes_world, round0_retriever, tiny_qwen2vl,
                                                                   tmp_path, spies):
    exp = tmp_path / "exp"
    args = _args(shapes_world, round0_retriever, tiny_qwen2vl, exp)
    spies["kill_round"] = 2
    with pytest.raises(Killed):
        ti.main(args)
    assert spies["mine"] == [1, 2] and spies["generate"] == [1, 2] and spies["train"] == [1]
    assert (exp / "checkpoint_iter_1" / ti.ROUND_FILE).is_file() and not (exp / "checkpoint_iter_2").exists()
    for name in ("hard_negatives_iter_1.json", "augmented_samples_iter_1.json", "hard_negatives_iter_2.json"):
        assert "manifest" in json.loads((exp / name).read_text())

    with pytest.raises(InputError, match="auto_resume"):  # never silently over an existing experiment
        ti.main(args)

    for key in ("mine", "generate", "train"):
        spies[key].clear()
    spies["kill_round"] = None
    summary = ti.main(args + ["--auto_resume", "true"])
    # resumed in round 2: round 1 not re-mined, round 2's finished mining and generation reused, training redone
    assert spies["mine"] == [3] and spies["generate"] == [3] and spies["train"] == [2, 3]
    assert set(summary) == {"round1", "round2", "round3"}

    aug = json.loads((exp / "augmented_samples_iter_1.json").read_text())["data"]
    stats = aug["stats"]
    assert stats["pairs"] == stats["kept"] + stats["rejected"] > 0
    assert stats["kept"] > 0  # random texts are non-empty and differ from the originals

    results_json = tmp_path / "results.json"
    rows = eval_iterative.main(["--experiment_dir", str(exp), "--summary", str(results_json)])
    assert list(rows) == ["round0", "round1", "round2", "round3"]
    # No margin over chance is asserted: on the tiny world a composed retriever trained from scratch on ~40
    # annotated triplets stays at chance (so do the CIR stage's FAST rows); this test checks the loop, not the method.
    for name, row in rows.items():
        for key in ("R@1", "R@5", "R@10", "R@50", "Rs@1", "Rs@2", "Rs@3", "Avg"):
            assert 0 <= row[key] <= 100, (name, key)
        assert row["Avg"] == (row["R@5"] + row["Rs@1"]) / 2
    assert rows["round2"]["missed_top1"] >= 0 and "aug_kept" in rows["round3"]
    assert set(json.loads(results_json.read_text())["cir-iterative"]) == set(rows)
    assert json.loads((exp / "evaluation_results.json").read_text())["rounds"] == rows

    only = eval_iterative.main(["--experiment_dir", str(exp), "--iterations", "1,3", "--output_file", "sub.json"])
    assert list(only) == ["round1", "round3"] and only["round3"] == rows["round3"]  # deterministic evaluation
    with pytest.raises(InputError, match="iterations"):
        eval_iterative.main(["--experiment_dir", str(exp), "--iterations", "5"])

    # A changed mining setting invalidates round 1's cached hard negatives (and what was built on them).
    exp2 = tmp_path / "exp2"
    shutil.copytree(exp, exp2)
    for key in ("mine", "generate", "train"):
        spies[key].clear()
    ti.main(_args(shapes_world, round0_retriever, tiny_qwen2vl, exp2, "--num_iterations", "1", "--hard_negative_k", "2",
                  "--auto_resume", "true"))
    assert spies["mine"] == [1] and spies["generate"] == [1] and spies["train"] == [1]
