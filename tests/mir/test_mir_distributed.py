"""The Shapes generator's trainer under torchrun: two ranks (gloo, CPU) sharing each global batch train the UNet and
its EMA to the weights one process reaches on the same batches, and a batch the ranks cannot share evenly is
refused before any work."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from core.device import derive_seed
from core.errors import InputError
from mir.generator import build_unet
from mir.layout import LAYOUT_CHANNELS
from tests.distributed import load_state, run_torchrun
from tests.mir.conftest import TINY_UNET, with_cached_helpers

ATOL, RTOL = 1e-5, 1e-4
LR = 2e-3


def _args(world: Path, dense: Path, out: Path, **kw) -> list[str]:
    args = {"data_json": world / "dataset_shapes.json", "image_root": world / "images", "dense_checkpoint": dense,
            "output_dir": out, "unet": json.dumps(TINY_UNET), "steps": 3, "batch_size": 8, "lr": LR,
            "warmup_steps": 1, "save_every": 3, "eval_images": 2, "sample_steps": 1, "num_workers": 0, "seed": 0, **kw}
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def _mismatch_share(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The share of weights outside ATOL/RTOL. Not all of them agree: Adam divides by sqrt(v) + eps, and where a
    gradient is as small as eps (a few in 10^5 of the UNet's at the first step) the step hangs on the gradient's
    last bits, which the order of the ranks' sums changes. A wrong split of the batch or of its random draws moves
    nearly every weight elsewhere."""
    outside = sum(int((~torch.isclose(a[k], b[k], atol=ATOL, rtol=RTOL)).sum()) for k in a)
    return outside / sum(a[k].numel() for k in a)


def test_generator_two_ranks_match_one_rank(mir_generator, shapes_world, dense_checkpoint, tmp_path):
    from mir import train_generator

    # the fixture run's layout encoder and scene reader (cached by what they were trained on): only UNets train here
    one = with_cached_helpers(tmp_path / "one", mir_generator)
    two = with_cached_helpers(tmp_path / "two", mir_generator)
    train_generator.main(_args(shapes_world, dense_checkpoint, one))
    run_torchrun("mir.train_generator", _args(shapes_world, dense_checkpoint, two), nproc=2)

    a, b = load_state(one / "checkpoint-last" / "model.pt"), load_state(two / "checkpoint-last" / "model.pt")
    torch.manual_seed(derive_seed(0, "unet"))  # the trainer's initial UNet (the dense tower is 64-d)
    init = build_unet(TINY_UNET, 64, LAYOUT_CHANNELS).state_dict()
    assert a.keys() == b.keys() == {f"{part}.{k}" for part in ("unet", "ema") for k in init}
    assert _mismatch_share(a, b) < 1e-3  # the UNet and its EMA (which follows the same steps)
    for key in a:  # and where they disagree, by less than one step at the learning rate
        assert float((a[key] - b[key]).abs().max()) < LR, key
    moved = torch.cat([(a[f"unet.{k}"] - v).abs().flatten() for k, v in init.items()])
    assert float(moved.median()) > 100 * ATOL  # the agreement is about weights that trained
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))  # rank 0 evaluated and wrote them
    assert m2["N"] == 2 and m2["train loss (last 50 steps)"] == pytest.approx(m1["train loss (last 50 steps)"], rel=1e-5)


def test_batch_the_ranks_cannot_share_is_refused_before_work(shapes_world, dense_checkpoint, tmp_path, monkeypatch):
    from mir import train_generator

    monkeypatch.setenv("RANK", "0")  # what torchrun announces to the first of two processes
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InputError, match="batch_size.*cannot be split evenly over 2 processes"):
        train_generator.main(_args(shapes_world, dense_checkpoint, tmp_path / "g", batch_size=7))
    assert not (tmp_path / "g").exists()

