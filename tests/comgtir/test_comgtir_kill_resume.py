"""The generative retriever's trainer resumes exactly after a real SIGKILL (tests/resume.py)."""
from __future__ import annotations

from tests.comgtir.test_comgtir_retriever import T5
from tests.resume import assert_resume_replays_the_run


def test_retriever_stage_resumes_exactly(comgtir_data, codes_path, tmp_path, monkeypatch):
    codes, _, _ = codes_path
    argv = lambda out: ["--stage", "seqid", "--output_dir", str(out), "--model", T5, "--data_dir", str(comgtir_data),  # noqa: E731
                        "--codes", str(codes), "--batch_size", "256", "--epochs", "2", "--eval_every", "1",
                        "--num_beams", "2", "--max_val_queries", "10", "--warmup_steps", "2", "--seed", "0"]
    assert_resume_replays_the_run("retriever.generative.train", argv, tmp_path, monkeypatch)
