"""The iterative loop end to end on the tiny Shapes world: rounds 1-3 from a trained composed retriever; a run
SIGKILLed in round 2 (while writing a mid-epoch checkpoint) that resumes in round 2 with --auto_resume, at the step of
its last complete in-round checkpoint, without re-mining round 1; manifests that invalidate a cache when the config
changes; and eval_iterative's rows, which must beat chance clearly. The foundation model is a tiny random Qwen2-VL
(real class, no hub)."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys

import pytest

from cir.iterative import augment, eval_iterative
from cir.iterative import train_iterative as ti
from core.checkpoint import LAST, read_meta
from core.errors import InputError

# Run train_iterative in a child process that SIGKILLs itself in round 2 while checkpoint-last/ of step KILL_STEP is
# half written (model and optimizer state on disk in the temporary folder, meta.json not yet): a real kill at the
# worst moment, at a deterministic point.
KILL_STEP = 4
CHILD = f"""
import os, signal, sys
from cir.iterative import trainer, train_iterative
real_save = trainer.save_checkpoint

def save(folder, **kw):
    if "training_iter_2" in str(folder) and kw["step"] == {KILL_STEP}:
        inner = kw["model_files"]
        def die(tmp):
            inner(tmp)
            os.kill(os.getpid(), signal.SIGKILL)
        kw["model_files"] = die
    return real_save(folder, **kw)

