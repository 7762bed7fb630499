"""The retriever pipeline on the tiny world: pseudo queries → data → stage 1 (beats chance) → stage 2 → merge →
stage 3 → test evaluation, all through the entry points; and a checkpoint of another stage is refused."""
from __future__ import annotations

import json

import pytest

from core.errors import InputError

T5 = '{"d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_decoder_layers": 2, "num_heads": 4, "dropout_rate": 0.0}'


@pytest.fixture(scope="module")
def pipeline(comgtir_data, codes_path, tmp_path_factory):
    from retriever.generative import merge, train

    codes, _, _ = codes_path
    out = tmp_path_factory.mktemp("comgtir")
    common = ["--data_dir", str(comgtir_data), "--codes", str(codes), "--batch_size", "64", "--num_beams", "10",
              "--max_val_queries", "150", "--eval_every", "1"]
    s1 = train.main(["--stage", "seqid", "--output_dir", str(out / "s1"), "--model", T5, "--epochs", "5",
                     "--lr", "3e-3", "--warmup_steps", "20", *common])
    s2 = train.main(["--stage", "setid", "--init", str(s1), "--output_dir", str(out / "s2"), "--epochs", "1", *common])
    merge.main(["--stage1", str(s1), "--stage2", str(s2), "--output", str(out / "merged")])
    s3 = train.main(["--stage", "unified", "--init", str(out / "merged"), "--output_dir", str(out / "s3"),
                     "--epochs", "1", "--lr", "1e-3", *common])
    return out, s1, s2, s3, codes


def test_stage1_beats_chance(pipeline):
    from core.checkpoint import read_meta

    _, s1, _, _, _ = pipeline
    val = read_meta(s1, "comgtir")["val"]
    assert val["R@10"] > 2 * 100 * 10 / 60, val  # chance R@10 over 60 validation images is 16.7%


def test_dual_identifier_evaluation_returns_valid_gallery_ids(pipeline, dense_run):
    from retriever.generative import evaluate
    from rqvae.codes import Identifiers

    out, _, _, s3, codes = pipeline
    report = evaluate.main(["--checkpoint", str(s3), "--codes", str(codes), "--emb_dir", str(dense_run / "emb"),
                            "--num_beams", "10", "--guidance", "1.0", "--max_queries", "100",
                            "--output_dir", str(out / "eval"), "--summary", str(out / "results.json")])
    gallery = set(json.loads((dense_run / "emb" / "image_test_ids.json").read_text()))
    ids = Identifiers(codes)
    rows = [json.loads(line) for line in (out / "eval" / "candidates.jsonl").read_text().splitlines()]
    assert len(rows) == 100
    for row in rows:
        ranked = row["ranked"]
        assert ranked and set(ranked) <= gallery and len(set(ranked)) == len(ranked)
        assert all(ids.split[str(i)] == "test" for i in ranked)
    for k in (1, 5, 10):  # the reported recall is the stored rankings' recall
        assert report[f"R@{k}"] == pytest.approx(100 * sum(r["imgid"] in r["ranked"][:k] for r in rows) / len(rows))
    assert "dual-id" in json.loads((out / "results.json").read_text())["comgtir"]


def test_checkpoint_of_another_stage_is_refused(pipeline, codes_path):
    from retriever.generative.model import load_retriever

    _, _, _, _, _ = pipeline
    _, _, rq = codes_path
    with pytest.raises(InputError, match="stage"):
        load_retriever(rq / "rqvae" / "checkpoint-best")


@pytest.mark.parametrize("prior", ["token", "prefix", "both"])
def test_every_prior_mode_runs_on_validation(pipeline, dense_run, prior):
    """The set identifier's guidance in each form, on the validation split, through the evaluation entry point."""
    from retriever.generative import evaluate
    from rqvae.codes import Identifiers

    out, _, _, s3, codes = pipeline
    report = evaluate.main(["--checkpoint", str(s3), "--codes", str(codes), "--emb_dir", str(dense_run / "emb"),
                            "--split", "val", "--num_beams", "10", "--guidance", "1.0", "--prior", prior,
                            "--prefix_top", "20", "--max_queries", "40", "--output_dir", str(out / f"val-{prior}")])
    ids = Identifiers(codes)
    for line in (out / f"val-{prior}" / "candidates.jsonl").read_text().splitlines():
        ranked = json.loads(line)["ranked"]
        assert ranked and all(ids.split[str(i)] == "val" for i in ranked)
    assert json.loads((out / f"val-{prior}" / "metrics.json").read_text())["prior"] == prior
    assert 0 <= report["R@1"] <= report["R@10"] <= 100
