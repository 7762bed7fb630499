"""The CIR trainers under torchrun: two gloo ranks and one process on the same global batches end with the same
weights (so the same losses and gradients: a missing all-gather of the in-batch targets, a per-rank token mean or a
per-rank batch draw breaks this), and a batch size the world size does not divide is refused before any work."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cir import train, train_mtst
from cir.data import load_cirr
from cir.retriever import build_shapes_retriever
from core.checkpoint import BEST, LAST
from core.config import parse_config
from core.device import seed_everything
from core.errors import InputError
from tests.distributed import assert_same_training, load_state, run_torchrun

SMALL = {"qformer": {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 128,
                     "cross_attention_frequency": 1, "max_position_embeddings": 48,
                     "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
         "num_query_tokens": 4, "embed_dim": 64, "max_text_length": 40}
# Float sums run in another order on two ranks. Adam's normalised step turns that noise into steps where the true
# gradient is zero or nearly (an attention key bias has none) and copies it into a few weights elsewhere, so the runs
# are compared as training runs: the difference of their updates is a small part of the update (all weights as one
# vector). A lost all-gather or a per-rank mean fails that by far (28 % of the update). The released PTHA form sends
# hop two's tokens through hop one's text feed-forward, whose weights get gradients near zero in three steps: there
# the two runs measured 0.9 % apart, all of it in 1.3 % of the weights, each off by at most one Adam step (lr).
MAX_RELATIVE = 1.5e-2


@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _reverse_folder(cirr: Path, out: Path) -> Path:
    """PTHA's reverse triplets in the layout cir.synthesize writes (target → reference, same pairid)."""
    rows = json.loads((cirr / "captions" / "cap.rc2.train.json").read_text())
    for row in rows:
        row["reference"], row["target_hard"] = row["target_hard"], row["reference"]
        row["target_soft"] = {row["target_hard"]: 1.0}
    (out / "captions").mkdir(parents=True)
    (out / "image_splits").mkdir()
    (out / "captions" / "cap.rc2.train_reverse.json").write_text(json.dumps(rows))
    (out / "image_splits" / "split.rc2.train_reverse.json").write_text(
        (cirr / "image_splits" / "split.rc2.train.json").read_text())
    return out


def test_cir_trainer_two_ranks_equal_one(shapes_world, dense_checkpoint, tmp_path):
    """PTHA fine-tuning (L_q2t with appended set members, L_t2t, L_p2p), three steps of a global batch of 8."""
    cirr = shapes_world / "cirr"
    torch.manual_seed(0)
    init = build_shapes_retriever(dense_checkpoint, [t.caption for t in load_cirr(cirr, "train").triplets], SMALL)
    init.save_pretrained(tmp_path / "init")
    args = ["--cirr_root", cirr, "--dense_checkpoint", dense_checkpoint, "--init_from", tmp_path / "init",
            "--objective", "ptha", "--reverse_root", _reverse_folder(cirr, tmp_path / "reverse"),
            "--max_triplets", "24", "--batch_size", "8", "--epochs", "1", "--lr", "2e-3", "--warmup_steps", "1",
            "--num_workers", "0", "--cache_dir", tmp_path / "features", "--seed", "0"]
    run_torchrun("cir.train", [*args, "--output_dir", tmp_path / "two"], nproc=2)
    # each rank encoded its share of the token cache; the one-process run reads the same cache
    made = json.loads((tmp_path / "features" / "cirr_train.json").read_text())
    assert [s.rsplit(".", 2)[-2] for s in made["shards"]] == ["r0of2", "r1of2"]
    with one_thread():  # as each torchrun rank runs
        train.main([*map(str, args), "--output_dir", str(tmp_path / "one")])

    assert json.loads((tmp_path / "two" / LAST / "meta.json").read_text())["step"] == 3
    one, two = load_state(tmp_path / "one" / LAST / "model.pt"), load_state(tmp_path / "two" / LAST / "model.pt")
    assert not [k for k in one if k.startswith("image_encoder.")]  # the frozen tower is named, not saved
    assert_same_training(one, two, load_state(tmp_path / "init" / "model.pt"), max_ratio=MAX_RELATIVE)


def _generator_state(folder: Path) -> dict[str, torch.Tensor]:
    bridge = torch.load(folder / "bridge.pt", weights_only=True)
    state = {"query_tokens": bridge["query_tokens"], "segment": bridge["segment"],
             **{f"projection.{k}": v for k, v in bridge["language_projection"].items()}}
    for part in ("qformer", "language_model"):
        state |= {f"{part}.{k}": v for k, v in load_file(folder / part / "model.safetensors").items()}
    return state


def test_mtst_trainer_two_ranks_equal_one(shapes_world, dense_checkpoint, tmp_path):
    """LM pretraining on text (a share of modification texts on one rank, captions on the other: unequal token
    counts) then three Q-Former steps with the LM still training, global batches of 8."""
    cirr = shapes_world / "cirr"
    args = ["--cirr_root", cirr, "--dense_checkpoint", dense_checkpoint, "--data_json",
            shapes_world / "dataset_shapes.json", "--lm_steps", "2", "--lm_batch_size", "8", "--steps", "3",
            "--batch_size", "8", "--lr", "2e-3", "--warmup_steps", "1", "--eval_every", "3", "--eval_pairs", "4",
            "--test_split", "", "--max_new_tokens", "4", "--num_query_tokens", "4", "--freeze_language_model",
            "false", "--num_workers", "0", "--cache_dir", tmp_path / "features", "--seed", "0"]
    run_torchrun("cir.train_mtst", [*args, "--output_dir", tmp_path / "two"], nproc=2)
    with one_thread():
        train_mtst.main([*map(str, args), "--output_dir", str(tmp_path / "one")])

    cfg = parse_config(train_mtst.MTSTConfig, [*map(str, args), "--output_dir", str(tmp_path / "init")])
    seed_everything(cfg.seed)  # the generator main() starts from
    start = train_mtst._build(cfg, load_cirr(cirr, "train"), torch.device("cpu"))
    start.save_pretrained(tmp_path / "init")
    assert_same_training(_generator_state(tmp_path / "one" / BEST), _generator_state(tmp_path / "two" / BEST),
                         _generator_state(tmp_path / "init"), max_ratio=MAX_RELATIVE)


@pytest.mark.parametrize("trainer", [train, train_mtst])
def test_batch_size_the_world_does_not_divide_is_refused(trainer, shapes_world, monkeypatch, tmp_path):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun announces: checked before the process group is joined
    with pytest.raises(InputError, match="batch_size.*cannot be split evenly over 2 processes"):
        trainer.main(["--cirr_root", str(shapes_world / "cirr"), "--batch_size", "7",
                      "--output_dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()