trainer.save_checkpoint = save
train_iterative.main(sys.argv[1:])
"""


def _args(world, model, foundation, exp, *extra):
    return ["--data_dir", str(world / "cirr"), "--model_path", str(model), "--foundation_model_backbone", "qwen2_vl",
            "--foundation_model_path", str(foundation), "--experiment_dir", str(exp), "--num_iterations", "3",
            "--epochs_per_round", "2", "--checkpoint_every", "2", "--batch_size", "32", "--hard_negative_k", "3",
            "--max_augment_per_round", "24", "--generation_batch_size", "12", "--max_new_tokens", "5",
            "--learning_rate", "2e-4", "--warmup_steps", "2", "--wandb", "false", *extra]


@pytest.fixture
def spies(monkeypatch):
    """Which round mined, generated and trained (the inner work, not the cached reads)."""
    calls = {"mine": [], "generate": [], "train": []}
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
        calls["train"].append(k["round_index"])
        return real["train"](*a, **k)

    monkeypatch.setattr(ti.RoundLoop, "mine", outer_mine)
    monkeypatch.setattr(ti, "mine_hard_negatives", inner_mine)
    monkeypatch.setattr(augment, "generate_augmented", generate)
    monkeypatch.setattr(ti, "train_round", train)
    return calls


# the seed's layout: a hard-negative file is numbered by the model that mined it (round 1 mines with round 0's)
ROUND_FILES = ["hard_negatives_iter_0.json", "augmented_samples_iter_1.json", "checkpoint_iter_1/iteration.json",
               "checkpoint_iter_1/model.pt", "hard_negatives_iter_1.json", "augmented_samples_iter_2.json"]


def _kill_in_round_2(args, exp):
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert "round 1: best validation" in proc.stderr and "round 2: best validation" not in proc.stderr
    state = exp / "training_iter_2"
    # the complete checkpoint before the kill survives; the one being written is a half-written temporary folder
    assert read_meta(state / LAST)["step"] == KILL_STEP - 2
    torn = [p for p in state.glob(f".{LAST}.*.tmp")]
    assert len(torn) == 1 and (torn[0] / "model.pt").is_file() and not (torn[0] / "meta.json").exists()
    assert (exp / "checkpoint_iter_1" / ti.ROUND_FILE).is_file() and not (exp / "checkpoint_iter_2").exists()
    for path in exp.glob("*.json"):  # no final file name holds half a file
        json.loads(path.read_text())
    for name in ("hard_negatives_iter_0.json", "augmented_samples_iter_1.json", "hard_negatives_iter_1.json"):
        assert "manifest" in json.loads((exp / name).read_text())


def test_killed_in_round_2_resumes_there_and_trained_rounds_beat_chance(shapes_world, round0_retriever, tiny_qwen2vl,
                                                                   tmp_path, spies, caplog):
    exp = tmp_path / "exp"
    args = _args(shapes_world, round0_retriever, tiny_qwen2vl, exp)
    _kill_in_round_2(args, exp)
    mtimes = {name: (exp / name).stat().st_mtime_ns for name in ROUND_FILES}

    with pytest.raises(InputError, match="auto_resume"):  # never silently over an existing experiment
        ti.main(args)

    with caplog.at_level(logging.INFO, logger="cir.iterative"):
        summary = ti.main(args + ["--auto_resume", "true"])
    # resumed in round 2: round 1 neither re-mined, re-generated nor retrained (its files untouched), round 2's
    # mining and generation reused, its training continued from the last complete checkpoint
    assert spies["mine"] == [3] and spies["generate"] == [3] and spies["train"] == [2, 3]
    assert {name: (exp / name).stat().st_mtime_ns for name in ROUND_FILES} == mtimes
    log = caplog.text
    assert "round 1: hard negatives reused" in log and "round 1: checkpoint reused" in log
    assert "round 2: hard negatives reused" in log and "round 2: augmented samples reused" in log
    assert f"round 2: training resumed from step {KILL_STEP - 2} of" in log
    assert "removed 1 half-written temporary" in log
    training = json.loads((exp / "checkpoint_iter_2" / ti.ROUND_FILE).read_text())["training"]
    assert training["resumed_from_step"] == KILL_STEP - 2 and training["steps"] > KILL_STEP
    assert json.loads((exp / "checkpoint_iter_3" / ti.ROUND_FILE).read_text())["training"]["resumed_from_step"] == 0
    assert set(summary) == {"round1", "round2", "round3"}
    for n in (1, 2, 3):
        assert (exp / f"checkpoint_iter_{n}" / ti.ROUND_FILE).is_file()
        assert (exp / f"hard_negatives_iter_{n - 1}.json").is_file() and (exp / f"augmented_samples_iter_{n}.json").is_file()
    assert not (exp / "hard_negatives_iter_3.json").exists()
    assert not list(exp.glob("training_iter_*"))  # in-round checkpoints are scratch once the round is written
    assert not [p for p in exp.rglob("*") if p.name.endswith((".tmp", ".old"))]

    aug = json.loads((exp / "augmented_samples_iter_1.json").read_text())["data"]
    stats = aug["stats"]
    assert stats["pairs"] == stats["kept"] + stats["rejected"] > 0
    assert stats["kept"] > 0  # random texts are non-empty and differ from the originals

    results_json = tmp_path / "results.json"
    rows = eval_iterative.main(["--experiment_dir", str(exp), "--summary", str(results_json)])
    assert list(rows) == ["round0", "round1", "round2", "round3"]
    for name, row in rows.items():
        for key in ("R@1", "R@5", "R@10", "R@50", "Rs@1", "Rs@2", "Rs@3", "Avg"):
            assert 0 <= row[key] <= 100, (name, key)
        assert row["Avg"] == (row["R@5"] + row["Rs@1"]) / 2
    # Every round's model, the trained rounds included, retrieves well above chance on the test split (the reference
    # is excluded from the gallery, so a random ranking finds the target in the top K with probability K / (n - 1)).
    gallery = json.loads((exp / "evaluation_results.json").read_text())["gallery"] - 1
    for name, row in rows.items():
        assert row["R@10"] > 2.5 * 100 * 10 / gallery, (name, row)  # chance 8.4% on 120 test images (measured 32-45)
        assert row["R@50"] > 100 * 50 / gallery + 30, (name, row)   # chance 42% (measured 93-95)
    # round 2 trained with what round 1's model mined (hard_negatives_iter_1.json, numbered by the mining model)
    mined = json.loads((exp / "hard_negatives_iter_1.json").read_text())["data"]["queries"]
    assert rows["round2"]["missed_top1"] == len(mined) and "aug_kept" in rows["round3"]
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
