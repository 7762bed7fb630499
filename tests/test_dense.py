"""The dense retriever end to end on the tiny world: it learns (beats chance clearly), evaluates through the
faiss index, and trains under torchrun as it does in one process."""
import json

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
