"""The dense retriever end to end on the tiny world: it learns (beats chance clearly), evaluates through the
faiss index, resumes after a kill, and trains under torchrun as it does in one process."""
import json
import os
import subprocess
import sys

import pytest

from core.checkpoint import LAST, read_meta
from core.errors import InputError
from retriever.dense import evaluate, train
from core.device import seed_everything
from core.encoders import build_dual_encoder
from tests.conftest import TINY_ENCODER
from tests.distributed import assert_same_training, run_torchrun


def test_trained_encoder_beats_chance_by_far(dense_run):
    results = evaluate.main(["--emb_dir", str(dense_run / "emb"), "--split", "test",
                             "--output_dir", str(dense_run / "eval")])
    chance_r10 = 100 * 10 / 120
    assert results["text→image"]["R@10"] > 3 * chance_r10
    assert results["image→text"]["R@10"] > 3 * chance_r10
    saved = json.loads((dense_run / "eval" / "metrics.json").read_text())
    assert saved["text→image"] == results["text→image"]


def test_ivf_index_agrees_with_exact_search(dense_run):
    exact = evaluate.evaluate_embeddings(dense_run / "emb", "test", index_kind="flat")
    ivf = evaluate.evaluate_embeddings(dense_run / "emb", "test", index_kind="ivf", nlist=4, nprobe=4)
    assert ivf == exact  # probing every list is exhaustive


def _train_args(world, out, **over):
    args = {"data_json": world / "dataset_shapes.json", "image_root": world / "images", "output_dir": out,
            "model": json.dumps(TINY_ENCODER), "batch_size": 64, "epochs": 1, "warmup_steps": 2,
            "save_every": 2, "seed": 0}
    args.update(over)
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def test_killed_run_resumes_from_its_step(shapes_world, tmp_path):
    """Kill a run after its step-4 checkpoint; the same command continues from step 4, not from 0; another
    learning rate is refused (core.run_folder), not silently ignored."""
    out = tmp_path / "run"
    code = (
        "import sys, retriever.dense.train as t\n"
        "orig = t._save_last\n"
        "def kill_after(cfg, model, opt, sch, step, best, out):\n"
        "    orig(cfg, model, opt, sch, step, best, out)\n"
        "    if step == 4: import os; os._exit(9)\n"
        "t._save_last = kill_after\n"
        f"t.main({_train_args(shapes_world, out)!r})\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "WANDB_MODE": "disabled"})
    assert proc.returncode == 9
    assert read_meta(out / LAST)["step"] == 4
    with pytest.raises(InputError, match="config.yaml: lr: .*0.001 -> 0.002"):
        train.main(_train_args(shapes_world, out, lr=2e-3))
    resumed = []
    orig = train._save_last
    train._save_last = lambda *a: (resumed.append(a[4]), orig(*a))
    try:
        train.main(_train_args(shapes_world, out))
    finally:
        train._save_last = orig
    assert resumed and resumed[0] == 6  # first save after the resume: the run went on from step 4
    assert read_meta(out / LAST)["step"] == 400 // 64


def test_two_ranks_train_as_one_process_on_the_same_global_batch(shapes_world, tmp_path):
    """3 steps on 2 gloo ranks (32 images each, features gathered with gradients) end at the weights of 3 steps in
    one process on the same 64-image batches; the weights moved far more than the tolerance."""
    for nproc in (1, 2):
        run_torchrun("retriever.dense.train", _train_args(shapes_world, tmp_path / f"n{nproc}", max_steps=3,
                                                          num_workers=0), nproc)
    assert read_meta(tmp_path / "n2" / LAST)["step"] == 3
    seed_everything(0)
    initial = build_dual_encoder(TINY_ENCODER).state_dict()
    assert_same_training(tmp_path / "n1" / LAST / "model.pt", tmp_path / "n2" / LAST / "model.pt", initial)


def test_batch_the_world_size_does_not_divide_is_refused_before_work(shapes_world, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InputError, match="batch_size: the global batch of 63 cannot be split evenly over 2"):
        train.main(_train_args(shapes_world, tmp_path / "x", batch_size=63))
    assert not (tmp_path / "x").exists()


def test_unknown_config_key_is_refused_before_work(shapes_world, tmp_path):
    with pytest.raises(InputError, match="command line: epoch: unknown option"):
        train.main(_train_args(shapes_world, tmp_path / "x") + ["--epoch", "3"])
    assert not (tmp_path / "x").exists()


def test_batch_larger_than_split_is_an_error(shapes_world, tmp_path):
    with pytest.raises(InputError, match="batch_size"):
        train.main(_train_args(shapes_world, tmp_path / "x", batch_size=4096))
