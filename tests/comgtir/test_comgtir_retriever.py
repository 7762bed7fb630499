"""The retriever pipeline on the tiny world: pseudo queries → data → stage 1 (beats chance) → stage 2 (which leaves
the decoder as stage 1 left it, so it needs no merge before stage 3) → stage 3 → test evaluation, all through the
entry points; and a checkpoint of another stage is refused."""
from __future__ import annotations

import json

import pytest
import torch

from core.errors import InputError

T5 = '{"d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_decoder_layers": 2, "num_heads": 4, "dropout_rate": 0.0}'


@pytest.fixture(scope="module")
def pipeline(comgtir_data, codes_path, tmp_path_factory):
    from retriever.generative import train

    codes, _, _ = codes_path
    out = tmp_path_factory.mktemp("comgtir")
    common = ["--data_dir", str(comgtir_data), "--codes", str(codes), "--batch_size", "64", "--num_beams", "10",
              "--max_val_queries", "150", "--eval_every", "1"]
    s1 = train.main(["--stage", "seqid", "--output_dir", str(out / "s1"), "--model", T5, "--epochs", "5",
                     "--lr", "3e-3", "--warmup_steps", "20", *common])
    s2 = train.main(["--stage", "setid", "--init", str(s1), "--output_dir", str(out / "s2"), "--epochs", "1", *common])
    s3 = train.main(["--stage", "unified", "--init", str(s2), "--output_dir", str(out / "s3"),
                     "--epochs", "1", "--lr", "1e-3", *common])
    return out, s1, s2, s3, codes


def test_stage1_beats_chance(pipeline):
    from core.checkpoint import read_meta

    _, s1, _, _, _ = pipeline
    val = read_meta(s1, "comgtir")["val"]
    assert val["R@10"] > 2 * 100 * 10 / 60, val  # chance R@10 over 60 validation images is 16.7%


def test_stage2_changes_only_the_encoder_and_the_set_head(pipeline):
    """So the stage-2 checkpoint already is the original's merged model (its `unified_encoder` step): stage-1 decoder,
    embeddings and LM head, stage-2 encoder and set head."""
    from retriever.generative.model import load_retriever

    _, s1, s2, _, _ = pipeline
    first, second = load_retriever(s1)[0].state_dict(), load_retriever(s2)[0].state_dict()
    assert first.keys() == second.keys()
    changed = {name for name in first if not torch.equal(first[name], second[name])}
    trained = ("t5.encoder.block.", "t5.encoder.final_layer_norm.", "set_head.")
    assert changed and all(name.startswith(trained) for name in changed), sorted(changed)
    assert any(name.startswith("set_head.") for name in changed) and any(name.startswith("t5.encoder.block.")
                                                                        for name in changed)


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
