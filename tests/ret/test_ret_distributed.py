"""ReT under torchrun: two ranks train exactly like one process on the same global batch (the query and passage
tokens gathered across ranks with gradients), and a global batch the ranks cannot share evenly is refused."""
from __future__ import annotations

import pytest
import torch

from core.config import parse_config
from core.device import seed_everything
from core.encoders import load_dual_encoder
from core.errors import InputError
from retriever.ret import cache, train
from retriever.ret.model import RetrieverModel
from tests.distributed import assert_same_training, run_torchrun

LAYERS = ["--layer_strategy", "all", "--single_layer_strategy", "last"]  # the test towers have 2 + 2 layers
CELL = '{"hidden_size": 32, "head_dim": 16, "dropout": 0.0, "attention_dropout": 0.0}'


def _data(world) -> list[str]:
    return [f"--queries_file={world}/m2kr/shapes_{{split}}.jsonl",
            f"--passages_file={world}/m2kr/shapes_passages_{{split}}.jsonl", "--image_root", str(world)]


def _train_args(world, encoder, cache_dir) -> list[str]:
    # ret uses every cell parameter; text-only leaves the vision ones unused (DDP's find_unused_parameters path)
    return ["--encoder", str(encoder), *_data(world), "--cache_dir", str(cache_dir), "--variants", "ret,text-only",
            "--cell", CELL, *LAYERS, "--batch_size", "32", "--max_steps", "3", "--eval_every", "3", "--lr", "3e-3",
            "--warmup_steps", "1", "--max_val_queries", "16", "--seed", "0"]


def test_two_ranks_train_like_one(shapes_world, dense_checkpoint, tmp_path):
    cache.main(["--encoder", str(dense_checkpoint), *_data(shapes_world), "--splits", "train,val",
                "--output_dir", str(tmp_path / "cache")])
    args = _train_args(shapes_world, dense_checkpoint, tmp_path / "cache")
    run_torchrun("retriever.ret.train", [*args, "--output_dir", tmp_path / "one"], nproc=1)
    run_torchrun("retriever.ret.train", [*args, "--output_dir", tmp_path / "two"], nproc=2)
    cfg = parse_config(train.TrainConfig, args)
    encoder = load_dual_encoder(dense_checkpoint)
    for variant in ("ret", "text-only"):
        seed_everything(cfg.seed)  # the cells as train.train_variant builds them, before any step
        initial = RetrieverModel(train.variant_config(cfg, variant, 2, 2), encoder).cells().state_dict()
        one, two = (tmp_path / run / variant / "checkpoint-last" / "model.pt" for run in ("one", "two"))
        # Adam moves a parameter whose true gradient is zero (self-attention's key bias) by lr·sign(rounding noise):
        # hence the weights' distance against how far training moved them, not an element-wise tolerance
        assert_same_training(one, two, initial)


def test_batch_the_ranks_cannot_share_is_refused_before_work(monkeypatch, tmp_path):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InputError, match="33 cannot be split evenly over 2 processes") as err:
        train.main(["--encoder", str(tmp_path / "no-encoder"), "--output_dir", str(tmp_path / "out"),
                    "--batch_size", "33"])
    assert err.value.field == "batch_size"
    assert not (tmp_path / "out").exists()


def test_rank_share_of_the_loss_averages_to_the_global_loss():
    """model.contrastive_loss over each rank's rows, averaged over ranks, is the loss of the whole batch."""
    from retriever.ret.model import contrastive_loss

    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(6, 4, 8, generator=g), dim=-1)
    p = torch.nn.functional.normalize(torch.randn(6, 4, 8, generator=g), dim=-1)
    labels = [0, 1, 1, 2, 3, 4]  # a duplicated positive shares its target across the two shares
    whole = contrastive_loss(q, p, labels)
    shares = [contrastive_loss(q, p, labels, rows=slice(r * 3, (r + 1) * 3)) for r in range(2)]
    assert torch.allclose(sum(shares) / 2, whole, atol=1e-6)
    assert not torch.allclose(shares[0], whole, atol=1e-3)
