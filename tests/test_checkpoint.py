import pytest
import torch

from core.checkpoint import LAST, read_meta, resume, save_checkpoint
from core.errors import InputError


def _model_and_optim():
    model = torch.nn.Linear(4, 2)
    optim = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(optim, 1, 0.5)
    return model, optim, sched


def test_resume_restores_weights_optimizer_scheduler_step_and_rng(tmp_path):
    model, optim, sched = _model_and_optim()
    model(torch.randn(3, 4)).sum().backward()
    optim.step(); sched.step()
    save_checkpoint(tmp_path / LAST, stage="demo", model=model, step=7, optimizer=optim, scheduler=sched)
    expected_draw = torch.rand(3)

    model2, optim2, sched2 = _model_and_optim()
    step, meta = resume(tmp_path / LAST, stage="demo", model=model2, optimizer=optim2, scheduler=sched2)
    assert step == 7 and meta["stage"] == "demo"
    assert torch.equal(model.weight, model2.weight)
    assert optim2.state_dict()["state"][0]["exp_avg"].equal(optim.state_dict()["state"][0]["exp_avg"])
    assert sched2.get_last_lr() == sched.get_last_lr()
    assert torch.equal(torch.rand(3), expected_draw)


def test_checkpoint_of_another_stage_is_refused(tmp_path):
    model, _, _ = _model_and_optim()
    save_checkpoint(tmp_path / "ck", stage="rqvae", model=model, step=1)
    with pytest.raises(InputError, match="written by stage 'rqvae', expected 'dense'"):
        read_meta(tmp_path / "ck", stage="dense")


def test_failed_save_leaves_nothing_behind(tmp_path):
    model, _, _ = _model_and_optim()

    def broken(folder):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_checkpoint(tmp_path / "ck", stage="demo", model=model, step=1, model_files=broken)
    assert list(tmp_path.iterdir()) == []
