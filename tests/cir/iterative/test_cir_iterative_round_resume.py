"""Checkpoints inside a round: a round's training killed after its step-4 checkpoint-last/ continues from step 4
(same batches, optimizer, schedule and RNG), ending with the weights and history of an uninterrupted run; a
checkpoint written for other inputs (another manifest) is not resumed."""
from __future__ import annotations

import pytest
import torch

from cir.iterative import trainer
from cir.iterative.backbones import load_backbone
from cir.iterative.data import Corpus, load_split
from cir.iterative.evaluate import evaluate_split
from core.checkpoint import LAST, read_meta


class Killed(Exception):
    """Stands in for the process dying right after a checkpoint (the loop test kills a real process)."""


@pytest.fixture(scope="module")
def data(shapes_world):
    train, train_paths = load_split(shapes_world / "cirr", None, "train")
    val, val_paths = load_split(shapes_world / "cirr", None, "val")
    return train, val, sorted(val_paths), {**train_paths, **val_paths}


def _run(model_dir, data, state_dir, manifest):
    train, val, val_gallery, paths = data
    torch.manual_seed(1234)  # a fresh process: whatever the RNG was, a resumed run restores the saved one
    model = load_backbone("composed_retriever", str(model_dir))
    corpus = Corpus(paths)
    corpus.prepare(model)
    result = trainer.train_round(
        model, corpus, train, epochs=2, batch_size=16, lr=5e-4, weight_decay=0.01, warmup_steps=2, temperature=0.07,
        negatives_per_query=0, seed=0, round_index=1, validate=lambda m: evaluate_split(m, corpus, val, val_gallery, 256),
        state_dir=state_dir, save_every=2, manifest=manifest)
    return model, result


def test_round_training_resumes_from_its_last_step(round0_retriever, data, tmp_path, monkeypatch):
    reference, expected = _run(round0_retriever, data, tmp_path / "whole", {"round": 1})
    assert expected["resumed_from_step"] == 0 and expected["steps"] > 6
    assert read_meta(tmp_path / "whole" / LAST)["step"] == expected["steps"]  # the last save: after the last epoch

    real_save = trainer.save_checkpoint

    def save_then_die(folder, **kw):
        real_save(folder, **kw)
        if kw["step"] == 4:
            raise Killed

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        _run(round0_retriever, data, tmp_path / "killed", {"round": 1})
    monkeypatch.setattr(trainer, "save_checkpoint", real_save)
    meta = read_meta(tmp_path / "killed" / LAST)
    assert meta["step"] == 4 and meta["history"] == []  # killed inside the first epoch

    resumed_model, resumed = _run(round0_retriever, data, tmp_path / "killed", {"round": 1})
    assert resumed["resumed_from_step"] == 4 and resumed["steps"] == expected["steps"]
    assert len(resumed["history"]) == len(expected["history"]) == 2
    for got, want in zip(resumed["history"], expected["history"]):  # same epoch losses and validation metrics
        assert got == pytest.approx(want)
    ref_state, got_state = reference.state_dict(), resumed_model.state_dict()
    assert all(torch.allclose(ref_state[k], got_state[k], atol=1e-6) for k in ref_state)

    # another round's (or another config's) checkpoint is never resumed: training starts at step 0
    optimizer = torch.optim.AdamW([p for p in resumed_model.parameters() if p.requires_grad])
    assert trainer.try_resume(tmp_path / "killed", {"round": 1, "config": "changed"}, resumed_model, optimizer, None,
                              trainer.RoundState()) == 0
    assert trainer.try_resume(tmp_path / "killed", {"round": 1}, resumed_model, optimizer, None,
                              trainer.RoundState()) == expected["steps"]
