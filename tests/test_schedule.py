"""The one learning-rate schedule (core.schedule): linear warmup, half cosine to a floor."""
import pytest
import torch

from core.schedule import warmup_cosine, warmup_cosine_factor


def test_warmup_then_half_cosine_to_the_floor():
    f = [warmup_cosine_factor(s, warmup=4, total=14, floor=0.1) for s in range(20)]
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f[4] == pytest.approx(1.0) and f[9] == pytest.approx(0.55) and f[14] == pytest.approx(0.1)
    assert f[19] == pytest.approx(0.1)  # held at the floor past the end
    assert all(a >= b for a, b in zip(f[4:], f[5:]))


def test_the_scheduler_follows_the_factor():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = warmup_cosine(opt, warmup=2, total=6)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([2.0 * warmup_cosine_factor(s, 2, 6) for s in range(6)])
