"""The multi-task training recipe: the mixture draws each set in its configured proportion, the step budget comes
from the data, the held-out validation slice is disjoint from training, and the passage→query half of the loss
scores with the passage's tokens as the query side (not the transpose of the query→passage scores)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.config import parse_config
from core.errors import InputError
from retriever.ret import train
from retriever.ret.mixture import (MixtureBatchSampler, epoch_mixture_batches, mixture_weights, schedule_steps,
                                   split_heldout)
from retriever.ret.model import contrastive_loss

CELL = '{"hidden_size": 32, "head_dim": 16, "dropout": 0.0, "attention_dropout": 0.0}'


def _set_of(indices: np.ndarray, sizes: list[int]) -> np.ndarray:
    return np.searchsorted(np.cumsum(sizes), indices, side="right")


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_mixture_draws_each_set_in_its_configured_proportion(temperature):
    sizes = [1200, 500, 60]
    weights = mixture_weights(sizes, temperature)
    expected = np.asarray(sizes, dtype=float) ** (1 / temperature)
    assert np.allclose(weights, expected / expected.sum())
    drawn = np.concatenate([b for epoch in range(10)
                            for b in epoch_mixture_batches(sizes, weights, 64, 27, seed=0, epoch=epoch)])
    counts = np.bincount(_set_of(drawn, sizes), minlength=3)
    assert np.allclose(counts / counts.sum(), weights, atol=2e-3), (counts, weights)
    # batch by batch the sets are mixed, not laid out one after the other
    first = _set_of(epoch_mixture_batches(sizes, weights, 64, 27, seed=0, epoch=0)[0], sizes)
    assert len(set(first.tolist())) >= 2
    # a set drawn more often than its size cycles through every query before it repeats one
    one_epoch = np.concatenate(epoch_mixture_batches(sizes, weights, 64, 27, seed=0, epoch=0))
    small = one_epoch[_set_of(one_epoch, sizes) == 2]
    assert len(set(small.tolist())) == min(len(small), 60)


def test_proportional_mixture_shows_each_query_once_per_epoch():
    sizes = [300, 100]
    sampler = MixtureBatchSampler(sizes, mixture_weights(sizes, 1.0), 50, seed=3)
    assert sampler.steps_per_epoch == 8 and len(sampler) == 8
    drawn = np.concatenate(sampler.global_batches())
    assert sorted(drawn.tolist()) == list(range(400))
    # two ranks take the two halves of the same global batches; a resumed epoch replays the rest exactly
    halves = [list(MixtureBatchSampler(sizes, sampler.weights, 50, seed=3, rank=r, world_size=2)) for r in (0, 1)]
    assert [a + b for a, b in zip(*halves)] == [[(0, int(i)) for i in batch] for batch in sampler.global_batches()]
    sampler.set_epoch(0, skip=5)
    assert [b.tolist() for b in sampler.global_batches()] == \
        [b.tolist() for b in epoch_mixture_batches(sizes, sampler.weights, 50, 8, 3, 0)[5:]]
    sampler.set_epoch(1)
    assert not np.array_equal(np.concatenate(sampler.global_batches()), drawn)  # a new order each epoch


def test_mixture_refuses_bad_settings():
    with pytest.raises(InputError, match="positive") as err:
        mixture_weights([10, 20], 0.0)
    assert err.value.field == "mixture_temperature"
    with pytest.raises(InputError, match="at least one query"):
        mixture_weights([10, 0], 1.0)


def test_steps_and_warmup_are_sized_from_the_mixture():
    # 1000 queries at batch 64: 15 steps an epoch
    assert schedule_steps(1000, 64, epochs=4, max_steps=0, warmup_steps=0, warmup_ratio=0.1) == (15, 60, 6)
    assert schedule_steps(1000, 64, epochs=4, max_steps=0, warmup_steps=10, warmup_ratio=0.1) == (15, 60, 10)
    assert schedule_steps(1000, 64, epochs=4, max_steps=200, warmup_steps=0, warmup_ratio=0.05) == (15, 200, 10)
    # the old M2KR config: 17 steps of which 1,000 warm up, the peak never reached
    with pytest.raises(InputError, match="does not end before") as err:
        schedule_steps(8704, 512, epochs=1, max_steps=0, warmup_steps=1000, warmup_ratio=0.0, source="m2kr.yaml")
    assert (err.value.field, str(err.value.path)) == ("warmup_steps", "m2kr.yaml")
    with pytest.raises(InputError, match="larger than the training queries"):
        schedule_steps(100, 128, epochs=1, max_steps=0, warmup_steps=0, warmup_ratio=0.1)
    with pytest.raises(InputError) as err:
        schedule_steps(1000, 64, epochs=1, max_steps=0, warmup_steps=0, warmup_ratio=1.0)
    assert err.value.field == "warmup_ratio"


def test_heldout_slice_takes_whole_question_ids():
    ids = [f"q{i // 2}" for i in range(200)]  # every question on two rows
    keep, held = split_heldout(ids, 0.1, seed=0, source="train.jsonl")
    assert len(held) == 20 and len(keep) == 180 and sorted(keep + held) == list(range(200))
    assert not {ids[i] for i in keep} & {ids[i] for i in held}
    assert split_heldout(ids, 0.1, seed=0, source="x") == (keep, held)  # fixed by the seed
    assert len(split_heldout(ids, 7, seed=0, source="x")[1]) == 14  # a count of ids, two rows each
    with pytest.raises(InputError, match="leaving none") as err:
        split_heldout(ids, 100, seed=0, source="train.jsonl")
    assert err.value.field == "heldout_queries"
    with pytest.raises(InputError):
        split_heldout(ids, 2.5, seed=0, source="x")


def test_passage_to_query_loss_is_maxsim_with_the_passage_as_query_side():
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(3, 2, 4, generator=g), dim=-1)
    p = F.normalize(torch.randn(3, 5, 4, generator=g), dim=-1)

    def brute_maxsim(a, b):  # Σ over a's tokens of the best match among b's tokens
        return sum(max(float(a[i] @ b[j]) for j in range(len(b))) for i in range(len(a)))

    s_qp = torch.tensor([[brute_maxsim(q[i], p[j]) for j in range(3)] for i in range(3)])
    s_pq = torch.tensor([[brute_maxsim(p[i], q[j]) for j in range(3)] for i in range(3)])
    target = torch.arange(3)
    expected = 0.5 * (F.cross_entropy(s_qp, target) + F.cross_entropy(s_pq, target))
    transposed = 0.5 * (F.cross_entropy(s_qp, target) + F.cross_entropy(s_qp.T, target))
    loss = contrastive_loss(q, p)
    assert torch.allclose(loss, expected, atol=1e-5)
    assert abs(float(loss - transposed)) > 1e-2


def _two_sets(world, root):
    """Two small sets ("a": 40 Shapes training queries, "b": 80 others), each over a corpus of its own queries'
    positives: a mixture whose live validation encodes a few hundred items, not the world's corpus."""
    m2kr = world / "m2kr"
    rows = [json.loads(line) for line in (m2kr / "shapes_train.jsonl").read_text().splitlines()]
    passages = {p["passage_id"]: p for p in map(json.loads, (m2kr / "shapes_passages_train.jsonl").read_text().splitlines())}
    for name, part in (("a", rows[:40]), ("b", rows[40:120])):
        wanted = dict.fromkeys(pid for r in part for pid in r["pos_item_ids"])
        for split in ("train", "val"):  # val files exist only so that a run without heldout_queries finds them
            (root / f"{name}_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
            (root / f"{name}_passages_{split}.jsonl").write_text("".join(json.dumps(passages[p]) + "\n" for p in wanted))
    return [f"--queries_file={root}/{{dataset}}_{{split}}.jsonl",
            f"--passages_file={root}/{{dataset}}_passages_{{split}}.jsonl", "--image_root", str(world)]


def test_a_mixture_trains_and_validates_each_set_on_its_heldout_slice(shapes_world, dense_checkpoint, tmp_path):
    data = _two_sets(shapes_world, tmp_path)
    args = ["--encoder", str(dense_checkpoint), *data, "--datasets", "a,b", "--features", "live",
            "--num_workers", "0", "--variants", "ret", "--cell", CELL, "--layer_strategy", "all",
            "--batch_size", "16", "--max_steps", "3", "--warmup_ratio", "0.34", "--heldout_queries", "8",
            "--lr", "3e-3", "--seed", "0", "--output_dir", str(tmp_path / "run")]
    cfg = parse_config(train.TrainConfig, args)
    sets = train.load_training_sets(cfg)
    for s in sets:  # the slice is the set's own training queries, none of which it trains on
        assert len(s.val.queries) == 8 and s.val_files == s.files
        assert not {q.question_id for q in s.val.queries} & {q.question_id for q in s.train.queries}
    val = train.main(args)["ret"]
    logged = json.loads((tmp_path / "run/ret/metrics.json").read_text())
    last = logged[-1] if isinstance(logged, list) else logged
    assert last["split"] == "heldout" and last["step"] == 3
    for k in ("R@1", "R@5", "R@10"):
        assert val[k] == pytest.approx((val[f"a/{k}"] + val[f"b/{k}"]) / 2)


def test_mixture_config_mistakes_are_refused_before_work(shapes_world, dense_checkpoint, tmp_path):
    data = _two_sets(shapes_world, tmp_path)
    base = ["--encoder", str(dense_checkpoint), *data, "--output_dir", str(tmp_path / "run"), "--variants", "ret"]
    with pytest.raises(InputError, match="features: live") as err:  # cached tokens are one set's
        train.main([*base, "--datasets", "a,b", "--features", "cache"])
    assert err.value.field == "features"
    with pytest.raises(InputError, match="placeholder") as err:
        train.main([*base, "--datasets", "[]"])
    assert err.value.field == "queries_file"
    with pytest.raises(InputError, match="listed twice"):
        train.main([*base, "--datasets", "a,a"])


@pytest.mark.parametrize("name", ["m2kr", "shapes"])
def test_shipped_configs_parse(name):
    cfg = parse_config(train.TrainConfig, ["--config", str(Path(__file__).parents[2] / f"configs/ret/{name}.yaml")])
    if name == "m2kr":
        assert len(cfg.datasets) == 7 and "{dataset}" in cfg.queries_file and cfg.heldout_queries > 0
        assert cfg.warmup_steps == 0 and 0 < cfg.warmup_ratio < 1
