"""ReT end to end on the tiny Shapes world: cache → train (beats chance) → index → search → evaluate → results.json."""
from __future__ import annotations

import json

import pytest

from retriever.ret import cache, evaluate, index, search, train

LAYERS = ["--layer_strategy", "all", "--single_layer_strategy", "last"]  # the test towers have 2 + 2 layers
CELL = '{"hidden_size": 32, "head_dim": 16, "dropout": 0.0, "attention_dropout": 0.0}'


@pytest.fixture(scope="module")
def ret_run(shapes_world, dense_checkpoint, tmp_path_factory):
    run = tmp_path_factory.mktemp("ret")
    data = [f"--queries_file={shapes_world}/m2kr/shapes_{{split}}.jsonl",
            f"--passages_file={shapes_world}/m2kr/shapes_passages_{{split}}.jsonl", "--image_root", str(shapes_world)]
    cache.main(["--encoder", str(dense_checkpoint), *data, "--output_dir", str(run / "cache")])
    val = train.main(["--encoder", str(dense_checkpoint), *data, "--cache_dir", str(run / "cache"),
                      "--output_dir", str(run), "--variants", "ret,text-only", "--cell", CELL, *LAYERS, "--batch_size", "64",
                      "--epochs", "3", "--lr", "3e-3", "--warmup_steps", "5", "--seed", "0"])
    return run, data, val


def test_train_beats_chance_and_a_finished_variant_is_not_retrained(ret_run, shapes_world, dense_checkpoint, capsys):
    run, data, val = ret_run
    n_passages = sum(1 for _ in (shapes_world / "m2kr/shapes_passages_val.jsonl").open())
    chance_r10 = 100 * 10 / n_passages
    assert val["ret"]["R@10"] > 3 * chance_r10, (val, chance_r10)
    # a rerun of a finished variant does no work (no file of the variant is rewritten) and reports the same figures
    written = {p: p.stat().st_mtime_ns for p in (run / "ret").rglob("*") if p.is_file()}
    capsys.readouterr()
    again = train.main(["--encoder", str(dense_checkpoint), *data, "--cache_dir", str(run / "cache"),
                        "--output_dir", str(run), "--variants", "ret", "--cell", CELL, *LAYERS, "--batch_size", "64",
                        "--epochs", "3", "--lr", "3e-3", "--warmup_steps", "5", "--seed", "0"])
    assert again["ret"] == val["ret"]
    assert "[ret] already trained" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (run / "ret").rglob("*") if p.is_file()} == written


def test_index_search_evaluate(ret_run, dense_checkpoint, tmp_path):
    run, data, _ = ret_run
    passages = [a for a in data if a.startswith("--passages_file")]
    queries = [a for a in data if a.startswith("--queries_file")]
    root = ["--image_root", data[-1]]
    common = ["--checkpoint", str(run / "ret/checkpoint-best"), "--cache_dir", str(run / "cache")]
    index.main([*common, *passages, *root, "--output_dir", str(run / "index"), "--nlist", "16", "--pq_bits", "6"])
    search.main([*common, *queries, *root, "--index_dir", str(run / "index"), "--per_token", "64",
                 "--output_file", str(run / "search/rankings.jsonl")])
    summary = tmp_path / "results.json"
    rows = evaluate.main(["--run_dir", str(run), "--variants", "ret,text-only", *queries, *passages, *root,
                          "--cache_dir", str(run / "cache"), "--index_dir", str(run / "index"),
                          "--rankings_file", str(run / "search/rankings.jsonl"), "--output_dir", str(run / "eval"),
                          "--summary", str(summary)])
    assert set(rows) == {"ret", "text-only", "index"}
    assert rows["index"]["top10_agreement"] >= 95.0
    saved = json.loads(summary.read_text())["ret"]
    assert saved["ret"]["R@10"] == rows["ret"]["R@10"] and "top10_agreement" in saved["index"]
