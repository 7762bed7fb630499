"""Every trainer family resumes exactly after a real SIGKILL: rerunning the killed command takes only the steps that
were left and ends at the weights of a run that was never interrupted (tests/resume.py). The ComGTIR retriever's
stages and the iterative CIR loop have theirs beside their other tests."""
from __future__ import annotations

import json

import pytest

from core.errors import InputError
from tests.conftest import TINY_ENCODER
from tests.resume import assert_resume_replays_the_run


def _flags(**kw) -> list[str]:
    return [x for k, v in kw.items() for x in (f"--{k}", str(v))]


def test_dense_resumes_exactly_and_refuses_another_config(shapes_world, tmp_path, monkeypatch):
    from retriever.dense import train

    argv = lambda out, **kw: _flags(**{"data_json": shapes_world / "dataset_shapes.json",  # noqa: E731
                                       "image_root": shapes_world / "images", "output_dir": out,
                                       "model": json.dumps(TINY_ENCODER), "batch_size": 64, "max_steps": 4,
                                       "warmup_steps": 1, "save_every": 2, "eval_every": 4, "max_val_images": 20,
                                       "num_workers": 0, "seed": 0, **kw})
    assert_resume_replays_the_run("retriever.dense.train", argv, tmp_path, monkeypatch)
    # another learning rate on the finished run is refused before any work, not silently ignored
    with pytest.raises(InputError, match=r"config.yaml: lr: .*lr: 0.001 -> 0.002.*--overwrite true"):
        train.main(argv(tmp_path / "whole", lr=2e-3))


def test_rqvae_resumes_exactly_with_its_codebook_generator(dense_run, tmp_path, monkeypatch):
    # restarts every 5 steps draw from the trainer's own generator, before and after the kill
    argv = lambda out: _flags(emb_dir=dense_run / "emb", output_dir=out, epochs=20, batch_size=128, levels=2,  # noqa: E731
                              codebook_size=16, restart_every=5, seed=0)
    assert_resume_replays_the_run("rqvae.train", argv, tmp_path, monkeypatch)


def test_ret_resumes_exactly(shapes_world, dense_checkpoint, tmp_path, monkeypatch):
    cell = '{"hidden_size": 32, "head_dim": 16, "dropout": 0.1, "attention_dropout": 0.0}'  # dropout draws: replayed
    argv = lambda out: _flags(encoder=dense_checkpoint, image_root=shapes_world, output_dir=out,  # noqa: E731
                              queries_file=f"{shapes_world}/m2kr/shapes_{{split}}.jsonl",
                              passages_file=f"{shapes_world}/m2kr/shapes_passages_{{split}}.jsonl",
                              features="live", variants="ret", cell=cell, layer_strategy="all", batch_size=32,
                              max_steps=4, eval_every=2, max_val_queries=16, warmup_steps=1, num_workers=0, seed=0)
    assert_resume_replays_the_run("retriever.ret.train", argv, tmp_path, monkeypatch, run_dir=lambda out: out / "ret")


def test_cir_retriever_resumes_exactly(shapes_world, dense_checkpoint, tmp_path, monkeypatch):
    from tests.cir.test_cir_distributed import SMALL

    argv = lambda out: _flags(cirr_root=shapes_world / "cirr", dense_checkpoint=dense_checkpoint, output_dir=out,  # noqa: E731
                              model=json.dumps(SMALL), objective="q2t", max_triplets=24, batch_size=8, epochs=2,
                              lr=2e-3, warmup_steps=1, num_workers=0, cache_dir=tmp_path / "features", seed=0)
    assert_resume_replays_the_run("cir.train", argv, tmp_path, monkeypatch)


def test_mtst_generator_resumes_exactly(shapes_world, dense_checkpoint, tmp_path, monkeypatch):
    # killed after the second checkpoint (the first ends the LM phase): the rerun skips that phase and goes on with
    # the Q-Former from step 2
    argv = lambda out: _flags(cirr_root=shapes_world / "cirr", dense_checkpoint=dense_checkpoint,  # noqa: E731
                              data_json=shapes_world / "dataset_shapes.json", output_dir=out, lm_steps=2,
                              lm_batch_size=8, steps=4, batch_size=8, lr=2e-3, warmup_steps=1, eval_every=2,
                              eval_pairs=4, test_split="", max_new_tokens=4, num_query_tokens=4, num_workers=0,
                              cache_dir=tmp_path / "features", seed=0)
    assert_resume_replays_the_run("cir.train_mtst", argv, tmp_path, monkeypatch, kill_at_save=2,
                                  extra_optimizer_steps=2)
