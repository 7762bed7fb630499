"""train_iterative under torchrun (gloo, CPU): one round (mining, generation, training, validation) on two ranks
gives the files and the weights of one rank on the same global batches; a batch the ranks cannot share evenly is
refused before any work."""
from __future__ import annotations

import json

import pytest
import torch

from cir.iterative import train_iterative as ti
from core.errors import InputError
from tests.distributed import assert_same_state, load_state, run_torchrun

ATOL, RTOL = 1e-5, 1e-4


def _args(world, model, foundation, exp, *extra):
    # Batches of at most 10 triplets grouped by reference: 9, 10, 10, 9, 10 of the 40 + 8 triplets, so two ranks hold
    # uneven shares (4 + 5) in some steps. Chunks of 3 generated texts: the generation shares are uneven too.
    return ["--data_dir", str(world / "cirr"), "--model_path", str(model), "--foundation_model_backbone", "qwen2_vl",
            "--foundation_model_path", str(foundation), "--experiment_dir", str(exp), "--num_iterations", "1",
            "--fast_mode", "true", "--fast_mode_triplets", "40", "--batch_size", "10", "--hard_negative_k", "2",
            "--max_augment_per_round", "8", "--generation_batch_size", "3", "--max_new_tokens", "4",
            "--learning_rate", "1e-3", "--weight_decay", "0.05", "--warmup_steps", "1", "--eval_batch_size", "32",
            "--checkpoint_every", "0", "--num_workers", "0", "--wandb", "false", *extra]


def _data(path):
    data = json.loads(path.read_text())["data"]
    data["stats"] = {k: v for k, v in data["stats"].items() if k not in ("generation_s", "pairs_per_s")}
    return data


def _without_key_biases(path, out):
    """The weights less the attention key biases. Softmax is unchanged by adding one number to every key's score, so
    in exact arithmetic those biases get no gradient at all; in floats they get rounding noise, which Adam scales up
    to steps of up to the learning rate, in each run differently. Every other weight is compared."""
    state = load_state(path)
    torch.save({k: v for k, v in state.items() if not k.endswith("attention.key.bias")}, out)
    return out


def test_one_round_on_two_ranks_equals_one_rank(shapes_world, round0_retriever, tiny_qwen2vl, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run_torchrun("cir.iterative.train_iterative", _args(shapes_world, round0_retriever, tiny_qwen2vl, one), nproc=1)
    run_torchrun("cir.iterative.train_iterative", _args(shapes_world, round0_retriever, tiny_qwen2vl, two), nproc=2)

    # mining and generation, computed in shards on two ranks, write what one rank writes
    assert _data(two / "hard_negatives_iter_0.json") == _data(one / "hard_negatives_iter_0.json")
    assert _data(two / "augmented_samples_iter_1.json") == _data(one / "augmented_samples_iter_1.json")
    assert list((two / "image_cache").glob("*.rank1-of-2.npy"))  # the token cache was written in two shards

    compared = [_without_key_biases(run / "checkpoint_iter_1" / "model.pt", tmp_path / f"{run.name}.pt")
                for run in (one, two)]
    assert_same_state(*compared, atol=ATOL, rtol=RTOL)
    start, trained = load_state(round0_retriever / "model.pt"), load_state(compared[0])
    moved = min((trained[k] - start[k]).abs().max().item() for k in trained if k.endswith("query_proj.weight"))
    assert moved > 100 * ATOL  # the equality above is about weights that training changed

    history = [json.loads((run / "checkpoint_iter_1" / ti.ROUND_FILE).read_text())["training"] for run in (one, two)]
    assert history[0]["steps"] == history[1]["steps"] >= 2
    for a, b in zip(history[0]["history"], history[1]["history"]):  # the global loss and the validation numbers
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5)


def test_a_batch_the_ranks_cannot_share_is_refused_before_work(tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InputError, match="cannot be split evenly over 2") as err:
        ti.main(["--data_dir", str(tmp_path), "--model_path", str(model), "--foundation_model_path", str(model),
                 "--experiment_dir", str(tmp_path / "exp"), "--batch_size", "15"])
    assert err.value.field == "batch_size"
    assert not (tmp_path / "exp").exists()
